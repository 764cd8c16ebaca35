"""SIGTERM to one of 2 processes (x 4 CPU devices) mid-training: both stop at one agreed step with a
checkpoint (model, optimizer, both data iterators) and exit 0; the restarted job ends exactly where
an uninterrupted job does."""

import json
import re
import signal
import subprocess

import jax
import numpy as np
import pytest

import multiprocess_testing

pytestmark = pytest.mark.multiprocess

STEPS = 24
OVERRIDES = [f'train.steps={STEPS}', f'train.checkpoint_every={STEPS}', 'train.log_every=1']
SIGNAL_AFTER_STEP = 3  # Process 1 gets SIGTERM once process 0 has logged this step.
# Interrupted and uninterrupted jobs run the same programs, topology and inputs: bitwise equal.
RESUME_ATOL = 0.0


def run_to_completion(workdir, overrides) -> list[str]:
  procs = multiprocess_testing.launch_training(workdir, overrides)
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
  return outputs


def losses(workdir) -> dict[int, float]:
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in records}


def test_sigterm_to_one_process_checkpoints_an_agreed_step_and_resumes_exactly(tmp_path):
  overrides = [f'data.cache_dir={tmp_path / "cache"}', *OVERRIDES]
  run_to_completion(tmp_path / 'straight', overrides)

  run = tmp_path / 'interrupted'
  with open(tmp_path / 'process_1.log', 'w') as log_1:
    procs = multiprocess_testing.launch_training(run, overrides, stdout=[subprocess.PIPE, log_1])
    seen = []
    for line in procs[0].stdout:
      seen.append(line)
      if line.startswith(f'step {SIGNAL_AFTER_STEP}/'):
        procs[1].send_signal(signal.SIGTERM)  # A maintenance event on one worker.
        break
    outputs = [''.join(seen) + procs[0].communicate(timeout=300)[0]]
    procs[1].wait(timeout=300)
  outputs.append((tmp_path / 'process_1.log').read_text())
  stops = []
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}:\n{out[-3000:]}'
    found = re.search(r'preemption notice: stopped at step (\d+)', out)
    assert found, f'process {i} did not stop on the preemption notice:\n{out[-3000:]}'
    stops.append(int(found.group(1)))
  stop = stops[0]
  assert stops == [stop, stop] and SIGNAL_AFTER_STEP < stop < STEPS, stops
  assert multiprocess_testing.checkpoint_steps(run) == [stop]
  for i in range(2):
    saved = json.loads(
      (run / 'checkpoints' / str(stop) / 'data' / f'process_{i}-of-2.json').read_text()
    )
    assert saved == {'kind': 'builtin', 'step': stop}

  outputs = run_to_completion(run, overrides)
  assert all(f'resumed from step {stop}' in out for out in outputs)
  assert losses(run) == losses(tmp_path / 'straight')
  resumed, extra = multiprocess_testing.restore_on_one_device(run)
  straight, _ = multiprocess_testing.restore_on_one_device(tmp_path / 'straight')
  assert extra['step'] == STEPS
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(resumed), jax.tree_util.tree_leaves(straight)
  ):
    np.testing.assert_allclose(a, b, atol=RESUME_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))
