"""Preemption: agree on a step boundary after SIGTERM, so the loop can checkpoint there and exit 0.

Multi-process jobs use JAX's preemption sync manager (started by `jax.distributed.initialize`,
config `jax_enable_preemption_service`, on by default) through orbax's
`CheckpointManager.reached_preemption`: SIGTERM to any process (a TPU maintenance event, a spot
reclaim, `kill`) reaches every process through the coordination service, and all of them return
True at the same step, the one after the largest step any process had reached. A single process
has no coordination service; there a Python SIGTERM handler records the notice and the next step
boundary is the stop step.
"""
import signal
import threading

import jax

from nextstep_jax import checkpoints


class PreemptionWatch:
  """`reached(step)` is True at the step every process stops at after a preemption notice.

  Use as a context manager around the training loop and call `reached(step)` after every step on
  every process (the multi-process protocol needs each step). The single-process handler is
  installed on entry (main thread only) and the previous handler restored on exit.
  """

  def __init__(self, ckpt: checkpoints.Checkpointer):
    self._ckpt = ckpt
    self._multi_process = jax.process_count() > 1
    self._notice = threading.Event()
    self._previous_handler = None

  def __enter__(self) -> 'PreemptionWatch':
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._notice.set()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` (just completed) and stop because of a preemption notice."""
    if self._multi_process:
      return self._ckpt.reached_preemption(step)
    return self._notice.is_set()
