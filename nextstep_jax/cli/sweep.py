"""nextstep-sweep --base configs/shapes.py --grid model.hidden_size=64,128 --grid model.num_layers=2,4 --out DIR

Runs every grid point (the Cartesian product of the --grid specs, after the --set overrides) one
after another on this machine, evaluates each on a fixed held-out batch, fits L(C) = a C^-b
(+ E) to eval loss against training FLOPs, and writes DIR/sweep.csv, sweep.png, sweep.json.
Fields that must change together: --grid model.hidden_size,model.intermediate_size=64:176,128:352.

--launch-cmd-only prints one training command per run instead (e.g. each on its own slice with
--launcher 'launch/tpu_pod.sh --name sweep-{name} --zone ZONE --type v5p-8'; {name} becomes the run
name); afterwards --collect-only evaluates the finished workdirs and fits without training.
"""
import argparse
import sys

from nextstep_jax.cli import entry


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--base', required=True, help='base config file[:variant], e.g. configs/shapes.py')
  parser.add_argument('--grid', action='append', default=[], required=True,
                      help='field=v1,v2,... or field1,field2=a1:b1,a2:b2 (repeatable; Cartesian product)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override applied to every run, e.g. train.steps=400 (repeatable)')
  parser.add_argument('--out', required=True, help='output directory (sweep.csv/.png/.json; runs/ unless --runs-dir)')
  parser.add_argument('--runs-dir', default=None, help='where the run workdirs go (default OUT/runs; gs:// works)')
  parser.add_argument('--eval-sequences', type=int, default=256, help='held-out batch size for the eval loss')
  parser.add_argument('--stop-at', type=int, default=None,
                      help='end each run after this step (learning-rate schedule of train.steps unchanged)')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--launch-cmd-only', action='store_true', help='print one launch command per run and exit')
  mode.add_argument('--collect-only', action='store_true', help='evaluate finished runs and fit, no training')
  parser.add_argument('--launcher', default='python -m nextstep_jax.cli.train',
                      help='command prefix of --launch-cmd-only lines (takes --config/--workdir/--config.x=v; '
                      '{name} becomes the run name)')
  args = parser.parse_args(argv)

  from nextstep_jax import configlib  # pylint: disable=g-import-not-at-top (after flag errors)
  from nextstep_jax.experiments import sweep  # pylint: disable=g-import-not-at-top
  try:
    runs = sweep.expand_grid(args.grid)
    for run in runs:
      sweep.run_config(args.base, args.set, run)
  except (ValueError, configlib.ConfigError) as error:
    parser.error(str(error))
  runs_dir = args.runs_dir or f'{args.out.rstrip("/")}/runs'
  if args.launch_cmd_only:
    for run in runs:
      print(sweep.launch_command(args.launcher, args.base, args.set, run, f'{runs_dir}/{run.name}'))
    return 0
  summary = sweep.run_sweep(args.base, args.grid, args.set, args.out, runs_dir, train=not args.collect_only,
                            eval_sequences=args.eval_sequences, stop_at=args.stop_at, extra={'command': ' '.join(sys.argv)})
  print(f'{len(summary["runs"])} runs; L(C) exponent {summary["fitted_exponent"]:.4f} '
        f'± {summary["fitted_exponent_std"]:.4f} ({summary["fit"]["chosen"]}); wrote {args.out}/sweep.csv, .png, .json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
