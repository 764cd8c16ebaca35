"""Train state (params, optimizer state, step), the optimizer, and sharded creation.

The state is a plain dict pytree {'params': nnx.State, 'opt_state': optax state, 'step': () int32}
so that jit shardings, donation and orbax checkpoints treat it uniformly. The graphdef of the
model is static and rebuilt from the config. With LoRA (`train.lora.rank` > 0, model/lora.py)
the params include the adapters and the optimizer state covers only the trained params
(`lora.split_trainable`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nextstep_jax.model import lora
from nextstep_jax.model import nextstep
from nextstep_jax.model import quant
from nextstep_jax.parallel import rules as rules_lib

DECAYED_PARAM_NAMES = ('kernel', 'embedding')  # Weight decay skips biases and norm weights.


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine decay to lr * min_lr_ratio (or constant)."""
  warmup = optax.linear_schedule(0.0, train_cfg.lr, max(train_cfg.warmup_steps, 1))
  decay_steps = max(train_cfg.steps - train_cfg.warmup_steps, 1)
  if train_cfg.lr_schedule == 'cosine':
    after = optax.cosine_decay_schedule(train_cfg.lr, decay_steps, alpha=train_cfg.min_lr_ratio)
  elif train_cfg.lr_schedule == 'constant':
    after = optax.constant_schedule(train_cfg.lr)
  else:
    raise ValueError(f'train.lr_schedule={train_cfg.lr_schedule!r}; use "cosine" or "constant"')
  return optax.join_schedules([warmup, after], [train_cfg.warmup_steps])


def decay_mask(params) -> Any:
  """True for matrices (`kernel`, `embedding`), False for biases and norm weights."""

  def is_decayed(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path]
    return any(name in DECAYED_PARAM_NAMES for name in names)

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW with the config's schedule."""
  return optax.chain(
    optax.clip_by_global_norm(train_cfg.grad_clip),
    optax.adamw(
      learning_rate_schedule(train_cfg),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      eps=train_cfg.eps,
      weight_decay=train_cfg.weight_decay,
      mask=decay_mask,
    ),
  )


def init_state(config, tx: optax.GradientTransformation) -> dict:
  """Fresh train state (unsharded; jit it with out_shardings to create it sharded)."""
  lora_cfg = lora.LoraConfig.from_config(config)
  if quant.QuantConfig.from_config(config.model).enabled and lora_cfg is None:
    raise ValueError(
      f'model.quant.mode={config.model.quant.mode!r} quantizes weights for sampling; '
      "train with model.quant.mode='none' and quantize the trained params, or train "
      'LoRA adapters over the quantized base (QLoRA: train.lora.rank > 0).'
    )
  params = nnx.state(nextstep.build_model(config, config.seed), nnx.Param)
  trained, _ = lora.split_trainable(params, lora_cfg)
  return {'params': params, 'opt_state': tx.init(trained), 'step': jnp.zeros((), jnp.int32)}


def abstract_train_state(config, tx) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, train state of ShapeDtypeStructs) without allocating anything."""
  graphdef, _ = nnx.split(nextstep.abstract_model(config), nnx.Param)
  return graphdef, jax.eval_shape(lambda: init_state(config, tx))


def state_shardings(config, tx, mesh) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract train state, its NamedShardings under `mesh` and config.mesh.rules)."""
  graphdef, abstract_state = abstract_train_state(config, tx)
  shardings = rules_lib.state_shardings(abstract_state, mesh, config.mesh.rules)
  return graphdef, abstract_state, shardings


def create_sharded_state(config, tx, mesh) -> tuple[nnx.GraphDef, dict, Any]:
  """Initialises the train state directly into its shardings (no host-side full copy)."""
  graphdef, _, shardings = state_shardings(config, tx, mesh)
  state = jax.jit(lambda: init_state(config, tx), out_shardings=shardings)()
  return graphdef, state, shardings
