"""Real handwritten digits: sklearn's `load_digits` (1797 8x8 images, 17 grey levels, 10 classes).

Images are white digits on black, upsampled from 8x8 with PIL bicubic interpolation to uint8
(size, size, 3) with the grey value replicated to RGB. The split is fixed: a stratified
`train_test_split(test_size=0.2, random_state=0)` gives 1437 train and 360 test images.
Captions read "a handwritten digit seven".
"""

import functools
import re

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import model_selection

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SPLITS = ('train', 'test')
MIN_IMAGE_SIZE = 8
TEST_FRACTION = 0.2
SPLIT_SEED = 0
# Augmentation in make_dataset: the digit's side is scaled by [MIN_SCALE, 1] and shifted by up to
# size/16 px (2 px at size 32) per axis.
MIN_SCALE = 0.85

_CAPTION = re.compile('a handwritten digit (' + '|'.join(DIGIT_WORDS) + ')')


def caption_for(label: int) -> str:
  """The caption of a digit label 0-9, e.g. 'a handwritten digit seven'."""
  if not 0 <= label < len(DIGIT_WORDS):
    raise ValueError(f'Digit label must be in 0..9, got {label!r}.')
  return f'a handwritten digit {DIGIT_WORDS[label]}'


def parse_caption(text: str) -> int:
  """Inverse of `caption_for`: the digit label of a caption (case, spaces, final '.' ignored)."""
  normalised = ' '.join(text.strip().lower().removesuffix('.').split())
  match = _CAPTION.fullmatch(normalised)
  if match is None:
    raise ValueError(
      f'Cannot parse caption {text!r}: expected "a handwritten digit WORD" with '
      f'WORD in {DIGIT_WORDS}.'
    )
  return DIGIT_WORDS.index(match.group(1))


def _check_image_size(size: int) -> None:
  if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
    raise ValueError(f'Image size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}.')


@functools.lru_cache(maxsize=1)
def _split_sources() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per split: the 8x8 images uint8 (n, 8, 8) scaled to 0..255, and labels int64 (n,)."""
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  train_index, test_index = model_selection.train_test_split(
    np.arange(len(images)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
  )
  return {
    split: (images[index], digits.target[index].astype(np.int64))
    for split, index in (('train', train_index), ('test', test_index))
  }


def _upsample(image: np.ndarray, side: int) -> np.ndarray:
  """Bicubic resize of a grey image uint8 (8, 8) to uint8 (side, side)."""
  return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))


def _to_rgb(grey: np.ndarray) -> np.ndarray:
  """uint8 (..., S, S) -> uint8 (..., S, S, 3)."""
  return np.repeat(grey[..., None], 3, axis=-1)


def load_split(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The fixed 'train' or 'test' split.

  Returns images uint8 (n, size, size, 3), labels int64 (n,) and captions.
  """
  _check_image_size(size)
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
  sources, labels = _split_sources()[split]
  images = _to_rgb(np.stack([_upsample(image, size) for image in sources]))
  return images, labels.copy(), [caption_for(int(label)) for label in labels]


def _augment(rng: np.random.Generator, source: np.ndarray, size: int) -> np.ndarray:
  """A jittered (scaled and shifted) rendering of an 8x8 digit: grey uint8 (size, size)."""
  side = int(round(size * rng.uniform(MIN_SCALE, 1.0)))
  max_shift = max(1, size // 16)
  top, left = (size - side) // 2 + rng.integers(-max_shift, max_shift + 1, size=2)
  canvas = np.zeros((size, size), np.uint8)
  digit = _upsample(source, side)
  rows = slice(max(top, 0), min(top + side, size))
  cols = slice(max(left, 0), min(left + side, size))
  canvas[rows, cols] = digit[
    rows.start - top : rows.stop - top, cols.start - left : cols.stop - left
  ]
  return canvas


def make_dataset(num: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
  """`num` augmented training examples (drawn with replacement from the train split).

  Returns images uint8 (num, size, size, 3) and captions; deterministic in `seed`.
  """
  _check_image_size(size)
  if num < 0:
    raise ValueError(f'num must be >= 0, got {num}.')
  sources, labels = _split_sources()['train']
  rng = np.random.default_rng(seed)
  picks = rng.integers(len(sources), size=num)
  images = np.zeros((num, size, size), np.uint8)
  for i, pick in enumerate(picks):
    images[i] = _augment(rng, sources[pick], size)
  return _to_rgb(images), [caption_for(int(labels[pick])) for pick in picks]


def eval_prompts(num: int, seed: int) -> list[str]:
  """`num` captions balanced over the 10 digits (counts differ by at most 1), shuffled by `seed`."""
  if num < 0:
    raise ValueError(f'num must be >= 0, got {num}.')
  rng = np.random.default_rng(seed)
  digit_order = rng.permutation(len(DIGIT_WORDS))
  labels = rng.permutation(digit_order[np.arange(num) % len(DIGIT_WORDS)])
  return [caption_for(int(label)) for label in labels]
