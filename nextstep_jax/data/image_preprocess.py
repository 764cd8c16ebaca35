"""Image bytes or arrays -> RGB uint8 at the training resolution; conversions of odd images.

decode_image: PNG/JPEG/... bytes or a decoded array (TFDS) -> (H, W, 3) uint8 plus the fixes made
(grayscale, alpha, 16-bit, palette/CMYK), or BadRecordError for undecodable / truncated data.
resize_to_cover + center_crop: scale (LANCZOS) so the image covers the target, then crop the
centre (docs/model.md §4); an image already at the target size passes through bit-exactly.
"""

import io
import warnings

import numpy as np
from PIL import Image

from nextstep_jax.data import bad_records

_WHITE = (255, 255, 255)


def decode_image(data) -> tuple[np.ndarray, list[str]]:
  """bytes (an image file) or an array (H, W[, C]) -> ((H, W, 3) uint8, fixes).

  fixes lists bad_records reasons of FIXED kind applied (grayscale, alpha, high bit depth, other
  modes). Raises BadRecordError(undecodable_image | truncated_image).
  """
  if isinstance(data, np.ndarray):
    return _array_to_rgb(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # PIL's DecompressionBombWarning etc.: the record decides.
      image = Image.open(io.BytesIO(bytes(data)))
      image.load()
  except OSError as error:
    reason = (
      bad_records.TRUNCATED_IMAGE
      if 'truncated' in str(error).lower()
      else bad_records.UNDECODABLE_IMAGE
    )
    raise bad_records.BadRecordError(reason, str(error)) from error
  except (ValueError, SyntaxError, TypeError, Image.DecompressionBombError, EOFError) as error:
    raise bad_records.BadRecordError(bad_records.UNDECODABLE_IMAGE, str(error)) from error
  if image.width < 1 or image.height < 1:
    raise bad_records.BadRecordError(bad_records.UNDECODABLE_IMAGE, f'size {image.size}')
  return _pil_to_rgb(image)


def image_file_size(data) -> tuple[int, int]:
  """(height, width) from an image file's header (pixels not decoded); BadRecordError if unreadable."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      width, height = Image.open(io.BytesIO(bytes(data))).size
  except (
    OSError,
    ValueError,
    SyntaxError,
    TypeError,
    Image.DecompressionBombError,
    EOFError,
  ) as error:
    raise bad_records.BadRecordError(bad_records.UNDECODABLE_IMAGE, str(error)) from error
  if width < 1 or height < 1:
    raise bad_records.BadRecordError(bad_records.UNDECODABLE_IMAGE, f'size {(width, height)}')
  return height, width


def _pil_to_rgb(image: Image.Image) -> tuple[np.ndarray, list[str]]:
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image, np.uint8), []
  if mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
    return _array_to_rgb(np.asarray(image))
  if mode in ('L', '1'):
    return np.asarray(image.convert('RGB'), np.uint8), [bad_records.GRAYSCALE_CONVERTED]
  has_alpha = mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
    mode == 'P' and 'transparency' in image.info
  )
  if has_alpha:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _WHITE + (255,))
    return (
      np.asarray(Image.alpha_composite(background, rgba).convert('RGB'), np.uint8),
      [bad_records.ALPHA_DROPPED],
    )
  return np.asarray(image.convert('RGB'), np.uint8), [bad_records.OTHER_MODE_CONVERTED]


def _array_to_rgb(array: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """(H, W), (H, W, 1|3|4) arrays of any integer/float dtype -> (H, W, 3) uint8 and fixes."""
  fixes = []
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
    raise bad_records.BadRecordError(
      bad_records.UNDECODABLE_IMAGE, f'array of shape {array.shape} is not an image'
    )
  if array.dtype != np.uint8:
    fixes.append(bad_records.HIGH_BIT_DEPTH_CONVERTED)
    if np.issubdtype(array.dtype, np.floating):  # Floats in [0, 1].
      array = np.round(np.clip(array, 0, 1) * 255)
    else:  # Integers: 16-bit full range (values above 65535 saturate).
      array = np.round(np.clip(array.astype(np.float64), 0, 65535) / 257)
    array = array.astype(np.uint8)
  if array.shape[-1] == 1:
    fixes.append(bad_records.GRAYSCALE_CONVERTED)
    array = np.repeat(array, 3, axis=-1)
  elif array.shape[-1] == 4:
    fixes.append(bad_records.ALPHA_DROPPED)
    alpha = array[..., 3:].astype(np.float32) / 255
    array = np.round(array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
  return np.ascontiguousarray(array), fixes


def resize_to_cover(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, 3) uint8 scaled (LANCZOS) to the smallest size covering height x width."""
  h, w = image.shape[:2]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  if (new_h, new_w) == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.LANCZOS))


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
  return image[top : top + height, left : left + width]


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w = image.shape[:2]
  return crop(image, (h - height) // 2, (w - width) // 2, height, width)


def to_training_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resize to cover, centre crop: (H, W, 3) uint8 -> (height, width, 3) uint8."""
  return center_crop(resize_to_cover(image, height, width), height, width)


def augment(
  image: np.ndarray,
  height: int,
  width: int,
  ops: tuple[str, ...],
  crop_scale: float,
  rng: np.random.Generator,
) -> np.ndarray:
  """The training image with random augmentation: 'random_crop' resizes to cover
  crop_scale x the target and crops a uniformly random window; 'hflip' flips with p = 1/2.
  Draws rng.integers twice for a crop and rng.random once for a flip, in that order."""
  if 'random_crop' in ops:
    big = resize_to_cover(image, round(height * crop_scale), round(width * crop_scale))
    top = int(rng.integers(0, big.shape[0] - height + 1))
    left = int(rng.integers(0, big.shape[1] - width + 1))
    out = crop(big, top, left, height, width)
  else:
    out = to_training_image(image, height, width)
  if 'hflip' in ops and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)
