"""notebooks/sample_colab.ipynb: its load/shard/sample cells run on a trained tiny run (8 CPU devices)."""

import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from nextstep_jax import configlib
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'sample_colab.ipynb'


@pytest.mark.slow
def test_notebook_samples_a_grid_sharded_over_all_devices(tmp_path, monkeypatch):
  run = tmp_path / 'run'
  loop.train(
    configlib.load_config(
      'configs/tiny.py',
      [f'data.cache_dir={tmp_path / "cache"}', 'train.steps=2', 'train.checkpoint_every=2'],
    ),
    str(run),
  )
  cells = [
    ''.join(c['source'])
    for c in json.loads(NOTEBOOK.read_text())['cells']
    if c['cell_type'] == 'code'
  ]
  install, settings, load, sample = cells
  assert 'pip' in install and '--worker' not in install
  settings = re.sub(r'^WORKDIR = .*$', f'WORKDIR = {str(run)!r}', settings, flags=re.M)
  settings = re.sub(r'^NUM_STEPS = .*$', 'NUM_STEPS = 2', settings, flags=re.M)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for cell in (settings, load, sample):
    exec(compile(cell, str(NOTEBOOK), 'exec'), namespace)
  assert len(namespace['prompt']['input_ids'].sharding.device_set) == 8
  images = namespace['images']
  assert images.shape == (4 * 8, 16, 16, 3) and images.dtype == np.uint8
  # Same prompt and seed through the unsharded pipeline: the same image up to a uint8 rounding flip.
  alone = pipeline.TextToImage.from_workdir(str(run), num_steps=2)([namespace['PROMPTS'][1]], [1])
  assert np.abs(alone[0].astype(int) - images[1].astype(int)).max() <= 1
  assert Image.open(tmp_path / 'samples.png').size == (
    namespace['grid'].shape[1],
    namespace['grid'].shape[0],
  )
