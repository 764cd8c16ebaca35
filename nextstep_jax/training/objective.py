"""Training objective: lm_loss_weight * CE(text) + im_loss_weight * FM(image tokens).

Batch (all arrays, leading B): input_ids (B, L) int32, labels (B, L) int32 (-100 = ignore; HF
convention: labels[i] is the target of position i-1), attention_mask (B, L) bool, positions (B, L)
int32, image_tokens (B, N, T) float32 (the row's placeholders in order), image_valid (B,) bool.

Routing (official): position i feeds the flow head iff input_ids[i+1] is a placeholder, else the
LM head with target labels[i+1]. Flow matching (t = 0 noise, t = 1 data): x_t = t x1 + (1-t) eps,
target u = x1 - eps, t = sigmoid(n), n ~ N(time_mean, time_std); every image token is tiled
`fm_head_batch_mul` times (row r <- r mod M) with fresh eps and t; squared error in float32, mean
over T, then a masked mean over tokens (+1e-8 in the denominator).

Few-step head (`head_objective='shortcut'`, shortcut models, Frans et al. 2024; needs the
step-conditioned head): of the M' head rows, the first round(shortcut_fraction M') are
self-consistency rows, the rest flow-matching rows at step size d = 0. A self-consistency row draws
a level d = 2^-l (l = 1..log2 K, K = shortcut_max_steps) and t = j d on the grid with t + 2d <= 1;
with u_1 = u(x_t, t, d'), u_2 = u(x_t + d u_1, t + d, d') (no gradient; d' = 0 at the finest level
d = 1/K, so the chain ends in the flow-matching velocity), the target of u(x_t, t, 2d) is
(u_1 + u_2) / 2: one step of 2d must land where two steps of d land. Guidance is applied at
sampling time (CFG combines average velocities the same way as instantaneous ones).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

IGNORE_ID = -100


@dataclasses.dataclass(frozen=True)
class LossConfig:
  placeholder_id: int
  lm_loss_weight: float = 0.01
  im_loss_weight: float = 1.0
  fm_head_batch_mul: int = 4
  time_mean: float = 0.0
  time_std: float = 1.0
  head_objective: str = 'flow'  # flow | shortcut.
  shortcut_fraction: float = 0.25
  shortcut_max_steps: int = 64

  @classmethod
  def from_config(cls, config, placeholder_id: int) -> 'LossConfig':
    lc = config.loss
    return cls(placeholder_id=placeholder_id, lm_loss_weight=lc.lm_loss_weight,
               im_loss_weight=lc.im_loss_weight, fm_head_batch_mul=lc.fm_head_batch_mul,
               time_mean=lc.time_mean, time_std=lc.time_std, head_objective=lc.get('head_objective', 'flow'),
               shortcut_fraction=lc.get('shortcut_fraction', 0.25),
               shortcut_max_steps=lc.get('shortcut_max_steps', 64))


def placeholder_positions(image_token_mask: jax.Array, num_tokens: int) -> jax.Array:
  """(B, L) bool with exactly N True per row -> (B, N) int32 positions in order."""
  return jax.vmap(lambda row: jnp.nonzero(row, size=num_tokens, fill_value=0)[0])(image_token_mask)


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean cross-entropy. logits (B, L', V) f32; targets, mask (B, L')."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  nll = (logz - target_logit) * mask
  return nll.sum() / (mask.sum() + 1e-8)


def flow_matching_loss(velocity_fn, x1: jax.Array, cond: jax.Array, mask: jax.Array, key: jax.Array,
                       cfg: LossConfig) -> jax.Array:
  """x1 (M, T) clean tokens, cond (M, C) conditions, mask (M,) -> scalar FM loss.

  velocity_fn(x_t (M', T), t (M',), cond (M', C)) -> (M', T) with M' = M * fm_head_batch_mul.
  """
  mul = cfg.fm_head_batch_mul
  x1 = jnp.tile(x1.astype(jnp.float32), (mul, 1))
  cond = jnp.tile(cond, (mul, 1))
  mask = jnp.tile(mask.astype(jnp.float32), (mul,))
  key_t, key_eps = jax.random.split(key)
  t = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key_t, (x1.shape[0],)))
  eps = jax.random.normal(key_eps, x1.shape, jnp.float32)
  x_t = t[:, None] * x1 + (1.0 - t[:, None]) * eps
  target = x1 - eps
  v = velocity_fn(x_t, t, cond).astype(jnp.float32)
  per_token = jnp.mean(jnp.square(v - target), axis=-1)
  return (per_token * mask).sum() / (mask.sum() + 1e-8)


def shortcut_loss(velocity_fn, x1: jax.Array, cond: jax.Array, mask: jax.Array, key: jax.Array,
                  cfg: LossConfig) -> jax.Array:
  """Flow matching at d = 0 plus the shortcut self-consistency rows (see module doc).

  velocity_fn(x_t (M', T), t (M',), cond (M', C), d (M',)) -> (M', T). Returns the scalar loss.
  """
  mul = cfg.fm_head_batch_mul
  x1 = jnp.tile(x1.astype(jnp.float32), (mul, 1))
  cond = jnp.tile(cond, (mul, 1))
  mask = jnp.tile(mask.astype(jnp.float32), (mul,))
  rows = x1.shape[0]
  key_t, key_eps, key_level, key_grid = jax.random.split(key, 4)
  eps = jax.random.normal(key_eps, x1.shape, jnp.float32)
  t_flow = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key_t, (rows,)))
  levels = int(math.log2(cfg.shortcut_max_steps))
  level = jax.random.randint(key_level, (rows,), 1, levels + 1)
  d = 2.0 ** -level.astype(jnp.float32)
  grid_points = 2 ** level - 1  # t = j d with j = 0 .. 1/d - 2, so that t + 2d <= 1.
  t_sc = jnp.floor(jax.random.uniform(key_grid, (rows,)) * grid_points) * d
  is_sc = jnp.arange(rows) < round(cfg.shortcut_fraction * rows)
  t = jnp.where(is_sc, t_sc, t_flow)
  x_t = t[:, None] * x1 + (1.0 - t[:, None]) * eps
  d_query = jnp.where(level == levels, 0.0, d)
  u_1 = jax.lax.stop_gradient(velocity_fn(x_t, t, cond, d_query).astype(jnp.float32))
  u_2 = jax.lax.stop_gradient(velocity_fn(x_t + d[:, None] * u_1, t + d, cond, d_query).astype(jnp.float32))
  target = jnp.where(is_sc[:, None], 0.5 * (u_1 + u_2), x1 - eps)
  v = velocity_fn(x_t, t, cond, jnp.where(is_sc, 2.0 * d, 0.0)).astype(jnp.float32)
  per_token = jnp.mean(jnp.square(v - target), axis=-1)
  return (per_token * mask).sum() / (mask.sum() + 1e-8)


def compute_loss(model, batch: dict, key: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict]:
  """Total loss and its pieces {'loss', 'lm_loss', 'im_loss'} for one batch (see module doc)."""
  input_ids, tokens = batch['input_ids'], batch['image_tokens']
  b, n, _ = tokens.shape
  image_mask = input_ids == cfg.placeholder_id
  x = model.embed(input_ids, tokens, image_mask)
  hidden, _ = model(x, batch['positions'], batch['attention_mask'])

  targets = batch['labels'][:, 1:]
  lm_mask = (targets != IGNORE_ID) & ~image_mask[:, 1:]
  lm = lm_loss(model.lm_logits(hidden[:, :-1]), targets, lm_mask)

  cond_positions = placeholder_positions(image_mask, n) - 1  # (B, N): predicts token k
  cond_hidden = jnp.take_along_axis(hidden, cond_positions[..., None], axis=1)
  cond = model.head_condition(cond_hidden, jnp.broadcast_to(jnp.arange(n), (b, n)))
  token_mask = jnp.broadcast_to(batch['image_valid'][:, None], (b, n)).reshape(-1)
  head_loss = shortcut_loss if cfg.head_objective == 'shortcut' else flow_matching_loss
  im = head_loss(model.image_head, tokens.reshape(b * n, -1), cond.reshape(b * n, -1), token_mask, key, cfg)
  total = cfg.lm_loss_weight * lm + cfg.im_loss_weight * im
  return total, {'loss': total, 'lm_loss': lm, 'im_loss': im}
