"""Decode roofline: where generation time goes, against this machine's measured matmul and memory speed.

  flock /tmp/nextstep-heavy.lock python benchmarks/decode_roofline.py \
      [--configs configs/tiny.py configs/shapes.py] [--batch-sizes 1 16 64] [--repeats 5]

Random weights (speed does not depend on them). Per config and batch size B, each phase is jitted
alone and timed (median of --repeats, compile excluded): prefill of the prompt rows; one cached
decoder step (the per-token backbone step); one token's head integration (50-step SDE with 2-way
CFG, and the few-step head: 4 Euler steps, guidance folded in, one branch); the image decode
(unpatchify + tokenizer decode + uint8 on the host); and the whole jitted generation for both
samplers. FLOPs and bytes are analytic: matmul FLOPs = 2 x parameters x rows (+ attention over the
cache), bytes = parameters x bytes per parameter streamed once per call + the KV cache read. The
machine's peak is measured here: a large float32 matmul (FLOP/s) and a large array copy-scale
(bytes/s, read + write). The 14B GPU target cannot be measured on this machine; its projection is
analytic (bytes per image token, bandwidth-bound at batch 1). Results:
benchmarks/results/decode_roofline.json, benchmarks/results/decode_throughput.png.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax.data import sequences
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers
from nextstep_jax.model import nextstep
from nextstep_jax.sampling import generate
from nextstep_jax.sampling import integrators
from nextstep_jax.utils import images as image_utils

RESULTS = pathlib.Path(__file__).parent / 'results'
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampling_speed  # its corpus tokenizer  # noqa: E402

# Official NextStep-1-Large parameter counts (docs/model.md §1) and the measured H100 bandwidth.
LAYERS_14B = 13_212_893_184
PROJECTORS_14B = 332_800 + 26_219_520  # image_in_projector + image_out_projector.
HEAD_14B = 157_228_096
H100_BYTES_PER_S = 2.9e12


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() (blocking), after one untimed call that compiles."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine_peaks(repeats: int) -> dict:
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  flops = 2 * n**3 / timed(lambda: matmul(a), repeats)
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB.
  scale = jax.jit(lambda x: x * 1.0001)
  bandwidth = 2 * big.nbytes / timed(lambda: scale(big), repeats)
  return {
    'matmul_f32_flop_per_s': flops,
    'copy_bytes_per_s': bandwidth,
    'ridge_flop_per_byte': flops / bandwidth,
  }


def param_counts(params) -> dict:
  """Matmul parameters streamed per call: backbone (decoder layers + projectors), head."""
  flat = {
    '.'.join(map(str, p)): int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(params)
  }
  layers = sum(v for k, v in flat.items() if k.startswith('decoder.layers'))
  projectors = sum(
    v for k, v in flat.items() if k.startswith(('image_in_projector', 'image_out_projector'))
  )
  head = sum(v for k, v in flat.items() if k.startswith('image_head'))
  return {'backbone': layers + projectors, 'head': head, 'total': sum(flat.values())}


def phase(name: str, seconds: float, flops: float, bytes_: float, peaks: dict) -> dict:
  achieved_f, achieved_b = flops / seconds, bytes_ / seconds
  bound = max(flops / peaks['matmul_f32_flop_per_s'], bytes_ / peaks['copy_bytes_per_s'])
  return {
    'phase': name,
    'ms': round(1000 * seconds, 4),
    'gflop': round(flops / 1e9, 5),
    'mbytes': round(bytes_ / 1e6, 4),
    'gflop_per_s': round(achieved_f / 1e9, 3),
    'gbytes_per_s': round(achieved_b / 1e9, 3),
    'fraction_of_peak_flops': round(achieved_f / peaks['matmul_f32_flop_per_s'], 4),
    'fraction_of_peak_bandwidth': round(achieved_b / peaks['copy_bytes_per_s'], 4),
    'roofline_bound_ms': round(1000 * bound, 4),
    'fraction_of_roofline': round(bound / seconds, 4),
  }


def bench(config_path: str, batch: int, repeats: int, peaks: dict) -> dict:
  config = configlib.load_config(config_path, ['sample.cfg=3.0'])
  grid_h, grid_w = configlib.image_grid(config)
  mcfg = nextstep.ModelConfig.from_config(config.model)
  model = nextstep.NextStep(mcfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  counts = param_counts(nnx.state(model, nnx.Param))
  bb = mcfg.backbone
  word = 4  # float32 on CPU.
  tok = sampling_speed.corpus_tokenizer(RESULTS.parent / '.cache', config.text.vocab_size)
  captions = ['a red circle to the left of a blue square'] * batch
  official = generate.SamplerConfig.from_config(config, grid_h, grid_w)
  few = dataclasses.replace(
    official,
    num_branches=1,
    cfg=1.0,
    integrator=integrators.IntegratorConfig(num_steps=4, solver='euler', time_grid='B'),
  )
  n_tokens = grid_h * grid_w
  out = {
    'config': config_path,
    'batch_size': batch,
    'image_tokens': n_tokens,
    'params': counts,
    'phases': [],
  }

  for label, scfg in (('official_sde50_cfg2', official), ('fewstep4_folded_cfg1', few)):
    rows = scfg.num_branches * batch
    prompt = {
      k: jnp.asarray(v)
      for k, v in sequences.build_prompt_batch(
        tok,
        captions,
        grid_h,
        grid_w,
        config.text.max_caption_tokens,
        num_branches=scfg.num_branches,
      ).items()
    }
    width = prompt['input_ids'].shape[1]
    slots = width + n_tokens - 1
    keys = generate.image_keys_from_seeds(np.arange(batch))

    @jax.jit
    def prefill(state, prompt):
      m = nnx.merge(graphdef, state)
      cache = m.decoder.init_cache(rows, slots)
      hidden, cache = m(
        m.embed(prompt['input_ids'], None, None),
        prompt['positions'],
        prompt['attention_mask'],
        cache,
      )
      return hidden[:, -1], cache

    last_hidden, cache = prefill(params, prompt)

    @jax.jit
    def decoder_step(state, cache, token):
      m = nnx.merge(graphdef, state)
      x = jnp.tile(m.embed_image_tokens(token[:, None]), (scfg.num_branches, 1, 1))
      return m(x, jnp.full((rows, 1), width, jnp.int32), jnp.ones((rows, 1), bool), cache)

    @jax.jit
    def head_token(state, last_hidden):
      m = nnx.merge(graphdef, state)
      return generate.sample_token(m, last_hidden, jnp.asarray(0), keys, scfg)

    token = head_token(params, last_hidden)
    kv_bytes = 2 * bb.num_layers * rows * slots * bb.num_kv_heads * bb.head_dim * word
    attn_flops_prefill = 4 * bb.num_layers * rows * width * width * bb.num_heads * bb.head_dim
    attn_flops_step = 4 * bb.num_layers * rows * slots * bb.num_heads * bb.head_dim
    calls = scfg.integrator.velocity_calls
    head_flops = 2 * counts['head'] * rows * calls
    t_prefill = timed(lambda: prefill(params, prompt), repeats)
    t_step = timed(lambda: decoder_step(params, cache, token), repeats)
    t_head = timed(lambda: head_token(params, last_hidden), repeats)
    t_gen = timed(lambda: generate.generate_tokens(graphdef, params, prompt, keys, scfg), repeats)
    tokens = np.asarray(generate.generate_tokens(graphdef, params, prompt, keys, scfg))
    image_tok = tokenizers.get_tokenizer(config)

    def decode():
      latents = patchify.unpatchify(tokens, grid_h, grid_w, config.model.latent_patch_size)
      return image_utils.to_uint8(image_tok.decode(latents))

    t_decode = timed(decode, repeats)
    t_prompt = timed(
      lambda: sequences.build_prompt_batch(
        tok,
        captions,
        grid_h,
        grid_w,
        config.text.max_caption_tokens,
        num_branches=scfg.num_branches,
      ),
      repeats,
    )
    step_bytes = counts['backbone'] * word + kv_bytes
    phases = [
      phase(
        'prefill',
        t_prefill,
        2 * counts['backbone'] * rows * width + attn_flops_prefill,
        counts['backbone'] * word,
        peaks,
      ),
      phase(
        'backbone_step', t_step, 2 * counts['backbone'] * rows + attn_flops_step, step_bytes, peaks
      ),
      phase('head_integration', t_head, head_flops, counts['head'] * word * calls, peaks),
      phase(
        'generate_total',
        t_gen,
        2 * counts['backbone'] * rows * (width + n_tokens - 1)
        + attn_flops_prefill
        + (n_tokens - 1) * attn_flops_step
        + n_tokens * head_flops,
        counts['backbone'] * word * n_tokens
        + (n_tokens - 1) * kv_bytes
        + counts['head'] * word * calls * n_tokens,
        peaks,
      ),
    ]
    host = {'decode_ms': round(1000 * t_decode, 3), 'prompt_build_ms': round(1000 * t_prompt, 3)}
    per_token_ms = 1000 * (t_step + t_head)
    out['phases'].append(
      {
        'sampler': label,
        'rows': rows,
        'head_calls_per_token': calls,
        'phases': phases,
        'host': host,
        'ms_per_image_token_loop': round(per_token_ms, 4),
        'images_per_s': round(batch / (t_gen + t_decode + t_prompt), 2),
        'head_share_of_token': round(t_head / (t_step + t_head), 3),
      }
    )
    print(
      json.dumps(
        {
          'config': config_path,
          'batch': batch,
          'sampler': label,
          **{p['phase']: p['ms'] for p in phases},
          **host,
        }
      ),
      flush=True,
    )
  return out


def projection_14b(head_steps=(1, 2, 4, 8, 50)) -> dict:
  """Bandwidth-bound ms per image token at batch 1 (bf16): backbone once, head once per step
  (2-way CFG rows share one weight stream); speedup vs the 50-step head; the backbone levers."""
  backbone_gb = 2 * (LAYERS_14B + PROJECTORS_14B) / 1e9
  head_gb = 2 * HEAD_14B / 1e9

  def ms(backbone, head, steps, tokens_per_pass=1):
    return 1000 * (backbone / tokens_per_pass + head * steps) * 1e9 / H100_BYTES_PER_S

  base = ms(backbone_gb, head_gb, 50)
  rows = {
    str(n): {
      'ms_per_token': round(ms(backbone_gb, head_gb, n), 2),
      'speedup': round(base / ms(backbone_gb, head_gb, n), 3),
    }
    for n in head_steps
  }
  levers = {
    'int8_backbone_bf16_head_4': base / ms(backbone_gb / 2, head_gb, 4),
    'int8_backbone_int8_head_4': base / ms(backbone_gb / 2, head_gb / 2, 4),
    'int8_backbone_int8_head_1': base / ms(backbone_gb / 2, head_gb / 2, 1),
    'speculative_2_tokens_per_pass_head_4': base / ms(backbone_gb, head_gb, 4, 2),
    'speculative_2_tokens_int8_head_4': base / ms(backbone_gb / 2, head_gb / 2, 4, 2),
    'int4_backbone_int8_head_4': base / ms(backbone_gb / 4, head_gb / 2, 4),
  }
  return {
    'backbone_gbytes_per_token_bf16': round(backbone_gb, 3),
    'head_gbytes_per_step_bf16': round(head_gb, 4),
    'bandwidth_bytes_per_s': H100_BYTES_PER_S,
    'by_head_steps': rows,
    'speedup_vs_50_steps': rows['4']['speedup'],
    'levers_speedup_vs_50_steps': {k: round(v, 3) for k, v in levers.items()},
    'note': 'not measured (no GPU lent to this task): analytic weight-stream bound at batch 1',
  }


def plot_throughput(results: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  configs = sorted({r['config'] for r in results})
  fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.2))
  for ax, config in zip(np.atleast_1d(axes), configs):
    for label in ('official_sde50_cfg2', 'fewstep4_folded_cfg1'):
      pts = sorted(
        (r['batch_size'], p['images_per_s'])
        for r in results
        if r['config'] == config
        for p in r['phases']
        if p['sampler'] == label
      )
      ax.plot(*zip(*pts), marker='o', label=label)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('prompts per generation call (batch)')
    ax.set_ylabel('images / s (CPU, generate + decode)')
    ax.set_title(f'throughput mode: {config}')
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--configs', nargs='+', default=['configs/tiny.py', 'configs/shapes.py'])
  parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16, 64])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  peaks = machine_peaks(args.repeats)
  print(json.dumps(peaks), flush=True)
  results = [bench(c, b, args.repeats, peaks) for c in args.configs for b in args.batch_sizes]
  out = {
    'machine_peaks': peaks,
    'results': results,
    'projection_14b': projection_14b(),
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
    'gpu': 'none lent to this task: the 14B target is projected, not measured',
    'jax': jax.__version__,
  }
  (RESULTS / 'decode_roofline.json').write_text(json.dumps(out, indent=2) + '\n')
  plot_throughput(results, RESULTS / 'decode_throughput.png')
  print(json.dumps(out['projection_14b'], indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
