"""Per-token distillation of a trained multi-step head into a few-step head, backbone frozen.

Letters: B images, N image tokens, M = B * N * noises trajectories, T token dim, C condition
width, K = 2^k teacher record points per trajectory (student step sizes d = 1, 1/2, ..., 1/K).

1. Conditions: the teacher (the trained model with its own sampler, e.g. the official SDE + CFG)
   generates images for training prompts; one teacher-forced backbone pass over [prompt rows][those
   tokens] gives every token's head condition in both CFG branches, (2, B * N, C).
2. Trajectories: from fresh noise x0 per token, the teacher head integrates the guided ODE
   dx = [v_u + s (v_c - v_u)] dt on a uniform grid (`teacher_steps` Euler/Heun steps), recording
   x at t = j / K, j = 0..K: (K + 1, M, T).
3. Student: a copy of the head with the zero-initialised step-size embedding (flow_head.py).
   With `fold_guidance` it is conditioned on the text branch only and learns the guided step, so
   sampling needs one branch (no unconditional backbone rows, one head row per image); without,
   it keeps both branches and its CFG combination u = u_u + s (u_c - u_u) is what is trained (the
   sampler then runs 2-way CFG at the teacher's scale). For a random level d = 2^-l and start j
   (a multiple of d), the loss is || u(x_t, t, d) - (x_{t+d} - x_t) / d ||^2 on the teacher's
   states. Only head parameters receive updates; the backbone and projectors are copied unchanged.
"""

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.model import nextstep
from nextstep_jax.sampling import guidance
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import state as state_lib
from nextstep_jax.utils import logging as logging_lib


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Distillation settings (arguments of `distill`; recorded in the student's distill.json and
  checkpoint, not in its config)."""

  num_images: int = 1024  # Teacher images whose tokens give the conditions.
  noises_per_token: int = 2  # Teacher trajectories per token condition.
  teacher_steps: int = (
    16  # Uniform-grid ODE steps of the teacher (a multiple of max_student_steps).
  )
  teacher_solver: str = 'heun'  # euler | heun.
  max_student_steps: int = 8  # K: student step sizes 1, 1/2, ..., 1/K (a power of two).
  steps: int = 3000  # Student optimiser steps.
  batch_size: int = 512  # Trajectory segments per optimiser step.
  lr: float = 3e-4  # Adam learning rate (cosine decay to 10%, 100-step warm-up).
  fold_guidance: bool = True  # Student on the text branch only (one-branch sampling).

  def __post_init__(self):
    k = self.max_student_steps
    if k < 1 or k & (k - 1):
      raise ValueError(f'distill.max_student_steps={k} must be a power of two')
    if self.teacher_steps % k:
      raise ValueError(
        f'distill.teacher_steps={self.teacher_steps} must be a multiple of '
        f'distill.max_student_steps={k}'
      )
    if self.teacher_solver not in ('euler', 'heun'):
      raise ValueError(f'distill.teacher_solver={self.teacher_solver!r}; use euler or heun')


def token_conditions(model, prompt: dict, tokens: jax.Array, num_branches: int) -> jax.Array:
  """Teacher-forced head conditions of every image token in every branch.

  prompt: input_ids / attention_mask / positions (R, P) with R = num_branches * B rows
  (branch-major, left padded); tokens (B, N, T). Returns (R, N, C): the condition that predicts
  token k from the prompt and tokens < k, as the cached sampler computes it.
  """
  ids, mask, positions = prompt['input_ids'], prompt['attention_mask'], prompt['positions']
  rows, _ = ids.shape
  n = tokens.shape[1]
  fed = jnp.tile(tokens[:, :-1], (num_branches, 1, 1))
  x = jnp.concatenate([model.embed(ids, None, None), model.embed_image_tokens(fed)], axis=1)
  image_positions = positions[:, -1:] + 1 + jnp.arange(n - 1)[None]
  hidden, _ = model(
    x,
    jnp.concatenate([positions, image_positions], axis=1),
    jnp.concatenate([mask, jnp.ones((rows, n - 1), bool)], axis=1),
  )
  last = hidden[:, ids.shape[1] - 1 :]  # (R, N, D): boi predicts token 0, token k-1 predicts k.
  return model.head_condition(last, jnp.broadcast_to(jnp.arange(n), (rows, n)))


def teacher_trajectories(
  head, cond_emb: jax.Array, x0: jax.Array, scale: float, cfg: DistillConfig
) -> jax.Array:
  """Guided teacher ODE from x0 (M, T) with branch-major cond_emb (2M, W) [text; uncond].
  Returns the states at t = j / K, j = 0..K: (K + 1, M, T) float32."""
  k = cfg.max_student_steps
  per_segment = cfg.teacher_steps // k
  dt = 1.0 / cfg.teacher_steps

  def velocity(x, t):
    v = head.velocity_from_condition(jnp.tile(x, (2, 1)), t, cond_emb)
    return guidance.combine_two_way(v, jnp.asarray(scale, jnp.float32))

  def step(x, t):
    v = velocity(x, t)
    if cfg.teacher_solver == 'euler':
      return x + dt * v, None
    return x + 0.5 * dt * (v + velocity(x + dt * v, t + dt)), None

  def segment(x, j):
    times = (j * per_segment + jnp.arange(per_segment)) * dt
    x, _ = jax.lax.scan(step, x, times)
    return x, x

  _, states = jax.lax.scan(segment, x0, jnp.arange(k))
  return jnp.concatenate([x0[None], states], axis=0)


def student_loss(
  head,
  cond: jax.Array,
  states: jax.Array,
  key: jax.Array,
  max_steps: int,
  scale: float | None = None,
) -> jax.Array:
  """Mean || u(x_t, t, d) - (x_{t+d} - x_t) / d ||^2 over random levels and starts.

  cond (M, C) text-branch conditions (folded guidance, scale None), or (2, M, C) [text; uncond]
  with u the CFG combination at `scale`; states (K + 1, M, T) teacher states at t = j / K."""
  m = states.shape[1]
  levels = int(math.log2(max_steps)) + 1
  key_level, key_start = jax.random.split(key)
  level = jax.random.randint(key_level, (m,), 0, levels)  # d = 2^-level.
  stride = max_steps // (2**level)  # Record points per step of size d.
  segments = 2**level
  start = (jax.random.uniform(key_start, (m,)) * segments).astype(jnp.int32) * stride
  rows = jnp.arange(m)
  x_t, x_next = states[start, rows], states[start + stride, rows]
  d = stride.astype(jnp.float32) / max_steps
  t = start.astype(jnp.float32) / max_steps
  if scale is None:
    u = head(x_t, t, cond, d)
  else:
    v = head(jnp.tile(x_t, (2, 1)), jnp.tile(t, 2), cond.reshape(2 * m, -1), jnp.tile(d, 2))
    u = guidance.combine_two_way(v, jnp.asarray(scale, jnp.float32))
  return jnp.mean(jnp.square(u - (x_next - x_t) / d[:, None]))


def student_model(teacher_config, teacher_params):
  """(config, graphdef, params) of the student: the teacher's model with a step-conditioned head,
  every teacher parameter copied, the step embedding at its zero initialisation."""
  config = configlib.with_base_defaults(teacher_config)
  with config.unlocked():
    config.model.fm_head_step_cond = True
  model = nextstep.NextStep(
    nextstep.ModelConfig.from_config(config.model), rngs=nnx.Rngs(config.seed)
  )
  graphdef, params = nnx.split(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(teacher_params):
    flat[path].set_value(var.get_value())
  return config, graphdef, nnx.from_flat_state(flat)


def split_head(params) -> tuple:
  """(head params, the rest) of a NextStep nnx.State."""
  head = nnx.State({'image_head': params['image_head']})
  rest = nnx.State({k: v for k, v in params.items() if k != 'image_head'})
  return head, rest


def merge_head(head, rest):
  return nnx.State({**rest, 'image_head': head['image_head']})


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train_step(graphdef, tx, max_steps, scale, head_params, rest, opt_state, cond, states, key):
  def loss_fn(hp):
    model = nnx.merge(graphdef, merge_head(hp, rest))
    return student_loss(model.image_head, cond, states, key, max_steps, scale)

  loss, grads = jax.value_and_grad(loss_fn)(head_params)
  updates, opt_state = tx.update(grads, opt_state, head_params)
  return optax.apply_updates(head_params, updates), opt_state, loss


def train_student(
  graphdef,
  params,
  cond: np.ndarray,
  states: np.ndarray,
  cfg: DistillConfig,
  seed: int = 0,
  log_every: int = 250,
  scale: float | None = None,
) -> tuple[nnx.State, list[float]]:
  """Adam on the head parameters only. cond (M, C) (folded) or (2, M, C) with the teacher's CFG
  `scale`; states (K + 1, M, T) host arrays.
  Returns (params with the trained head and every other parameter unchanged, losses per log)."""
  head, rest = split_head(params)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, min(100, cfg.steps // 2), cfg.steps, cfg.lr * 0.1
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(head)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  m = states.shape[1]
  progress = logging_lib.ProgressLogger(cfg.steps, log_every, items_per_step=cfg.batch_size)
  losses, running = [], []
  for step in range(cfg.steps):
    idx = rng.integers(0, m, cfg.batch_size)
    head, opt_state, loss = _train_step(
      graphdef,
      tx,
      cfg.max_student_steps,
      scale,
      head,
      rest,
      opt_state,
      jnp.asarray(cond[..., idx, :]),
      jnp.asarray(states[:, idx]),
      jax.random.fold_in(key, step),
    )
    running.append(loss)
    if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
      losses.append(float(np.mean(jax.device_get(running))))
      running = []
      progress.update(step + 1, {'loss': losses[-1]})
  return merge_head(head, rest), losses


def teacher_data(
  teacher: pipeline.TextToImage,
  prompts: list[str],
  seeds: list[int],
  cfg: DistillConfig,
  chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
  """Teacher images for `prompts`, their conditions (2, M, C) [text; uncond] and guided ODE
  states (K + 1, M, T), with noises_per_token fresh noises per token (rows noise-major)."""
  if teacher.sampler_cfg.num_branches != 2:
    raise ValueError(
      'distillation folds text CFG into the student: the teacher needs sample.cfg != 1'
    )
  model = nnx.merge(teacher.graphdef, teacher.params)
  scale = teacher.sampler_cfg.cfg

  @jax.jit
  def conditions_and_states(prompt, tokens, key):
    cond = token_conditions(model, prompt, tokens, 2)  # (2B, N, C)
    cond = cond.reshape(2, -1, cond.shape[-1])  # (2, B*N, C)
    cond = jnp.tile(cond, (1, cfg.noises_per_token, 1))  # (2, M, C)
    cond_emb = model.image_head.condition(cond.reshape(-1, cond.shape[-1]))
    x0 = jax.random.normal(key, cond.shape[1:2] + (tokens.shape[-1],), jnp.float32)
    return cond, teacher_trajectories(model.image_head, cond_emb, x0, scale, cfg)

  conds, states = [], []
  progress = logging_lib.ProgressLogger(len(prompts), chunk)
  for start in range(0, len(prompts), chunk):
    p, s = prompts[start : start + chunk], seeds[start : start + chunk]
    tokens = teacher.tokens(p, s)
    prompt = {k: jnp.asarray(v) for k, v in teacher.prompts(p).items()}
    c, x = conditions_and_states(prompt, jnp.asarray(tokens), jax.random.key(s[0]))
    conds.append(np.asarray(c))
    states.append(np.asarray(x))
    progress.update(min(start + chunk, len(prompts)))
  return np.concatenate(conds, axis=1), np.concatenate(states, axis=1)


def distill(
  teacher_workdir: str,
  out_workdir: str,
  prompts: list[str],
  seeds: list[int],
  cfg: DistillConfig,
  student_steps: int = 4,
) -> dict:
  """Distils the run in `teacher_workdir` (its own sampler settings are the teacher) and writes a
  loadable run to `out_workdir` (config.json with the step-conditioned head and one-branch Euler
  sampling of `student_steps` uniform steps, tokenizer.model, checkpoint). Returns a summary."""
  start = time.perf_counter()
  teacher = pipeline.TextToImage.from_workdir(teacher_workdir)
  cond, states = teacher_data(teacher, prompts, seeds, cfg)
  data_s = time.perf_counter() - start
  config, graphdef, params = student_model(teacher.config, teacher.params)
  scale = teacher.sampler_cfg.cfg
  if cfg.fold_guidance:
    params, losses = train_student(graphdef, params, cond[0], states, cfg, seed=config.seed)
  else:
    params, losses = train_student(
      graphdef, params, cond, states, cfg, seed=config.seed, scale=scale
    )
  with config.unlocked():
    config.sample.update(
      dict(
        solver='euler',
        time_grid='B',
        timestep_shift=1.0,
        num_steps=student_steps,
        cfg=1.0 if cfg.fold_guidance else scale,
        cfg_schedule='constant',
        times=(),
        token_steps=(),
      )
    )
  configlib.validate(config)
  out = pathlib.Path(out_workdir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  (out / runs.CONFIG_FILE).write_text(configlib.config_to_json(config))
  shutil.copy(pathlib.Path(teacher_workdir) / runs.TOKENIZER_FILE, out / runs.TOKENIZER_FILE)
  tx = state_lib.make_optimizer(config.train)
  state = {
    'params': params,
    'opt_state': tx.init(params),
    'step': jnp.asarray(cfg.steps, jnp.int32),
  }
  summary = {
    'teacher': str(teacher_workdir),
    'teacher_sample': teacher.settings,
    'trajectories': int(states.shape[1]),
    'data_seconds': round(data_s, 1),
    'train_seconds': round(time.perf_counter() - start - data_s, 1),
    'losses': losses,
    'distill': dataclasses.asdict(cfg),
  }
  ckpt = checkpoints.Checkpointer(out / runs.CHECKPOINT_DIR, keep=1, async_save=False)
  try:
    ckpt.save(cfg.steps, state, {'distill': summary}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  (out / 'distill.json').write_text(json.dumps(summary, indent=2, default=str) + '\n')
  return summary
