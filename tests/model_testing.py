"""Helpers shared by the model, objective and sampler tests (importable: conftest puts tests/ on sys.path)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
