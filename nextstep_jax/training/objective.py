"""Training objective: lm_loss_weight * CE(text) + im_loss_weight * FM(image tokens).

Batch (all arrays, leading B): input_ids (B, L) int32, labels (B, L) int32 (-100 = ignore; HF
convention: labels[i] is the target of position i-1), attention_mask (B, L) bool, positions (B, L)
int32, image_tokens (B, N, T) float32 (the row's placeholders in order), image_valid (B,) bool.

Routing (official): position i feeds the flow head iff input_ids[i+1] is a placeholder, else the
LM head with target labels[i+1]. Flow matching (t = 0 noise, t = 1 data): x_t = t x1 + (1-t) eps,
target u = x1 - eps, t = sigmoid(n), n ~ N(time_mean, time_std); every image token is tiled
`fm_head_batch_mul` times (row r <- r mod M) with fresh eps and t; squared error in float32, mean
over T, then a masked mean over tokens (+1e-8 in the denominator).
"""
import dataclasses

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

  @classmethod
  def from_config(cls, config, placeholder_id: int) -> 'LossConfig':
    lc = config.loss
    return cls(placeholder_id=placeholder_id, lm_loss_weight=lc.lm_loss_weight,
               im_loss_weight=lc.im_loss_weight, fm_head_batch_mul=lc.fm_head_batch_mul,
               time_mean=lc.time_mean, time_std=lc.time_std)


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
  im = flow_matching_loss(model.image_head, tokens.reshape(b * n, -1), cond.reshape(b * n, -1),
                          token_mask, key, cfg)
  total = cfg.lm_loss_weight * lm + cfg.im_loss_weight * im
  return total, {'loss': total, 'lm_loss': lm, 'im_loss': im}
