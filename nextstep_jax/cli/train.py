"""nextstep-train --config configs/shapes.py[:variant] [--workdir DIR] [--config.train.steps=100 ...]

Trains (or resumes) a run; prints the workdir, which `nextstep-sample --workdir` accepts. The
workdir may be a gs:// URL. On SIGTERM (preemption) or Ctrl-C every process checkpoints one agreed
step and exits 0 (a second Ctrl-C exits at once); rerunning the same command continues the run
from the newest checkpoint that restores (damaged newer ones are moved aside, not deleted), or
from `--step N`. One trainer per workdir (train.lock). User errors print one line (`--debug`
or NEXTSTEP_DEBUG=1 for the traceback).
"""

import sys

from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax.cli import entry


def parse_config(argv, description: str):
  """(args, config) from `--config FILE[:variant]` plus `--config.field=value` overrides."""
  parser = entry.ArgumentParser(description=description)
  parser.add_argument(
    '--config', required=True, help='config file, e.g. configs/shapes.py or configs/shapes.py:demo'
  )
  parser.add_argument('--workdir', default=None, help='run directory (default: runs/<config name>)')
  parser.add_argument('--coordinator', default=None, help='multi-process: host:port of process 0')
  parser.add_argument(
    '--num-processes', type=int, default=None, help='multi-process: process count'
  )
  parser.add_argument('--process-id', type=int, default=None, help='multi-process: this process')
  parser.add_argument(
    '--step',
    type=int,
    default=None,
    help='resume from this saved step (default: the newest that restores); newer '
    'checkpoints are moved aside to checkpoints.superseded/',
  )
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(
      f'unrecognised arguments {bad}; config overrides look like --config.train.steps=100'
    )
  return args, configlib.load_config(args.config, rest)


def main(argv=None) -> int:
  return entry.run(_main, argv, stop_signals='train')


def _main(argv) -> int:
  args, config = parse_config(argv, __doc__)
  if args.step is not None and args.step < 0:
    raise errors.UsageError(f'--step {args.step} must be >= 0 (a saved step)')
  from nextstep_jax.parallel import distributed  # after flag errors

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from nextstep_jax.training import loop

  result = loop.train(config, args.workdir, from_step=args.step)
  state = 'preempted at' if result.preempted else 'finished'
  print(
    f'{state} step {result.step} in {result.minutes:.1f} min; workdir: {result.workdir}', flush=True
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
