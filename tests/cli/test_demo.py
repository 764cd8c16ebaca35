"""`make demo DEMO_ARGS='--tokenizer vae'` end to end with tiny step counts: trains the VAE tokenizer,
then the AR model on its latents, samples, scores; a finished tokenizer is reused."""

import json

import pytest

from nextstep_jax import configlib
from nextstep_jax.cli import demo
from nextstep_jax.training import tokenizer_train


@pytest.mark.slow
def test_vae_demo_trains_tokenizer_then_ar_model(tmp_path, monkeypatch):
  workdir = tmp_path / 'demo_vae'
  args = [
    '--tokenizer',
    'vae',
    '--config',
    'configs/demo_vae.py:tiny',
    '--workdir',
    str(workdir),
    '--num-prompts',
    '2',
  ]
  assert demo.main(args) == 0
  summary = json.loads((workdir / 'demo' / 'scores.json').read_text())
  tokenizer = summary['tokenizer']
  assert tokenizer['steps'] == 4 and tokenizer['heldout_psnr'] > 5  # Trained, decodes images.
  assert (workdir / 'tokenizer' / 'release' / 'vae.safetensors').exists()
  stored = json.loads((workdir / 'config.json').read_text())
  assert stored['image']['vae']['checkpoint'] == str((workdir / 'tokenizer').resolve())
  assert summary['train_steps'] == 4 and set(summary['scores']) == {
    'seen_one',
    'seen_two',
    'heldout',
  }
  assert (workdir / 'demo' / 'heldout_grid.png').exists()

  def no_training(*unused):
    raise AssertionError('a finished tokenizer must be reused, not retrained')

  monkeypatch.setattr(tokenizer_train, 'train', no_training)
  config = configlib.load_config('configs/demo_vae.py:tiny', [])
  assert demo.train_tokenizer(config, str(workdir))['heldout_psnr'] == tokenizer['heldout_psnr']
  assert config.image.vae.checkpoint == stored['image']['vae']['checkpoint']
