"""Tests for the shapes-world detector and prompt scorer."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image
from PIL import ImageFilter

from nextstep_jax.data.builtin import shapes
from nextstep_jax.evaluate import shapes_eval

_OPPOSITE = {
  'to the left of': 'to the right of',
  'to the right of': 'to the left of',
  'above': 'below',
  'below': 'above',
}


def _scenes(num: int, num_objects: int, size: int, seed: int = 0) -> list[shapes.Scene]:
  rng = np.random.default_rng(seed)
  return [shapes.sample_scene(rng, num_objects, size=size) for _ in range(num)]


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('num_objects', [1, 2, 3])
@pytest.mark.parametrize('split', ['train', 'heldout'])
def test_real_renders_score_perfectly(size, num_objects, split):
  num = 300 if num_objects < 3 else 100
  images, captions = shapes.make_dataset(
    num, seed=size + num_objects, size=size, split=split, num_objects=(num_objects,)
  )
  result = shapes_eval.score(images, captions)
  assert result['n'] == num
  for key in ('accuracy', 'color', 'shape', 'count'):
    assert result[key] == 1.0, (key, result)
  assert result['relation'] == 1.0 if num_objects == 2 else math.isnan(result['relation'])


@pytest.mark.parametrize('size', [32, 64])
def test_mildly_blurred_renders_still_score_perfectly(size):
  images, captions = shapes.make_dataset(100, seed=1, size=size)
  blur = ImageFilter.GaussianBlur(0.8 * size / 32)
  blurred = np.stack([np.asarray(Image.fromarray(image).filter(blur)) for image in images])
  assert shapes_eval.score(blurred, captions)['accuracy'] == 1.0


def test_detects_objects_with_positions():
  scene = shapes.Scene(
    (
      shapes.ShapeObject('green', 'triangle', 10, 20, 12),
      shapes.ShapeObject('magenta', 'circle', 24, 8, 10),
    ),
    'below',
  )
  found = sorted(shapes_eval.detect_objects(shapes.render(scene, 32)), key=lambda o: o.color)
  assert [(o.color, o.shape) for o in found] == [('green', 'triangle'), ('magenta', 'circle')]
  assert abs(found[1].cx - 24) < 0.5 and abs(found[1].cy - 8) < 0.5
  assert abs(found[0].cx - 10) < 0.5 and found[0].cy > 20  # A triangle's mass sits low.


@pytest.mark.parametrize('size', [32, 64])
def test_rejects_swapped_colours_and_wrong_relation(size):
  for scene in _scenes(100, 2, size):
    first, second = scene.objects
    if first.color != second.color:
      swapped = shapes.Scene(
        (
          dataclasses.replace(first, color=second.color),
          dataclasses.replace(second, color=first.color),
        ),
        scene.relation,
      )
      assert not shapes_eval.evaluate_image(shapes.render(swapped, size), shapes.caption(scene))[
        'correct'
      ]
    wrong = shapes.caption(dataclasses.replace(scene, relation=_OPPOSITE[scene.relation]))
    result = shapes_eval.evaluate_image(shapes.render(scene, size), wrong)
    assert result['count'] and result['color'] and result['shape']
    assert not result['relation'] and not result['correct']


def test_rejects_wrong_shape_and_extra_object():
  other_shape = {'circle': 'square', 'square': 'triangle', 'triangle': 'circle'}
  for scene in _scenes(100, 2, 32, seed=1):
    first = scene.objects[0]
    changed = shapes.Scene(
      (dataclasses.replace(first, shape=other_shape[first.shape]), scene.objects[1]), scene.relation
    )
    result = shapes_eval.evaluate_image(shapes.render(changed, 32), shapes.caption(scene))
    assert not result['correct']
    image = shapes.render(scene, 32)
    result = shapes_eval.evaluate_image(image, f'a {first.color} {first.shape}')
    assert not result['count'] and not result['correct']


@pytest.mark.parametrize('size', [32, 64])
def test_rejects_blank_and_noise_images(size):
  rng = np.random.default_rng(0)
  captions = shapes.eval_prompts(50, 1, 'seen', seed=0) + shapes.eval_prompts(50, 2, 'seen', seed=0)
  blank = np.zeros((len(captions), size, size, 3), np.uint8)
  noise = rng.integers(0, 256, size=blank.shape, dtype=np.uint8)
  for images in (blank, noise):
    result = shapes_eval.score(images, captions)
    assert result['accuracy'] == 0.0 and result['count'] == 0.0, result
  white = shapes_eval.score(np.full_like(blank, 255), captions)  # One object of no named colour.
  assert white['accuracy'] == 0.0 and white['color'] == 0.0, white


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match='square RGB image'):
    shapes_eval.evaluate_image(np.zeros((32, 16, 3), np.uint8), 'a red circle')
  with pytest.raises(ValueError, match='uint8'):
    shapes_eval.evaluate_image(np.zeros((32, 32, 3), np.float32), 'a red circle')
  with pytest.raises(ValueError, match='Cannot parse caption'):
    shapes_eval.evaluate_image(np.zeros((32, 32, 3), np.uint8), 'a red blob')
  with pytest.raises(ValueError, match='captions'):
    shapes_eval.score(np.zeros((2, 32, 32, 3), np.uint8), ['a red circle'])


@pytest.mark.parametrize('size', [32, 64])
def test_new_concepts_on_real_renders_score_perfectly_in_extended_mode(size):
  images, captions = shapes.make_new_concept_dataset(400, seed=size, size=size, new_fraction=1.0)
  assert {shapes.parse_caption(c, 'extended').objects[0] for c in captions} == set(
    shapes.NEW_CONCEPT_PAIRS
  )
  result = shapes_eval.score(images, captions, 'extended')
  assert result['accuracy'] == 1.0, result
  # The extended detector still reads every base render (1-3 objects) correctly.
  for num_objects in (1, 2, 3):
    base_images, base_captions = shapes.make_dataset(
      150, seed=size + num_objects, size=size, num_objects=(num_objects,)
    )
    assert shapes_eval.score(base_images, base_captions, 'extended')['accuracy'] == 1.0


@pytest.mark.parametrize('size', [32, 64])
def test_mildly_blurred_new_concepts_still_score_perfectly(size):
  images, captions = shapes.make_new_concept_dataset(150, seed=3, size=size, new_fraction=1.0)
  blur = ImageFilter.GaussianBlur(0.8 * size / 32)
  blurred = np.stack([np.asarray(Image.fromarray(image).filter(blur)) for image in images])
  assert shapes_eval.score(blurred, captions, 'extended')['accuracy'] == 1.0


def test_new_concepts_are_told_apart_from_their_neighbours():
  scene = lambda color, shape: shapes.Scene(
    (shapes.ShapeObject(color, shape, 16.0, 16.0, 12.0),), None
  )
  orange_circle = shapes.render(scene('orange', 'circle'), 32, 'extended')
  assert shapes_eval.evaluate_image(orange_circle, 'a orange circle', 'extended')['correct']
  assert not shapes_eval.evaluate_image(orange_circle, 'a red circle', 'extended')['color']
  assert not shapes_eval.evaluate_image(orange_circle, 'a yellow circle', 'extended')['color']
  red_diamond = shapes.render(scene('red', 'diamond'), 32, 'extended')
  assert shapes_eval.evaluate_image(red_diamond, 'a red diamond', 'extended')['correct']
  assert not shapes_eval.evaluate_image(red_diamond, 'a red circle', 'extended')['shape']
  assert not shapes_eval.evaluate_image(red_diamond, 'a red square', 'extended')['shape']
  # The base detector knows neither concept: the prompt is refused, the image read as base ones.
  with pytest.raises(ValueError, match='orange'):
    shapes_eval.evaluate_image(orange_circle, 'a orange circle')
  assert shapes_eval.detect_objects(red_diamond)[0].shape == 'circle'
