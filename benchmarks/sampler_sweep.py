"""Sampler-settings sweep on one trained run: evaluator scores per (solver, cfg, temperature, steps).

  python benchmarks/sampler_sweep.py --workdir runs/quality/shapes [--prompts 40]
      [--solvers sde euler] [--cfgs 1.5 3 5] [--temperatures 1.0] [--num-steps 50]

Sampler settings need no retraining, so they are chosen by measuring on the trained checkpoint.
Results: benchmarks/results/sampler_sweep_<dataset>.json.
"""

import argparse
import datetime
import itertools
import json
import os
import pathlib
import platform
import sys
import time

import jax

from nextstep_jax.evaluate import run_eval
from nextstep_jax.sampling import pipeline

RESULTS = pathlib.Path(__file__).parent / 'results'


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--prompts', type=int, default=40)
  parser.add_argument('--solvers', nargs='+', default=['sde', 'euler'])
  parser.add_argument('--cfgs', nargs='+', type=float, default=[1.5, 3.0, 5.0])
  parser.add_argument('--temperatures', nargs='+', type=float, default=[1.0])
  parser.add_argument('--num-steps', nargs='+', type=int, default=[50])
  args = parser.parse_args()
  rows = []
  dataset = None
  for solver, cfg, temperature, steps in itertools.product(
    args.solvers, args.cfgs, args.temperatures, args.num_steps
  ):
    sampler = pipeline.TextToImage.from_workdir(
      args.workdir, solver=solver, cfg=cfg, temperature=temperature, num_steps=steps
    )
    dataset = sampler.config.data.dataset
    t0 = time.perf_counter()
    if dataset == 'shapes':
      scores, _ = run_eval.evaluate_shapes(sampler, args.prompts)
    else:
      scores, _ = run_eval.evaluate_digits(sampler, args.prompts, sampler.config.image.size)
    rows.append(
      {
        'solver': solver,
        'cfg': cfg,
        'temperature': temperature,
        'num_steps': steps,
        'seconds': round(time.perf_counter() - t0, 1),
        **run_eval.headline(dataset, scores),
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  out = {
    'workdir': args.workdir,
    'prompts_per_suite': args.prompts,
    'results': rows,
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f'sampler_sweep_{dataset}.json').write_text(json.dumps(out, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
