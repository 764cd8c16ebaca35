"""Tests for the independent digit classifier and its Fréchet distance."""

import numpy as np
import pytest

from nextstep_jax.data.builtin import digits
from nextstep_jax.evaluate import digits_eval


@pytest.fixture(scope='module')
def evaluator() -> digits_eval.DigitsEvaluator:
  return digits_eval.DigitsEvaluator.fit(size=32, seed=0)


@pytest.fixture(scope='module')
def test_split() -> tuple[np.ndarray, np.ndarray, list[str]]:
  return digits.load_split('test', 32)


def test_classifier_is_accurate_on_the_real_test_split(evaluator, test_split):
  images, labels, _ = test_split
  predictions = evaluator.predict(images)
  assert predictions.shape == labels.shape and predictions.dtype == np.int64
  assert evaluator.accuracy(images, labels) >= 0.95


def test_fit_is_deterministic(evaluator, test_split):
  images = test_split[0][:50]
  again = digits_eval.DigitsEvaluator.fit(size=32, seed=0)
  np.testing.assert_array_equal(again.features(images), evaluator.features(images))


def test_frechet_separates_real_from_noise(evaluator, test_split):
  images = test_split[0]
  train_images = digits.load_split('train', 32)[0]
  noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
  features = evaluator.features(images)
  assert features.shape == (len(images), digits_eval.HIDDEN_SIZES[-1])
  real = evaluator.frechet_distance(images, train_images)
  assert real * 20 < evaluator.frechet_distance(images, noise)
  assert evaluator.frechet_distance(images, images) == pytest.approx(0.0, abs=1e-6)


def test_score(evaluator, test_split):
  images, labels, captions = test_split
  result = evaluator.score(images, captions)
  assert result['n'] == len(images)
  assert result['accuracy'] == evaluator.accuracy(images, labels)
  assert result['frechet'] == pytest.approx(0.0, abs=1e-6)
  shuffled = [captions[(i + 1) % len(captions)] for i in range(len(captions))]
  assert evaluator.score(images, shuffled)['accuracy'] < 0.3


def test_bad_input_raises_clear_errors(evaluator):
  with pytest.raises(ValueError, match=r'\(n, 32, 32, 3\)'):
    evaluator.predict(np.zeros((2, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    evaluator.features(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match='at least 2'):
    evaluator.frechet_distance(
      np.zeros((1, 32, 32, 3), np.uint8), np.zeros((5, 32, 32, 3), np.uint8)
    )
  with pytest.raises(ValueError, match='labels'):
    evaluator.accuracy(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3))
