"""Edit triplets: folder + JSONL -> edit-record shards (bad records skipped and counted) -> training
rows in the official edit layout, deterministic per step, and a fine-tune step on them."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import hf_testing
from nextstep_jax import configlib
from nextstep_jax.cli import data as data_cli
from nextstep_jax.data import bad_records
from nextstep_jax.data import edit_builder
from nextstep_jax.data import edit_data
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import image_preprocess
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers
from nextstep_jax.training import loop


@pytest.fixture(scope='module')
def edits(tmp_path_factory):
  """(shard glob, tokenizer path, kept triplets) of 6 good edits and 4 bad lines."""
  root = tmp_path_factory.mktemp('edits')
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  lines, kept = [], []
  for i in range(6):
    for role in ('src', 'tgt'):
      Image.fromarray(rng.integers(0, 255, (20, 16, 3), np.uint8)).save(images / f'{role}{i}.png')
    lines.append(
      json.dumps(
        {'source': f'src{i}.png', 'target': f'tgt{i}.png', 'instruction': f'make it red {i}'}
      )
    )
    kept.append((f'src{i}.png', f'tgt{i}.png', f'make it red {i}'))
  (images / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  lines += [
    json.dumps({'source': 'src0.png', 'target': 'missing.png', 'instruction': 'x'}),  # unreadable
    json.dumps({'source': 'broken.png', 'target': 'tgt0.png', 'instruction': 'x'}),  # truncated PNG
    json.dumps(
      {'source': 'src0.png', 'target': 'tgt0.png', 'instruction': '  '}
    ),  # empty instruction
    '{"source": "src0.png"',
  ]  # malformed
  (root / 'edits.jsonl').write_text('\n'.join(lines) + '\n')
  assert (
    data_cli.main(
      [
        'build',
        '--from',
        'edit-folder',
        '--images',
        str(images),
        '--edits',
        str(root / 'edits.jsonl'),
        '--out',
        str(root / 'shards' / 'edits'),
      ]
    )
    == 0
  )
  hf_testing.build_tokenizer(str(root / 'tokenizer.json'))
  return f'{root}/shards/edits-*.array_record', str(root / 'tokenizer.json'), images, kept


def test_build_keeps_good_edits_and_counts_bad_ones(edits):
  shards, _, images, kept = edits
  summary = json.loads(pathlib.Path(shards.replace('-*.array_record', '.summary.json')).read_text())
  assert summary['records'] == 6
  assert summary['skipped'] == {
    bad_records.UNREADABLE_FILE: 1,
    bad_records.TRUNCATED_IMAGE: 1,
    bad_records.EMPTY_CAPTION: 1,
    bad_records.MALFORMED_RECORD: 1,
  }
  from nextstep_jax.data import records

  first = edit_builder.split_edit_record(records.read_all(records.resolve_paths(shards))[0])
  assert first == (
    (images / kept[0][0]).read_bytes(),
    (images / kept[0][1]).read_bytes(),
    kept[0][2].encode(),
  )
  with pytest.raises(bad_records.BadRecordError, match='edit record was expected'):
    edit_builder.split_edit_record(records.encode_record(b'abc', 'x', {'kind': 'image'}))


def tiny_edit_config(edits, tmp_path, *overrides):
  shards, tokenizer, _, _ = edits
  return configlib.load_config(
    'configs/tiny.py',
    [
      'data.source=edit',
      f'data.paths={shards}',
      'text.tokenizer=hf',
      f'text.tokenizer_json={tokenizer}',
      'model.vocab_size=352',
      'model.max_seq_len=128',
      'text.max_caption_tokens=12',
      'train.batch_size=4',
      f'data.cache_dir={tmp_path}',
      *overrides,
    ],
  )


def test_rows_are_the_official_edit_rows_of_the_records(edits, tmp_path):
  config = tiny_edit_config(
    edits, tmp_path, 'data.edit_drop_text_prob=0.3', 'data.edit_drop_both_prob=0.3'
  )
  configlib.validate(config)
  _, tokenizer, images, kept = edits
  tok = hf_tokenizer.HFTokenizer.load(tokenizer)
  data = edit_data.EditTrainingData(config, tok, 0, 1)
  batch = data.next_batch()
  idx = data.indices(0, 4)
  modes = edit_sequences.edit_drop_modes(
    np.random.default_rng([config.seed, 0, 2]), 4, 0.3, 0.05, 0.3
  )
  patch, size = config.model.latent_patch_size, config.image.size
  encoder = tokenizers.get_tokenizer(config)

  def tokens(name):
    image = image_preprocess.to_training_image(
      np.asarray(Image.open(images / name).convert('RGB')), size, size
    )
    return np.asarray(
      patchify.patchify(np.asarray(encoder.encode(tokenizers.uint8_to_unit(image[None]))), patch)
    )[0]

  expected = edit_sequences.build_edit_training_batch(
    tok,
    [kept[i][2] for i in idx],
    4,
    4,
    4,
    4,
    12,
    modes,
    np.stack([tokens(kept[i][0]) for i in idx]),
    np.stack([tokens(kept[i][1]) for i in idx]),
  )
  assert batch.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(batch[key], expected[key], atol=1e-6, err_msg=key)
  # Two processes get the halves of the same global batch; the state resumes the step.
  halves = [edit_data.EditTrainingData(config, tok, p, 2).batch(0) for p in range(2)]
  np.testing.assert_array_equal(
    np.concatenate([h['input_ids'] for h in halves]), batch['input_ids']
  )
  data.set_state({'kind': 'edit', 'step': 0})
  np.testing.assert_array_equal(data.next_batch()['input_ids'], batch['input_ids'])


@pytest.mark.slow
def test_training_on_edits_runs(edits, tmp_path):
  config = tiny_edit_config(
    edits,
    tmp_path,
    'train.steps=3',
    'train.log_every=1',
    'train.checkpoint_every=3',
    'train.batch_size=8',
  )  # One row per device.
  result = loop.train(config, str(tmp_path / 'run'))
  assert result.step == 3 and np.isfinite(result.metrics['loss'])
  assert (tmp_path / 'run' / 'tokenizer.json').exists()
