"""nextstep-merge-lora: a LoRA run merged into plain params samples what the adapter run samples."""

import numpy as np
import pytest

from nextstep_jax import configlib
from nextstep_jax.cli import merge_lora
from nextstep_jax.model import lora
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop

# Merging changes float32 summation order only; over 16 token steps of the sampler the tokens
# stay within this (seen on CPU: ~1e-5).
TOKEN_ATOL = 1e-3


@pytest.mark.slow
def test_merged_run_samples_the_adapter_runs_tokens(tmp_path, capsys):
  config = configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={tmp_path / "cache"}',
      'train.steps=3',
      'train.checkpoint_every=3',
      'train.batch_size=8',
      'train.warmup_steps=0',
      'train.lr=1e-2',
      'train.lora.rank=4',
      'train.lora.alpha=8.0',
    ],
  )
  loop.train(config, str(tmp_path / 'run'))
  merge_lora.main(['--workdir', str(tmp_path / 'run'), '--out', str(tmp_path / 'merged')])
  adapter = pipeline.TextToImage.from_workdir(str(tmp_path / 'run'))
  merged = pipeline.TextToImage.from_workdir(str(tmp_path / 'merged'))
  assert lora.has_adapters(adapter.params) and not lora.has_adapters(merged.params)
  assert merged.config.train.lora.rank == 0
  captions = ['a red circle', 'a blue square above a green triangle']
  want, got = adapter.tokens(captions, [0, 1]), merged.tokens(captions, [0, 1])
  np.testing.assert_allclose(got, want, atol=TOKEN_ATOL, rtol=0)
  with pytest.raises(ValueError, match='not a LoRA run'):
    merge_lora.merge_run(str(tmp_path / 'merged'), str(tmp_path / 'again'))
  # The console script: one error line each, exit 2, no traceback (not LoRA; --out taken).
  capsys.readouterr()
  merged_run, again = str(tmp_path / 'merged'), str(tmp_path / 'again')
  assert merge_lora.main(['--workdir', merged_run, '--out', again]) == 2
  assert merge_lora.main(['--workdir', str(tmp_path / 'run'), '--out', merged_run]) == 2
  err = capsys.readouterr().err
  assert err.count('error: ') == 2 and 'Traceback' not in err, err
  assert 'not a LoRA run' in err and 'choose an empty --out' in err
