"""Scores a trained text-to-image sampler on the built-in evaluators (one sample per prompt).

shapes: prompt accuracy (colour, shape, relation, count, whole prompt) on seen one-object,
seen two-object and held-out prompts. digits: accuracy of the independent classifier on the
prompted digit and the Fréchet distance in its feature space against the real test split.
"""

import math

import numpy as np

from nextstep_jax.data.builtin import shapes
from nextstep_jax.evaluate import shapes_eval


def shapes_suites(num_prompts: int, seed: int = 1) -> dict[str, list[str]]:
  """Evaluation prompt sets: seen one-object, seen two-object, held-out (1 and 2 objects)."""
  half = num_prompts // 2
  return {
    'seen_one': shapes.eval_prompts(num_prompts, 1, 'seen', seed),
    'seen_two': shapes.eval_prompts(num_prompts, 2, 'seen', seed),
    'heldout': shapes.eval_prompts(half, 1, 'heldout', seed)
    + shapes.eval_prompts(num_prompts - half, 2, 'heldout', seed),
  }


def evaluate_shapes(sampler, num_prompts: int, seed: int = 1) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns ({suite: score dict}, {suite: images uint8}) for `sampler(captions, seeds)`."""
  scores, images = {}, {}
  for suite, prompts in shapes_suites(num_prompts, seed).items():
    images[suite] = sampler(prompts, list(range(len(prompts))))
    scores[suite] = shapes_eval.score(images[suite], prompts)
  return scores, images


def score_workdir(workdir: str, num_prompts: int, seed: int = 1) -> dict:
  """Headline shapes accuracies of a training run's latest checkpoint (`num_prompts` per suite)."""
  from nextstep_jax.sampling import pipeline  # loads jax models

  scores, _ = evaluate_shapes(pipeline.TextToImage.from_workdir(workdir), num_prompts, seed)
  return {**json_safe(headline('shapes', scores)), 'evaluator_prompts_per_suite': num_prompts}


def evaluate_digits(sampler, num_prompts: int, size: int, seed: int = 1) -> tuple[dict, np.ndarray]:
  """Returns (score dict with accuracy/frechet/n, generated images uint8)."""
  from nextstep_jax.data.builtin import digits  # sklearn import
  from nextstep_jax.evaluate import digits_eval

  prompts = digits.eval_prompts(num_prompts, seed)
  images = sampler(prompts, list(range(len(prompts))))
  return digits_eval.DigitsEvaluator.fit(size=size).score(images, prompts), images


def headline(dataset: str, scores: dict) -> dict[str, float]:
  """The benchmark's headline figures from `evaluate_*` scores."""
  if dataset == 'shapes':
    return {
      'shapes_seen_accuracy_one': scores['seen_one']['accuracy'],
      'shapes_seen_accuracy_two': scores['seen_two']['accuracy'],
      'shapes_heldout_accuracy': scores['heldout']['accuracy'],
    }
  return {'digits_accuracy': scores['accuracy'], 'digits_frechet': scores['frechet']}


def json_safe(value):
  """`value` with NaN/Inf floats replaced by None (strict JSON), recursively."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value
