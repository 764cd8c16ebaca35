"""Test setup: the process-wide JAX settings every test runs under, made here and nowhere else.

- 8 virtual CPU devices (XLA_FLAGS, JAX_PLATFORMS=cpu), fixed before JAX is imported; a fewer count
  fails the run.
- float32 matmuls at full precision (`jax_default_matmul_precision='highest'`): the parity tests
  compare against float64 numpy / float32 PyTorch references with tight tolerances.
- Flax variables are not sharded eagerly (`flax_always_shard_variable=False`), as in the package.

Test modules must not change these at import (that would leak into every test of the run).

Tests mirror the package layout in folders without `__init__.py` (pytest --import-mode=importlib),
so every test file basename must be unique.
"""

import os
import re
import sys

NUM_DEVICES = 8

os.environ['XLA_FLAGS'] = ' '.join(
  re.sub(r'--xla_force_host_platform_device_count=\S*', '', os.environ.get('XLA_FLAGS', '')).split()
  + [f'--xla_force_host_platform_device_count={NUM_DEVICES}']
)
os.environ['JAX_PLATFORMS'] = 'cpu'

sys.path.insert(0, os.path.dirname(__file__))  # Shared test helpers (model_testing.py).

import flax  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
flax.config.update('flax_always_shard_variable', False)


def pytest_configure(config):
  del config
  if jax.device_count() != NUM_DEVICES:
    raise pytest.UsageError(
      f'The tests need {NUM_DEVICES} CPU devices but JAX sees {jax.device_count()} '
      f'({jax.devices()}). JAX was initialised before tests/conftest.py could set '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES} and '
      'JAX_PLATFORMS=cpu: do not import jax in plugins or set conflicting flags.'
    )


@pytest.fixture
def tmp_workdir(tmp_path):
  """An empty run directory (pathlib.Path) for checkpoints, events and samples."""
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  return workdir


@pytest.fixture
def tfds_testing():
  """The tests/tfds_testing.py helpers; skips the test without the tfds extra."""
  pytest.importorskip('tensorflow_datasets', reason='TFDS sources need the tfds extra')
  import tfds_testing as helpers  # Imports tensorflow_datasets.

  return helpers
