"""Our jitted sampler vs the official NextStep-1 sampling algorithm in PyTorch, same CPU.

  flock /tmp/nextstep-heavy.lock python benchmarks/sampling_vs_official.py [--grid 8] [--num-steps 50]
      [--cfg 7.5] [--hidden 256] [--layers 4] [--repeats 3] [--skip-compile]

One random model in the official layout (tests/torch_reference.py: transformers' Qwen2Model +
the head and projectors of docs/model.md) is saved as a release, converted with our converter and
sampled by both sides with the same steps, guidance (2-way CFG), token grid and batch (1 image):
  jax            generate.generate_tokens: one jitted call (prefill, lax.scan over tokens, each a
                 lax.scan over SDE steps with both CFG branches in one head call)
  torch_eager    the official loop: Qwen2Model with a DynamicCache, per token an eager Python loop
                 of Euler–Maruyama steps with CFG in the head (tests/torch_reference.generate)
  torch_compiled the official default compile settings on this platform: the backbone under
                 torch.compile, the per-token head sampler under torch.compile(fullgraph=True)
                 (inductor on CPU; CUDA graphs do not exist here)
Steady state = the fastest of --repeats full generations after a warm-up (median also kept); first_image_s = the first
generation in a fresh process state including compilation. The progress-bar overhead of our
sampler (a host callback per image token) is measured on the same model.
Results: benchmarks/results/sampling_vs_official.json.
"""

import argparse
import dataclasses
import datetime
import io
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))  # The PyTorch reference lives with the parity tests.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import hf_testing  # noqa: E402
import torch_reference as tr  # noqa: E402
from nextstep_jax.convert import official  # noqa: E402
from nextstep_jax.data import hf_tokenizer  # noqa: E402
from nextstep_jax.data import sequences  # noqa: E402
from nextstep_jax.model import nextstep  # noqa: E402
from nextstep_jax.parallel import mesh as mesh_lib  # noqa: E402
from nextstep_jax.sampling import generate  # noqa: E402
from nextstep_jax.sampling import integrators  # noqa: E402
from nextstep_jax.sampling import progress  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results'
CAPTION = 'a photo of a cat on a sofa, 4k'


def timed(fn, repeats):
  """(first call s, fastest steady call s, median s, fewest process CPU-seconds of a steady call).
  The fastest call is the wall-clock figure: on the shared VM other jobs only ever add time; CPU
  seconds (all threads of this process) do not count time spent waiting for a core."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  fn()  # Warm-up (a second trace/compile of anything shape-dependent).
  runs, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    runs.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return first, min(runs), statistics.median(runs), min(cpu)


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--grid', type=int, default=8, help='image tokens per side (8: 64 tokens, 128 px with f8/p2)'
  )
  parser.add_argument('--num-steps', type=int, default=50)
  parser.add_argument('--cfg', type=float, default=7.5)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--head-width', type=int, default=256)
  parser.add_argument('--head-layers', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--torch-threads',
    type=int,
    default=1,
    help='torch intra-op threads (1: on the shared 2-core VM two threads measured 25 ms '
    'per head call against 0.9 ms with one, OpenMP waiting on busy cores)',
  )
  parser.add_argument('--skip-compile', action='store_true', help='leave out torch.compile')
  parser.add_argument('--out', default=str(RESULTS / 'sampling_vs_official.json'))
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)
  release = dict(
    tr.TINY_RELEASE,
    hidden_size=args.hidden,
    num_hidden_layers=args.layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=args.hidden // 4,
    intermediate_size=args.hidden * 11 // 4,
    fm_head_dim=args.head_width,
    fm_head_layers=args.head_layers,
  )
  work = pathlib.Path(tempfile.mkdtemp(prefix='sampling_vs_official_'))
  hf_testing.build_tokenizer(str(work / 'tokenizer.json'))
  torch_model = tr.NextStepTorch(release).randomize(seed=0).eval()
  tr.write_release(torch_model, release, str(work / 'tokenizer.json'), work / 'hf')
  config = official.convert(
    work / 'hf', work / 'converted', compute_dtype='float32', max_caption_tokens=32
  )
  graphdef, params = official.load_params(
    work / 'converted', mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  )
  tok = hf_tokenizer.HFTokenizer.load(str(work / 'converted' / 'tokenizer.json'))
  num_tokens, token_dim = args.grid * args.grid, 64
  prompt = sequences.build_prompt_batch(tok, [CAPTION], args.grid, args.grid, 32)
  jax_prompt = {k: jnp.asarray(v) for k, v in prompt.items()}
  keys = generate.image_keys_from_seeds([0])
  sampler_cfg = generate.SamplerConfig(
    grid_h=args.grid,
    grid_w=args.grid,
    integrator=integrators.IntegratorConfig(num_steps=args.num_steps),
    num_branches=2,
    cfg=args.cfg,
    use_norm=True,
  )
  results = {}

  def run_jax(cfg=sampler_cfg):
    jax.block_until_ready(generate.generate_tokens(graphdef, params, jax_prompt, keys, cfg))

  t0 = time.perf_counter()
  run_jax()
  first = time.perf_counter() - t0
  with_bar = dataclasses.replace(sampler_cfg, progress_every=1)
  with progress.reporting(progress.TokenProgress(10**9, stream=io.StringIO())):
    run_jax(with_bar)  # Compile.
    plain_runs, bar_runs, plain_cpu = [], [], []
    for _ in range(args.repeats):  # Interleaved, so both see the same load.
      for cfg, runs in ((sampler_cfg, plain_runs), (with_bar, bar_runs)):
        t0, c0 = time.perf_counter(), time.process_time()
        run_jax(cfg)
        runs.append(time.perf_counter() - t0)
        if cfg is sampler_cfg:
          plain_cpu.append(time.process_time() - c0)
  results['jax'] = dict(
    first_image_s=first,
    seconds_per_image=min(plain_runs),
    median_s=statistics.median(plain_runs),
    cpu_s=min(plain_cpu),
  )
  results['jax_progress_bar'] = dict(
    seconds_per_image=min(bar_runs),
    median_s=statistics.median(bar_runs),
    overhead=min(bar_runs) / min(plain_runs) - 1,
  )
  results['jax_progress_bar']['callback_us_per_token'] = callback_cost_us()
  print('jax', results['jax'], '\njax + progress bar', results['jax_progress_bar'], flush=True)

  ids = tr.to_torch(prompt['input_ids']).long()
  mask = tr.to_torch(prompt['attention_mask']).long()
  gen = torch.Generator().manual_seed(0)
  x0 = torch.randn(num_tokens, 1, token_dim, generator=gen)
  noise = torch.randn(num_tokens, args.num_steps - 1, 1, token_dim, generator=gen)

  def run_torch(**kw):
    tr.generate(
      torch_model,
      ids,
      mask,
      num_tokens,
      x0,
      noise,
      cfg=args.cfg,
      num_steps=args.num_steps,
      use_norm=True,
      **kw,
    )

  first, steady, median, cpu = timed(run_torch, args.repeats)
  results['torch_eager'] = dict(
    first_image_s=first, seconds_per_image=steady, median_s=median, cpu_s=cpu
  )
  print('torch_eager', results['torch_eager'], flush=True)
  if args.skip_compile:
    results['torch_compiled'] = dict(error='skipped (--skip-compile)')
  else:
    try:
      backbone = torch.compile(torch_model.backbone)
      sampler = torch.compile(tr.sample_token, fullgraph=True)
      first, steady, median, cpu = timed(
        lambda: run_torch(backbone=backbone, token_sampler=sampler), args.repeats
      )
      results['torch_compiled'] = dict(
        first_image_s=first, seconds_per_image=steady, median_s=median, cpu_s=cpu
      )
    except Exception as error:  # record why compile cannot run here
      results['torch_compiled'] = dict(error=f'{type(error).__name__}: {str(error)[:500]}')
    print('torch_compiled', results['torch_compiled'], flush=True)

  def per_s(name):
    seconds = results[name].get('seconds_per_image')
    return round(1.0 / seconds, 4) if seconds else None

  out = {
    'jax_images_per_s': per_s('jax'),
    'torch_eager_images_per_s': per_s('torch_eager'),
    'torch_compiled_images_per_s': per_s('torch_compiled'),
    'ratio_eager': round(per_s('jax') / per_s('torch_eager'), 2),
    'ratio_compiled': round(per_s('jax') / per_s('torch_compiled'), 2)
    if per_s('torch_compiled')
    else None,
    'cpu_seconds_per_image': {
      name: round(r['cpu_s'], 4) for name, r in results.items() if 'cpu_s' in r
    },
    'ratio_eager_cpu_seconds': round(results['torch_eager']['cpu_s'] / results['jax']['cpu_s'], 2),
    'first_image_s': {
      name: round(r['first_image_s'], 3) for name, r in results.items() if 'first_image_s' in r
    },
    'progress_bar_overhead': round(results['jax_progress_bar']['overhead'], 4),
    'progress_callback_us_per_token': round(
      results['jax_progress_bar']['callback_us_per_token'], 1
    ),
    'jax_ms_per_image_token': round(1000 * results['jax']['seconds_per_image'] / num_tokens, 3),
    'details': results,
    'setup': dict(
      release,
      image_tokens=num_tokens,
      token_dim=token_dim,
      num_steps=args.num_steps,
      cfg=args.cfg,
      cfg_branches=2,
      use_norm=True,
      batch_images=1,
      dtype='float32',
      torch_threads=args.torch_threads,
      params=nextstep.count_params(params),
    ),
    'command': ' '.join(['python'] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
    'versions': {'jax': jax.__version__, 'torch': torch.__version__},
  }
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
  print(
    json.dumps(
      {
        k: out[k]
        for k in (
          'jax_images_per_s',
          'torch_eager_images_per_s',
          'torch_compiled_images_per_s',
          'ratio_eager',
          'ratio_compiled',
          'first_image_s',
          'cpu_seconds_per_image',
          'ratio_eager_cpu_seconds',
        )
      }
    )
  )
  return 0


def callback_cost_us(steps: int = 4000, repeats: int = 5) -> float:
  """Microseconds one progress callback adds to a jitted scan step (a trivial body, so the
  difference is the callback alone): fastest of `repeats` with minus without, per step."""

  def run(with_callback):
    def body(carry, k):
      if with_callback:
        progress.report(k + 1, 1)
      return carry + 1.0, None

    fn = jax.jit(lambda: jax.lax.scan(body, jnp.zeros(()), jnp.arange(steps))[0])
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return min(times)

  with progress.reporting(progress.TokenProgress(10**9, stream=io.StringIO())):
    return (run(True) - run(False)) / steps * 1e6


if __name__ == '__main__':
  sys.exit(main())
