"""Single-process preemption: SIGTERM or Ctrl-C (SIGINT) mid-training checkpoints the next step
boundary and returns; rerunning ends exactly where an uninterrupted run does."""

import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.training import loop
from nextstep_jax.training import preemption
from nextstep_jax.training import state as state_lib

STEPS = 60
SIGNAL_AFTER_RECORDS = 3  # SIGTERM once metrics.jsonl holds this many lines (log_every=1).
RESUME_ATOL = 0.0  # Same programs on the same inputs: bitwise equal.


def config_for(tmp_path):
  return configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={tmp_path / "cache"}',
      f'train.steps={STEPS}',
      f'train.checkpoint_every={STEPS}',
      'train.log_every=1',
    ],
  )


def final_state(workdir):
  config = configlib.config_from_json((workdir / runs.CONFIG_FILE).read_text())
  _, abstract = state_lib.abstract_train_state(config, state_lib.make_optimizer(config.train))
  ckpt = checkpoints.Checkpointer(workdir / runs.CHECKPOINT_DIR, keep=10)
  try:
    state, _ = ckpt.restore(None, abstract)
    return jax.tree.map(np.asarray, state), ckpt.all_steps()
  finally:
    ckpt.close()


def signal_when_logged(metrics_path, records: int, signum=signal.SIGTERM) -> threading.Thread:
  def watch():
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
      if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= records:
        os.kill(os.getpid(), signum)
        return
      time.sleep(0.005)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'sigint'])
def test_stop_signal_checkpoints_the_next_step_and_rerun_continues_exactly(
  tmp_path, signum, capsys
):
  config = config_for(tmp_path)
  loop.train(config, str(tmp_path / 'straight'))
  late_signals = []  # A signal arriving after training returned must not kill pytest.
  previous = signal.signal(signum, lambda *_: late_signals.append(1))
  try:
    watcher = signal_when_logged(tmp_path / 'run' / 'metrics.jsonl', SIGNAL_AFTER_RECORDS, signum)
    stopped = loop.train(config, str(tmp_path / 'run'))
    watcher.join()
    assert not late_signals, 'the run ended before the signal arrived'
    assert stopped.preempted and SIGNAL_AFTER_RECORDS <= stopped.step < STEPS
    assert signal.getsignal(signum) is not None and not isinstance(
      getattr(signal.getsignal(signum), '__self__', None), preemption.PreemptionWatch
    )
  finally:
    signal.signal(signum, previous)
  if signum == signal.SIGINT:
    assert 'Ctrl-C: saving a checkpoint' in capsys.readouterr().err
  _, steps = final_state(tmp_path / 'run')
  assert steps == [stopped.step]

  finished = loop.train(config, str(tmp_path / 'run'))
  assert finished.step == STEPS and not finished.preempted
  resumed, steps = final_state(tmp_path / 'run')
  straight, _ = final_state(tmp_path / 'straight')
  assert steps == [stopped.step, STEPS]
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(resumed), jax.tree_util.tree_leaves(straight)
  ):
    np.testing.assert_allclose(a, b, atol=RESUME_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))
