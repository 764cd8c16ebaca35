"""The jitted train step: one signature (in/out shardings, donated state) for training and tests.

train_step(state, batch) -> (state, metrics): metrics are float32 scalars {loss, lm_loss, im_loss,
grad_norm, lr}. The step's randomness (FM noise and times) is fold_in(key(seed), step), so a
resumed run draws exactly the noise an uninterrupted one would.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import objective
from nextstep_jax.training import state as state_lib

BATCH_KEYS = ('input_ids', 'labels', 'attention_mask', 'positions', 'image_tokens', 'image_valid')


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: objective.LossConfig,
                  schedule: optax.Schedule, seed: int, state: dict, batch: dict) -> tuple[dict, dict]:
  """Pure train step (see module docstring)."""
  step = state['step']
  key = jax.random.fold_in(jax.random.key(seed), step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    return objective.compute_loss(model, batch, key, loss_cfg)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=jnp.asarray(schedule(step), jnp.float32))
  return {'params': params, 'opt_state': opt_state, 'step': step + 1}, metrics


def batch_shardings(config, mesh, batch_spec: dict) -> dict:
  """NamedShardings for a batch dict: leading dim over `batch`, the rest replicated."""
  return {k: rules_lib.activation_spec(mesh, config.mesh.rules, 'batch', *([None] * (v.ndim - 1)))
          for k, v in batch_spec.items()}


def build_train_step(config, graphdef, tx, state_shardings, mesh, placeholder_id: int, batch_spec: dict):
  """jax.jit of the train step with explicit in/out shardings and the state donated.

  batch_spec: a dict of arrays or ShapeDtypeStructs with the batch's shapes (rank per key)."""
  loss_cfg = objective.LossConfig.from_config(config, placeholder_id)
  fn = mesh_lib.in_mesh(functools.partial(train_step_fn, graphdef, tx, loss_cfg,
                                 state_lib.learning_rate_schedule(config.train), config.seed), mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn, in_shardings=(state_shardings, batch_shardings(config, mesh, batch_spec)),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


EVAL_KEY_SALT = 0x5EED  # Eval noise is fold_in(key(seed), salt): fixed, and unlike any train step's.


def eval_step_fn(graphdef: nnx.GraphDef, loss_cfg: objective.LossConfig, seed: int, params, batch: dict) -> dict:
  """Loss pieces {loss, lm_loss, im_loss} of `params` on `batch` with fixed FM noise (no update)."""
  key = jax.random.fold_in(jax.random.key(seed), EVAL_KEY_SALT)
  _, metrics = objective.compute_loss(nnx.merge(graphdef, params), batch, key, loss_cfg)
  return metrics


def build_eval_step(config, graphdef, param_shardings, mesh, placeholder_id: int, batch_spec: dict):
  """jax.jit of `eval_step_fn(params, batch) -> metrics` with explicit shardings (params not donated)."""
  loss_cfg = objective.LossConfig.from_config(config, placeholder_id)
  fn = functools.partial(eval_step_fn, graphdef, loss_cfg, config.seed)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn, in_shardings=(param_shardings, batch_shardings(config, mesh, batch_spec)),
                 out_shardings=replicated)
