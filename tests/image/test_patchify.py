"""Patchify / unpatchify in the official (c, py, px) channel-major order (docs/model.md §3)."""

import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.image import patchify as P

C, PATCH = 16, 2


def value_encoded_latent(height, width, channels=C):
  """NHWC latent with latent[y, x, c] = 1000 c + 10 y + x (the doc's NCHW latent[c, y, x])."""
  y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing='ij')
  return (1000 * c + 10 * y + x).astype(np.float32)[None]


def expected_token(row, col, channels=C, patch=PATCH):
  """Feature f = c p^2 + py p + px of the patch at (row, col), built independently of the code."""
  return np.array(
    [
      1000 * c + 10 * (row * patch + py) + (col * patch + px)
      for c in range(channels)
      for py in range(patch)
      for px in range(patch)
    ],
    np.float32,
  )


def test_value_encoded_token_order():
  h, w = 3, 4
  tokens = P.patchify(value_encoded_latent(h * PATCH, w * PATCH), PATCH)
  assert tokens.shape == (1, h * w, C * PATCH * PATCH)
  np.testing.assert_array_equal(
    tokens[0, 0, :12], [0, 1, 10, 11, 1000, 1001, 1010, 1011, 2000, 2001, 2010, 2011]
  )
  # Raster order: token n = row * w + col.
  np.testing.assert_array_equal(tokens[0, 1, :4], [2, 3, 12, 13])
  np.testing.assert_array_equal(tokens[0, w, :4], [20, 21, 30, 31])
  for row in range(h):
    for col in range(w):
      np.testing.assert_array_equal(tokens[0, row * w + col], expected_token(row, col))


def test_not_flux_order():
  """Flux packs (py, px, c); ours must be (c, py, px): feature 1 is (c=0, px=1), not (c=1)."""
  tokens = P.patchify(value_encoded_latent(2, 2), PATCH)
  assert tokens[0, 0, 1] == 1 and tokens[0, 0, 4] == 1000


@pytest.mark.parametrize(
  'h, w, patch, channels', [(3, 5, 2, 16), (5, 2, 2, 3), (2, 3, 4, 3), (4, 1, 1, 7)]
)
def test_round_trip_non_square(h, w, patch, channels):
  rng = np.random.default_rng(0)
  latent = rng.standard_normal((2, h * patch, w * patch, channels)).astype(np.float32)
  tokens = P.patchify(latent, patch)
  assert tokens.shape == (2, h * w, channels * patch * patch)
  np.testing.assert_array_equal(P.unpatchify(tokens, h, w, patch), latent)
  # Inverse the other way round as well, and on jax arrays.
  np.testing.assert_array_equal(P.patchify(P.unpatchify(tokens, h, w, patch), patch), tokens)
  np.testing.assert_array_equal(
    np.asarray(P.unpatchify(P.patchify(jnp.asarray(latent), patch), h, w, patch)), latent
  )


def test_unpatchify_uses_explicit_grid():
  """(h, w) = (2, 6) and (3, 4) hold the same number of tokens but give different images."""
  tokens = P.patchify(value_encoded_latent(4, 12), PATCH)
  assert P.unpatchify(tokens, 2, 6, PATCH).shape == (1, 4, 12, C)
  assert P.unpatchify(tokens, 3, 4, PATCH).shape == (1, 6, 8, C)
  np.testing.assert_array_equal(P.unpatchify(tokens, 2, 6, PATCH), value_encoded_latent(4, 12))


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='divisible'):
    P.patchify(np.zeros((1, 5, 4, C), np.float32), PATCH)
  with pytest.raises(ValueError, match='divisible'):
    P.patchify(np.zeros((1, 4, 7, C), np.float32), PATCH)
  tokens = np.zeros((1, 6, C * 4), np.float32)
  with pytest.raises(ValueError, match='grid'):
    P.unpatchify(tokens, 2, 2, PATCH)  # 6 tokens are not a 2 x 2 grid.
  with pytest.raises(ValueError, match='grid'):
    P.unpatchify(np.zeros((1, 6, 10), np.float32), 2, 3, PATCH)  # 10 not divisible by 4.
