"""Two local processes x 4 CPU devices (gloo collectives) train like one process x 8 devices."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax.parallel import distributed
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop
from nextstep_jax.training import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
# Same programs and global batch; only the all-reduce implementation (gloo vs in-process) and
# its summation order differ. AdamW magnifies that noise on near-zero gradients, hence the atol.
RTOL, ATOL = 1e-5, 4e-6
OVERRIDES = ['train.steps=4', 'train.checkpoint_every=2']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def final_params(workdir: pathlib.Path):
  config = configlib.config_from_json((workdir / pipeline.CONFIG_FILE).read_text())
  _, abstract = state_lib.abstract_train_state(config, state_lib.make_optimizer(config.train))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # Restore across topologies.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), abstract)
  ckpt = checkpoints.Checkpointer(workdir / pipeline.CHECKPOINT_DIR, keep=10)
  try:
    state, extra = ckpt.restore(None, abstract)
  finally:
    ckpt.close()
  return jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state['params'])), extra


def test_two_processes_match_one(tmp_path):
  cache = tmp_path / 'cache'
  single = loop.train(configlib.load_config('configs/tiny.py', [f'data.cache_dir={cache}', *OVERRIDES]),
                      str(tmp_path / 'single'))
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'nextstep_jax.cli.train', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'multi'), '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
       '--process-id', str(i), f'--config.data.cache_dir={cache}', *[f'--config.{o}' for o in OVERRIDES]],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
    assert f'process {i}/2: 4 local devices of 8' in out
  metrics = (tmp_path / 'multi' / 'metrics.jsonl').read_text().splitlines()
  assert len(metrics) == len((tmp_path / 'single' / 'metrics.jsonl').read_text().splitlines())  # One writer.
  multi, extra = final_params(tmp_path / 'multi')
  reference, _ = final_params(tmp_path / 'single')
  assert extra['step'] == single.step == 4
  for (path, a), (_, b) in zip(multi, reference):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


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
