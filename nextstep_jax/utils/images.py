"""Image conversions at the edges: model floats in [-1, 1] <-> uint8, grids, PNG files."""

import math
import pathlib

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """Floats in [-1, 1] (any shape, numpy or jax) -> uint8 round(clamp((x + 1) / 2, 0, 1) * 255)."""
  scaled = np.clip((np.asarray(images, dtype=np.float32) + 1) / 2, 0, 1) * 255
  return np.round(scaled).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
  """Tiles uint8 images (n, H, W, C) row-major into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C).

  rows = ceil(n / cols) with cols = min(ncols, n); unused cells and borders are `pad_value`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
    raise ValueError(
      f'make_grid wants uint8 images (n, H, W, C) with n > 0, got {images.dtype} {images.shape}.'
    )
  n, height, width, channels = images.shape
  cols = min(ncols, n)
  rows = math.ceil(n / cols)
  grid = np.full(
    (rows * (height + pad) + pad, cols * (width + pad) + pad, channels), pad_value, dtype=np.uint8
  )
  for index, image in enumerate(images):
    top = pad + (index // cols) * (height + pad)
    left = pad + (index % cols) * (width + pad)
    grid[top : top + height, left : left + width] = image
  return grid


def save_png(path: str | pathlib.Path | epath.Path, image: np.ndarray) -> None:
  """Writes a uint8 image (H, W, 3), (H, W, 1) or (H, W) as PNG, creating parent folders.

  `path` may be local or an etils.epath URL such as gs://bucket/x.png."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'save_png wants uint8, got {image.dtype}; convert with to_uint8.')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')


def load_resized(path: str | pathlib.Path, height: int, width: int) -> np.ndarray:
  """An image file as uint8 (height, width, 3): LANCZOS-resized to cover, then centre-cropped
  (the official preprocessing of edit sources)."""
  with Image.open(path) as image:
    image = image.convert('RGB')
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)
