"""Spatially tiled VAE decode/encode: tile layout, blending, exactness with one tile, measured
deviation and seams of a small random VAE, and the VaeTokenizer switching to tiles by size."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import config_defaults as base
from nextstep_jax import configlib
from nextstep_jax.evaluate import tokenizer_eval
from nextstep_jax.image import tokenizers
from nextstep_jax.image import vae
from nextstep_jax.image import vae_tiling

# A per-pixel function is tile-invariant: tiled == untiled up to float32 rounding of the blend.
BLEND_ATOL = 1e-6
# Random f2 VAE (seed 0), 16x16 latents in 3x3 tiles of 8 (overlap 4): measured 26.1 dB of PSNR
# (range [-1, 1]) against the untiled decode, max |diff| 0.62 on outputs of std 0.30; per-tile
# GroupNorm statistics dominate. Bound with margin:
RANDOM_VAE_MIN_PSNR = 24.0
# Seam ratio (tokenizer_eval.seam_ratio) measured 1.16 with ramps vs 2.17 for hard cuts (overlap 0).
MAX_BLENDED_SEAM_RATIO = 1.5
MIN_HARD_CUT_SEAM_RATIO = 1.8


def small_vae(seed=0) -> vae.AutoEncoder:
  cfg = vae.AutoEncoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4)
  return vae.AutoEncoder(cfg, nnx.Rngs(seed))


def decode(model, latents, tiling=None):
  return np.asarray(nnx.jit(lambda m, z: m.decode(z, tiling))(model, latents))


def test_tile_layout_covers_evenly_and_weights_sum_to_one():
  assert vae_tiling.tile_starts(128, 64, 16) == (0, 32, 64)  # Official 1024px: 3 tiles per axis.
  assert vae_tiling.tile_starts(64, 64, 16) == (0,)
  assert vae_tiling.tile_starts(40, 0, 0) == (0,)
  for length, size, overlap in ((101, 40, 10), (20, 8, 2), (33, 8, 0), (9, 8, 7)):
    starts = vae_tiling.tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))
    weights = vae_tiling.axis_weights(starts, size, 3)
    total = np.zeros(length * 3)
    for start, w in zip(starts, weights):
      assert (w > 0).all()
      total[start * 3 : (start + size) * 3] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='overlap < size'):
    vae_tiling.Tiling(8, 8).check()


def test_per_pixel_function_is_tile_invariant():
  rng = np.random.default_rng(0)
  upsample = lambda z: jnp.tanh(1.3 * jnp.repeat(jnp.repeat(z, 4, axis=1), 4, axis=2))
  latents = rng.standard_normal((2, 20, 12, 3)).astype(np.float32)  # Non-square: 4 x 2 tiles.
  tiled = vae_tiling.tiled_apply(upsample, latents, vae_tiling.Tiling(8, 3), 1, 4)
  np.testing.assert_allclose(tiled, upsample(latents), atol=BLEND_ATOL)
  pool = lambda x: x.reshape(x.shape[0], x.shape[1] // 4, 4, x.shape[2] // 4, 4, -1).mean((2, 4))
  images = rng.standard_normal((2, 80, 48, 3)).astype(np.float32)
  tiled = vae_tiling.tiled_apply(pool, images, vae_tiling.Tiling(8, 3), 4, 1)
  np.testing.assert_allclose(tiled, pool(images), atol=BLEND_ATOL)


@pytest.mark.slow
def test_one_tile_equals_untiled_exactly():
  model = small_vae()
  latents = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  untiled = decode(model, latents)
  for tiling in (vae_tiling.Tiling(16, 4), vae_tiling.Tiling(32, 8)):  # Tile = and > the latent.
    np.testing.assert_array_equal(decode(model, latents, tiling), untiled)
  tiling = vae_tiling.Tiling(16, 4)
  np.testing.assert_array_equal(
    nnx.jit(lambda m, x: m.encode(x, tiling=tiling))(model, images),
    nnx.jit(lambda m, x: m.encode(x))(model, images),
  )


@pytest.mark.slow
def test_tiled_decode_deviation_and_seams():
  model = small_vae()
  latents = np.random.default_rng(1).standard_normal((4, 16, 16, 4)).astype(np.float32)
  untiled = decode(model, latents)
  blended = vae_tiling.Tiling(8, 4)
  tiled = decode(model, latents, blended)
  psnr = 10 * np.log10(4.0 / np.mean(np.square(tiled - untiled)))
  assert RANDOM_VAE_MIN_PSNR <= psnr < 60, psnr  # An approximation, but a close one.
  seams = vae_tiling.seam_positions(16, blended, 2)
  assert seams == [8, 16, 24]
  assert tokenizer_eval.seam_ratio(tiled, untiled, seams, seams) < MAX_BLENDED_SEAM_RATIO
  hard = vae_tiling.Tiling(8, 0)  # Two abutting tiles, no blending: the seam must show.
  cut = vae_tiling.seam_positions(16, hard, 2)
  assert cut == [16]
  assert (
    tokenizer_eval.seam_ratio(decode(model, latents, hard), untiled, cut, cut)
    > MIN_HARD_CUT_SEAM_RATIO
  )


@pytest.mark.slow
def test_tokenizer_tiles_above_tile_size():
  c = base.get_base_config()
  c.image.tokenizer, c.image.size = 'vae', 32
  v = c.image.vae
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.norm_groups, v.batch_chunk = (
    8,
    (1, 2),
    1,
    4,
    4,
    1,
  )
  v.tile_size, v.tile_overlap = 8, 4
  c.model.latent_channels, c.model.latent_patch_size = 4, 2
  configlib.validate(c)
  tok = tokenizers.get_tokenizer(c)
  model = small_vae(c.seed)  # The tokenizer's seed-initialised weights.
  images = np.random.default_rng(3).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  latents = tok.encode(images)
  tiling = vae_tiling.Tiling(8, 4)
  direct = nnx.jit(lambda m, x: m.encode(x, tiling=tiling))(model, images)
  np.testing.assert_allclose(latents, direct, atol=1e-5)
  np.testing.assert_allclose(
    tok.decode(latents), np.clip(decode(model, latents, tiling), -1, 1), atol=1e-5
  )
  small = tok.decode(latents[:, :8, :8])  # One tile: untiled.
  np.testing.assert_allclose(small, np.clip(decode(model, latents[:, :8, :8]), -1, 1), atol=1e-5)
  v.tile_overlap = 8
  with pytest.raises(configlib.ConfigError, match='image.vae.tile_overlap'):
    configlib.validate(c)
