"""Compute-optimal scaling study on this CPU: shapes world, 3 isoFLOP budgets, a 4x prediction, head allocation.

  python benchmarks/scaling_sweep.py [--runs-dir runs/scaling_sweep] [--collect-only]

Family (`experiments/scaling.py`): backbone width w in WIDTHS, depth round(w / 32), attention heads
of 16; the flow head is 192 x 2 layers for every member: the image token is 192 wide (8x8 RGB
patches) and a head narrower than its token caps the rank of the predicted velocity, so the flow
loss stalls near the noise floor (the study's first family, with 32-wide heads, sat at ~0.97 at
every size). Fixed: batch 8, lr 5e-4 (cosine, 5% warm-up), one head sample per token
(`loss.fm_head_batch_mul=1`). Budgets 1e12, 3e12, 1e13 training FLOPs (the planner's model):
the same five family shapes (w16 to w160) on every budget (`tokens_per_param` centres the window
there: with the head fixed, the loss-optimal backbone stayed at the smallest widths), each
trained for C / (FLOPs per step) steps with its own schedule; 6 flow-head allocations (64 x 2 to
384 x 2) at 3e12; the fitted laws then predict the optimal size and eval loss at 4e13 and that
run is trained. 21 runs, 1.25e14 training FLOPs: 82 minutes of training on this 2-core CPU
while other benchmarks shared it (the 1e12 runs took 30 s each). Every run resumes from its
checkpoints; rerunning the command skips finished runs. Writes benchmarks/results/scaling_sweep.json and
scaling_sweep_{isoflop,laws,head_allocation}.png.
"""

import argparse
import os
import platform
import sys

from nextstep_jax.evaluate import run_eval
from nextstep_jax.experiments import study

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
WIDTHS = (16, 48, 96, 128, 160, 192, 256)
BUDGETS = (1e12, 3e12, 1e13)
FIXED = (
  'train.batch_size=8',
  'train.lr=5e-4',
  'train.log_every=100',
  'train.sample_every=0',
  'train.num_grid_samples=4',
  'train.keep_checkpoints=1',
  'sample.num_steps=20',
  'loss.fm_head_batch_mul=1',
)
HEADS = ((64, 2), (128, 2), (192, 1), (192, 2), (256, 2), (384, 2))  # (width, layers).


def spec() -> study.StudySpec:
  return study.StudySpec(
    'configs/shapes.py',
    FIXED,
    WIDTHS,
    BUDGETS,
    sizes_per_budget=5,
    min_steps=150,
    max_steps=25000,
    tokens_per_param=1.5,
    predict_factor=4.0,
    head_budget=3e12,
    heads=HEADS,
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--runs-dir', default='runs/scaling_sweep', help='run workdirs (gs:// works)')
  parser.add_argument('--out', default=RESULTS, help='where scaling_sweep.json and the PNGs go')
  parser.add_argument(
    '--collect-only', action='store_true', help='read finished runs, train nothing'
  )
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  import jax

  extra = {
    'command': ' '.join(
      ['python', 'benchmarks/scaling_sweep.py', *(sys.argv[1:] if argv is None else argv)]
    ),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
  }
  study_spec = spec()
  summary = study.run_study(
    study_spec,
    args.out,
    args.runs_dir,
    train=not args.collect_only,
    extra=extra,
    stem='scaling_sweep',
    scorer=lambda workdir: run_eval.score_workdir(workdir, study_spec.eval_prompts),
  )
  if summary is None:
    return 1
  p = summary['prediction']
  print(
    f'N* ~ C^{summary["exponent_n_opt"]["value"]:.3f} {summary["exponent_n_opt"]["interval"]}, '
    f'L* ~ C^-{summary["exponent_loss"]["value"]:.3f} {summary["exponent_loss"]["interval"]}; '
    f'prediction at {p["budget"]:.3g}: {p["predicted_eval_loss"]:.4f} vs measured '
    f'{p.get("measured_eval_loss")} (relative error {p.get("relative_error")})'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
