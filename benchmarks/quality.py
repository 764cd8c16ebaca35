"""Quality benchmark: train shapes and digits configs on this CPU, score samples with the evaluators.

  python benchmarks/quality.py [--shapes-config configs/shapes.py] [--digits-config configs/digits.py]
      [--minutes 60] [--prompts 100] [--curve-prompts 40] [--workdir runs/quality] [--skip-digits]

Each config trains for at most `--minutes` of wall time (train.max_minutes), checkpointing every
`train.checkpoint_every` steps (all kept). Afterwards every checkpoint is scored on `--curve-prompts`
prompts per suite (the accuracy-vs-minutes curve) and the last one on `--prompts` prompts per suite
(the headline figures). One sample per prompt, seeds 0..n-1. Results: benchmarks/results/quality.json
and sample grids in benchmarks/results/quality_*.png.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

import jax

from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.evaluate import run_eval
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop
from nextstep_jax.utils import images as image_utils

RESULTS = pathlib.Path(__file__).parent / 'results'


def minutes_at_steps(workdir: pathlib.Path) -> dict[int, float]:
  """Training wall minutes at each logged step (metrics.jsonl, last run segment wins)."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    out[record['step']] = record['minutes']
  return out


def score(dataset: str, sampler, num_prompts: int, size: int):
  if dataset == 'shapes':
    return run_eval.evaluate_shapes(sampler, num_prompts)
  return run_eval.evaluate_digits(sampler, num_prompts, size)


def run(
  config_path: str,
  overrides: list[str],
  minutes: float,
  prompts: int,
  curve_prompts: int,
  workdir: pathlib.Path,
) -> dict:
  config = configlib.load_config(
    config_path, [f'train.max_minutes={minutes}', 'train.keep_checkpoints=1000', *overrides]
  )
  result = loop.train(config, str(workdir))
  minutes_by_step = minutes_at_steps(workdir)
  steps = runs.checkpoint_steps(str(workdir))
  curve = []
  for step in steps:
    sampler = pipeline.TextToImage.from_workdir(str(workdir), step)
    scores, _ = score(config.data.dataset, sampler, curve_prompts, config.image.size)
    curve.append(
      {
        'step': step,
        'minutes': round(minutes_by_step.get(step, float('nan')), 2),
        **run_eval.headline(config.data.dataset, scores),
      }
    )
    print(json.dumps(curve[-1]), flush=True)
  sampler = pipeline.TextToImage.from_workdir(str(workdir))
  scores, images = score(config.data.dataset, sampler, prompts, config.image.size)
  name = config.data.dataset
  if name == 'shapes':
    for suite in ('seen_one', 'seen_two', 'heldout'):
      image_utils.save_png(
        RESULTS / f'quality_{name}_{suite}.png', image_utils.make_grid(images[suite][:64], 8)
      )
  else:
    image_utils.save_png(RESULTS / f'quality_{name}.png', image_utils.make_grid(images[:64], 8))
  return {
    'config': config_path,
    'overrides': overrides,
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'config_name': config.name,
    'train_minutes': round(result.minutes, 2),
    'train_steps': result.step,
    'batch_size': config.train.batch_size,
    'sample': config.sample.to_dict(),
    'scores': scores,
    'curve': curve,
    **run_eval.headline(name, scores),
  }


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--shapes-config', default='configs/shapes.py')
  parser.add_argument('--digits-config', default='configs/digits.py')
  parser.add_argument(
    '--override', action='append', default=[], help='field=value for both configs'
  )
  parser.add_argument('--minutes', type=float, default=60.0)
  parser.add_argument('--prompts', type=int, default=100)
  parser.add_argument('--curve-prompts', type=int, default=40)
  parser.add_argument('--workdir', default='runs/quality')
  parser.add_argument('--skip-digits', action='store_true')
  parser.add_argument('--skip-shapes', action='store_true')
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  out_path = RESULTS / 'quality.json'
  summary = json.loads(out_path.read_text()) if out_path.exists() else {}
  root = pathlib.Path(args.workdir)
  if not args.skip_shapes:
    shapes = run(
      args.shapes_config,
      args.override,
      args.minutes,
      args.prompts,
      args.curve_prompts,
      root / 'shapes',
    )
    summary.update(
      {
        k: shapes[k]
        for k in ('shapes_seen_accuracy_one', 'shapes_seen_accuracy_two', 'shapes_heldout_accuracy')
      }
    )
    summary['shapes'] = shapes
  if not args.skip_digits:
    digits = run(
      args.digits_config,
      args.override,
      args.minutes,
      args.prompts,
      args.curve_prompts,
      root / 'digits',
    )
    summary.update({k: digits[k] for k in ('digits_accuracy', 'digits_frechet')})
    summary['digits'] = digits
  summary['train_minutes'] = {
    k: summary[k]['train_minutes'] for k in ('shapes', 'digits') if k in summary
  }
  summary.update(
    {
      'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
    }
  )
  out_path.write_text(json.dumps(run_eval.json_safe(summary), indent=2, default=str) + '\n')
  print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
