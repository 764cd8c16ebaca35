"""VaeTokenizer: sharded chunked encode/decode equals the plain model call; export round trip."""

import numpy as np
import pytest
from flax import nnx

from nextstep_jax import config_defaults as base
from nextstep_jax import configlib
from nextstep_jax.image import tokenizers
from nextstep_jax.image import vae
from nextstep_jax.image import vae_tokenizer

# Same float32 graph, one unsharded batch vs passes of 8 sharded rows: only XLA's fusion differs.
ATOL = 1e-5


def tiny_config(checkpoint=''):
  c = base.get_base_config()
  c.image.tokenizer = 'vae'
  c.image.size = 16
  v = c.image.vae
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.norm_groups = 8, (1, 2), 1, 4, 4
  v.batch_chunk = 1
  v.checkpoint = checkpoint
  c.model.latent_channels, c.model.latent_patch_size = 4, 2
  return c


def test_downsample_follows_ch_mult():
  c = tiny_config()
  configlib.validate(c)
  assert configlib.tokenizer_downsample(c) == 2 and configlib.image_grid(c) == (4, 4)
  c.model.latent_channels = 16
  with pytest.raises(configlib.ConfigError, match='image.vae.z_channels'):
    configlib.validate(c)


@pytest.mark.slow
def test_chunked_sharded_equals_direct_and_round_trips(tmp_path):
  c = tiny_config()
  tok = tokenizers.get_tokenizer(c)
  assert tok.rows_per_pass == 8 and tok.latent_shape(16) == (8, 8, 4)
  images = np.random.default_rng(0).uniform(-1, 1, (11, 16, 16, 3)).astype(np.float32)
  latents = tok.encode(images)  # 11 rows -> 2 passes of 8 (padded), each over 8 devices.
  model = vae_tokenizer.load_model(c)  # The same seed-initialised weights.
  np.testing.assert_allclose(latents, nnx.jit(lambda m, x: m.encode(x))(model, images), atol=ATOL)
  decoded = tok.decode(latents)
  direct = nnx.jit(lambda m, z: m.decode(z))(model, latents)
  np.testing.assert_allclose(decoded, np.clip(direct, -1, 1), atol=ATOL)

  vae_tokenizer.export_release(
    tmp_path / vae_tokenizer.RELEASE_DIR, model.cfg, nnx.state(model, nnx.Param)
  )
  reloaded = vae_tokenizer.load_model(tiny_config(str(tmp_path)))
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(nnx.state(model, nnx.Param)),
    nnx.to_flat_state(nnx.state(reloaded, nnx.Param)),
  ):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))

  wrong = tiny_config(str(tmp_path))
  wrong.image.vae.ch_mult = (1, 2, 2)
  with pytest.raises(ValueError, match='downsample 2'):
    vae_tokenizer.load_model(wrong)


@pytest.mark.slow
def test_posterior_sampling_and_normalisation():
  cfg = vae.AutoEncoderConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    z_channels=4,
    norm_groups=4,
    deterministic=False,
    scaling_factor=2.0,
    shift_factor=0.5,
  )
  model = vae.AutoEncoder(cfg, nnx.Rngs(0))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  import jax

  mean, _ = model.posterior(images)
  np.testing.assert_allclose(model.encode(images), (np.asarray(mean) - 0.5) * 2.0, atol=1e-6)
  sampled = model.encode(images, jax.random.key(0))
  assert not np.allclose(sampled, model.encode(images))
  z = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(model.decode(model.normalize(z)), model.decoder(z), atol=1e-5)


def test_checkpoint_path_must_exist(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither'):
    vae_tokenizer.load_model(tiny_config(str(tmp_path)))
