"""nextstep-sweep --base configs/shapes.py --grid model.hidden_size=64,128 --grid model.num_layers=2,4 --out DIR

Runs every grid point (the Cartesian product of the --grid specs, after the --set overrides) one
after another on this machine, evaluates each on a fixed held-out batch, fits L(C) = a C^-b
(+ E) to eval loss against training FLOPs, and writes DIR/sweep.csv, sweep.png, sweep.json.
Fields that must change together: --grid model.hidden_size,model.intermediate_size=64:176,128:352.

--launch-cmd-only prints one training command per run instead (e.g. each on its own slice with
--launcher 'launch/tpu_pod.sh --name sweep-{name} --zone ZONE --type v5p-8'; {name} becomes the run
name); afterwards --collect-only evaluates the finished workdirs and fits without training.

Compute-optimal mode (--budgets instead of --grid; `experiments/study.py`): for every budget C
(training FLOPs, the planner's model), family shapes of the --widths (depth scales with the
width; the flow head is max(token width, width / 2) wide) train for C / (FLOPs per step) steps
along the isoFLOP curve; flow-head allocations (--heads) run at --head-budget; parabola and
power-law fits with bootstrap intervals predict the optimal size and loss at --predict-factor x
the largest budget, and that run is trained and compared. Writes DIR/scaling_study.json and
_isoflop/_laws/_head_allocation PNGs (benchmarks/scaling_sweep.py is this study on the shapes):
  nextstep-sweep --base configs/shapes.py --budgets 1e12,3e12,1e13 --widths 16,48,96,128,160,192,256 \
    --set train.batch_size=8 --set train.lr=5e-4 --set loss.fm_head_batch_mul=1 --min-steps 150 \
    --max-steps 25000 --tokens-per-param 1.5 --heads 64x2,128x2,192x1,192x2,256x2,384x2 \
    --head-budget 3e12 --out DIR
With --launch-cmd-only it prints the unfinished runs' commands (the prediction run once the
isoFLOP runs are collected); --collect-only reads finished workdirs (local or gs://).
"""

import argparse
import sys

from nextstep_jax.cli import entry


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--base', required=True, help='base config file[:variant], e.g. configs/shapes.py'
  )
  parser.add_argument(
    '--grid',
    action='append',
    default=[],
    help='field=v1,v2,... or field1,field2=a1:b1,a2:b2 (repeatable; Cartesian product)',
  )
  parser.add_argument(
    '--budgets',
    default=None,
    help='compute-optimal mode: training FLOPs budgets, e.g. 1e12,3e12,1e13',
  )
  parser.add_argument(
    '--widths', default='16,32,48,64,96,128,160,192,256', help='family widths (multiples of 16)'
  )
  parser.add_argument('--sizes-per-budget', type=int, default=5)
  parser.add_argument(
    '--min-steps', type=int, default=100, help='shorter runs are left off a budget'
  )
  parser.add_argument(
    '--max-steps', type=int, default=20000, help='longer runs are left off a budget'
  )
  parser.add_argument(
    '--predict-factor', type=float, default=4.0, help='prediction budget / largest budget'
  )
  parser.add_argument(
    '--tokens-per-param',
    type=float,
    default=20.0,
    help="centres each budget's sizes at sqrt(C / (6 x this)) (the fitted vertex decides)",
  )
  parser.add_argument(
    '--min-head-dim',
    type=int,
    default=None,
    help='narrowest family flow head (default: the image token width; narrower heads cap the '
    'rank of the velocity)',
  )
  parser.add_argument(
    '--heads',
    default=None,
    help='head allocations WIDTHxLAYERS,... at --head-budget, e.g. 64x2,192x1,192x2,384x2',
  )
  parser.add_argument(
    '--head-budget', type=float, default=None, help='budget of the head runs (default: largest)'
  )
  parser.add_argument(
    '--eval-prompts', type=int, default=50, help='shapes evaluator prompts per suite'
  )
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='override applied to every run, e.g. train.steps=400 (repeatable)',
  )
  parser.add_argument(
    '--out', required=True, help='output directory (sweep.csv/.png/.json; runs/ unless --runs-dir)'
  )
  parser.add_argument(
    '--runs-dir', default=None, help='where the run workdirs go (default OUT/runs; gs:// works)'
  )
  parser.add_argument(
    '--eval-sequences', type=int, default=256, help='held-out batch size for the eval loss'
  )
  parser.add_argument(
    '--stop-at',
    type=int,
    default=None,
    help='end each run after this step (learning-rate schedule of train.steps unchanged)',
  )
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument(
    '--launch-cmd-only', action='store_true', help='print one launch command per run and exit'
  )
  mode.add_argument(
    '--collect-only', action='store_true', help='evaluate finished runs and fit, no training'
  )
  parser.add_argument(
    '--launcher',
    default='python -m nextstep_jax.cli.train',
    help='command prefix of --launch-cmd-only lines (takes --config/--workdir/--config.x=v; '
    '{name} becomes the run name)',
  )
  args = parser.parse_args(argv)

  if bool(args.grid) == bool(args.budgets):
    parser.error('give either --grid specs (a grid sweep) or --budgets (a compute-optimal study)')
  from nextstep_jax import configlib  # after flag errors
  from nextstep_jax.experiments import sweep

  if args.budgets:
    return _study(parser, args)
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
  summary = sweep.run_sweep(
    args.base,
    args.grid,
    args.set,
    args.out,
    runs_dir,
    train=not args.collect_only,
    eval_sequences=args.eval_sequences,
    stop_at=args.stop_at,
    extra={'command': ' '.join(sys.argv)},
  )
  print(
    f'{len(summary["runs"])} runs; L(C) exponent {summary["fitted_exponent"]:.4f} '
    f'± {summary["fitted_exponent_std"]:.4f} ({summary["fit"]["chosen"]}); wrote {args.out}/sweep.csv, .png, .json'
  )
  return 0


def _parse_heads(text: str) -> tuple[tuple[int, int], ...]:
  """'64x2,192x1' -> ((64, 2), (192, 1))."""
  heads = tuple(tuple(item.split('x')) for item in text.split(','))
  if not all(len(h) == 2 and all(v.isdigit() and int(v) > 0 for v in h) for h in heads):
    raise ValueError(f'--heads {text!r}: expected WIDTHxLAYERS,... e.g. 64x2,192x2')
  return tuple((int(w), int(n)) for w, n in heads)


def spec_is_shapes(spec) -> bool:
  from nextstep_jax import configlib

  return configlib.load_config(spec.base, list(spec.fixed)).data.dataset == 'shapes'


def _shapes_scorer(run_eval, spec):
  return lambda workdir: run_eval.score_workdir(workdir, spec.eval_prompts)


def _study(parser, args) -> int:
  """Compute-optimal mode: plan, run or collect, fit, predict (see the module docstring)."""
  from nextstep_jax import configlib
  from nextstep_jax.evaluate import run_eval
  from nextstep_jax.experiments import study

  try:
    spec = study.StudySpec(
      args.base,
      tuple(args.set),
      tuple(int(w) for w in args.widths.split(',')),
      tuple(float(b) for b in args.budgets.split(',')),
      args.sizes_per_budget,
      args.min_steps,
      args.max_steps,
      tokens_per_param=args.tokens_per_param,
      predict_factor=args.predict_factor,
      head_budget=args.head_budget,
      eval_sequences=args.eval_sequences,
      eval_prompts=args.eval_prompts,
      min_head_dim=args.min_head_dim,
      **({'heads': _parse_heads(args.heads)} if args.heads else {}),
    )
    study.plan_isoflop(spec, study.Costs(spec))
  except (ValueError, configlib.ConfigError) as error:
    parser.error(str(error))
  runs_dir = args.runs_dir or f'{args.out.rstrip("/")}/runs'
  summary = study.run_study(
    spec,
    args.out,
    runs_dir,
    train=not args.collect_only,
    extra={'command': ' '.join(sys.argv)},
    launch_only=args.launcher if args.launch_cmd_only else None,
    scorer=_shapes_scorer(run_eval, spec) if spec_is_shapes(spec) else None,
  )
  if summary is None:
    return 0 if args.launch_cmd_only else 1
  p = summary['prediction']
  print(
    f'N* ~ C^{summary["exponent_n_opt"]["value"]:.3f}, L* ~ C^-{summary["exponent_loss"]["value"]:.3f}; '
    f'predicted eval loss {p["predicted_eval_loss"]:.4f} at {p["budget"]:.3g} FLOPs, measured '
    f'{p.get("measured_eval_loss")}; wrote {args.out}/scaling_study.json and PNGs'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
