"""Training objective: lm_loss_weight * CE(text) + im_loss_weight * FM(image tokens).

Batch (all arrays, leading B): input_ids (B, L) int32, labels (B, L) int32 (-100 = ignore; HF
convention: labels[i] is the target of position i-1), attention_mask (B, L) bool, positions (B, L)
int32, image_tokens (B, N, T) float32 (the row's placeholders in order), image_valid (B,) bool;
optional image_token_loss (B, N) bool: which tokens get the FM loss (edit rows: the target image's,
not the source's; a row with fewer than N placeholders leaves its last tokens unused and False).

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

Normalisation: each piece is a masked sum divided once by its count over the whole batch
(`loss_sums`, `loss_counts`, `combine_loss`), so gradient accumulation (training/step.py) sums
microbatch sums under the whole batch's counts and gets the full-batch loss exactly in definition.
The head's random draws (`head_draws`) are made for the whole batch's rows at once.
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
    return cls(
      placeholder_id=placeholder_id,
      lm_loss_weight=lc.lm_loss_weight,
      im_loss_weight=lc.im_loss_weight,
      fm_head_batch_mul=lc.fm_head_batch_mul,
      time_mean=lc.time_mean,
      time_std=lc.time_std,
      head_objective=lc.get('head_objective', 'flow'),
      shortcut_fraction=lc.get('shortcut_fraction', 0.25),
      shortcut_max_steps=lc.get('shortcut_max_steps', 64),
    )


def placeholder_positions(image_token_mask: jax.Array, num_tokens: int) -> jax.Array:
  """(B, L) bool with N (edit rows without a source: fewer) True per row -> (B, N) int32 positions
  in order, missing ones 0 (their tokens carry no loss)."""
  return jax.vmap(lambda row: jnp.nonzero(row, size=num_tokens, fill_value=0)[0])(image_token_mask)


def lm_target_mask(batch: dict, cfg: LossConfig) -> jax.Array:
  """(B, L - 1) bool: position i + 1's label is a text target (not ignored, not a placeholder)."""
  image_mask = batch['input_ids'][:, 1:] == cfg.placeholder_id
  return (batch['labels'][:, 1:] != IGNORE_ID) & ~image_mask


def token_loss_mask(batch: dict) -> jax.Array:
  """(B, N) bool: image tokens with an FM loss (valid rows, and `image_token_loss` when given)."""
  b, n = batch['image_tokens'].shape[:2]
  mask = jnp.broadcast_to(batch['image_valid'][:, None], (b, n))
  if 'image_token_loss' in batch:
    mask = mask & batch['image_token_loss']
  return mask


def loss_counts(batch: dict, cfg: LossConfig) -> dict:
  """The loss normalisers of `batch`, from its masks alone: {'lm_count': text targets (int32),
  'im_count': valid head rows (float32)}."""
  rows = jnp.tile(token_loss_mask(batch).reshape(-1).astype(jnp.float32), (cfg.fm_head_batch_mul,))
  return {'lm_count': lm_target_mask(batch, cfg).sum(), 'im_count': rows.sum()}


def lm_loss_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked sum of cross-entropies. logits (B, L', V) f32; targets, mask (B, L')."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  nll = (logz - target_logit) * mask
  return nll.sum()


def head_draws(key: jax.Array, num_rows: int, token_dim: int, cfg: LossConfig) -> dict:
  """The head objective's random draws for R = num_rows head rows (fm_head_batch_mul B N, ordered
  (copy, row, token) like the tiled tokens); every array leads with R, so a microbatch takes its
  rows' slice of the draws of the whole batch.

  flow: {'eps' (R, T) f32, 't' (R,)}; shortcut adds 'd' (R,) levels, 'd_query' (R,) (0 at the
  finest level) and 'is_sc' (R,) bool (self-consistency rows come first).
  """
  if cfg.head_objective != 'shortcut':
    key_t, key_eps = jax.random.split(key)
    t = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key_t, (num_rows,)))
    return {'eps': jax.random.normal(key_eps, (num_rows, token_dim), jnp.float32), 't': t}
  key_t, key_eps, key_level, key_grid = jax.random.split(key, 4)
  eps = jax.random.normal(key_eps, (num_rows, token_dim), jnp.float32)
  t_flow = jax.nn.sigmoid(cfg.time_mean + cfg.time_std * jax.random.normal(key_t, (num_rows,)))
  levels = int(math.log2(cfg.shortcut_max_steps))
  level = jax.random.randint(key_level, (num_rows,), 1, levels + 1)
  d = 2.0 ** -level.astype(jnp.float32)
  grid_points = 2**level - 1  # t = j d with j = 0 .. 1/d - 2, so that t + 2d <= 1.
  t_sc = jnp.floor(jax.random.uniform(key_grid, (num_rows,)) * grid_points) * d
  is_sc = jnp.arange(num_rows) < round(cfg.shortcut_fraction * num_rows)
  return {
    'eps': eps,
    't': jnp.where(is_sc, t_sc, t_flow),
    'd': d,
    'd_query': jnp.where(level == levels, 0.0, d),
    'is_sc': is_sc,
  }


def flow_matching_loss_sum(
  velocity_fn, x1: jax.Array, cond: jax.Array, mask: jax.Array, draws: dict, cfg: LossConfig
) -> jax.Array:
  """x1 (M, T) clean tokens, cond (M, C) conditions, mask (M,), draws of M' = M fm_head_batch_mul
  rows (`head_draws`) -> masked sum over rows of the per-row mean squared error.

  velocity_fn(x_t (M', T), t (M',), cond (M', C)) -> (M', T).
  """
  mul = cfg.fm_head_batch_mul
  x1 = jnp.tile(x1.astype(jnp.float32), (mul, 1))
  cond = jnp.tile(cond, (mul, 1))
  mask = jnp.tile(mask.astype(jnp.float32), (mul,))
  t, eps = draws['t'], draws['eps']
  x_t = t[:, None] * x1 + (1.0 - t[:, None]) * eps
  target = x1 - eps
  v = velocity_fn(x_t, t, cond).astype(jnp.float32)
  per_token = jnp.mean(jnp.square(v - target), axis=-1)
  return (per_token * mask).sum()


def shortcut_loss_sum(
  velocity_fn, x1: jax.Array, cond: jax.Array, mask: jax.Array, draws: dict, cfg: LossConfig
) -> jax.Array:
  """Flow matching at d = 0 plus the shortcut self-consistency rows (see module doc); masked sum.

  velocity_fn(x_t (M', T), t (M',), cond (M', C), d (M',)) -> (M', T).
  """
  mul = cfg.fm_head_batch_mul
  x1 = jnp.tile(x1.astype(jnp.float32), (mul, 1))
  cond = jnp.tile(cond, (mul, 1))
  mask = jnp.tile(mask.astype(jnp.float32), (mul,))
  eps, t, d, d_query, is_sc = (draws[k] for k in ('eps', 't', 'd', 'd_query', 'is_sc'))
  x_t = t[:, None] * x1 + (1.0 - t[:, None]) * eps
  u_1 = jax.lax.stop_gradient(velocity_fn(x_t, t, cond, d_query).astype(jnp.float32))
  u_2 = jax.lax.stop_gradient(
    velocity_fn(x_t + d[:, None] * u_1, t + d, cond, d_query).astype(jnp.float32)
  )
  target = jnp.where(is_sc[:, None], 0.5 * (u_1 + u_2), x1 - eps)
  v = velocity_fn(x_t, t, cond, jnp.where(is_sc, 2.0 * d, 0.0)).astype(jnp.float32)
  per_token = jnp.mean(jnp.square(v - target), axis=-1)
  return (per_token * mask).sum()


def loss_sums(model, batch: dict, draws: dict, cfg: LossConfig) -> dict:
  """Unnormalised loss pieces {'lm_sum', 'im_sum'} of `batch` with the head draws of its rows."""
  input_ids, tokens = batch['input_ids'], batch['image_tokens']
  b, n, _ = tokens.shape
  image_mask = input_ids == cfg.placeholder_id
  x = model.embed(input_ids, tokens, image_mask)
  hidden, _ = model(x, batch['positions'], batch['attention_mask'])

  lm = lm_loss_sum(
    model.lm_logits(hidden[:, :-1]), batch['labels'][:, 1:], lm_target_mask(batch, cfg)
  )

  cond_positions = placeholder_positions(image_mask, n) - 1  # (B, N): predicts token k
  cond_hidden = jnp.take_along_axis(hidden, cond_positions[..., None], axis=1)
  cond = model.head_condition(cond_hidden, jnp.broadcast_to(jnp.arange(n), (b, n)))
  token_mask = token_loss_mask(batch).reshape(-1)
  head_loss = shortcut_loss_sum if cfg.head_objective == 'shortcut' else flow_matching_loss_sum
  im = head_loss(
    model.image_head, tokens.reshape(b * n, -1), cond.reshape(b * n, -1), token_mask, draws, cfg
  )
  return {'lm_sum': lm, 'im_sum': im}


def combine_loss(sums: dict, counts: dict, cfg: LossConfig) -> tuple[jax.Array, dict]:
  """Normalised pieces and the weighted total: (total, {'loss', 'lm_loss', 'im_loss'}).

  Linear in `sums`: with the counts of a whole batch, the totals of its microbatches' sums add up
  to the total of the batch."""
  lm = sums['lm_sum'] / (counts['lm_count'] + 1e-8)
  im = sums['im_sum'] / (counts['im_count'] + 1e-8)
  total = cfg.lm_loss_weight * lm + cfg.im_loss_weight * im
  return total, {'loss': total, 'lm_loss': lm, 'im_loss': im}


def compute_loss(model, batch: dict, key: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict]:
  """Total loss and its pieces {'loss', 'lm_loss', 'im_loss'} for one batch (see module doc)."""
  b, n, token_dim = batch['image_tokens'].shape
  draws = head_draws(key, cfg.fm_head_batch_mul * b * n, token_dim, cfg)
  return combine_loss(loss_sums(model, batch, draws, cfg), loss_counts(batch, cfg), cfg)
