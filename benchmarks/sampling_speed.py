"""Sampling-speed benchmark: compile time, images/s and ms per image token of the jitted generator.

  python benchmarks/sampling_speed.py [--configs configs/tiny.py configs/shapes.py] [--batch-sizes 1 16]
      [--repeats 3] [--num-steps 50] [--cfg 3.0]

Randomly initialised params (speed does not depend on the weights), 2-way CFG, the config's solver.
Compile time is measured apart from the steady state (median of `--repeats` runs). Results:
benchmarks/results/sampling_speed.json.
"""

import argparse
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
from nextstep_jax.data import text_tokenizer
from nextstep_jax.model import nextstep
from nextstep_jax.sampling import generate

RESULTS = pathlib.Path(__file__).parent / 'results'


def corpus_tokenizer(workdir: pathlib.Path, vocab_size: int) -> text_tokenizer.TextTokenizer:
  captions = [
    'a red circle to the left of a blue square',
    'a green triangle above a yellow square',
    'a handwritten digit seven',
  ]
  return text_tokenizer.TextTokenizer.load_or_train(
    str(workdir / f'bench_{vocab_size}.model'), captions, vocab_size
  )


def bench_config(
  config_path: str,
  batch_size: int,
  repeats: int,
  num_steps: int,
  cfg: float,
  tok: text_tokenizer.TextTokenizer,
) -> dict:
  config = configlib.load_config(
    config_path, [f'sample.num_steps={num_steps}', f'sample.cfg={cfg}']
  )
  configlib.validate(config)
  grid_h, grid_w = configlib.image_grid(config)
  model = nextstep.NextStep(nextstep.ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  sampler_cfg = generate.SamplerConfig.from_config(config, grid_h, grid_w)
  captions = ['a red circle to the left of a blue square'] * batch_size
  prompt = {
    k: jnp.asarray(v)
    for k, v in sequences.build_prompt_batch(
      tok,
      captions,
      grid_h,
      grid_w,
      config.text.max_caption_tokens,
      num_branches=sampler_cfg.num_branches,
    ).items()
  }
  keys = generate.image_keys_from_seeds(np.arange(batch_size))
  t0 = time.perf_counter()
  program = generate.SamplingProgram.for_state(graphdef, params, config.mesh.rules)
  compiled = (
    program.generate_program(prompt['input_ids'].shape[0], len(keys))
    .lower(params, prompt, keys, sampler_cfg)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, prompt, keys, sampler_cfg))
    times.append(time.perf_counter() - t0)
  run_s = statistics.median(times)
  n_tokens = grid_h * grid_w
  return {
    'config': config_path,
    'batch_size': batch_size,
    'image_tokens': n_tokens,
    'num_steps': num_steps,
    'cfg_branches': sampler_cfg.num_branches,
    'solver': config.sample.solver,
    'params': nextstep.count_params(params),
    'compile_s': round(compile_s, 3),
    'seconds_per_batch': round(run_s, 4),
    'images_per_s': round(batch_size / run_s, 3),
    'ms_per_image_token': round(1000 * run_s / n_tokens, 3),
    'ms_per_image_token_per_image': round(1000 * run_s / n_tokens / batch_size, 3),
  }


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--configs', nargs='+', default=['configs/tiny.py', 'configs/shapes.py'])
  parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num-steps', type=int, default=50)
  parser.add_argument('--cfg', type=float, default=3.0)
  parser.add_argument('--out', default=str(RESULTS / 'sampling_speed.json'))
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  rows = []
  for config_path in args.configs:
    vocab = configlib.load_config(config_path).text.vocab_size
    tok = corpus_tokenizer(RESULTS.parent / '.cache', vocab)
    for batch_size in args.batch_sizes:
      rows.append(
        bench_config(config_path, batch_size, args.repeats, args.num_steps, args.cfg, tok)
      )
      print(json.dumps(rows[-1]), flush=True)
  out = {
    'results': rows,
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
    'jax': jax.__version__,
  }
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
