"""The torch-free checkpoint.pt reader refuses records that point outside their storage (crafted
files from the hardening report), in one line naming the tensor; a random-mutation fuzz of a valid
file, run in a subprocess, never crashes and never loads anything but the record's own values;
safetensors damage names the file."""

import json
import os
import subprocess
import sys

import checkpoint_fuzz
import numpy as np
import pytest

from nextstep_jax.image import vae_import

FUZZ_CASES = 400
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ_SCRIPT = os.path.join(ROOT, 'tests', 'checkpoint_fuzz.py')


def _crafted(tmp_path, **changes):
  storages, records = checkpoint_fuzz.valid_file(np.random.default_rng(0))
  for name, fields in changes.items():
    for field, value in fields.items():
      setattr(records[name], field, value)
  path = tmp_path / 'checkpoint.pt'
  checkpoint_fuzz.write(path, storages, records)
  return path


def test_valid_file_loads_exactly(tmp_path):
  storages, records = checkpoint_fuzz.valid_file(np.random.default_rng(0))
  loaded = vae_import.read_torch_checkpoint(_crafted(tmp_path))
  for name, record in records.items():
    np.testing.assert_array_equal(loaded[name], checkpoint_fuzz.reference(storages, record))
  np.testing.assert_array_equal(
    loaded['conv.weight_t'], loaded['conv.weight'].reshape(-1)[:6].reshape(2, 3).T
  )


@pytest.mark.parametrize(
  'changes, says',
  [
    ({'norm.weight': {'size': (4096,)}}, "'norm.weight': its last element"),  # Leaked 16 KB before.
    ({'conv.bias': {'stride': (2**40,)}}, "'conv.bias': its last element"),  # SIGSEGV before.
    ({'conv.bias': {'offset': -1}}, "'conv.bias': offset -1"),
    ({'step': {'offset': 5}}, "'step': its last element"),
    (
      {'conv.weight': {'stride': (12, 4, 2)}},
      "'conv.weight': size (2, 3, 2, 2) and stride (12, 4, 2) differ",
    ),
    (
      {'norm.weight': {'storage': 'FloatStorage'}},
      "'norm.weight': storage '1' declares 6 elements",
    ),
    ({'conv.bias': {'numel': 4096}}, "'conv.bias': storage '0' declares 4096 elements"),
    (
      {'step': {'storage': 'HalfStorage'}},
      "'step': storage '2' declares 5 elements but holds 20 of float16",
    ),
  ],
)
def test_out_of_bounds_records_are_refused_naming_the_tensor(tmp_path, changes, says):
  with pytest.raises(vae_import.UnsafeCheckpointError) as error:
    vae_import.read_torch_checkpoint(_crafted(tmp_path, **changes))
  assert says in str(error.value) and '\n' not in str(error.value)


def test_fuzzed_records_load_exactly_or_are_refused_in_a_subprocess(tmp_path):
  out = tmp_path / 'fuzz.json'
  result = subprocess.run(
    [sys.executable, FUZZ_SCRIPT, '--cases', str(FUZZ_CASES), '--json', str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'},
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]  # 139 would be a SIGSEGV.
  summary = json.loads(out.read_text())
  assert summary['wrong'] == 0 and summary['unexpected'] == 0, summary['examples']
  assert summary['exact'] + summary['refused'] == FUZZ_CASES
  assert summary['exact'] > 0 and summary['refused'] > 0  # Both branches exercised.


def test_damaged_safetensors_names_the_file(tmp_path):
  path = tmp_path / 'vae.safetensors'
  vae_import.write_safetensors(path, {'a': np.arange(64, dtype=np.float32)})
  assert np.array_equal(vae_import.read_safetensors(path)['a'], np.arange(64, dtype=np.float32))
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(vae_import.CheckpointFormatError, match=str(path)):
    vae_import.read_safetensors(path)


@pytest.mark.parametrize(
  'release, says',
  [
    ({'psz': None, 'encoder_norm': True}, 'psz=null'),
    ({'ch': 'wide'}, "ch='wide' must be a positive integer"),
    ({'ch_mult': 4}, 'ch_mult=4 must be a list'),
  ],
)
def test_release_config_errors_are_one_line(release, says):
  with pytest.raises(vae_import.CheckpointFormatError, match=says):
    vae_import.config_from_release(release)


def test_release_without_norm_or_psz_is_read_as_it_says():
  cfg = vae_import.config_from_release({'psz': None, 'encoder_norm': False})
  assert not cfg.encoder_norm
