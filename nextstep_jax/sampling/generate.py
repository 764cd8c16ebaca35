"""Text-to-image generation: prefill the prompt rows once, then `lax.scan` over image positions.

Letters: B images, R = branches * B prompt rows (branch-major: [cond; uncond(; uncond2)]), P prompt
width (left padded), N = h * w image tokens, T token dim, D hidden.

For image token k: c = image_out_projector(last hidden (R, D) [+ gen_pos_embed[k]]); the head's
condition embedding is computed once; the per-token integrator (itself a `lax.scan` over steps)
runs on x (B, T) with every branch evaluated in one batched head call and combined by CFG; the
token (optionally LayerNorm-ed, `use_norm`) is fed to every branch's row for one cached decoder
step at slot P + k. The whole generation is one jitted function of (graphdef, state, prompt, keys).
`token_steps` (training-free few-step baseline) splits the N tokens into equal raster-order
segments, segment j integrating with token_steps[j] steps (e.g. (8, 4, 2, 1): many steps for the
early tokens that fix the layout, few for the late ones); each segment is its own `lax.scan`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import nn as L
from nextstep_jax.sampling import guidance
from nextstep_jax.sampling import integrators
from nextstep_jax.sampling import progress


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampling settings (hashable: part of the jit cache key)."""
  grid_h: int
  grid_w: int
  integrator: integrators.IntegratorConfig = integrators.IntegratorConfig()
  num_branches: int = 2  # 1 = no guidance, 2 = text CFG, 3 = edit CFG.
  cfg: float = 1.0
  cfg_img: float = 1.0  # Image guidance of the 3-way form.
  cfg_schedule: str = 'constant'
  use_norm: bool = False
  progress_every: int = 0  # > 0: host callback every this many tokens (sampling/progress.py).
  token_steps: tuple[int, ...] = ()  # Annealed steps per token segment; () = integrator.num_steps.

  def __post_init__(self):
    if self.num_branches not in (1, 2, 3):
      raise ValueError(f'num_branches={self.num_branches}; use 1 (no CFG), 2 (text) or 3 (edit)')
    if self.cfg_schedule not in guidance.SCHEDULES:
      raise ValueError(f'sample.cfg_schedule={self.cfg_schedule!r}; choose one of {guidance.SCHEDULES}')
    if self.token_steps and (len(self.token_steps) > self.num_tokens or min(self.token_steps) < 1):
      raise ValueError(f'sample.token_steps={self.token_steps}: need 1..{self.num_tokens} segments of >= 1 steps')

  def token_segments(self) -> list[tuple[int, int, integrators.IntegratorConfig]]:
    """[(first token, end token, integrator)] covering 0..N-1 in order."""
    if not self.token_steps:
      return [(0, self.num_tokens, self.integrator)]
    bounds = [round(j * self.num_tokens / len(self.token_steps)) for j in range(len(self.token_steps) + 1)]
    return [(bounds[j], bounds[j + 1], dataclasses.replace(self.integrator, num_steps=n))
            for j, n in enumerate(self.token_steps)]

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  @classmethod
  def from_config(cls, config, grid_h: int, grid_w: int, num_branches: int | None = None) -> 'SamplerConfig':
    s = config.sample
    integ = integrators.IntegratorConfig(
        num_steps=s.num_steps, solver=s.solver, time_grid=s.time_grid, timestep_shift=s.timestep_shift,
        last_step_size=s.last_step_size, temperature=s.temperature, times=tuple(s.get('times', ())),
        unroll=config.model.scan_unroll)
    if num_branches is None:
      num_branches = 1 if s.cfg == 1.0 else 2
    return cls(grid_h=grid_h, grid_w=grid_w, integrator=integ, num_branches=num_branches, cfg=s.cfg,
               cfg_schedule=s.cfg_schedule, use_norm=config.image.use_norm,
               token_steps=tuple(s.get('token_steps', ())))


def guided_velocity(head, cond_emb: jax.Array, cfg: SamplerConfig,
                    scale: jax.Array) -> integrators.ConditionedVelocity:
  """The guided velocity of one token: its table is the head's step_modulations of every
  evaluation point (all branches' rows, built once per token); each step tiles x over the
  branches, runs the head's x-path once for all rows, then combines the branches (CFG)."""
  branches = cfg.num_branches

  def apply(x, modulations):
    v = head.velocity_from_modulations(jnp.tile(x, (branches, 1)), modulations)
    if branches == 1:
      return v
    if branches == 2:
      return guidance.combine_two_way(v, scale)
    return guidance.combine_three_way(v, scale, jnp.asarray(cfg.cfg_img, jnp.float32))

  return integrators.ConditionedVelocity(
      condition=lambda t, d: head.step_modulations(t, cond_emb, d), apply=apply)


def sample_token(model, last_hidden: jax.Array, token_index: jax.Array, row_keys: jax.Array,
                 cfg: SamplerConfig, integrator: integrators.IntegratorConfig | None = None) -> jax.Array:
  """Samples image token `token_index` for B images from the rows' last hidden (R, D).
  row_keys (B,) keys of this token; integrator defaults to cfg.integrator. Returns (B, T) float32."""
  integrator = integrator or cfg.integrator
  cond = model.head_condition(last_hidden, token_index)
  cond_emb = model.image_head.condition(cond)  # Once per token, outside the integration loop.
  scale = guidance.guidance_scale(cfg.cfg, cfg.cfg_schedule, token_index, cfg.num_tokens)
  velocity = guided_velocity(model.image_head, cond_emb, cfg, scale)
  x0 = integrator.temperature * integrators.row_normal(row_keys, 0, (model.cfg.token_dim,))
  token = integrators.integrate(velocity, x0, row_keys, integrator)
  return L.layer_norm(token) if cfg.use_norm else token


def generate_tokens_fn(model, prompt: dict, image_keys: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """prompt: input_ids (R, P) int32, attention_mask (R, P) bool, positions (R, P) int32 (left
  padded, raw slots), optionally image_tokens (R, Ns, T) + image_token_mask (R, P) bool (edit
  prompts: source tokens fed at the placeholders); image_keys (B,) one key per image.
  Returns tokens (B, N, T) float32."""
  ids = prompt['input_ids']
  rows, width = ids.shape
  if rows != cfg.num_branches * image_keys.shape[0]:
    raise ValueError(f'{rows} prompt rows for {image_keys.shape[0]} images and {cfg.num_branches} branches')
  cache = model.decoder.init_cache(rows, width + cfg.num_tokens - 1)
  embeds = model.embed(ids, prompt.get('image_tokens'), prompt.get('image_token_mask'))
  hidden, cache = model(embeds, prompt['positions'], prompt['attention_mask'], cache)
  next_position = prompt['positions'][:, -1:] + 1  # (R, 1)

  def token_at(last_hidden, k, integrator):
    token_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, k)
    return sample_token(model, last_hidden, k, token_keys, cfg, integrator)

  def step_with(integrator):
    def step(carry, k):
      cache, last_hidden = carry
      token = token_at(last_hidden, k, integrator)
      x = jnp.tile(model.embed_image_tokens(token[:, None]), (cfg.num_branches, 1, 1))  # Project once, not per branch.
      hidden, cache = model(x, next_position + k, jnp.ones((rows, 1), bool), cache)
      if cfg.progress_every:
        progress.report(k + 1, cfg.progress_every)
      return (cache, hidden[:, 0]), token
    return step

  # Tokens 0..N-2 each feed one decoder step; the last token needs no decoder step after it.
  carry, pieces = (cache, hidden[:, -1]), []
  for start, end, integrator in cfg.token_segments():
    end_scanned = min(end, cfg.num_tokens - 1)
    if end_scanned > start:
      carry, tokens = jax.lax.scan(step_with(integrator), carry, jnp.arange(start, end_scanned))
      pieces.append(tokens.transpose(1, 0, 2))
    if end == cfg.num_tokens:
      pieces.append(token_at(carry[1], jnp.asarray(cfg.num_tokens - 1), integrator)[:, None])
  return jnp.concatenate(pieces, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def generate_tokens(graphdef, state, prompt: dict, image_keys: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """Jitted `generate_tokens_fn` on a split model (graphdef static, state traced)."""
  return generate_tokens_fn(nnx.merge(graphdef, state), prompt, image_keys, cfg)


def image_keys_from_seeds(seeds) -> jax.Array:
  """(B,) int seeds -> (B,) keys; image b's noise depends only on its seed."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
