"""Preemption and Ctrl-C: agree on a step boundary after SIGTERM (or SIGINT), so the loop can
checkpoint there and exit 0.

Multi-process jobs use JAX's preemption sync manager (started by `jax.distributed.initialize`,
config `jax_enable_preemption_service`, on by default) through orbax's
`CheckpointManager.reached_preemption`: SIGTERM to any process (a TPU maintenance event, a spot
reclaim, `kill`) reaches every process through the coordination service, and all of them return
True at the same step, the one after the largest step any process had reached. A single process
has no coordination service; there Python handlers for SIGTERM and SIGINT record the notice and
the next step boundary is the stop step. Ctrl-C (single process) prints what will happen; a second
Ctrl-C exits at once without saving (`nextstep_jax/signals.py`). Requests recorded before the
watch started (while jax was importing) count as notices.
"""

import signal
import sys
import threading

import jax

from nextstep_jax import checkpoints
from nextstep_jax import signals


class PreemptionWatch:
  """`reached(step)` is True at the step every process stops at after a preemption notice.

  Use as a context manager around the training loop and call `reached(step)` after every step on
  every process (the multi-process protocol needs each step). The single-process handlers are
  installed on entry (main thread only) and the previous handlers restored on exit.
  """

  def __init__(self, ckpt: checkpoints.Checkpointer):
    self._ckpt = ckpt
    self._multi_process = jax.process_count() > 1
    self._notice = threading.Event()
    self._previous_handlers = {}

  def __enter__(self) -> 'PreemptionWatch':
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
      if signals.received():
        self._notice.set()
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      if not self._notice.is_set():
        print(
          'Ctrl-C: saving a checkpoint at the end of this step, then exiting '
          '(Ctrl-C again exits at once without saving)',
          file=sys.stderr,
          flush=True,
        )
      self._notice.set()
      signals.count_interrupt()
    self._notice.set()

  def requested(self) -> bool:
    """Whether a stop was requested on this process (before any multi-process agreement)."""
    return self._notice.is_set()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` (just completed) and stop because of a preemption notice."""
    if self._multi_process:
      return self._ckpt.reached_preemption(step)
    return self._notice.is_set()
