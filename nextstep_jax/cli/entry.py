"""The wrapper every console script's `main` runs in: one line per user error.

`run(main_impl, argv)` calls `main_impl(argv)`; a `nextstep_jax.errors.UserError` (bad flags,
config, inputs, a damaged checkpoint, a held workdir ...) is printed as `error: <message>` on
stderr, with no traceback, and its exit code returned (2 usage, 1 runtime). `--debug` anywhere on
the command line, or NEXTSTEP_DEBUG=1 in the environment, prints the traceback too. Any other
exception is a bug: it propagates with its traceback. Ctrl-C outside training (which saves and
exits by itself) prints one line and exits 130; a SIGTERM or Ctrl-C that arrived while the
package was importing (`nextstep_jax/signals.py`) is reported in one line before any work starts,
or, for the trainer (`stop_signals='train'`), handed to its preemption watch. `ArgumentParser`
reports flag errors the same way
(one line, exit 2) instead of argparse's usage block.
"""

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from nextstep_jax import errors
from nextstep_jax import signals

DEBUG_FLAG = '--debug'
DEBUG_ENV = 'NEXTSTEP_DEBUG'


class ArgumentParser(argparse.ArgumentParser):
  """argparse with flag errors raised as `UsageError` (printed in one line by `run`)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if not any(DEBUG_FLAG in action.option_strings for action in self._actions):
      self.add_argument(
        DEBUG_FLAG,
        action='store_true',
        help=f'show tracebacks of user errors (or set {DEBUG_ENV}=1)',
      )

  def error(self, message: str):
    raise errors.UsageError(f'{message} (see {self.prog} --help)')


def debug_enabled(argv: Sequence[str]) -> bool:
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, '').strip() not in ('', '0')


def run(
  main_impl: Callable[[list[str]], int],
  argv: Sequence[str] | None = None,
  stop_signals: str = 'default',
) -> int:
  """Runs `main_impl(argv)` (default sys.argv[1:]); returns its exit code, or a user error's.

  stop_signals: 'default' (an early stop request ends the tool before it starts; then the usual
  handlers) or 'train' (SIGTERM / Ctrl-C stay recorded for the trainer's preemption watch).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_enabled(argv)
  if stop_signals == 'train':
    signals.install()
  else:
    early = signals.received()
    signals.uninstall()
    if early:
      print(
        f'error: stopped by {signals.name(early[0])} before any work started',
        file=sys.stderr,
        flush=True,
      )
      return 128 + early[0]
  try:
    return main_impl(argv)
  except errors.UserError as error:
    if debug:
      traceback.print_exc()
    print(f'error: {error}', file=sys.stderr, flush=True)
    return error.exit_code
  except KeyboardInterrupt:
    if debug:
      traceback.print_exc()
    print('error: interrupted (Ctrl-C)', file=sys.stderr, flush=True)
    return 130
