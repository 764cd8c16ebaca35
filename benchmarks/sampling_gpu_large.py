"""NextStep-1-Large (14B) sampling on one GPU: our jitted sampler vs the official algorithm in PyTorch.

  python benchmarks/sampling_gpu_large.py [--out benchmarks/results/sampling_gpu_large.json]
      [--batches 1 4] [--torch-tokens 16 48] [--num-steps 50] [--cfg 7.5] [--image-size 512]

The issue's setting: the 14B shape (configs/nextstep1_large.py), random bf16 weights (speed does not
depend on their values), 512x512 images (32x32 = 1024 image tokens), 2-way CFG, 50 head steps.
Each side runs in its own subprocess (one framework holds the GPU at a time):
  jax          generate.SamplingProgram (the one sampling program): one jitted call per batch of
               images (prefill, lax.scan over the 1024 tokens, each a lax.scan over the 50 SDE
               steps, both CFG rows in one head call); whole images timed, compile separately;
               --batches images per call.
  torch_eager  tests/torch_reference.generate, the official loop: transformers' Qwen2Model (sdpa
               attention) with a DynamicCache, per token an eager Python loop of Euler–Maruyama
               steps with CFG in the head, bf16 weights on the GPU, one image per call. A whole image
               takes minutes, so it is timed on --torch-tokens prefixes (e.g. 16 and 48 tokens):
               ms per token = the difference over the extra tokens, and the image time is
               prefill + 1024 x that (the per-token cost hardly grows with the cache: the step is
               weight-bandwidth and launch bound).
  torch.compile is not run: the issue's own measurement on an H100 had no token after 7 minutes of
  warm-up, more than this benchmark's whole device budget.
Also measured once: the GPU's bf16 matmul rate and copy bandwidth (the two ceilings), and the
weight-streaming floor per image token (decoder + head bytes per token over the copy bandwidth).
  precisions   (--sides precisions) the sampling program with bf16, int8 and int4 weights
               (model.quant), one image per call each, ms per image token against each precision's
               weight-streaming floor; about 8 minutes on an H100 (the issue's 15-minute budget:
               `--sides precisions --repeats 1 --timeout 840`).
--smoke runs both sides on a tiny shape on whatever device exists (a check of the script itself).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # The package and configs/ from this checkout (no install needed).
RESULTS = ROOT / 'benchmarks' / 'results'
PROMPT_TOKENS = 64  # Caption + image prefix ids per row (official prompts are of this order).
SMOKE = dict(
  model__vocab_size=512,
  model__hidden_size=128,
  model__num_layers=2,
  model__num_heads=4,
  model__num_kv_heads=2,
  model__head_dim=32,
  model__intermediate_size=256,
  model__fm_head_dim=64,
  model__fm_head_layers=2,
)


def large_config(args):
  """configs/nextstep1_large.py with bf16 params, the sampler settings and --smoke shapes."""
  from nextstep_jax import configlib

  overrides = [
    f'image.size={args.image_size}',
    'model.param_dtype=bfloat16',
    'model.dtype=bfloat16',
    f'sample.num_steps={args.num_steps}',
    f'sample.cfg={args.cfg}',
    'model.attention=xla',
  ]
  if args.smoke:
    overrides += [f'{k.replace("__", ".")}={v}' for k, v in SMOKE.items()]
  return configlib.load_config(str(ROOT / 'configs' / 'nextstep1_large.py'), overrides)


def release_of(config) -> dict:
  """The official release's config fields (tests/torch_reference.py) of our model config."""
  m = config.model
  return dict(
    vocab_size=m.vocab_size,
    hidden_size=m.hidden_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    num_key_value_heads=m.num_kv_heads,
    head_dim=m.head_dim,
    intermediate_size=m.intermediate_size,
    rope_theta=m.rope_theta,
    rms_norm_eps=m.rms_norm_eps,
    max_position_embeddings=m.max_seq_len,
    latent_channels=m.latent_channels,
    latent_patch_size=m.latent_patch_size,
    fm_head_dim=m.fm_head_dim,
    fm_head_layers=m.fm_head_layers,
  )


def run_jax(args, save) -> dict:
  """Whole-image generation with our sampler, per batch size: compile s, seconds per call.
  save(result) is called after each batch size (a later timeout keeps the earlier ones)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from nextstep_jax import configlib
  from nextstep_jax.model import nextstep
  from nextstep_jax.sampling import generate

  config = large_config(args)
  grid_h, grid_w = configlib.image_grid(config)
  model_cfg = nextstep.ModelConfig.from_config(config.model)
  t0 = time.perf_counter()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: nextstep.NextStep(model_cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(nextstep.NextStep(model_cfg, rngs=nnx.Rngs(0))))()
  jax.block_until_ready(params)
  out = dict(
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    params=nextstep.count_params(params),
    init_s=round(time.perf_counter() - t0, 2),
    image_tokens=grid_h * grid_w,
    runs={},
  )
  print(f'[jax] {out["params"]:,} params on {out["device"]} in {out["init_s"]} s', flush=True)
  sampler_cfg = generate.SamplerConfig.from_config(config, grid_h, grid_w, num_branches=2)
  rng = np.random.default_rng(0)
  for batch in args.batches:
    rows = 2 * batch
    prompt = dict(
      input_ids=jnp.asarray(
        rng.integers(0, config.model.vocab_size, (rows, PROMPT_TOKENS)), jnp.int32
      ),
      attention_mask=jnp.ones((rows, PROMPT_TOKENS), bool),
      positions=jnp.broadcast_to(jnp.arange(PROMPT_TOKENS, dtype=jnp.int32), (rows, PROMPT_TOKENS)),
    )
    keys = generate.image_keys_from_seeds(np.arange(batch))
    t0 = time.perf_counter()
    program = generate.SamplingProgram.for_state(graphdef, params, config.mesh.rules)
    compiled = (
      program.generate_program(prompt['input_ids'].shape[0], len(keys))
      .lower(params, prompt, keys, sampler_cfg)
      .compile()
    )
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = jax.block_until_ready(compiled(params, prompt, keys, sampler_cfg))
    first_run_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, prompt, keys, sampler_cfg))
      times.append(time.perf_counter() - t0)
    seconds = min(times)
    run = dict(
      batch_images=batch,
      compile_s=round(compile_s, 2),
      first_image_s=round(compile_s + first_run_s, 2),
      seconds_per_call=round(seconds, 3),
      median_s=round(statistics.median(times), 3),
      images_per_s=round(batch / seconds, 4),
      ms_per_image_token=round(1000 * seconds / out['image_tokens'], 3),
      finite=bool(np.isfinite(np.asarray(tokens, np.float32)).all()),
    )
    out['runs'][str(batch)] = run
    print(f'[jax] batch {batch}: {run}', flush=True)
    save(out)
  return out


def run_phases(args, save) -> dict:
  """Where a batch-1 image token's time goes: one cached decoder step (rows 2, cache of
  prompt + 1024 slots) and one token's head integration (50 SDE steps, both CFG rows), each
  jitted alone, median of 20 calls, under this process's XLA_FLAGS."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from nextstep_jax import configlib
  from nextstep_jax.model import nextstep
  from nextstep_jax.sampling import generate

  config = large_config(args)
  grid_h, grid_w = configlib.image_grid(config)
  model_cfg = nextstep.ModelConfig.from_config(config.model)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: nextstep.NextStep(model_cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(nextstep.NextStep(model_cfg, rngs=nnx.Rngs(0))))()
  sampler_cfg = generate.SamplerConfig.from_config(config, grid_h, grid_w, num_branches=2)
  rows, slots = 2, PROMPT_TOKENS + grid_h * grid_w - 1
  keys = generate.image_keys_from_seeds(np.arange(1))

  @jax.jit
  def decoder_step(state, cache, token):
    m = nnx.merge(graphdef, state)
    x = jnp.tile(m.embed_image_tokens(token[:, None]), (2, 1, 1))
    return m(x, jnp.full((rows, 1), PROMPT_TOKENS, jnp.int32), jnp.ones((rows, 1), bool), cache)

  @jax.jit
  def head_token(state, last_hidden):
    return generate.sample_token(
      nnx.merge(graphdef, state), last_hidden, jnp.asarray(0), keys, sampler_cfg
    )

  cache = jax.jit(lambda: nnx.merge(graphdef, params).decoder.init_cache(rows, slots))()
  last_hidden = jnp.ones((rows, config.model.hidden_size), jnp.bfloat16)
  token = jnp.ones((1, 64), jnp.float32)

  def median_ms(fn):
    jax.block_until_ready(fn())
    times = []
    for _ in range(20):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)

  out = dict(xla_flags=os.environ.get('XLA_FLAGS', ''), device=str(jax.devices()[0].device_kind))
  out['decoder_step_ms'] = median_ms(lambda: decoder_step(params, cache, token))
  out['head_token_ms'] = median_ms(lambda: head_token(params, last_hidden))
  print(f'[phases] {out}', flush=True)
  save(out)
  return out


def run_precisions(args, save) -> dict:
  """One 512x512 image (2 CFG rows) per call with the sampling program in each of --precisions
  (bf16, int8, int4 weight-only: model.quant), weights random and quantized on the GPU; ms per
  image token against the weight-streaming floor of that precision (the program's per-token
  weights at their stored width over the measured copy bandwidth; the head's x path per evaluation,
  planning/aot.token_floor_bytes without the KV cache)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from nextstep_jax import configlib
  from nextstep_jax.model import nextstep
  from nextstep_jax.model import quant
  from nextstep_jax.planning import aot
  from nextstep_jax.sampling import generate

  config = large_config(args)
  grid_h, grid_w = configlib.image_grid(config)
  sampler_cfg = generate.SamplerConfig.from_config(config, grid_h, grid_w, num_branches=2)
  copy_bytes_per_s = ceilings().get('copy_bytes_per_s')
  out = dict(device=str(jax.devices()[0].device_kind), copy_bytes_per_s=copy_bytes_per_s, rows={})
  rows = 2
  rng = np.random.default_rng(0)
  prompt = dict(
    input_ids=jnp.asarray(
      rng.integers(0, config.model.vocab_size, (rows, PROMPT_TOKENS)), jnp.int32
    ),
    attention_mask=jnp.ones((rows, PROMPT_TOKENS), bool),
    positions=jnp.broadcast_to(jnp.arange(PROMPT_TOKENS, dtype=jnp.int32), (rows, PROMPT_TOKENS)),
  )
  keys = generate.image_keys_from_seeds(np.arange(1))
  for precision in args.precisions:
    with config.unlocked():
      config.model.quant.mode = 'none' if precision == 'bf16' else precision
    qcfg = quant.QuantConfig.from_config(config.model)
    model_cfg = nextstep.ModelConfig.from_config(config.model)
    graphdef, _ = generate.for_sampling(*nnx.split(nextstep.abstract_model(config), nnx.Param))
    t0 = time.perf_counter()
    params = jax.jit(
      lambda: generate.for_sampling(
        *nnx.split(
          quant.quantize_model(nextstep.NextStep(model_cfg, rngs=nnx.Rngs(0)), qcfg), nnx.Param
        )
      )[1]
    )()
    jax.block_until_ready(params)
    program = generate.SamplingProgram.for_state(graphdef, params, config.mesh.rules)
    compiled = program.generate_program(rows, 1).lower(params, prompt, keys, sampler_cfg).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      tokens = jax.block_until_ready(compiled(params, prompt, keys, sampler_cfg))
      times.append(time.perf_counter() - t0)
    ms = 1000 * min(times) / sampler_cfg.num_tokens
    row = dict(
      init_and_compile_s=round(compile_s, 2),
      seconds_per_image=round(min(times), 3),
      ms_per_image_token=round(ms, 3),
      finite=bool(np.isfinite(np.asarray(tokens, np.float32)).all()),
    )
    if copy_bytes_per_s:
      flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
      size = lambda x: x.size * aot._bits(x.dtype) / 8
      per_eval = lambda k: (
        "'image_head'" in k
        and any(n in k for n in aot.HEAD_PER_EVALUATION)
        and not any(n in k for n in ("'time_embed'", "'step_embed'"))
      )
      head = sum(size(x) for k, x in flat.items() if per_eval(k))
      body = sum(size(x) for k, x in flat.items() if not per_eval(k) and "'embed_tokens'" not in k)
      floor_ms = 1000 * (body + head * sampler_cfg.integrator.velocity_calls) / copy_bytes_per_s
      row.update(
        floor_ms_per_image_token=round(floor_ms, 3), fraction_of_floor=round(floor_ms / ms, 3)
      )
    out['rows'][precision] = row
    print(f'[precisions] {precision}: {row}', flush=True)
    save(out)
    del params, compiled, program
  return out


def run_torch(args) -> dict:
  """The official loop on --torch-tokens prefixes of one image: ms per token, image time."""
  import torch

  sys.path.insert(0, str(ROOT / 'tests'))
  import torch_reference as tr

  config = large_config(args)
  release = release_of(config)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.set_default_device(device)
  torch.set_default_dtype(torch.bfloat16)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = tr.NextStepTorch(release, attn_implementation='sdpa').eval()
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  sync()
  grid = config.image.size // 8 // config.model.latent_patch_size
  out = dict(
    device=torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
    torch=torch.__version__,
    params=sum(p.numel() for p in model.parameters()),
    init_s=round(time.perf_counter() - t0, 2),
    image_tokens=grid * grid,
    attention='sdpa',
    runs={},
  )
  print(f'[torch] {out["params"]:,} params on {out["device"]} in {out["init_s"]} s', flush=True)
  token_dim = config.model.latent_channels * config.model.latent_patch_size**2
  ids = torch.randint(0, release['vocab_size'], (2, PROMPT_TOKENS))
  mask = torch.ones(2, PROMPT_TOKENS, dtype=torch.long)

  def generate(num_tokens):
    x0 = torch.randn(num_tokens, 1, token_dim, dtype=torch.float32)
    noise = torch.randn(num_tokens, args.num_steps - 1, 1, token_dim, dtype=torch.float32)
    sync()
    t0 = time.perf_counter()
    tokens = tr.generate(
      model, ids, mask, num_tokens, x0, noise, cfg=args.cfg, num_steps=args.num_steps, use_norm=True
    )
    sync()
    return time.perf_counter() - t0, bool(torch.isfinite(tokens).all())

  first_s, _ = generate(2)  # Warm-up: kernels, cuBLAS handles.
  out['first_call_s_2_tokens'] = round(first_s, 3)
  for n in args.torch_tokens:
    times = [generate(n) for _ in range(args.torch_repeats)]
    out['runs'][str(n)] = dict(
      tokens=n, seconds=round(min(t for t, _ in times), 3), finite=all(f for _, f in times)
    )
    print(f'[torch] {n} tokens: {out["runs"][str(n)]}', flush=True)
  short, long_ = (out['runs'][str(n)] for n in args.torch_tokens[:2])
  per_token = (long_['seconds'] - short['seconds']) / (long_['tokens'] - short['tokens'])
  prefill = max(short['seconds'] - short['tokens'] * per_token, 0.0)
  out.update(
    ms_per_image_token=round(1000 * per_token, 2),
    prefill_s=round(prefill, 3),
    seconds_per_image_extrapolated=round(prefill + out['image_tokens'] * per_token, 2),
  )
  return out


def ceilings() -> dict:
  """The GPU's measured bf16 matmul rate and device-to-device copy bandwidth (read + write)."""
  import torch

  if not torch.cuda.is_available():
    return {}
  a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
  b = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
  src = torch.randn(2**30, device='cuda', dtype=torch.bfloat16)  # 2 GiB.
  dst = torch.empty_like(src)

  def timed(fn, repeats=10):
    for _ in range(3):
      fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
      fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats

  matmul_s = timed(lambda: a @ b)
  copy_s = timed(lambda: dst.copy_(src))
  return dict(
    bf16_matmul_flops_per_s=2 * 8192**3 / matmul_s, copy_bytes_per_s=2 * src.numel() * 2 / copy_s
  )


def weight_floor_ms(config, copy_bytes_per_s: float) -> dict:
  """Milliseconds per image token to stream the bf16 weights once per use at batch 1 (every step
  is weight-bandwidth bound): the decoder layers + projectors once, the head once per velocity
  evaluation."""
  from nextstep_jax.planning import costs

  p = costs.decoder_matmul_params(config)
  decoder = 2 * (p['decoder'] + p['image_in'] + p['image_out'])
  head = 2 * p['head'] * costs.sample_shapes(config)[3].integrator.velocity_calls
  return dict(
    decoder_step=1000 * decoder / copy_bytes_per_s,
    head_token=1000 * head / copy_bytes_per_s,
    token=1000 * (decoder + head) / copy_bytes_per_s,
  )


def child(args) -> int:
  save = lambda result: pathlib.Path(args.child_out).write_text(json.dumps(result, indent=2))
  if args.child == 'phases':
    return 0 if run_phases(args, save) else 1
  if args.child == 'precisions':
    return 0 if run_precisions(args, save) else 1
  result = run_jax(args, save) if args.child == 'jax' else run_torch(args)
  if args.child == 'torch' and not args.smoke:
    result['ceilings'] = ceilings()
  save(result)
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--out', default=str(RESULTS / 'sampling_gpu_large.json'))
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 4], help='JAX images per call')
  parser.add_argument(
    '--repeats', type=int, default=2, help='timed JAX calls per batch size (fastest kept)'
  )
  parser.add_argument(
    '--torch-tokens', type=int, nargs=2, default=[16, 48], help='two token prefixes timed'
  )
  parser.add_argument('--torch-repeats', type=int, default=1)
  parser.add_argument('--num-steps', type=int, default=50)
  parser.add_argument('--cfg', type=float, default=7.5)
  parser.add_argument('--image-size', type=int, default=512)
  parser.add_argument(
    '--precisions',
    nargs='+',
    default=['bf16', 'int8', 'int4'],
    choices=['bf16', 'int8', 'int4'],
    help='weight precisions of the precisions side (one image per call each)',
  )
  parser.add_argument(
    '--sides',
    nargs='*',
    default=['jax', 'torch', 'phases'],
    choices=['jax', 'torch', 'phases', 'precisions'],
    help='sides to measure (none with --update: recompute the summary only)',
  )
  parser.add_argument('--timeout', type=float, default=400, help='seconds per side')
  parser.add_argument(
    '--update',
    action='store_true',
    help='keep the other sides of an existing --out file (sides measured in separate runs)',
  )
  parser.add_argument(
    '--smoke', action='store_true', help='tiny shapes: check the script on any machine'
  )
  parser.add_argument(
    '--child', choices=['jax', 'torch', 'phases', 'precisions'], help=argparse.SUPPRESS
  )
  parser.add_argument('--child-out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)

  out_path = pathlib.Path(args.out)
  previous = json.loads(out_path.read_text()) if args.update and out_path.exists() else {}
  result = dict(
    benchmark='NextStep-1-Large sampling on one GPU: jitted JAX sampler vs the official PyTorch loop',
    command=' '.join(['python', 'benchmarks/sampling_gpu_large.py'] + sys.argv[1:]),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
    setup=dict(
      image_size=args.image_size,
      num_steps=args.num_steps,
      cfg=args.cfg,
      cfg_branches=2,
      prompt_tokens=PROMPT_TOKENS,
      weights='random bfloat16',
      smoke=args.smoke,
    ),
  )
  if not args.sides:  # Summary only: keep where and how the sides were measured.
    result.update(
      {k: previous[k] for k in ('command', 'date', 'machine', 'setup') if k in previous}
    )
  result.update(
    {
      side: previous[side]
      for side in ('jax', 'torch', 'phases', 'precisions')
      if side in previous and side not in args.sides
    }
  )
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    XLA_PYTHON_CLIENT_MEM_FRACTION='0.9',
    PYTHONUNBUFFERED='1',
  )
  for side in args.sides:
    child_out = out_path.with_suffix(f'.{side}.part.json')
    command = [sys.executable, __file__, '--child', side, '--child-out', str(child_out)] + sys.argv[
      1:
    ]
    started = time.monotonic()
    try:
      proc = subprocess.run(command, env=env, timeout=args.timeout, check=False)
      error = None if proc.returncode == 0 else f'exit code {proc.returncode}'
    except subprocess.TimeoutExpired:
      error = f'timed out after {args.timeout:.0f} s'
    result[side] = json.loads(child_out.read_text()) if child_out.exists() else {}
    if error:
      result[side]['error'] = error
    result[side]['wall_s'] = round(time.monotonic() - started, 1)
    child_out.unlink(missing_ok=True)
    out_path.write_text(
      json.dumps(result, indent=2) + '\n'
    )  # Partial results survive a later failure.

  jax_run, torch_run = result.get('jax', {}), result.get('torch', {})
  if (
    jax_run.get('runs')
    and str(args.batches[0]) in jax_run['runs']
    and torch_run.get('ms_per_image_token')
  ):
    one = jax_run['runs'][str(args.batches[0])]
    best = max(jax_run['runs'].values(), key=lambda r: r['images_per_s'])
    torch_images_per_s = 1.0 / torch_run['seconds_per_image_extrapolated']
    result['summary'] = dict(
      jax_images_per_s=one['images_per_s'],
      jax_best_images_per_s=best['images_per_s'],
      jax_best_batch=best['batch_images'],
      torch_eager_images_per_s=round(torch_images_per_s, 6),
      ratio_eager_same_batch=round(one['images_per_s'] / torch_images_per_s, 1),
      ratio_eager_best_batch=round(best['images_per_s'] / torch_images_per_s, 1),
      jax_ms_per_image_token=one['ms_per_image_token'],
      torch_ms_per_image_token=torch_run['ms_per_image_token'],
      first_image_s=dict(
        jax=one['first_image_s'],
        torch_eager=round(torch_run['init_s'] + torch_run['seconds_per_image_extrapolated'], 1),
      ),
    )
    if torch_run.get('ceilings'):
      config = large_config(args)
      floor = weight_floor_ms(config, torch_run['ceilings']['copy_bytes_per_s'])
      result['summary']['weight_streaming_floor_ms'] = {k: round(v, 2) for k, v in floor.items()}
      result['summary']['jax_fraction_of_floor'] = round(
        floor['token'] / one['ms_per_image_token'], 3
      )
      for phase in ('decoder_step', 'head_token'):
        if f'{phase}_ms' in result.get('phases', {}):
          result['summary'][f'jax_{phase}_fraction_of_floor'] = round(
            floor[phase] / result['phases'][f'{phase}_ms'], 3
          )
  out_path.write_text(json.dumps(result, indent=2) + '\n')
  print(json.dumps(result.get('summary', {k: result.get(k) for k in args.sides}), indent=2))
  return 0 if all('error' not in result.get(s, {}) for s in args.sides) else 1


if __name__ == '__main__':
  sys.exit(main())
