"""Helpers of the multi-process tests: free ports, launching `nextstep-train` processes, restoring."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.training import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_training(
  workdir: pathlib.Path,
  overrides,
  num_processes: int = 2,
  devices_per_process: int = 4,
  stdout=subprocess.PIPE,
) -> list[subprocess.Popen]:
  """Starts `num_processes` `nextstep_jax.cli.train` processes of configs/tiny.py on one coordinator.

  stdout: a stream for every process, or a list with one per process (stderr joins stdout).
  """
  port = free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
  )
  streams = stdout if isinstance(stdout, list) else [stdout] * num_processes
  return [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'nextstep_jax.cli.train',
        '--config',
        'configs/tiny.py',
        '--workdir',
        str(workdir),
        '--coordinator',
        f'127.0.0.1:{port}',
        '--num-processes',
        str(num_processes),
        '--process-id',
        str(i),
        *[f'--config.{o}' for o in overrides],
      ],
      cwd=REPO,
      env=env,
      stdout=streams[i],
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]


def restore_on_one_device(workdir: pathlib.Path, step: int | None = None):
  """(train state as numpy, extra) of a run's checkpoint `step` (latest), on this process's device 0."""
  config = configlib.config_from_json((workdir / runs.CONFIG_FILE).read_text())
  _, abstract = state_lib.abstract_train_state(config, state_lib.make_optimizer(config.train))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # Restore across topologies.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), abstract
  )
  ckpt = checkpoints.Checkpointer(workdir / runs.CHECKPOINT_DIR, keep=100)
  try:
    state, extra = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, state), extra


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  ckpt = checkpoints.Checkpointer(workdir / runs.CHECKPOINT_DIR, keep=100)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()
