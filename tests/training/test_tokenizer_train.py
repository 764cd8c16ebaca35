"""Tokenizer training on the tiny config (noise regularisation + GAN on): learning, files, exact
resume, the eval CLI, and the AR model training and sampling on the trained tokenizer's latents."""

import json

import numpy as np
import pytest
from PIL import Image

from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.cli import eval_tokenizer
from nextstep_jax.cli import train_tokenizer
from nextstep_jax.image import tokenizers
from nextstep_jax.image import vae_import
from nextstep_jax.image import vae_tokenizer
from nextstep_jax.training import loop
from nextstep_jax.training import tokenizer_train

TINY = 'configs/tokenizer_shapes.py:tiny'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(run dir, overrides): the tiny tokenizer (noise gamma 0.2, GAN from step 2) trained 16 steps
  through the CLI."""
  root = tmp_path_factory.mktemp('tok')
  overrides = [f'--config.data.cache_dir={root / "cache"}']
  train_tokenizer.main(['--config', TINY, '--workdir', str(root / 'run'), *overrides])
  return root / 'run', overrides


@pytest.mark.slow
def test_training_learns_and_writes_a_release(trained):
  run, _ = trained
  records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [4, 8, 12, 16]
  assert records[-1]['l1'] < 0.8 * records[0]['l1']
  assert 'disc_loss' in records[-1] and 'gan' in records[-1]
  stats = json.loads((run / tokenizer_train.STATS_FILE).read_text())
  assert len(stats['channel_mean']) == len(stats['channel_std']) == 4
  # encoder_norm LayerNorms every 2x2x4 patch, so the overall statistics are exactly (0, 1).
  assert abs(stats['mean']) < 1e-5 and abs(stats['std'] - 1) < 1e-4
  release = json.loads((run / 'release' / vae_import.CONFIG_FILE).read_text())
  assert release['scaling_factor'] == stats['scaling_factor'] and release['ch_mult'] == [1, 2]
  assert (run / 'grids' / 'step_0000016.png').exists()
  assert list((run / 'tb').iterdir())


@pytest.mark.slow
def test_resume_is_exact(trained, tmp_path):
  straight, overrides = trained
  config = configlib.load_config(TINY, overrides)
  resumed = tmp_path / 'resumed'
  assert tokenizer_train.train(config, str(resumed), stop_at=8)['step'] == 8
  assert not (resumed / 'release').exists()
  tokenizer_train.train(config, str(resumed))
  a = vae_import.read_release_tensors(straight / 'release')
  b = vae_import.read_release_tensors(resumed / 'release')
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_eval_cli(trained, tmp_path):
  trained, _ = trained
  out = tmp_path / 'eval.json'
  eval_tokenizer.main(
    [
      '--workdir',
      str(trained),
      '--labels',
      'tiny',
      '--num',
      '8',
      '--sigmas',
      '0',
      '0.5',
      '--out',
      str(out),
      '--plot',
      str(tmp_path / 'curve.png'),
    ]
  )
  result = json.loads(out.read_text())['tiny']
  assert result['n'] == 8 and set(result['robustness']) == {'0', '0.5'}
  assert result['robustness']['0'] == pytest.approx(result['psnr'])
  assert result['robustness']['0.5'] < result['psnr']
  assert (tmp_path / 'curve.png').stat().st_size > 0


@pytest.mark.slow
def test_ar_model_trains_and_samples_on_the_tokenizer(trained, tmp_path):
  trained, _ = trained
  config = configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={tmp_path / "cache"}',
      'image.tokenizer=vae',
      'image.vae.ch=8',
      'image.vae.ch_mult=(1, 2)',
      'image.vae.z_channels=4',
      'image.vae.norm_groups=4',
      'model.latent_channels=4',
      'model.latent_patch_size=2',
      'image.use_norm=True',
      f'image.vae.checkpoint={trained}',
      'train.steps=2',
      'train.checkpoint_every=2',
    ],
  )
  assert configlib.image_grid(config) == (4, 4)
  result = loop.train(config, str(tmp_path / 'ar'))
  assert result.step == 2 and np.isfinite(result.metrics['im_loss'])
  grid = tmp_path / 'ar' / 'samples' / 'step_0000002.png'  # Sampled and decoded by the tokenizer.
  assert np.asarray(Image.open(grid)).shape == (2 + 2 * 18, 2 + 2 * 18, 3)
  saved = configlib.config_from_json((tmp_path / 'ar' / runs.CONFIG_FILE).read_text())
  assert isinstance(tokenizers.get_tokenizer(saved), vae_tokenizer.VaeTokenizer)
