"""Scaling sweep on this CPU: shapes-world models of 3 widths x 2 depths at a fixed step budget.

  python benchmarks/scaling_sweep.py [--steps 500] [--stop-at 200] [--runs-dir /tmp/nextstep_scaling_runs]

Every run has the learning-rate schedule of a --steps run (warm-up 50, cosine) and ends after
--stop-at steps. The same as
  nextstep-sweep --base configs/shapes.py \
    --grid model.hidden_size,model.intermediate_size,model.head_dim=64:176:16,128:352:32,256:704:64 \
    --grid model.num_layers=2,4 --set train.steps=500 ... --stop-at 200 --out benchmarks/results
with the results renamed: benchmarks/results/scaling_sweep.{csv,png,json} (runs, fitted exponent
and its standard error, the command, date and machine). Run workdirs (checkpoints) go to --runs-dir.
"""
import argparse
import datetime
import os
import pathlib
import platform
import sys

import jax

from nextstep_jax.experiments import sweep

RESULTS = pathlib.Path(__file__).parent / 'results'
GRID = ('model.hidden_size,model.intermediate_size,model.head_dim=64:176:16,128:352:32,256:704:64',
        'model.num_layers=2,4')


def fixed_overrides(steps: int) -> list[str]:
  return [f'train.steps={steps}', 'train.batch_size=32', 'train.warmup_steps=50', 'train.lr=1e-3',
          f'train.checkpoint_every={steps}', 'train.log_every=50', 'train.sample_every=0',
          'train.num_grid_samples=4', 'sample.num_steps=10', 'data.num_train=10000']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=500, help='train.steps (sets the LR schedule)')
  parser.add_argument('--stop-at', type=int, default=200, help='end each run after this step')
  parser.add_argument('--runs-dir', default='/tmp/nextstep_scaling_runs')
  parser.add_argument('--eval-sequences', type=int, default=512)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  extra = {'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
           'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}'}
  summary = sweep.run_sweep('configs/shapes.py', GRID, fixed_overrides(args.steps), str(RESULTS.absolute()),
                            args.runs_dir, stem='scaling_sweep', eval_sequences=args.eval_sequences,
                            stop_at=args.stop_at, extra=extra)
  print(f'exponent {summary["fitted_exponent"]:.4f} ± {summary["fitted_exponent_std"]:.4f} '
        f'({summary["fit"]["chosen"]}); wrote {RESULTS}/scaling_sweep.csv, .png, .json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
