"""Independent digit classifier for generated digit images, and a Fréchet distance on its features.

An sklearn MLP (two ReLU hidden layers) is trained on the real train split plus augmented copies
(`digits.make_dataset`) of it, from images reduced to grey 16x16 in [0, 1]. Its last hidden layer
gives the features for the Fréchet distance (FID-style, Gaussian fits). Nothing is cached on disk.
"""

import warnings

import numpy as np
import threadpoolctl
from PIL import Image
from scipy import linalg
from sklearn import exceptions
from sklearn import neural_network

from nextstep_jax.data.builtin import digits

FEATURE_SIDE = 16
HIDDEN_SIZES = (128, 64)
AUGMENTED_COPIES = 2  # Augmented examples per real training image added to the training set.
_SQRTM_EPS = 1e-6


def _check_images(images: np.ndarray, size: int) -> None:
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f'Expected images (n, {size}, {size}, 3), got shape {images.shape}.')
  if images.dtype != np.uint8:
    raise ValueError(f'Expected uint8 images, got {images.dtype}.')


def _inputs(images: np.ndarray) -> np.ndarray:
  """uint8 (n, S, S, 3) -> float32 (n, FEATURE_SIDE**2): grey, box-downsampled, in [0, 1]."""
  grey = images.astype(np.float32).mean(axis=-1) / 255.0
  small = [
    np.asarray(Image.fromarray(g).resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BOX))
    for g in grey
  ]
  return np.stack(small).reshape(len(images), -1)


def frechet_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance between Gaussian fits of two feature sets float (n_a, F), (n_b, F)."""
  if len(features_a) < 2 or len(features_b) < 2:
    raise ValueError('The Fréchet distance needs at least 2 images per set.')
  mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
  cov_a = np.cov(features_a, rowvar=False)
  cov_b = np.cov(features_b, rowvar=False)
  with warnings.catch_warnings():  # Dead ReLU units make the product singular; handled here.
    warnings.simplefilter('ignore', category=linalg.LinAlgWarning)
    cov_sqrt = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(cov_sqrt).all():  # Regularise both covariances and retry.
      offset = np.eye(len(cov_a)) * _SQRTM_EPS
      cov_sqrt = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
  cov_sqrt = np.real(cov_sqrt)  # Drops the round-off imaginary part of a PSD product's root.
  diff = mean_a - mean_b
  distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cov_sqrt)
  return max(float(distance), 0.0)  # Round-off can push identical distributions below 0.


class DigitsEvaluator:
  """Classifier and feature extractor for digit images uint8 (n, size, size, 3)."""

  def __init__(self, classifier: neural_network.MLPClassifier, size: int):
    self.classifier = classifier
    self.size = size
    self.test_features = self.features(digits.load_split('test', size)[0])

  @classmethod
  def fit(cls, size: int = 32, seed: int = 0) -> 'DigitsEvaluator':
    """Trains on the real train split plus augmented copies; deterministic in `seed`."""
    images, labels, _ = digits.load_split('train', size)
    augmented, captions = digits.make_dataset(AUGMENTED_COPIES * len(images), seed, size)
    inputs = _inputs(np.concatenate([images, augmented]))
    targets = np.concatenate([labels, [digits.parse_caption(c) for c in captions]])
    classifier = neural_network.MLPClassifier(
      hidden_layer_sizes=HIDDEN_SIZES,
      alpha=1e-3,
      batch_size=128,
      learning_rate_init=1e-3,
      max_iter=30,
      random_state=seed,
    )
    # One BLAS thread: these small matrices train fastest that way (several times faster on a
    # busy machine) and the result does not depend on the core count.
    with threadpoolctl.threadpool_limits(limits=1), warnings.catch_warnings():
      # A fixed epoch budget is intended, not a convergence failure.
      warnings.simplefilter('ignore', category=exceptions.ConvergenceWarning)
      classifier.fit(inputs, targets)
    return cls(classifier, size)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Last hidden layer (ReLU) activations, float64 (n, HIDDEN_SIZES[-1])."""
    _check_images(images, self.size)
    activations = _inputs(images).astype(np.float64)
    for weights, bias in zip(self.classifier.coefs_[:-1], self.classifier.intercepts_[:-1]):
      activations = np.maximum(activations @ weights + bias, 0.0)
    return activations

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Predicted digit labels, int64 (n,)."""
    _check_images(images, self.size)
    return self.classifier.predict(_inputs(images)).astype(np.int64)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose predicted label equals `labels` int (n,)."""
    if len(images) != len(labels):
      raise ValueError(f'Got {len(images)} images but {len(labels)} labels.')
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def frechet_distance(self, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """Fréchet distance between the feature distributions of two image sets."""
    return frechet_from_features(self.features(images_a), self.features(images_b))

  def score(self, images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """`accuracy` against the captions' digits, `frechet` against the real test split, `n`."""
    labels = np.array([digits.parse_caption(c) for c in captions])
    return {
      'accuracy': self.accuracy(images, labels),
      'frechet': frechet_from_features(self.features(images), self.test_features),
      'n': float(len(images)),
    }
