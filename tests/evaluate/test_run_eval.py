"""Evaluation runner: suites, headline keys, strict-JSON output, scoring of a perfect sampler."""

import json
import math

import numpy as np

from nextstep_jax.data.builtin import shapes
from nextstep_jax.evaluate import run_eval


def test_suites_have_requested_sizes_and_kinds():
  suites = run_eval.shapes_suites(10)
  assert {k: len(v) for k, v in suites.items()} == {'seen_one': 10, 'seen_two': 10, 'heldout': 10}
  assert all(len(shapes.parse_caption(p).objects) == 1 for p in suites['seen_one'])
  assert all(len(shapes.parse_caption(p).objects) == 2 for p in suites['seen_two'])
  for prompt in suites['heldout']:
    assert set(shapes.parse_caption(prompt).objects) & shapes.HELDOUT_PAIRS


def test_a_sampler_drawing_the_truth_scores_one_and_noise_scores_zero():
  def true_sampler(captions, seeds):
    del seeds
    rng = np.random.default_rng(0)
    out = []
    for caption in captions:  # Rejection-sample a training scene whose caption matches.
      spec = shapes.parse_caption(caption)
      split = 'heldout' if set(spec.objects) & shapes.HELDOUT_PAIRS else 'train'
      while True:
        scene = shapes.sample_scene(rng, len(spec.objects), split=split)
        if shapes.caption(scene) == caption:
          out.append(shapes.render(scene, 32))
          break
    return np.stack(out)

  def noise_sampler(captions, seeds):
    return np.random.default_rng(0).integers(0, 256, (len(captions), 32, 32, 3), dtype=np.uint8)

  scores, images = run_eval.evaluate_shapes(true_sampler, 3)
  assert images['seen_two'].shape == (3, 32, 32, 3)
  assert run_eval.headline('shapes', scores) == {
    'shapes_seen_accuracy_one': 1.0,
    'shapes_seen_accuracy_two': 1.0,
    'shapes_heldout_accuracy': 1.0,
  }
  noise_scores, _ = run_eval.evaluate_shapes(noise_sampler, 3)
  assert all(v == 0.0 for v in run_eval.headline('shapes', noise_scores).values())


def test_json_safe_replaces_non_finite_numbers():
  value = {'a': float('nan'), 'b': [np.float32(1.5), math.inf], 'c': 'x'}
  assert json.loads(json.dumps(run_eval.json_safe(value), allow_nan=False)) == {
    'a': None,
    'b': [1.5, None],
    'c': 'x',
  }
