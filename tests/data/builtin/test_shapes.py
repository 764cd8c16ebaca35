"""Tests for the procedural shapes world."""

import itertools

import numpy as np
import pytest

from nextstep_jax.data.builtin import shapes


def _pairs_in(text: str) -> set[tuple[str, str]]:
  return set(shapes.parse_caption(text).objects)


def test_palette_is_well_separated_and_heldout_leaves_every_attribute_in_training():
  assert len(shapes.COLORS) >= 6
  for a, b in itertools.combinations(shapes.COLORS.values(), 2):
    assert np.linalg.norm(np.subtract(a, b)) >= 250
  all_pairs = set(itertools.product(shapes.COLORS, shapes.SHAPES))
  assert shapes.HELDOUT_PAIRS < all_pairs
  assert len(shapes.HELDOUT_PAIRS) == round(len(all_pairs) / 6)
  train_pairs = all_pairs - shapes.HELDOUT_PAIRS
  assert {c for c, _ in train_pairs} == set(shapes.COLORS)
  assert {s for _, s in train_pairs} == set(shapes.SHAPES)


@pytest.mark.parametrize('size', [32, 64])
def test_make_dataset_is_deterministic_and_well_formed(size):
  images, captions = shapes.make_dataset(64, seed=3, size=size)
  again_images, again_captions = shapes.make_dataset(64, seed=3, size=size)
  other_images, _ = shapes.make_dataset(64, seed=4, size=size)
  assert images.shape == (64, size, size, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, again_images)
  assert captions == again_captions
  assert not np.array_equal(images, other_images)
  assert {len(shapes.parse_caption(c).objects) for c in captions} == {1, 2}
  assert (images[:, 0, 0] == 0).all()  # Black background at the border.


def test_three_objects_and_probs():
  _, captions = shapes.make_dataset(40, seed=0, num_objects=(1, 3), probs=(0.0, 1.0))
  assert all(len(shapes.parse_caption(c).objects) == 3 for c in captions)


def test_training_never_shows_heldout_pairs():
  _, captions = shapes.make_dataset(3000, seed=0, num_objects=(1, 2, 3))
  seen = set().union(*(_pairs_in(c) for c in captions))
  assert not seen & shapes.HELDOUT_PAIRS
  assert seen == set(itertools.product(shapes.COLORS, shapes.SHAPES)) - shapes.HELDOUT_PAIRS


@pytest.mark.parametrize('num_objects', [1, 2, 3])
def test_heldout_prompts_always_contain_a_heldout_pair(num_objects):
  heldout = shapes.eval_prompts(200, num_objects, 'heldout', seed=1)
  assert all(len(_pairs_in(c) & shapes.HELDOUT_PAIRS) == 1 for c in heldout)
  seen = shapes.eval_prompts(200, num_objects, 'seen', seed=1)
  assert not any(_pairs_in(c) & shapes.HELDOUT_PAIRS for c in seen)
  assert shapes.eval_prompts(20, num_objects, 'seen', seed=1) == seen[:20]
  _, captions = shapes.make_dataset(50, seed=2, split='heldout', num_objects=(num_objects,))
  assert all(_pairs_in(c) & shapes.HELDOUT_PAIRS for c in captions)


def test_caption_parse_round_trip():
  rng = np.random.default_rng(0)
  for num_objects in (1, 2, 3):
    for _ in range(100):
      scene = shapes.sample_scene(rng, num_objects)
      spec = shapes.parse_caption(shapes.caption(scene))
      assert spec.objects == tuple((o.color, o.shape) for o in scene.objects)
      assert spec.relation == scene.relation
      assert shapes.format_prompt(spec) == shapes.caption(scene)


def test_caption_grammar_examples():
  assert shapes.parse_caption('a red circle') == shapes.PromptSpec((('red', 'circle'),), None)
  assert shapes.parse_caption(' A red circle to the left of a blue square. ') == shapes.PromptSpec(
    (('red', 'circle'), ('blue', 'square')), 'to the left of'
  )
  assert shapes.parse_caption('a red circle, a blue square and a green triangle') == (
    shapes.PromptSpec((('red', 'circle'), ('blue', 'square'), ('green', 'triangle')), None)
  )


@pytest.mark.parametrize(
  'text, message',
  [
    ('a orange circle', 'unknown colour'),
    ('a red hexagon', 'unknown shape'),
    ('a red circle near a blue square', 'cannot parse'),
    ('', 'cannot parse'),
  ],
)
def test_parse_caption_rejects_bad_text(text, message):
  with pytest.raises(ValueError, match=f'(?i){message}'):
    shapes.parse_caption(text)


@pytest.mark.parametrize('size', [32, 64])
def test_two_object_relation_is_unambiguous_and_objects_do_not_overlap(size):
  rng = np.random.default_rng(5)
  for num_objects in (2, 3):
    for _ in range(200):
      scene = shapes.sample_scene(rng, num_objects, size=size)
      for obj in scene.objects:
        assert size / 2 - obj.size / 2 >= abs(obj.cx - size / 2) - 1e-9
        assert size / 2 - obj.size / 2 >= abs(obj.cy - size / 2) - 1e-9
      for a, b in itertools.combinations(scene.objects, 2):
        assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= (a.size + b.size) / 2 + size / 16 - 1e-9
      if num_objects == 2:
        first, second = scene.objects
        dx, dy = abs(first.cx - second.cx), abs(first.cy - second.cy)
        along, across = (dx, dy) if scene.relation in shapes.RELATIONS[:2] else (dy, dx)
        assert across <= shapes.MAX_ACROSS_RATIO * along + 1e-9
        assert shapes.relation_holds((first.cx, first.cy), (second.cx, second.cy), scene.relation)


def test_render_draws_each_object_in_its_colour():
  scene = shapes.Scene(
    (
      shapes.ShapeObject('red', 'square', 8, 8, 8),
      shapes.ShapeObject('blue', 'circle', 24, 24, 10),
    ),
    'above',
  )
  image = shapes.render(scene, 32)
  np.testing.assert_array_equal(image[4:12, 4:12], np.broadcast_to((255, 0, 0), (8, 8, 3)))
  np.testing.assert_array_equal(image[24, 24], (0, 0, 255))
  assert (image.reshape(-1, 3) == (255, 0, 0)).all(axis=1).sum() == 64
  assert shapes.caption(scene) == 'a red square above a blue circle'


@pytest.mark.parametrize(
  'call, message',
  [
    (
      lambda: shapes.render(
        shapes.Scene((shapes.ShapeObject('red', 'circle', 3, 16, 10),), None), 32
      ),
      'does not fit',
    ),
    (
      lambda: shapes.render(
        shapes.Scene((shapes.ShapeObject('teal', 'circle', 16, 16, 10),), None), 32
      ),
      'unknown colour',
    ),
    (lambda: shapes.render(shapes.Scene((), None), 8), 'image size'),
    (lambda: shapes.sample_scene(np.random.default_rng(0), 4), 'num_objects'),
    (lambda: shapes.sample_scene(np.random.default_rng(0), 1, split='test'), 'split'),
    (lambda: shapes.make_dataset(4, 0, probs=(1.0,)), 'probs'),
    (lambda: shapes.eval_prompts(4, 1, 'train', 0), 'evaluation split'),
    (lambda: shapes.format_prompt(shapes.PromptSpec((('red', 'circle'),) * 2, None)), 'relation'),
    (lambda: shapes.relation_holds((0, 0), (1, 1), 'near'), 'relation'),
  ],
)
def test_bad_input_raises_clear_errors(call, message):
  with pytest.raises(ValueError, match=f'(?i){message}'):
    call()


def test_new_concepts_stay_out_of_the_base_world():
  new_colors, new_shapes = set(shapes.NEW_COLORS), set(shapes.NEW_SHAPES)
  assert not new_colors & set(shapes.COLORS) and not new_shapes & set(shapes.SHAPES)
  _, captions = shapes.make_dataset(500, seed=0, num_objects=(1, 2, 3))
  prompts = shapes.eval_prompts(200, 2, 'seen', 0) + shapes.eval_prompts(200, 2, 'heldout', 0)
  words = {w for text in captions + prompts for w in text.replace(',', ' ').split()}
  assert not words & (new_colors | new_shapes)
  with pytest.raises(ValueError, match="concepts='extended'"):
    shapes.parse_caption('a red diamond')


def test_new_concept_dataset_mixes_new_pairs_with_replay():
  images, captions = shapes.make_new_concept_dataset(400, seed=1, size=32, new_fraction=0.5)
  specs = [shapes.parse_caption(c, 'extended') for c in captions]
  new = [s for s in specs if any(p in shapes.NEW_CONCEPT_PAIRS for p in s.objects)]
  assert all(len(s.objects) == 1 for s in new)
  assert 150 < len(new) < 250
  assert {len(s.objects) for s in specs if s not in new} == {1, 2}
  assert images.shape == (400, 32, 32, 3)
  again = shapes.make_new_concept_dataset(400, seed=1, size=32, new_fraction=0.5)
  np.testing.assert_array_equal(again[0], images)
  prompts = shapes.eval_prompts(20, 1, 'new', 0)
  assert {shapes.parse_caption(p, 'extended').objects[0] for p in prompts} == set(
    shapes.NEW_CONCEPT_PAIRS
  )
