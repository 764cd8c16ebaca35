"""Spatially tiled VAE decode/encode: overlapping tiles of one fixed shape, blended with linear ramps.

The grid is laid out in latent pixels. Along an axis of L latent pixels, tiles of side
T = min(tile size, L) start at round(i (L - T) / (n - 1)), i < n = ceil((L - T) / (T - overlap)) + 1:
equal tiles spread evenly, neighbours overlapping by >= `overlap`. Every tile has the same shape,
so one compiled tile function runs under lax.scan (peak memory: one tile). `fn` maps a tile of
T * in_unit input pixels to T * out_unit output pixels (decode: 1 -> f; encode: f -> 1).

Blending: along each axis a tile's weight ramps linearly, (j + 0.5) / R for j < R, over the R
output pixels it shares with its previous neighbour (mirrored towards the next one) and is 1
elsewhere; the weights are then divided by their sum over tiles, so they sum to 1 at every pixel
(the 2-D weight is the product of the axis weights, and so is its sum). One tile per axis is the
untiled call, exactly.

Approximation: a tile sees only its own pixels. GroupNorm statistics and the mid-block attention
become per tile, and convolutions at tile edges see zero padding instead of neighbours; the overlap
keeps the edges away from the blended result and the ramps hide the seams. Deviation from the
untiled decode is measured in benchmarks/README.md (image tokenizer, tiled decode).
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tiles of `size` x `size` latent pixels overlapping by >= `overlap`; an axis longer than `size`
  is tiled, a shorter one is one tile. size 0 = never tile."""

  size: int = 0
  overlap: int = 0

  @classmethod
  def from_config(cls, vae_cfg) -> 'Tiling':
    """From `image.vae.tile_size` / `tile_overlap`."""
    return cls(int(vae_cfg.tile_size), int(vae_cfg.tile_overlap))

  def check(self) -> None:
    if self.size < 0 or (self.size and not 0 <= self.overlap < self.size):
      raise ValueError(
        f'tiling size={self.size}, overlap={self.overlap}: need size >= 0 and, when '
        'tiling, 0 <= overlap < size (e.g. overlap = size // 4).'
      )


def tile_starts(length: int, size: int, overlap: int) -> tuple[int, ...]:
  """Start offsets (latent pixels) of the equal tiles covering [0, length) (module docstring)."""
  if not size or length <= size:
    return (0,)
  count = math.ceil((length - size) / (size - overlap)) + 1
  return tuple(round(i * (length - size) / (count - 1)) for i in range(count))


def axis_weights(starts: tuple[int, ...], side: int, unit: int) -> np.ndarray:
  """(n, side * unit) float32 blending weights of the tiles along one axis, summing to 1 over
  tiles at every output pixel (`side`, `starts` in latent pixels; `unit` output pixels each)."""
  n, width = len(starts), side * unit
  weights = np.ones((n, width), np.float64)
  for i in range(n):
    if i > 0:  # Ramp up over the band shared with the previous tile.
      shared = (starts[i - 1] + side - starts[i]) * unit
      weights[i, :shared] = (np.arange(shared) + 0.5) / shared
    if i + 1 < n:  # Ramp down over the band shared with the next tile.
      shared = (starts[i] + side - starts[i + 1]) * unit
      weights[i, width - shared :] *= (shared - np.arange(shared) - 0.5) / shared
  total = np.zeros(starts[-1] * unit + width)
  for start, w in zip(starts, weights):
    total[start * unit : start * unit + width] += w
  return np.stack([w / total[s * unit : s * unit + width] for s, w in zip(starts, weights)]).astype(
    np.float32
  )


def tiled_apply(
  fn: Callable[[jax.Array], jax.Array], x: jax.Array, tiling: Tiling, in_unit: int, out_unit: int
) -> jax.Array:
  """fn over overlapping tiles of x (B, h * in_unit, w * in_unit, C), blended into
  (B, h * out_unit, w * out_unit, C') float32 (module docstring); fn's tiles are
  (B, Th * in_unit, Tw * in_unit, C) -> (B, Th * out_unit, Tw * out_unit, C')."""
  b, height, width, channels = x.shape
  if height % in_unit or width % in_unit:
    raise ValueError(
      f'tiled input {height}x{width} is not a multiple of its unit {in_unit} '
      '(the image side must be divisible by the VAE downsampling).'
    )
  h, w = height // in_unit, width // in_unit
  starts_y, starts_x = (
    tile_starts(h, tiling.size, tiling.overlap),
    tile_starts(w, tiling.size, tiling.overlap),
  )
  if len(starts_y) == len(starts_x) == 1:
    return fn(x).astype(jnp.float32)
  side_y, side_x = min(tiling.size, h), min(tiling.size, w)
  weights_y = axis_weights(starts_y, side_y, out_unit)
  weights_x = axis_weights(starts_x, side_x, out_unit)
  iy, ix = np.meshgrid(np.arange(len(starts_y)), np.arange(len(starts_x)), indexing='ij')
  iy, ix = iy.ravel(), ix.ravel()
  per_tile = (
    np.asarray(starts_y, np.int32)[iy],
    np.asarray(starts_x, np.int32)[ix],
    weights_y[iy],
    weights_x[ix],
  )
  tile_in = (b, side_y * in_unit, side_x * in_unit, channels)
  out_tile = jax.eval_shape(fn, jax.ShapeDtypeStruct(tile_in, x.dtype))
  out_channels = out_tile.shape[-1]

  def add_tile(total, tile):
    start_y, start_x, weight_y, weight_x = tile
    piece = jax.lax.dynamic_slice(x, (0, start_y * in_unit, start_x * in_unit, 0), tile_in)
    y = fn(piece).astype(jnp.float32) * (weight_y[:, None] * weight_x[None, :])[None, :, :, None]
    corner = (0, start_y * out_unit, start_x * out_unit, 0)
    current = jax.lax.dynamic_slice(total, corner, y.shape)
    return jax.lax.dynamic_update_slice(total, current + y, corner), None

  total = jnp.zeros((b, h * out_unit, w * out_unit, out_channels), jnp.float32)
  total, _ = jax.lax.scan(add_tile, total, per_tile)
  return total


def seam_positions(length: int, tiling: Tiling, unit: int) -> list[int]:
  """Output pixel offsets along an axis where a tile's coverage begins or ends (inside the image):
  the places a seam would show."""
  starts = tile_starts(length, tiling.size, tiling.overlap)
  side = min(tiling.size, length) if tiling.size else length
  edges = {s * unit for s in starts[1:]} | {(s + side) * unit for s in starts[:-1]}
  return sorted(edges)
