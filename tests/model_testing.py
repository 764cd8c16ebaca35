"""Helpers shared by the model, objective and sampler tests (importable: conftest puts tests/ on sys.path)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.model import nextstep

# A tiny NextStep: 2 layers, GQA 4/2 heads, 12-dim tokens (3 channels x 2x2 patch), head width 32.
TINY_MODEL = dict(
  vocab_size=512,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=96,
  latent_channels=3,
  latent_patch_size=2,
  fm_head_dim=32,
  fm_head_layers=2,
)


def randomize(module, seed, std=0.15):
  """Every Param <- normal(0, std); norm weights <- 1 + normal(0, std). Makes the zero-initialised
  flow head (and everything downstream) depend on its inputs. Returns the module."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    x = var.get_value()
    is_norm_weight = path[-1] == 'weight' and ('norm' in str(path[-2]) or path[-2] == 'in_ln')
    noise = std * rng.standard_normal(x.shape) + (1.0 if is_norm_weight else 0.0)
    var.set_value(jnp.asarray(noise, x.dtype))
  nnx.update(module, state)
  return module


def tiny_model(seed=1):
  """TINY_MODEL with every parameter randomised (see `randomize`)."""
  m = get_base_config().model
  m.update(TINY_MODEL)
  return randomize(
    nextstep.NextStep(nextstep.ModelConfig.from_config(m), rngs=nnx.Rngs(0)), seed=seed
  )
