"""End-to-end training loop on the tiny config: learning, exact resume, divergence stop, CLIs."""

import json

import jax
import numpy as np
import pytest
from etils import epath

import multiprocess_testing
from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.cli import sample as sample_cli
from nextstep_jax.cli import train as train_cli
from nextstep_jax.data import sequences
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop

# Resumed and uninterrupted runs execute the same XLA programs on the same inputs: bitwise equal.
RESUME_ATOL = 0.0


def tiny_config(tmp_path, *overrides):
  return configlib.load_config(
    'configs/tiny.py', [f'data.cache_dir={tmp_path / "cache"}', *overrides]
  )


restored_params = multiprocess_testing.restore_on_one_device  # (train state as numpy, extra).


@pytest.mark.slow
def test_few_steps_lower_the_loss(tmp_path):
  config = tiny_config(tmp_path, 'train.steps=40', 'train.log_every=5', 'train.lr=3e-3')
  result = loop.train(config, str(tmp_path / 'run'))
  records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert records[0]['step'] == 5 and records[-1]['step'] == 40
  first, last = records[0], records[-1]
  assert last['loss'] < 0.8 * first['loss']
  assert last['im_loss'] < first['im_loss'] and last['lm_loss'] < first['lm_loss']
  assert result.step == 40
  assert (tmp_path / 'run' / 'samples' / 'step_0000040.png').exists()
  assert list((tmp_path / 'run' / 'tb').iterdir()), 'no TensorBoard events written'


@pytest.mark.slow
@pytest.mark.parametrize(
  'pipeline_overrides', [(), ('data.grain_builtin=True',)], ids=['in_memory', 'grain']
)
def test_resume_is_exact(tmp_path, pipeline_overrides):
  """Through the in-memory source (state = step) and the Grain pipeline (state = Grain's iterator
  state, saved in the same checkpoint): a run stopped at step 6 and resumed ends bitwise equal."""
  config = tiny_config(tmp_path, 'train.steps=12', 'train.checkpoint_every=4', *pipeline_overrides)
  loop.train(config, str(tmp_path / 'straight'))
  stopped = loop.train(config, str(tmp_path / 'resumed'), stop_at=6)
  assert stopped.step == 6
  loop.train(config, str(tmp_path / 'resumed'))
  a, extra_a = restored_params(tmp_path / 'straight')
  b, extra_b = restored_params(tmp_path / 'resumed')
  assert extra_a['step'] == extra_b['step'] == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=RESUME_ATOL, rtol=0)


@pytest.mark.slow
def test_divergence_stops_with_last_good_checkpoint(tmp_path):
  config = tiny_config(
    tmp_path,
    'train.steps=30',
    'train.checkpoint_every=5',
    'train.lr=1e30',
    'train.warmup_steps=1',
    'train.grad_clip=1e30',
  )
  with pytest.raises(loop.TrainingDivergedError, match='non-finite'):
    loop.train(config, str(tmp_path / 'run'))
  ckpt = checkpoints.Checkpointer(tmp_path / 'run' / runs.CHECKPOINT_DIR, keep=100)
  steps = ckpt.all_steps()
  ckpt.close()
  for step in steps:
    params, _ = restored_params(tmp_path / 'run', step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params['params']))


@pytest.mark.slow
def test_train_and_sample_clis(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert (
    train_cli.main(
      [
        '--config',
        'configs/tiny.py',
        '--workdir',
        str(workdir),
        f'--config.data.cache_dir={tmp_path / "cache"}',
        '--config.train.steps=4',
        '--config.train.checkpoint_every=4',
      ]
    )
    == 0
  )
  assert f'workdir: {workdir}' in capsys.readouterr().out
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a red circle\n\na blue square above a green circle\na yellow triangle\n')
  out = tmp_path / 'out'
  assert (
    sample_cli.main(
      [
        '--workdir',
        str(workdir),
        '--prompts',
        str(prompts),
        '--out',
        str(out),
        '--seed',
        '7',
        '--num-steps',
        '3',
      ]
    )
    == 0
  )
  records = [json.loads(l) for l in (out / 'samples.jsonl').read_text().splitlines()]
  assert [r['prompt'] for r in records] == [
    'a red circle',
    'a blue square above a green circle',
    'a yellow triangle',
  ]
  assert [r['seed'] for r in records] == [7, 8, 9]
  assert all((out / r['file']).exists() for r in records)
  assert records[0]['settings']['num_steps'] == 3


@pytest.mark.slow
def test_sampler_is_deterministic_and_batch_independent(tmp_path):
  config = tiny_config(tmp_path, 'train.steps=2', 'train.checkpoint_every=2')
  loop.train(config, str(tmp_path / 'run'))
  sampler = pipeline.TextToImage.from_workdir(str(tmp_path / 'run'), num_steps=3)
  alone = sampler(['a red circle'], [5])
  in_batch = sampler(['a blue square', 'a red circle', 'a green circle'], [1, 5, 2])
  again = sampler(['a blue square', 'a red circle', 'a green circle'], [1, 5, 2])
  np.testing.assert_array_equal(in_batch, again)
  assert alone.shape == (1, 16, 16, 3) and alone.dtype == np.uint8
  # uint8 images from float tokens: allow a rounding flip of 1 level.
  assert np.abs(alone[0].astype(int) - in_batch[1].astype(int)).max() <= 1


@pytest.mark.slow
def test_too_long_prompt_fails_clearly(tmp_path):
  config = tiny_config(tmp_path, 'train.steps=2', 'train.checkpoint_every=2')
  loop.train(config, str(tmp_path / 'run'))
  sampler = pipeline.TextToImage.from_workdir(str(tmp_path / 'run'))
  with pytest.raises(sequences.PromptTooLongError, match='text.max_caption_tokens'):
    sampler(['a red circle to the left of a blue square ' * 5], [0])


def test_bad_configs_fail_before_training(tmp_path):
  with pytest.raises(configlib.ConfigError, match='num_kv_heads'):
    loop.train(tiny_config(tmp_path, 'model.num_kv_heads=3'), str(tmp_path / 'a'))
  with pytest.raises(configlib.ConfigError, match='solver'):
    loop.train(tiny_config(tmp_path, 'sample.solver=rk4'), str(tmp_path / 'b'))
  with pytest.raises(configlib.ConfigError):
    tiny_config(tmp_path, 'train.stepz=3')


@pytest.mark.slow
def test_workdir_with_other_model_is_refused(tmp_path):
  loop.train(
    tiny_config(tmp_path, 'train.steps=1', 'train.checkpoint_every=1'), str(tmp_path / 'run')
  )
  with pytest.raises(ValueError, match='different model config'):
    loop.train(
      tiny_config(tmp_path, 'train.steps=1', 'model.hidden_size=128'), str(tmp_path / 'run')
    )


@pytest.mark.slow
def test_run_recorded_before_a_model_field_existed_resumes(tmp_path):
  """A config.json written by an older release lacks newer model fields (here model.quant);
  resuming fills them from the package defaults instead of calling the model different."""
  run = tmp_path / 'run'
  loop.train(tiny_config(tmp_path, 'train.steps=1', 'train.checkpoint_every=1'), str(run))
  record = json.loads((run / 'config.json').read_text())
  del record['model']['quant']
  (run / 'config.json').write_text(json.dumps(record))
  result = loop.train(tiny_config(tmp_path, 'train.steps=2', 'train.checkpoint_every=1'), str(run))
  assert result.step == 2 and 'quant' in json.loads((run / 'config.json').read_text())['model']


@pytest.mark.parametrize('appendable', [True, False])  # Local files append; object stores rewrite.
def test_metrics_log_keeps_earlier_records(tmp_path, appendable):
  path = epath.Path(tmp_path / 'metrics.jsonl')
  path.write_text('{"step": 1}\n{"step": 2}\n')
  log = loop.MetricsLog(path, enabled=True, appendable=appendable)
  log.write({'step': 3})
  log.write({'step': 4, 'loss': 0.5})
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
  loop.MetricsLog(epath.Path(tmp_path / 'other.jsonl'), enabled=False).write({'step': 1})
  assert not (tmp_path / 'other.jsonl').exists()
