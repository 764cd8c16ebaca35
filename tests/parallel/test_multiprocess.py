"""Two local processes x 4 CPU devices (gloo collectives) train like one process x 8 devices."""

import jax
import numpy as np
import pytest

import multiprocess_testing
from nextstep_jax import configlib
from nextstep_jax.parallel import distributed
from nextstep_jax.training import loop

# Same programs and global batch; only the all-reduce implementation (gloo vs in-process) and
# its summation order differ. AdamW magnifies that noise on near-zero gradients, hence the atol.
RTOL, ATOL = 1e-5, 4e-6
OVERRIDES = ['train.steps=4', 'train.checkpoint_every=2']


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  cache = tmp_path / 'cache'
  single = loop.train(
    configlib.load_config('configs/tiny.py', [f'data.cache_dir={cache}', *OVERRIDES]),
    str(tmp_path / 'single'),
  )
  procs = multiprocess_testing.launch_training(
    tmp_path / 'multi', [f'data.cache_dir={cache}', *OVERRIDES]
  )
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
    assert f'process {i}/2: 4 local devices of 8' in out
  metrics = (tmp_path / 'multi' / 'metrics.jsonl').read_text().splitlines()
  assert len(metrics) == len(
    (tmp_path / 'single' / 'metrics.jsonl').read_text().splitlines()
  )  # One writer.
  multi, extra = multiprocess_testing.restore_on_one_device(tmp_path / 'multi')
  reference, _ = multiprocess_testing.restore_on_one_device(tmp_path / 'single')
  assert extra['step'] == single.step == 4
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(multi['params']),
    jax.tree_util.tree_leaves(reference['params']),
  ):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
  data_files = sorted(
    p.name
    for p in (tmp_path / 'multi' / 'checkpoints' / '4' / 'data').iterdir()
    if p.name.startswith('process_')
  )
  assert data_files == [
    'process_0-of-2.json',
    'process_1-of-2.json',
  ]  # Each process saved its iterator.


def test_process_rows_split_the_global_batch():
  batch = {'x': np.arange(8)[:, None], 'y': np.arange(8)}
  parts = [distributed.process_rows(batch, i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['y'] for p in parts]), batch['y'])
  assert distributed.process_rows(batch, 0, 1) is batch
  try:
    distributed.process_rows(batch, 0, 3)
  except ValueError as e:
    assert 'train.batch_size' in str(e)
  else:
    raise AssertionError('expected a ValueError for 8 rows over 3 processes')


def test_partial_multiprocess_settings_are_refused():
  try:
    distributed.initialize('127.0.0.1:1234', None, 0)
  except ValueError as e:
    assert 'num_processes' in str(e)
  else:
    raise AssertionError('expected a ValueError')
