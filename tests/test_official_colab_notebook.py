"""notebooks/sample_official_colab.ipynb: its convert / load / sample / edit cells run on a tiny
release in the official layout (PyTorch-built, with a vae/ folder) on the 8 CPU devices."""
import pytest

pytest.importorskip('torch', reason='the PyTorch references need the parity extra')
pytest.importorskip('transformers', reason='the PyTorch references need the parity extra')

import json
import pathlib
import re

import numpy as np

import hf_testing
import torch_reference as tr

pytestmark = pytest.mark.torch

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'sample_official_colab.ipynb'


def test_official_notebook_converts_samples_and_edits(tmp_path, monkeypatch):
  hf_testing.build_tokenizer(str(tmp_path / 'tokenizer_src.json'))
  torch_model = tr.NextStepTorch(tr.TINY_RELEASE).randomize(seed=0).eval()
  release = tr.write_release(torch_model, tr.TINY_RELEASE, str(tmp_path / 'tokenizer_src.json'), tmp_path / 'hf')
  hf_testing.write_vae_release(release / 'vae')
  cells = [''.join(c['source']) for c in json.loads(NOTEBOOK.read_text())['cells'] if c['cell_type'] == 'code']
  install, settings, download, convert, load, sample, edit_download, edit_convert, edit = cells
  assert 'pip' in install and 'snapshot_download' in download and 'snapshot_download' in edit_download
  settings = re.sub(r"^WORK = .*$", f'WORK = {str(tmp_path)!r}', settings, flags=re.M)
  settings = re.sub(r"^IMAGE_SIZE = .*$", 'IMAGE_SIZE = 16', settings, flags=re.M)  # f2 tiny VAE x 2x2 patches.
  settings = re.sub(r"^NUM_STEPS = .*$", 'NUM_STEPS = 2', settings, flags=re.M)
  monkeypatch.chdir(tmp_path)
  namespace = {'RELEASE': str(release), 'EDIT_RELEASE': str(release)}  # The downloads' results.
  for cell in (settings, convert, load, sample, edit_convert, edit):
    exec(compile(cell, str(NOTEBOOK), 'exec'), namespace)  # pylint: disable=exec-used
  sampler = namespace['sampler']
  assert len(sampler.params['decoder']['layers']['mlp']['gate_proj']['kernel'][...].sharding.device_set) == 8
  assert pathlib.Path(namespace['CONVERTED'], 'vae', 'config.json').exists()
  images, edited = namespace['images'], namespace['edited']
  assert images.shape == edited.shape == (1, 16, 16, 3) and images.dtype == edited.dtype == np.uint8
  assert images.std() > 1 and np.abs(edited.astype(int) - images.astype(int)).max() > 0
  assert (tmp_path / 'panda.png').exists() and (tmp_path / 'panda_edit.png').exists()
