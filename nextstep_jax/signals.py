"""Stop requests (SIGTERM, Ctrl-C) recorded from the first moment of a console script.

Importing jax and flax takes seconds; a SIGTERM in that window used to kill a trainer silently
(exit 143). Console scripts (`nextstep-*`) install `record` for SIGTERM and SIGINT when the
package is imported (see `nextstep_jax/__init__.py`); `cli/entry.run` then either hands the
requests to the trainer's preemption watch (`training/preemption.py`), which saves and stops at
the next step boundary, or, for the other tools, reports a request that came before any work in
one line and restores the default handlers. A second Ctrl-C always exits at once (code 130).
No jax imports here: this module runs before them.
"""

import os
import signal
import sys
import threading

_received: list[int] = []
_interrupts = [0]


def install() -> None:
  """Records SIGTERM and SIGINT from now on (main thread only; a no-op elsewhere)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)


def uninstall() -> None:
  """Restores the default handlers (SIGTERM terminates, SIGINT raises KeyboardInterrupt)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def record(signum, frame) -> None:
  """Signal handler: remembers the request; the second Ctrl-C exits immediately."""
  del frame
  _received.append(signum)
  if signum == signal.SIGINT:
    count_interrupt()


def count_interrupt() -> None:
  """Counts a Ctrl-C; on the second, prints one line and exits the process with code 130."""
  _interrupts[0] += 1
  if _interrupts[0] >= 2:
    print(
      'second Ctrl-C: exiting now without saving; rerun to resume from the last checkpoint',
      file=sys.stderr,
      flush=True,
    )
    os._exit(130)  # immediate: no cleanup waits on threads


def received() -> list[int]:
  """Signals recorded so far (SIGTERM / SIGINT numbers, in order)."""
  return list(_received)


def name(signum: int) -> str:
  return 'Ctrl-C (SIGINT)' if signum == signal.SIGINT else signal.Signals(signum).name
