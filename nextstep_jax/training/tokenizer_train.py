"""Tokenizer (VAE) training: reconstruction L1 + L2, KL, latent noise regularisation, patch GAN.

Per step (images x in [-1, 1], batch of `vae_train.batch_size`, sampled with replacement by
default_rng([seed, step]), so resume is exact):
  (mean, logvar) = posterior(x); z = mean + std * eps; latents = (z - shift) * scale
  noise regularisation: latents += alpha * eps', alpha ~ U[0, noise_max] per image (paper: 0.2)
  x_hat = decode(latents)
  loss = l1 |x - x_hat| + l2 (x - x_hat)^2 (means) + kl_weight * KL (summed over latent elements,
         mean over images) + [step >= disc_start] disc_weight * -mean(D(x_hat))
  discriminator (disc_weight > 0): hinge mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))),
         trained from disc_start.
Sharded like the main trainer: params by their logical axes (`config.mesh.rules`), images over
`batch`, state donated. Workdir: train_config.json, checkpoints/ (orbax, resumable), tb/,
grids/step_<7 digits>.png (held-out originals above reconstructions), metrics.jsonl, and at the
end release/ (config.json + vae.safetensors, the official layout; scaling/shift factors from the
latent channel statistics) plus stats.json (per-channel mean/std of the training latents).
"""

import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax.data import builtin_source
from nextstep_jax.image import discriminator
from nextstep_jax.image import tokenizers
from nextstep_jax.image import vae
from nextstep_jax.image import vae_tokenizer
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.utils import images as image_utils
from nextstep_jax.utils import logging as log_utils

CONFIG_FILE = 'train_config.json'
STATS_FILE = 'stats.json'
NUM_GRID = 8  # Held-out images in each reconstruction grid.
HELDOUT_SEED = 7919  # Shapes held-out scenes: default_rng(HELDOUT_SEED + seed), 'heldout' split.


class TrainingDivergedError(errors.UserError, RuntimeError):
  """A loss became NaN/Inf."""


def model_config(config) -> vae.AutoEncoderConfig:
  return vae.AutoEncoderConfig.from_config(config.image.vae)


def heldout_images(config, num: int) -> np.ndarray:
  """uint8 (num, S, S, 3) never trained on: shapes scenes of the held-out colour-shape pairs;
  the digits test split."""
  if config.data.dataset == 'shapes':
    from nextstep_jax.data.builtin import shapes

    return shapes.make_dataset(
      num, HELDOUT_SEED + config.seed, size=config.image.size, split='heldout'
    )[0]
  from nextstep_jax.data.builtin import digits

  return digits.load_split('test', size=config.image.size)[0][:num]


def make_optimizer(t) -> optax.GradientTransformation:
  """Adam (0.5, 0.9), linear warm-up then constant lr, global-norm clip 1.0 (LDM's recipe)."""
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1)), optax.constant_schedule(t.lr)],
    [t.warmup_steps],
  )
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=0.5, b2=0.9))


def init_state(config, tx) -> dict:
  cfg = model_config(config)
  rngs = nnx.Rngs(config.seed)
  state = {
    'params': nnx.state(vae.AutoEncoder(cfg, rngs), nnx.Param),
    'step': jnp.zeros((), jnp.int32),
  }
  state['opt_state'] = tx.init(state['params'])
  if config.vae_train.disc_weight > 0:
    disc = nnx.state(
      discriminator.PatchDiscriminator(config.vae_train.disc_ch, cfg, rngs), nnx.Param
    )
    state.update(disc=disc, disc_opt_state=tx.init(disc))
  return state


def _graphdefs(config):
  cfg = model_config(config)
  model = nnx.eval_shape(lambda: vae.AutoEncoder(cfg, nnx.Rngs(0)))
  disc = nnx.eval_shape(
    lambda: discriminator.PatchDiscriminator(config.vae_train.disc_ch, cfg, nnx.Rngs(0))
  )
  return nnx.split(model, nnx.Param)[0], nnx.split(disc, nnx.Param)[0]


def train_step_fn(config, graphdef, disc_graphdef, tx, state: dict, images: jax.Array):
  """One step (module docstring): (state, images (B, S, S, 3)) -> (state, float32 metrics)."""
  t = config.vae_train
  step = state['step']
  keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step), 3)
  use_disc = 'disc' in state
  gan_on = (step >= t.disc_start).astype(jnp.float32)

  def generator_loss(params):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.posterior(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(keys[0], mean.shape)
    latents = model.normalize(z)
    alpha = jax.random.uniform(keys[1], (latents.shape[0], 1, 1, 1), maxval=t.noise_max)
    latents = latents + alpha * jax.random.normal(keys[2], latents.shape)
    recon = model.decode(latents)
    l1 = jnp.mean(jnp.abs(images - recon))
    l2 = jnp.mean(jnp.square(images - recon))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = t.l1_weight * l1 + t.l2_weight * l2 + t.kl_weight * kl
    metrics = {'l1': l1, 'l2': l2, 'kl': kl, 'psnr': 10 * jnp.log10(4.0 / jnp.maximum(l2, 1e-10))}
    if use_disc:
      gan = -jnp.mean(nnx.merge(disc_graphdef, state['disc'])(recon))
      loss = loss + gan_on * t.disc_weight * gan
      metrics['gan'] = gan
    return loss, (metrics, recon)

  (loss, (metrics, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
    state['params']
  )
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new = dict(
    state, params=optax.apply_updates(state['params'], updates), opt_state=opt_state, step=step + 1
  )
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
  if use_disc:
    fake = jax.lax.stop_gradient(recon)

    def disc_loss(disc_params):
      disc = nnx.merge(disc_graphdef, disc_params)
      return jnp.mean(jax.nn.relu(1 - disc(images))) + jnp.mean(jax.nn.relu(1 + disc(fake)))

    d_loss, d_grads = jax.value_and_grad(disc_loss)(state['disc'])
    d_grads = jax.tree.map(lambda g: g * gan_on, d_grads)  # Frozen before disc_start.
    d_updates, d_opt = tx.update(d_grads, state['disc_opt_state'], state['disc'])
    new.update(disc=optax.apply_updates(state['disc'], d_updates), disc_opt_state=d_opt)
    metrics['disc_loss'] = d_loss
  return new, {k: v.astype(jnp.float32) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class _Program:
  """The jitted functions of one config (cached, so reruns and resumes in a process reuse them)."""

  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract: Any  # Train state of ShapeDtypeStructs with their shardings (restore target).
  init: Callable[[], dict]
  step: Callable[[dict, jax.Array], tuple[dict, dict]]


@functools.lru_cache(maxsize=4)
def _program(config_json: str) -> _Program:
  """Sharded init and train step: params by their logical axes, images over `batch`, state donated."""
  config = configlib.config_from_json(config_json)
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = make_optimizer(config.vae_train)
  graphdef, disc_graphdef = _graphdefs(config)
  abstract = jax.eval_shape(lambda: init_state(config, tx))
  shardings = rules_lib.state_shardings(abstract, mesh, config.mesh.rules)
  batch_sharding = rules_lib.activation_spec(mesh, config.mesh.rules, 'batch', None, None, None)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
    lambda s, x: train_step_fn(config, graphdef, disc_graphdef, tx, s, x),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, replicated),
    donate_argnums=(0,),
  )
  return _Program(
    mesh,
    graphdef,
    rules_lib.abstract_with_shardings(abstract, mesh, config.mesh.rules),
    jax.jit(lambda: init_state(config, tx), out_shardings=shardings),
    step,
  )


def batch_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
  """Training rows of `step`: with replacement, a pure function of (seed, step)."""
  return np.random.default_rng([seed, step, 2]).integers(n, size=batch)


def train(config, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the tokenizer of `config` in `workdir`; returns the final metrics and
  channel statistics (see module docstring for the files written)."""
  configlib.validate(config)
  if config.image.tokenizer != 'vae':
    raise ValueError(f'image.tokenizer={config.image.tokenizer!r}; tokenizer training needs "vae".')
  t = config.vae_train
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(configlib.config_to_json(config))
  images, _ = builtin_source.load_images_and_captions(config)
  held = heldout_images(config, t.num_eval)
  program = _program(configlib.config_to_json(config))
  mesh, graphdef = program.mesh, program.graphdef
  ckpt = checkpoints.Checkpointer(root / 'checkpoints', keep=t.keep_checkpoints)
  restored = ckpt.restore_newest(
    program.abstract,  # Damaged newer steps are moved aside.
    log=lambda line: print(f'warning: {line}', flush=True),
  )
  if restored is None:
    state, start = program.init(), 0
  else:
    state, start = restored.state, restored.step
    print(f'resumed from step {start} in {root}', flush=True)
  step_fn = program.step
  writer = log_utils.MetricWriter(root / 'tb')
  progress = log_utils.ProgressLogger(
    t.steps, t.log_every, start_step=start, items_per_step=t.batch_size
  )
  host: dict = {}
  step = start
  t_start = time.monotonic()
  with open(root / 'metrics.jsonl', 'a') as metrics_file:
    while step < t.steps:
      rows = images[batch_indices(config.seed, step, t.batch_size, len(images))]
      batch = rules_lib.shard_batch(tokenizers.uint8_to_unit(rows), mesh, config.mesh.rules)
      state, metrics = step_fn(state, batch)
      step += 1
      last = step == t.steps or step == stop_at
      if step % t.log_every == 0 or last:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in host.items() if not math.isfinite(v)}
        if bad:
          raise TrainingDivergedError(
            f'step {step}: non-finite {bad}; lower vae_train.lr or '
            'kl_weight and resume from the last checkpoint.'
          )
        writer.scalars(step, host)
        minutes = (time.monotonic() - t_start) / 60
        metrics_file.write(json.dumps({'step': step, 'minutes': minutes, **host}) + '\n')
        metrics_file.flush()
        progress.update(step, {k: host[k] for k in ('loss', 'psnr', 'kl')})
      if step % t.checkpoint_every == 0 or last:
        ckpt.save(step, state, extra={'step': step}, force=True)
      if (t.grid_every and step % t.grid_every == 0) or last:
        save_grid(graphdef, state['params'], held[:NUM_GRID], root, step, writer)
      if step == stop_at:
        break
  ckpt.close()
  writer.close()
  if step < t.steps:
    return {'step': step, **host}
  stats = finalize(config, graphdef, state['params'], images, root)
  return {'step': step, **host, **stats}


def _model(graphdef, params) -> vae.AutoEncoder:
  return nnx.merge(graphdef, jax.device_get(params))


@nnx.jit
def _reconstruct(model: vae.AutoEncoder, images: jax.Array) -> jax.Array:
  return model.decode(model.encode(images))


@nnx.jit
def _posterior_mean(model: vae.AutoEncoder, images: jax.Array) -> jax.Array:
  return model.posterior(images)[0]


def save_grid(
  graphdef, params, originals: np.ndarray, root: pathlib.Path, step: int, writer
) -> str:
  """Held-out originals (top row) above their reconstructions (bottom row) as a PNG."""
  model = _model(graphdef, params)
  recon = _reconstruct(model, tokenizers.uint8_to_unit(originals))
  grid = image_utils.make_grid(
    np.concatenate([originals, image_utils.to_uint8(recon)]), ncols=len(originals)
  )
  path = root / 'grids' / f'step_{step:07d}.png'
  image_utils.save_png(path, grid)
  writer.image(step, 'reconstructions', grid)
  return str(path)


def finalize(config, graphdef, params, images: np.ndarray, root: pathlib.Path) -> dict:
  """Per-channel statistics of the posterior mean z on the first num_eval training images ->
  stats.json; the release/ export with the factors they imply."""
  model = _model(graphdef, params)
  sample = tokenizers.uint8_to_unit(images[: config.vae_train.num_eval])
  latents = np.asarray(_posterior_mean(model, sample))
  stats = vae_tokenizer.channel_statistics(latents)
  (root / STATS_FILE).write_text(json.dumps(stats, indent=2))
  cfg = dataclasses.replace(
    model.cfg, shift_factor=stats['shift_factor'], scaling_factor=stats['scaling_factor']
  )
  vae_tokenizer.export_release(root / vae_tokenizer.RELEASE_DIR, cfg, nnx.state(model, nnx.Param))
  print(
    f'latent channel mean {np.round(stats["channel_mean"], 3).tolist()} std '
    f'{np.round(stats["channel_std"], 3).tolist()} -> shift_factor {stats["shift_factor"]:.4f}, '
    f'scaling_factor {stats["scaling_factor"]:.4f}; release in {root / vae_tokenizer.RELEASE_DIR}',
    flush=True,
  )
  return {'shift_factor': stats['shift_factor'], 'scaling_factor': stats['scaling_factor']}
