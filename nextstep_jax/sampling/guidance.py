"""Classifier-free guidance on head velocities. Rows are branch-major: [cond; uncond(; uncond2)].

2-way (text):  v = v_u + cfg (v_c - v_u).
3-way (edit), branches [full, source image + negative text, negative text only]:
  v = v_none + cfg_img (v_img - v_none) + cfg (v_full - v_img).
"""

import jax
import jax.numpy as jnp

SCHEDULES = ('constant', 'linear')


def combine_two_way(v: jax.Array, cfg: jax.Array) -> jax.Array:
  """v (2B, T) branch-major -> (B, T)."""
  v_cond, v_uncond = jnp.split(v, 2, axis=0)
  return v_uncond + cfg * (v_cond - v_uncond)


def combine_three_way(v: jax.Array, cfg: jax.Array, cfg_img: jax.Array) -> jax.Array:
  """v (3B, T) branch-major [full, image-only, none] -> (B, T)."""
  v_full, v_img, v_none = jnp.split(v, 3, axis=0)
  return v_none + cfg_img * (v_img - v_none) + cfg * (v_full - v_img)


def guidance_scale(cfg: float, schedule: str, token_index: jax.Array, num_tokens: int) -> jax.Array:
  """Scale for image token k of N: 'constant' = cfg; 'linear' = 1 + (cfg - 1)(N - k)/N (decays
  from cfg towards 1, the [gh]/vLLM direction)."""
  if schedule == 'constant':
    return jnp.asarray(cfg, jnp.float32)
  if schedule == 'linear':
    return 1.0 + (cfg - 1.0) * (num_tokens - token_index.astype(jnp.float32)) / num_tokens
  raise ValueError(f'sample.cfg_schedule={schedule!r}; choose one of {SCHEDULES}')
