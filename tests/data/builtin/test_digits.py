"""Tests for the sklearn handwritten digits dataset."""

import numpy as np
import pytest
from sklearn import datasets

from nextstep_jax.data.builtin import digits


@pytest.mark.parametrize('size', [32, 64])
def test_load_split_shapes_and_appearance(size):
  images, labels, captions = digits.load_split('test', size)
  assert images.shape == (360, size, size, 3) and images.dtype == np.uint8
  assert labels.shape == (360,) and labels.dtype == np.int64
  assert captions == [digits.caption_for(int(label)) for label in labels]
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Grey replicated to RGB.
  assert images.max() >= 250 and np.median(images[:, :2, :2]) == 0  # White digit on black.


def test_split_is_fixed_stratified_and_complete():
  _, train_labels, _ = digits.load_split('train', 8)
  images, test_labels, _ = digits.load_split('test', 8)
  again_images, again_labels, _ = digits.load_split('test', 8)
  np.testing.assert_array_equal(images, again_images)
  np.testing.assert_array_equal(test_labels, again_labels)
  assert (len(train_labels), len(test_labels)) == (1437, 360)
  all_counts = np.bincount(datasets.load_digits().target, minlength=10)
  test_counts = np.bincount(test_labels, minlength=10)
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10) + test_counts, all_counts)
  assert np.abs(test_counts - 0.2 * all_counts).max() <= 1


def test_captions_round_trip_and_reject_bad_text():
  for label in range(10):
    assert digits.parse_caption(digits.caption_for(label)) == label
  assert digits.caption_for(7) == 'a handwritten digit seven'
  assert digits.parse_caption(' A handwritten digit Seven. ') == 7
  for text in ('a handwritten digit ten', 'a digit seven', ''):
    with pytest.raises(ValueError, match='Cannot parse caption'):
      digits.parse_caption(text)
  with pytest.raises(ValueError, match='0..9'):
    digits.caption_for(10)


def test_make_dataset_is_deterministic_augmented_and_can_exceed_the_split():
  images, captions = digits.make_dataset(2000, seed=0)
  again_images, again_captions = digits.make_dataset(2000, seed=0)
  other_images, _ = digits.make_dataset(2000, seed=1)
  assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, again_images)
  assert captions == again_captions
  assert not np.array_equal(images, other_images)
  counts = np.bincount([digits.parse_caption(c) for c in captions], minlength=10)
  assert counts.min() > 150
  # Augmented images are not exact copies of the plain upsampled training images.
  plain = {image.tobytes() for image in digits.load_split('train', 32)[0]}
  assert np.mean([image.tobytes() in plain for image in images]) < 0.5


def test_eval_prompts_are_balanced_and_seeded():
  prompts = digits.eval_prompts(100, seed=0)
  assert np.bincount([digits.parse_caption(p) for p in prompts], minlength=10).tolist() == [10] * 10
  counts = np.bincount([digits.parse_caption(p) for p in digits.eval_prompts(25, 3)], minlength=10)
  assert counts.max() - counts.min() <= 1
  assert prompts == digits.eval_prompts(100, seed=0)
  assert prompts != digits.eval_prompts(100, seed=1)


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda: digits.load_split('valid'), 'split'),
    (lambda: digits.load_split('train', 4), 'size'),
    (lambda: digits.make_dataset(-1, 0), 'num'),
  ],
)
def test_bad_input_raises_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
