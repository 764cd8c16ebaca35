"""Input-pipeline throughput vs the train step's consumption (configs/shapes.py), raw vs latent cache.

  flock /tmp/nextstep-heavy.lock python benchmarks/data_throughput.py [--records 5000]
      [--batches 30] [--steps 12] [--workers 0 2] [--workdir /tmp/data_throughput]
  flock /tmp/nextstep-heavy.lock python benchmarks/data_throughput.py --only latent_cache

1. Builds the shapes world (32 px) into ArrayRecord shards (`nextstep-data build` library, PNG
   records) and a pixels-tokenizer latent cache (`nextstep-data cache-latents`).
2. Pipeline records/s per host: `GrainTrainingData.next_batch` (global batch 64, one process: read,
   decode, resize/crop, tokenise captions, build rows, encode + patchify) in steady state, for
   each worker count, raw shards and latent cache.
3. The train step's records/s: the jitted sharded step of configs/shapes.py on batches already in
   memory (compile excluded).
4. End to end: training steps fed by the pipeline (0 workers), raw vs cache.
5. Latent-cache gain with a VAE tokenizer (--vae-config, configs/shapes_vae.py; section
   `latent_cache`): the same model, batch and train step fed from raw shards (the VAE encodes
   every batch in the training process) vs from the VAE latent cache, timed in alternating rounds
   so both feeds see the same machine load; plus the VAE encoder alone on one batch. The VAE is
   randomly initialised unless --vae-checkpoint is given: its speed does not depend on weights.
   Repeated with the official f8ch16 autoencoder architecture (ch 128, ch_mult 1,2,4,4) at the
   same 32 px (4x4x16 latents, patch 1): the same 4x4 grid of 16-dim tokens, so the same AR model
   and batch with a heavier encoder (key `official_f8ch16_vae`).
   `--only latent_cache` runs this section alone and merges it into the existing JSON.
headroom = best raw pipeline records/s / step records/s (target >= 5). On a 2-core machine the
pipeline and the step share the cores, so the end-to-end figures are the honest check.
Results: benchmarks/results/data_throughput.json.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import jax
import numpy as np

from nextstep_jax import configlib
from nextstep_jax.data import builder
from nextstep_jax.data import builtin_source
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import latent_cache
from nextstep_jax.image import tokenizers
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

RESULTS = pathlib.Path(__file__).parent / 'results'
# The official f8ch16 autoencoder's architecture on the 32 px shapes: latents 4x4x16, 1x1 patches
# (encoder_norm over 1x1 patches to match them).
OFFICIAL_VAE_OVERRIDES = [
  'image.vae.ch=128',
  'image.vae.ch_mult=(1, 2, 4, 4)',
  'image.vae.num_res_blocks=2',
  'image.vae.z_channels=16',
  'image.vae.norm_groups=32',
  'image.vae.batch_chunk=16',
  'image.vae.psz=1',
  'model.latent_channels=16',
  'model.latent_patch_size=1',
]


def pipeline_rate(config, tok, batches: int) -> float:
  """Steady-state records/s of next_batch (the first two batches, worker start-up, excluded)."""
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  for _ in range(2):
    data.next_batch()
  start = time.perf_counter()
  for _ in range(batches):
    data.next_batch()
  seconds = time.perf_counter() - start
  data.close()
  return batches * config.train.batch_size / seconds


def train_rates(config, tok, steps: int, feeds: dict) -> dict:
  """Records/s of the train step on an in-memory batch, and fed by each pipeline in `feeds`."""
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.train)
  graphdef, _, shardings = state_lib.state_shardings(config, tx, mesh)
  state = jax.jit(lambda: state_lib.init_state(config, tx), out_shardings=shardings)()
  fixed = builtin_source.BuiltinSource(config, tok).batch(0)
  train_step = step_lib.build_train_step(
    config,
    graphdef,
    tx,
    shardings,
    mesh,
    tok.image_placeholder_id,
    {k: v[:1] for k, v in fixed.items()},
  )
  batch = rules_lib.shard_batch(fixed, mesh, config.mesh.rules)
  state, metrics = train_step(state, batch)  # Compile.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  out = {'step_records_per_s': steps * config.train.batch_size / (time.perf_counter() - start)}
  for name, feed_config in feeds.items():
    data = grain_pipeline.GrainTrainingData(feed_config, tok, 0, 1)
    state, metrics = train_step(
      state, rules_lib.shard_batch(data.next_batch(), mesh, config.mesh.rules)
    )
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_step(
        state, rules_lib.shard_batch(data.next_batch(), mesh, config.mesh.rules)
      )
    jax.block_until_ready(metrics)
    out[f'end_to_end_{name}_records_per_s'] = (
      steps * config.train.batch_size / (time.perf_counter() - start)
    )
    data.close()
  return out


def steps_per_s(train_step, state, data, mesh, rules, steps: int):
  """(state, seconds) of `steps` train steps fed by `data.next_batch()` (pipeline time included)."""
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, rules_lib.shard_batch(data.next_batch(), mesh, rules))
  jax.block_until_ready(metrics)
  return state, time.perf_counter() - start


def latent_cache_gain(
  args, workdir: pathlib.Path, shard_glob: str, name: str, vae_overrides=()
) -> dict:
  """Section 5 (module docstring): train steps/s from raw images (VAE encode per batch) vs cache."""
  overrides = [
    f'data.cache_dir={workdir / "cache"}',
    'data.source=arrayrecord',
    f'data.paths={shard_glob}',
    f'image.vae.checkpoint={args.vae_checkpoint}',
    'data.read_threads=1',
    *vae_overrides,
  ]
  raw = configlib.load_config(args.vae_config, overrides)
  configlib.validate(raw)
  tok = builtin_source.load_text_tokenizer(raw)
  t0 = time.perf_counter()
  summary = latent_cache.build_latent_cache(raw, str(workdir / f'{name}_latents'), num_shards=4)
  cache_s = time.perf_counter() - t0
  cached = raw.copy_and_resolve_references()
  cached.data.use_latent_cache = True
  cached.data.latent_cache_paths = f'{workdir}/{name}_latents-*.array_record'

  mesh = mesh_lib.make_mesh(raw.mesh)
  tx = state_lib.make_optimizer(raw.train)
  graphdef, _, shardings = state_lib.state_shardings(raw, tx, mesh)
  state = jax.jit(lambda: state_lib.init_state(raw, tx), out_shardings=shardings)()
  feeds = {
    'raw': grain_pipeline.GrainTrainingData(raw, tok, 0, 1),
    'cached': grain_pipeline.GrainTrainingData(cached, tok, 0, 1),
  }
  first = feeds['cached'].next_batch()
  train_step = step_lib.build_train_step(
    raw, graphdef, tx, shardings, mesh, tok.image_placeholder_id, first
  )
  for data in feeds.values():  # Compiles the step and the VAE encoder; warms the pipelines.
    state, _ = steps_per_s(train_step, state, data, mesh, raw.mesh.rules, 1)
  seconds = dict.fromkeys(feeds, 0.0)
  for round_index in range(args.vae_rounds):
    for feed, data in feeds.items():
      state, took = steps_per_s(train_step, state, data, mesh, raw.mesh.rules, args.vae_steps)
      seconds[feed] += took
      print(
        f'latent cache gain ({name}), round {round_index}: {feed} {args.vae_steps / took:.2f} steps/s',
        flush=True,
      )
  for data in feeds.values():
    data.close()

  encoder = feeds['raw'].image_tokenizer
  images = tokenizers.uint8_to_unit(
    np.zeros((raw.train.batch_size, raw.image.size, raw.image.size, 3), np.uint8)
  )
  jax.block_until_ready(encoder.encode(images))
  start = time.perf_counter()
  for _ in range(args.vae_steps):
    jax.block_until_ready(encoder.encode(images))
  encode_s = (time.perf_counter() - start) / args.vae_steps

  steps = args.vae_rounds * args.vae_steps
  raw_rate, cached_rate = steps / seconds['raw'], steps / seconds['cached']
  batch = raw.train.batch_size
  return {
    'raw_steps_per_s': round(raw_rate, 3),
    'cached_steps_per_s': round(cached_rate, 3),
    'gain': round(cached_rate / raw_rate, 2),
    'raw_records_per_s': round(raw_rate * batch, 1),
    'cached_records_per_s': round(cached_rate * batch, 1),
    'vae_encode_records_per_s': round(batch / encode_s, 1),
    'cache_latents_records_per_s': round(summary['records'] / cache_s, 1),
    'config': args.vae_config,
    'overrides': list(vae_overrides),
    'vae_checkpoint': args.vae_checkpoint or 'random init',
    'global_batch': batch,
    'timed_steps_per_feed': steps,
    'rounds': args.vae_rounds,
    'records': summary['records'],
  }


def vae_gains(args, workdir: pathlib.Path) -> dict:
  """The shapes_vae figures, with the official-architecture VAE's under `official_f8ch16_vae`."""
  shards = f'{workdir}/shapes-*.array_record'
  return {
    **latent_cache_gain(args, workdir, shards, 'shapes_vae'),
    'official_f8ch16_vae': latent_cache_gain(
      args, workdir, shards, 'official_vae', OFFICIAL_VAE_OVERRIDES
    ),
  }


def run_metadata(config_path: str) -> dict:
  return {
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind} x{jax.device_count()}',
    'jax': jax.__version__,
    'load_average_1min_at_end': round(os.getloadavg()[0], 2),  # Other jobs sharing the CPU.
    'config': config_path,
  }


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--config', default='configs/shapes.py')
  parser.add_argument('--records', type=int, default=5000)
  parser.add_argument('--batches', type=int, default=200, help='pipeline batches timed')
  parser.add_argument('--steps', type=int, default=12, help='train steps timed')
  parser.add_argument('--workers', nargs='+', type=int, default=[0, 2])
  parser.add_argument('--workdir', default='/tmp/data_throughput')
  parser.add_argument('--out', default=str(RESULTS / 'data_throughput.json'))
  parser.add_argument('--vae-config', default='configs/shapes_vae.py')
  parser.add_argument('--vae-checkpoint', default='', help="VAE weights ('' = random init)")
  parser.add_argument('--vae-steps', type=int, default=6, help='train steps per feed per round')
  parser.add_argument('--vae-rounds', type=int, default=3, help='alternating raw / cached rounds')
  parser.add_argument(
    '--only',
    choices=['latent_cache'],
    default=None,
    help='run one section and merge it into the existing --out JSON',
  )
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).absolute()
  shutil.rmtree(workdir, ignore_errors=True)  # Time a fresh build, not a resumed one.
  config = configlib.load_config(args.config, [f'data.cache_dir={workdir / "cache"}'])
  configlib.validate(config)
  tok = builtin_source.load_text_tokenizer(config)

  t0 = time.perf_counter()
  items = builder.builtin_items(config.data.dataset, args.records, config.seed, config.image.size)
  built = builder.build(items, str(workdir / 'shapes'), num_shards=4, workers=1, source='shapes')
  build_s = time.perf_counter() - t0
  if args.only == 'latent_cache':
    out = json.loads(pathlib.Path(args.out).read_text())
    out['latent_cache'] = {**vae_gains(args, workdir), **run_metadata(args.vae_config)}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
    print(json.dumps(out['latent_cache'], indent=2))
    return 0
  raw = configlib.load_config(
    args.config,
    [
      f'data.cache_dir={workdir / "cache"}',
      'data.source=arrayrecord',
      f'data.paths={workdir}/shapes-*.array_record',
    ],
  )
  t0 = time.perf_counter()
  latent_cache.build_latent_cache(raw, str(workdir / 'latents'), num_shards=4)
  cache_s = time.perf_counter() - t0
  cached = raw.copy_and_resolve_references()
  cached.data.use_latent_cache = True
  cached.data.latent_cache_paths = f'{workdir}/latents-*.array_record'

  pipeline = {}
  for workers in args.workers:
    for name, base in (('raw', raw), ('latent_cache', cached)):
      c = base.copy_and_resolve_references()
      c.data.worker_count = workers
      pipeline[f'{name}_workers_{workers}'] = rate = pipeline_rate(c, tok, args.batches)
      print(f'pipeline {name}, {workers} workers: {rate:.0f} records/s', flush=True)
  train = train_rates(config, tok, args.steps, {'raw': raw, 'latent_cache': cached})
  print(json.dumps(train), flush=True)
  gain = vae_gains(args, workdir)
  print(json.dumps(gain), flush=True)
  records_per_s = max(v for k, v in pipeline.items() if k.startswith('raw'))
  cache_per_s = max(v for k, v in pipeline.items() if k.startswith('latent_cache'))
  out = {
    'records_per_s': round(records_per_s, 1),
    'step_records_per_s': round(train['step_records_per_s'], 1),
    'headroom': round(records_per_s / train['step_records_per_s'], 2),
    'latent_cache_records_per_s': round(cache_per_s, 1),
    'latent_cache_headroom': round(cache_per_s / train['step_records_per_s'], 2),
    'latent_cache_speedup': round(cache_per_s / records_per_s, 2),
    'pipeline_records_per_s': {k: round(v, 1) for k, v in pipeline.items()},
    'end_to_end_records_per_s': {
      k: round(v, 1) for k, v in train.items() if k.startswith('end_to_end')
    },
    'build_records_per_s': round(built['records'] / build_s, 1),
    'cache_latents_records_per_s': round(built['records'] / cache_s, 1),
    'records': built['records'],
    'dataset_bytes': built['bytes'],
    'global_batch': config.train.batch_size,
    **run_metadata(args.config),
    'latent_cache': gain,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
  print(json.dumps(out, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
