"""Few-step heads: evaluator scores vs wall time per image on the shapes and digits models.

  flock /tmp/nextstep-heavy.lock python benchmarks/fewstep_quality.py \
      [--shapes-run /work/main/runs/q2/shapes] [--digits-run /work/main/runs/q1/digits] \
      [--out-root /work/main/runs/fewstep] [--prompts 100] [--steps 1 2 4 8 50] [--skip-distill]

Stage 1 (unless --skip-distill and the run exists): distil each trained run's head (its own
sampler, the official SDE with CFG, is the teacher's data generator; the guided ODE of the head is
the teacher map; nextstep_jax/training/distill.py) into a step-conditioned head with guidance folded
in, written to <out-root>/<dataset>. Stage 2: score, for head steps in --steps, the official SDE head,
the Euler ODE on the unchanged head, the distilled heads (Euler with step sizes; `distilled`:
guidance folded in, one branch; `distilled_cfg`: 2-way CFG kept), and the training-free annealed
schedule (Euler; many steps for the first tokens, few for the last) at the same mean head steps.
Wall time per image: after a compiling call, the median of --timing-repeats runs generating and
decoding --timing-images evaluation prompts at sample.batch_size (captions to uint8). Results:
benchmarks/results/fewstep.json and benchmarks/results/fewstep_quality.png.
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
import numpy as np

from nextstep_jax import runs
from nextstep_jax.data.builtin import shapes as shapes_data
from nextstep_jax.evaluate import run_eval
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import distill

RESULTS = pathlib.Path(__file__).parent / 'results'
ANNEAL = {
  2: (4, 2, 1, 1),
  4: (8, 4, 2, 2),
  8: (16, 8, 4, 4),
}  # Mean head steps -> steps per token quarter.


def distill_prompts(dataset: str, num: int) -> list[str]:
  """Training-split prompts for the teacher (seed 1000; the evaluation uses seed 1)."""
  if dataset == 'shapes':
    return shapes_data.eval_prompts(num // 2, 1, 'seen', 1000) + shapes_data.eval_prompts(
      num - num // 2, 2, 'seen', 1001
    )
  from nextstep_jax.data.builtin import digits  # sklearn

  return digits.eval_prompts(num, 1000)


def accuracy(dataset: str, scores: dict) -> float:
  """One headline number: mean whole-prompt accuracy over the three shapes suites, or digit accuracy."""
  if dataset == 'shapes':
    return float(np.mean([scores[s]['accuracy'] for s in ('seen_one', 'seen_two', 'heldout')]))
  return float(scores['accuracy'])


def ms_per_image(sampler: pipeline.TextToImage, captions: list[str], repeats: int) -> float:
  """Median wall ms per image of sampler(captions) (generate + decode), after a compiling call."""
  seeds = list(range(len(captions)))
  sampler(captions[:1], seeds[:1])
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sampler(captions, seeds)
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times) / len(captions)


def evaluate(dataset: str, run: str, args, size: int, **overrides) -> dict:
  sampler = pipeline.TextToImage.from_workdir(run, **overrides)
  if dataset == 'shapes':
    scores, _ = run_eval.evaluate_shapes(sampler, args.prompts)
    captions = run_eval.shapes_suites(args.timing_images)['seen_two'][: args.timing_images]
  else:
    scores, _ = run_eval.evaluate_digits(sampler, args.prompts, size)
    from nextstep_jax.data.builtin import digits  # sklearn

    captions = digits.eval_prompts(args.timing_images, 1)
  row = {
    'accuracy': accuracy(dataset, scores),
    'ms_per_image': round(ms_per_image(sampler, captions, args.timing_repeats), 2),
    **run_eval.headline(dataset, scores),
    'settings': overrides,
  }
  print(json.dumps({'dataset': dataset, **row}), flush=True)
  return row


def methods(steps: list[int]) -> list[tuple[str, int, dict]]:
  rows = []
  for n in steps:
    rows.append(('sde', n, {'num_steps': n}))
    rows.append(('ode', n, {'num_steps': n, 'solver': 'euler'}))
    if n in ANNEAL:
      rows.append(('anneal', n, {'solver': 'euler', 'token_steps': ANNEAL[n]}))
  return rows


STUDENTS = {'distilled': '', 'distilled_cfg': '_cfg'}  # Method -> student run suffix.


def run_dataset(dataset: str, run: str, out_root: pathlib.Path, args) -> dict:
  size = pipeline.TextToImage.from_workdir(run).config.image.size
  table, distill_info = [], {}
  if not args.only_students:
    for method, n, overrides in methods(args.steps):
      table.append(
        {'method': method, 'steps': n, **evaluate(dataset, run, args, size, **overrides)}
      )
  for method in args.students:
    student = out_root / f'{dataset}{STUDENTS[method]}'
    if not (student / runs.CONFIG_FILE).exists() or not args.skip_distill:
      cfg = dataclasses.replace(
        distill.DistillConfig(),
        num_images=args.distill_images,
        steps=args.distill_steps,
        lr=args.distill_lr,
        fold_guidance=method == 'distilled',
      )
      seeds = list(range(10_000, 10_000 + cfg.num_images))
      summary = distill.distill(
        run, str(student), distill_prompts(dataset, cfg.num_images), seeds, cfg
      )
      print(json.dumps({k: v for k, v in summary.items() if k != 'losses'}), flush=True)
    for n in [s for s in args.steps if s <= distill.DistillConfig().max_student_steps]:
      table.append(
        {'method': method, 'steps': n, **evaluate(dataset, str(student), args, size, num_steps=n)}
      )
    info = json.loads((student / 'distill.json').read_text())
    distill_info[method] = {
      'run': str(student),
      **{k: v for k, v in info.items() if k != 'teacher_sample'},
    }
  return {'run': run, 'table': table, 'distill': distill_info}


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
  for ax, (dataset, res) in zip(np.atleast_1d(axes), results.items()):
    for method, marker in (
      ('sde', 'o'),
      ('ode', 's'),
      ('anneal', '^'),
      ('distilled', '*'),
      ('distilled_cfg', 'P'),
    ):
      rows = sorted([r for r in res['table'] if r['method'] == method], key=lambda r: r['steps'])
      if not rows:
        continue
      ax.plot(
        [r['ms_per_image'] for r in rows],
        [100 * r['accuracy'] for r in rows],
        marker=marker,
        label=method,
      )
      for r in rows:
        ax.annotate(
          str(r['steps']),
          (r['ms_per_image'], 100 * r['accuracy']),
          fontsize=8,
          xytext=(3, 3),
          textcoords='offset points',
        )
    ax.set_xscale('log')
    ax.set_xlabel('wall ms per image (CPU, generate + decode)')
    ax.set_ylabel('evaluator accuracy (%)')
    ax.set_title(f'{dataset}: accuracy vs time (labels: head steps)')
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def headline(results: dict, few: int, method: str) -> dict:
  """The issue's keys for `method` at `few` head steps against the official 50-step SDE head."""
  out = {'steps': few, 'few_step_method': method}
  speedups = []
  for dataset, res in results.items():
    base = next(r for r in res['table'] if r['method'] == 'sde' and r['steps'] == 50)
    student = next(r for r in res['table'] if r['method'] == method and r['steps'] == few)
    out[f'{dataset}_accuracy_50'] = base['accuracy']
    out[f'{dataset}_accuracy_few'] = student['accuracy']
    speedups.append(base['ms_per_image'] / student['ms_per_image'])
    out[f'{dataset}_speedup'] = round(speedups[-1], 2)
  out['speedup_end_to_end'] = round(min(speedups), 2)
  return out


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--shapes-run', default='/work/main/runs/q2/shapes')
  parser.add_argument('--digits-run', default='/work/main/runs/q1/digits')
  parser.add_argument('--out-root', default='/work/main/runs/fewstep')
  parser.add_argument('--prompts', type=int, default=100)
  parser.add_argument('--steps', nargs='+', type=int, default=[1, 2, 4, 8, 50])
  parser.add_argument('--few', type=int, default=4, help='the distilled head steps of the headline')
  parser.add_argument('--distill-images', type=int, default=768)
  parser.add_argument('--distill-steps', type=int, default=2500)
  parser.add_argument('--distill-lr', type=float, default=3e-4)
  parser.add_argument('--students', nargs='*', default=list(STUDENTS), choices=list(STUDENTS))
  parser.add_argument('--only-students', action='store_true', help='keep the stored baseline rows')
  parser.add_argument('--headline-method', default='distilled_cfg')
  parser.add_argument('--timing-images', type=int, default=32)
  parser.add_argument('--timing-repeats', type=int, default=3)
  parser.add_argument(
    '--headline-only',
    action='store_true',
    help='recompute the headline keys and the figure from the stored results',
  )
  parser.add_argument('--datasets', nargs='+', default=['shapes', 'digits'])
  parser.add_argument('--skip-distill', action='store_true', help='reuse existing distilled runs')
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  out_path = RESULTS / 'fewstep.json'
  summary = json.loads(out_path.read_text()) if out_path.exists() else {}
  results = summary.get('results', {})
  run_dirs = {'shapes': args.shapes_run, 'digits': args.digits_run}
  for dataset in [] if args.headline_only else args.datasets:
    fresh = run_dataset(dataset, run_dirs[dataset], pathlib.Path(args.out_root), args)
    if args.only_students and dataset in results:  # Keep stored baseline rows and other students.
      fresh['table'] = [
        r for r in results[dataset]['table'] if r['method'] not in args.students
      ] + fresh['table']
      fresh['distill'] = {**results[dataset].get('distill', {}), **fresh['distill']}
    results[dataset] = fresh
    summary['results'] = results
    out_path.write_text(json.dumps(run_eval.json_safe(summary), indent=2, default=str) + '\n')
  if all(d in results for d in ('shapes', 'digits')):
    summary.update(headline(results, args.few, args.headline_method))
  roofline = RESULTS / 'decode_roofline.json'
  if roofline.exists():
    summary['projected_speedup_14b'] = json.loads(roofline.read_text())['projection_14b'][
      'speedup_vs_50_steps'
    ]
  summary.update(
    {}
    if args.headline_only
    else {
      'prompts_per_suite': args.prompts,
      'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
    }
  )
  out_path.write_text(json.dumps(run_eval.json_safe(summary), indent=2, default=str) + '\n')
  plot(results, RESULTS / 'fewstep_quality.png')
  print(json.dumps({k: v for k, v in summary.items() if k != 'results'}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
