"""Hardened training runs: a damaged newest checkpoint falls back to the previous one (kept aside,
message checked), `--step N` resumes an older step, one trainer per workdir, batch/device
divisibility checked before the workdir exists, metrics.jsonl rows past the restored step dropped."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

import multiprocess_testing
from nextstep_jax import configlib
from nextstep_jax.training import loop
from nextstep_jax.training import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESUME_ATOL = 0.0  # Same programs on the same inputs: bitwise equal.


def tiny_config(tmp_path, *overrides):
  return configlib.load_config(
    'configs/tiny.py', [f'data.cache_dir={tmp_path / "cache"}', *overrides]
  )


def train_cli(*args, timeout=600):
  """Runs nextstep-train in a subprocess; (exit code, stdout, stderr)."""
  result = subprocess.run(
    [sys.executable, '-m', 'nextstep_jax.cli.train', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
    env={**os.environ, 'PYTHONPATH': ROOT},
  )
  return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_to_the_previous_one(tmp_path, capsys):
  config = tiny_config(
    tmp_path, 'train.steps=6', 'train.checkpoint_every=2', 'train.keep_checkpoints=3'
  )
  run = tmp_path / 'run'
  loop.train(config, str(run))
  straight, _ = multiprocess_testing.restore_on_one_device(run, 6)
  data = sorted(
    (run / 'checkpoints' / '6' / 'state' / 'd').iterdir(), key=lambda p: -p.stat().st_size
  )[0]
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # Truncated data file.
  (run / 'checkpoints' / '4' / 'state' / 'manifest.ocdbt').unlink()  # Deleted file.
  capsys.readouterr()

  result = loop.train(config, str(run))
  out = capsys.readouterr().out
  assert result.step == 6
  assert 'warning: checkpoint step 6 is damaged (a data file is truncated or corrupt' in out, out
  assert 'warning: checkpoint step 4 is damaged (file state/manifest.ocdbt is missing)' in out, out
  assert out.count('moved it aside to') == 2 and 'resumed from step 2' in out
  kept = sorted(p.name.split('-')[0] for p in (run / 'checkpoints.damaged').iterdir())
  assert kept == ['4', '6']  # Kept aside, not deleted.
  resumed, _ = multiprocess_testing.restore_on_one_device(run, 6)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(resumed), jax.tree_util.tree_leaves(straight)
  ):
    np.testing.assert_allclose(a, b, atol=RESUME_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))
  steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps == sorted(set(steps)), 'metrics.jsonl repeats re-run steps'


@pytest.mark.slow
def test_step_flag_resumes_an_older_checkpoint(tmp_path, capsys):
  config = tiny_config(tmp_path, 'train.steps=4', 'train.checkpoint_every=2', 'train.log_every=1')
  run = tmp_path / 'run'
  loop.train(config, str(run))
  capsys.readouterr()
  result = loop.train(config, str(run), from_step=2)
  out = capsys.readouterr().out
  assert 'moved the newer checkpoint 4 aside' in out and 'resumed from step 2' in out
  assert result.step == 4
  assert [p.name.split('-')[0] for p in (run / 'checkpoints.superseded').iterdir()] == ['4']
  steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [1, 2, 3, 4]  # Rows 3 and 4 of the first run were dropped, then rewritten.


@pytest.mark.slow
def test_second_trainer_on_a_locked_workdir_exits_1_naming_the_holder(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  with workdir_lock.WorkdirLock(epath.Path(run)) as lock:
    code, _, err = train_cli(
      '--config',
      'configs/tiny.py',
      '--workdir',
      str(run),
      f'--config.data.cache_dir={tmp_path / "cache"}',
    )
  assert code == 1, err
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert err.startswith(
    f'error: workdir {run} is in use by another trainer (host {lock.info["host"]}, '
    f'pid {os.getpid()}, started {lock.info["started"]})'
  )
  assert not (run / 'checkpoints').exists() and not (run / 'train.lock').exists()


def test_stale_lock_is_detected_and_replaced(tmp_path, capsys):
  (tmp_path / 'train.lock').write_text(
    json.dumps({'host': 'gone', 'pid': 1 << 30, 'started': 'then'})
  )
  with workdir_lock.WorkdirLock(epath.Path(tmp_path)) as lock:
    assert (
      json.loads((tmp_path / 'train.lock').read_text())['pid'] == os.getpid() == lock.info['pid']
    )
  assert 'replaced a stale lock' in capsys.readouterr().out
  assert not (tmp_path / 'train.lock').exists()


@pytest.mark.slow
def test_indivisible_batch_fails_before_the_workdir_is_created(tmp_path):
  run = tmp_path / 'run'
  code, _, err = train_cli(
    '--config',
    'configs/tiny.py',
    '--workdir',
    str(run),
    '--config.train.batch_size=6',
    f'--config.data.cache_dir={tmp_path / "cache"}',
  )
  assert code == 2, err
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert 'error: train.batch_size=6 does not divide over the 8 devices' in err
  assert '--config.train.batch_size=' in err
  assert not run.exists()


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path):
  path = epath.Path(tmp_path / 'metrics.jsonl')
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n{"st')
  log = loop.MetricsLog(path, enabled=True, resumed_step=2)
  log.write({'step': 3})
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3]
