"""The jitted train step: one signature (in/out shardings, donated state) for training and tests.

train_step(state, batch) -> (state, metrics): metrics are float32 scalars {loss, lm_loss, im_loss,
grad_norm, lr}. The step's randomness (FM noise and times) is fold_in(key(seed), step), so a
resumed run draws exactly the noise an uninterrupted one would.

Gradient accumulation (`train.microbatches` = K > 1): the global batch of B rows is cut into K
microbatches of B / K rows, microbatch j holding rows j, j + K, j + 2K, ... Strided rows keep
every device on rows it already holds (the batch is sharded in contiguous blocks of B_dev rows,
B_dev % K == 0), so splitting the batch is a local reshape and transpose, no all-to-all. A
`lax.scan` over the microbatches accumulates float32 gradients (constrained to the params'
shardings) and the loss sums; the loss normalisers (text-target and head-row counts) are those of
the whole batch, so the gradient, the loss pieces and the grad norm are the full batch's up to
float32 summation order, followed by one optimizer update. Keys: the head's noise and times are
drawn once for the whole batch from the step key, exactly as with K = 1, and each microbatch
takes its rows' draws, so every row sees the same noise whatever K is (the draws keep the
objective's (copy, row, token) order, which each microbatch regroups like the objective's own
tiling of the tokens); K = 1 runs the plain full-batch step, bit for bit the step without
accumulation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax import nn
from nextstep_jax.model import lora
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import objective
from nextstep_jax.training import state as state_lib

BATCH_KEYS = ('input_ids', 'labels', 'attention_mask', 'positions', 'image_tokens', 'image_valid')


def split_microbatches(x: jax.Array, count: int, axis: int = 0) -> jax.Array:
  """Splits the batch dimension `axis` (size B) into `count` strided microbatches: (..., B, ...) ->
  (count, ..., B / count, ...), microbatch j holding rows j, j + count, j + 2 count, ..."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // count, count) + shape[axis + 1 :])
  return jnp.moveaxis(x, axis + 1, 0)


def split_batch_rows(x: jax.Array, count: int, rules) -> jax.Array:
  """A batch array (B, ...) sharded over `batch` -> (count, B / count, ...), each microbatch
  sharded over `batch` again: a local reshape and transpose on every device."""
  x = nn.constrain(x, rules, 'batch', *([None] * (x.ndim - 1)))
  x = split_microbatches(x, count)
  return nn.constrain(x, rules, None, 'batch', *([None] * (x.ndim - 2)))


def split_head_draws(x: jax.Array, count: int, b: int, n: int, rules) -> jax.Array:
  """Head draws (mul B N, ...) ordered (copy, row, token) -> (count, mul, B / count, N, ...), the
  microbatches of the rows of `split_batch_rows`, sharded over `batch` (local)."""
  x = x.reshape((-1, b, n) + x.shape[1:])
  x = nn.constrain(x, rules, None, 'batch', *([None] * (x.ndim - 2)))
  x = split_microbatches(x, count, axis=1)
  return nn.constrain(x, rules, None, None, 'batch', *([None] * (x.ndim - 3)))


def microbatch_gradients(
  graphdef: nnx.GraphDef,
  loss_cfg: objective.LossConfig,
  microbatches: int,
  rules,
  grad_shardings,
  params,
  batch: dict,
  key: jax.Array,
  frozen=None,
) -> tuple:
  """(grads, metrics {loss, lm_loss, im_loss}) of the whole batch's loss, accumulated over
  `microbatches` strided microbatches in a lax.scan (see module docstring). Gradients are taken
  with respect to `params`; `frozen` (LoRA's base params) joins them in the model untrained."""
  b, n, token_dim = batch['image_tokens'].shape
  counts = objective.loss_counts(batch, loss_cfg)
  draws = objective.head_draws(key, loss_cfg.fm_head_batch_mul * b * n, token_dim, loss_cfg)

  def accumulate(acc, microbatch):
    rows, row_draws = microbatch
    # Back to the objective's flat (copy, row, token) rows: like its tiling of the tokens, this
    # regroups each device's rows (one small all-to-all of the draws per microbatch).
    row_draws = {k: v.reshape((-1,) + v.shape[3:]) for k, v in row_draws.items()}

    def loss_fn(p):
      sums = objective.loss_sums(
        nnx.merge(graphdef, lora.join_params(p, frozen)), rows, row_draws, loss_cfg
      )
      return objective.combine_loss(sums, counts, loss_cfg)[0], sums

    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc['grads'], grads)
    return {
      'grads': jax.lax.with_sharding_constraint(grad_sum, grad_shardings),
      'sums': jax.tree.map(jnp.add, acc['sums'], sums),
    }, None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = {
    'grads': jax.lax.with_sharding_constraint(zeros, grad_shardings),
    'sums': {'lm_sum': jnp.zeros((), jnp.float32), 'im_sum': jnp.zeros((), jnp.float32)},
  }
  xs = (
    {k: split_batch_rows(v, microbatches, rules) for k, v in batch.items()},
    {k: split_head_draws(v, microbatches, b, n, rules) for k, v in draws.items()},
  )
  acc, _ = jax.lax.scan(accumulate, init, xs)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), acc['grads'], params)
  _, metrics = objective.combine_loss(acc['sums'], counts, loss_cfg)
  return grads, metrics


def train_step_fn(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_cfg: objective.LossConfig,
  schedule: optax.Schedule,
  seed: int,
  microbatches: int,
  rules,
  grad_shardings,
  state: dict,
  batch: dict,
  lora_cfg: lora.LoraConfig | None = None,
) -> tuple[dict, dict]:
  """Pure train step (see module docstring); grad_shardings: the params' shardings. With
  `lora_cfg` only `lora.split_trainable`'s trained params get gradients and updates."""
  step = state['step']
  key = jax.random.fold_in(jax.random.key(seed), step)
  trained, frozen = lora.split_trainable(state['params'], lora_cfg)
  if microbatches == 1:

    def loss_fn(params):
      model = nnx.merge(graphdef, lora.join_params(params, frozen))
      return objective.compute_loss(model, batch, key, loss_cfg)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
  else:
    grad_shardings, _ = lora.split_trainable(grad_shardings, lora_cfg)
    grads, metrics = microbatch_gradients(
      graphdef, loss_cfg, microbatches, rules, grad_shardings, trained, batch, key, frozen
    )
  updates, opt_state = tx.update(grads, state['opt_state'], trained)
  params = lora.join_params(optax.apply_updates(trained, updates), frozen)
  metrics = dict(
    metrics, grad_norm=optax.tree.norm(grads), lr=jnp.asarray(schedule(step), jnp.float32)
  )
  return {'params': params, 'opt_state': opt_state, 'step': step + 1}, metrics


def check_microbatches(config, mesh) -> None:
  """Raises ConfigError unless train.microbatches divides the rows each batch-sharding device holds."""
  k, batch_size = config.train.microbatches, config.train.batch_size
  axes = rules_lib.logical_to_spec(('batch',), config.mesh.rules)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  shards = math.prod(mesh.shape[axis] for axis in axes)
  if batch_size % (shards * k) == 0:
    return
  per_device = batch_size // shards if batch_size % shards == 0 else 0
  divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
  raise configlib.ConfigError(
    f'train.microbatches={k}: train.batch_size={batch_size} does not split into {shards} '
    f'batch-sharding devices (mesh axes {" x ".join(axes) or "none"}) x {k} microbatches. Set '
    f'train.batch_size to a multiple of {shards * k}'
    + (
      f' or train.microbatches to one of {divisors} ({per_device} rows per device).'
      if divisors
      else '.'
    )
  )


def batch_shardings(config, mesh, batch_spec: dict) -> dict:
  """NamedShardings for a batch dict: leading dim over `batch`, the rest replicated."""
  return {
    k: rules_lib.activation_spec(mesh, config.mesh.rules, 'batch', *([None] * (v.ndim - 1)))
    for k, v in batch_spec.items()
  }


def build_train_step(
  config, graphdef, tx, state_shardings, mesh, placeholder_id: int, batch_spec: dict
):
  """jax.jit of the train step with explicit in/out shardings and the state donated.

  batch_spec: a dict of arrays or ShapeDtypeStructs with the batch's shapes (rank per key)."""
  if config.train.microbatches > 1:
    check_microbatches(config, mesh)
  loss_cfg = objective.LossConfig.from_config(config, placeholder_id)
  fn = mesh_lib.in_mesh(
    functools.partial(
      train_step_fn,
      graphdef,
      tx,
      loss_cfg,
      state_lib.learning_rate_schedule(config.train),
      config.seed,
      config.train.microbatches,
      config.mesh.rules,
      state_shardings['params'],
      lora_cfg=lora.LoraConfig.from_config(config),
    ),
    mesh,
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    fn,
    in_shardings=(state_shardings, batch_shardings(config, mesh, batch_spec)),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )


EVAL_KEY_SALT = (
  0x5EED  # Eval noise is fold_in(key(seed), salt): fixed, and unlike any train step's.
)


def eval_step_fn(
  graphdef: nnx.GraphDef, loss_cfg: objective.LossConfig, seed: int, params, batch: dict
) -> dict:
  """Loss pieces {loss, lm_loss, im_loss} of `params` on `batch` with fixed FM noise (no update)."""
  key = jax.random.fold_in(jax.random.key(seed), EVAL_KEY_SALT)
  _, metrics = objective.compute_loss(nnx.merge(graphdef, params), batch, key, loss_cfg)
  return metrics


def build_eval_step(config, graphdef, param_shardings, mesh, placeholder_id: int, batch_spec: dict):
  """jax.jit of `eval_step_fn(params, batch) -> metrics` with explicit shardings (params not donated)."""
  loss_cfg = objective.LossConfig.from_config(config, placeholder_id)
  fn = functools.partial(eval_step_fn, graphdef, loss_cfg, config.seed)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    fn,
    in_shardings=(param_shardings, batch_shardings(config, mesh, batch_spec)),
    out_shardings=replicated,
  )
