"""notebooks/sample_official_colab.ipynb (Colab's v5e-1): its code cells run on CPU against a tiny
release in the official layout (PyTorch-built, with a vae/ folder), with the notebook's parameters
(work directory, quantization, image size, steps) set to tiny values: download (skipped: the release
is local), convert, restore, sample, convert the edit model, edit."""

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


def set_param(cell: str, name: str, value) -> str:
  """The notebook parameter `name` (a `NAME = ...  #@param` line) set to `value`."""
  new, count = re.subn(rf'^{name} = .*$', f'{name} = {value!r}', cell, flags=re.M)
  assert count == 1, f'no parameter {name} in the settings cell'
  return new


@pytest.mark.parametrize('quantize', ['none'])
def test_official_notebook_converts_samples_and_edits(tmp_path, monkeypatch, quantize):
  hf_testing.build_tokenizer(str(tmp_path / 'tokenizer_src.json'))
  torch_model = tr.NextStepTorch(tr.TINY_RELEASE).randomize(seed=0).eval()
  release = tr.write_release(
    torch_model, tr.TINY_RELEASE, str(tmp_path / 'tokenizer_src.json'), tmp_path / 'hf'
  )
  hf_testing.write_vae_release(release / 'vae')
  cells = [
    ''.join(c['source'])
    for c in json.loads(NOTEBOOK.read_text())['cells']
    if c['cell_type'] == 'code'
  ]
  install, settings, download, convert, load, sample, edit_convert, edit = cells
  assert (
    'pip' in install and 'snapshot_download' in download and 'snapshot_download' in edit_convert
  )
  for name, value in (
    ('WORK', str(tmp_path)),
    ('QUANTIZE', quantize),
    ('IMAGE_SIZE', 16),
    ('NUM_STEPS', 2),
  ):
    settings = set_param(settings, name, value)  # IMAGE_SIZE 16: the f2 tiny VAE x 2x2 patches.
  monkeypatch.chdir(tmp_path)
  # The downloads' results: the local release (the download cells skip nothing here, so bind them).
  namespace = {'RELEASE': str(release), 'EDIT_RELEASE': str(release)}
  download_free = lambda cell: cell.replace(
    'from huggingface_hub import snapshot_download', 'pass'
  ).replace('snapshot_download(', '(lambda *a, **k: RELEASE)(')
  for cell in (settings, download_free(download), convert, load, sample):
    exec(compile(cell, str(NOTEBOOK), 'exec'), namespace)
  sampler = namespace['sampler']
  assert 'lm_head' not in sampler.params
  assert pathlib.Path(namespace['CONVERTED'], 'vae', 'config.json').exists()
  assert namespace['CONVERTED'] == f'{tmp_path}/nextstep1_large_{quantize}'
  for cell in (download_free(edit_convert), edit):
    exec(compile(cell, str(NOTEBOOK), 'exec'), namespace)
  assert 'sampler' not in namespace  # Released before the edit model loads.
  images, edited = namespace['images'], namespace['edited']
  assert images.shape == edited.shape == (1, 16, 16, 3) and images.dtype == edited.dtype == np.uint8
  assert images.std() > 1 and np.abs(edited.astype(int) - images.astype(int)).max() > 0
  assert (tmp_path / 'panda.png').exists() and (tmp_path / 'panda_edit.png').exists()
