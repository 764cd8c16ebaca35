"""Tests of the Grain pipeline: process sharding, exact resume, bad records, sources."""

import collections
import json

import numpy as np
import pytest

import data_testing
from nextstep_jax.data import bad_records
from nextstep_jax.data import captions
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import sequences


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return data_testing.tokenizer(tmp_path_factory.mktemp('tok'))


def _good_shards(tmp_path, num: int, num_shards: int = 2) -> str:
  recs = [
    data_testing.image_record(
      data_testing.image_bytes(data_testing.random_rgb(i)), data_testing.CAPTIONS[i % 4]
    )
    for i in range(num)
  ]
  data_testing.write_shards(str(tmp_path / 'good'), recs, num_shards)
  return str(tmp_path / 'good-*.array_record')


def test_processes_get_disjoint_complete_coverage_of_every_epoch(tmp_path, tok):
  config = data_testing.tiny_config(tmp_path, grain_builtin=True)
  config.train.batch_size = 12  # 3 processes x 4 rows; 24 records = 2 global batches per epoch.
  seen = []
  for process in range(3):
    data = grain_pipeline.GrainTrainingData(config, tok, process, 3)
    seen.append([data.next_raw_batch()[grain_pipeline.INDEX_KEY] for _ in range(4)])
  for epoch in range(2):
    per_process = [np.concatenate(s[2 * epoch : 2 * epoch + 2]) for s in seen]
    union = np.concatenate(per_process)
    assert sorted(union.tolist()) == list(range(24)), f'epoch {epoch} is not covered exactly once'
  first, second = (
    np.concatenate([np.concatenate(s[2 * e : 2 * e + 2]) for s in seen]) for e in (0, 1)
  )
  assert not np.array_equal(first, second), 'each epoch is reshuffled'


def test_rows_are_the_records_they_claim(tmp_path, tok):
  config = data_testing.tiny_config(tmp_path, grain_builtin=True, drop_text_prob=0.0)
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  raw = data.next_raw_batch()
  source = grain_pipeline.BuiltinRecords(config)
  fitted = [
    captions.fit_caption(source[i]['caption'], tok, 14, 'truncate')[0] for i in raw['record_index']
  ]
  expected = sequences.build_training_batch(tok, fitted, 2, 2, 14, np.zeros(4, bool))
  for key in expected:
    np.testing.assert_array_equal(raw[key], expected[key])
  np.testing.assert_array_equal(
    raw['image'], np.stack([source[i]['image'] for i in raw['record_index']])
  )


@pytest.mark.slow
@pytest.mark.parametrize('worker_count', [0, 1])
def test_resume_from_state_yields_exactly_the_uninterrupted_batches(tmp_path, tok, worker_count):
  config = data_testing.tiny_config(
    tmp_path,
    source='arrayrecord',
    paths=_good_shards(tmp_path, 10),
    worker_count=worker_count,
    augment='hflip,random_crop',
    drop_text_prob=0.5,
  )
  uninterrupted = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  for _ in range(2):
    uninterrupted.next_batch()
  state = uninterrupted.get_state()
  batches = [uninterrupted.next_batch() for _ in range(3)]
  uninterrupted.close()
  resumed = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  with pytest.raises(ValueError, match='not a Grain data state'):
    resumed.set_state({'kind': 'builtin', 'step': 3})
  resumed.set_state(json.loads(json.dumps(state)))
  for expected in batches:
    got = resumed.next_batch()
    assert set(got) == {
      'input_ids',
      'labels',
      'attention_mask',
      'positions',
      'image_tokens',
      'image_valid',
    }
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  resumed.close()


def _bad_record_shard(tmp_path) -> tuple[str, dict]:
  """Each bad-record class once (plus good records); returns (glob, expected counts)."""
  rgb = data_testing.random_rgb(0)
  png = data_testing.image_bytes(rgb)
  gray16 = np.arange(data_testing.SIZE**2, dtype=np.uint16).reshape(16, 16) * 250
  rgba = np.concatenate([rgb, np.full((16, 16, 1), 128, np.uint8)], axis=-1)
  good_caption = 'a red circle'
  recs = [
    data_testing.image_record(png, good_caption),
    data_testing.image_record(b'not an image at all', good_caption),  # undecodable
    data_testing.image_record(png[: len(png) // 2], good_caption),  # truncated
    data_testing.image_record(data_testing.image_bytes(rgb[..., 0]), good_caption),  # grayscale
    data_testing.image_record(data_testing.image_bytes(rgba), good_caption),  # alpha
    data_testing.image_record(data_testing.image_bytes(gray16), good_caption),  # 16-bit gray
    data_testing.image_record(data_testing.image_bytes(rgb, fmt='JPEG'), '   '),  # empty caption
    data_testing.image_record(png, 'a red circle ' * 20),  # over-long: truncated
    data_testing.image_record(png, b'red \xff circle'),  # not UTF-8
    data_testing.image_record(png, 'a red <|image_placeholder|> circle'),  # special token
    b'\x00garbage that is no record',  # malformed
    data_testing.image_record(png, good_caption),
  ]
  data_testing.write_shards(str(tmp_path / 'bad'), recs, 2)
  expected = {
    bad_records.UNDECODABLE_IMAGE: 1,
    bad_records.TRUNCATED_IMAGE: 1,
    bad_records.GRAYSCALE_CONVERTED: 2,
    bad_records.ALPHA_DROPPED: 1,
    bad_records.HIGH_BIT_DEPTH_CONVERTED: 1,
    bad_records.EMPTY_CAPTION: 1,
    bad_records.CAPTION_TRUNCATED: 2,
    bad_records.CAPTION_NOT_UTF8: 1,
    bad_records.MALFORMED_RECORD: 1,
  }
  return str(tmp_path / 'bad-*.array_record'), expected


def test_every_bad_record_class_is_converted_or_skipped_and_counted(tmp_path, tok, caplog):
  paths, expected = _bad_record_shard(tmp_path)
  config = data_testing.tiny_config(tmp_path, source='arrayrecord', paths=paths, drop_text_prob=0.0)
  config.train.batch_size = 8  # 12 records, 4 skipped: one epoch is exactly one batch.
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  with caplog.at_level('WARNING', logger='nextstep_jax.data'):
    batch = data.next_raw_batch()
  assert data.bad_record_counts == expected
  assert 'bad records so far' in caplog.text
  assert sorted(batch['record_index'].tolist()) == [0, 3, 4, 5, 7, 8, 9, 11]
  rows = dict(zip(batch['record_index'].tolist(), batch['image']))
  np.testing.assert_array_equal(rows[3], np.repeat(data_testing.random_rgb(0)[..., :1], 3, -1))
  assert (rows[5][..., 0] == rows[5][..., 1]).all() and rows[5].dtype == np.uint8
  assert (np.abs(rows[4].astype(int) - (data_testing.random_rgb(0) * 0.502 + 127)) <= 1).all()
  captions = [tok.decode(row[: list(row).index(tok.image_area_id)]) for row in batch['input_ids']]
  assert all(len(tok.encode(c)) <= 14 for c in captions)
  assert 'red \ufffd circle' in captions and 'a red  circle' in captions
  assert data.get_state()['bad_record_counts'] == expected


def test_overlong_captions_can_be_skipped_instead(tmp_path, tok):
  paths, expected = _bad_record_shard(tmp_path)
  config = data_testing.tiny_config(
    tmp_path, source='arrayrecord', paths=paths, overlong_captions='skip'
  )
  config.train.batch_size = 7
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  data.next_raw_batch()
  expected[bad_records.CAPTION_TRUNCATED] -= 1
  expected[bad_records.CAPTION_TOO_LONG] = 1
  assert data.bad_record_counts == expected


def test_tfds_source_is_read_without_tensorflow(tmp_path, tok, tfds_testing):
  data_dir = tfds_testing.prepare_tiny_captions(tmp_path / 'tfds')
  config = data_testing.tiny_config(
    tmp_path, source='tfds', tfds_name='tiny_captions', tfds_data_dir=str(data_dir)
  )
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  indices = collections.Counter()
  for _ in range(2):
    batch = data.next_raw_batch()
    indices.update(batch['record_index'].tolist())
    assert batch['image'].shape == (4, 16, 16, 3)
  assert sorted(indices) == list(range(8))


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'source': 'arrayrecord'}, 'data.source=arrayrecord needs data.paths'),
    ({'source': 'tfds'}, 'data.source=tfds needs data.tfds_name'),
    ({'use_latent_cache': True}, 'needs data.latent_cache_paths'),
    ({'augment': 'rotate'}, "data.augment has 'rotate'"),
    ({'cache_variants': 2}, 'set data.augment'),
    ({'overlong_captions': 'drop'}, 'data.overlong_captions'),
  ],
)
def test_config_errors_name_the_field(tmp_path, fields, message):
  from nextstep_jax import configlib

  with pytest.raises(configlib.ConfigError, match=message):
    configlib.validate(data_testing.tiny_config(tmp_path, **fields))


def test_a_data_set_without_usable_records_fails_clearly(tmp_path, tok):
  data_testing.write_shards(
    str(tmp_path / 'junk'), [data_testing.image_record(b'junk', 'a red circle')] * 5
  )
  config = data_testing.tiny_config(tmp_path, source='arrayrecord', paths=str(tmp_path / 'junk-*'))
  with pytest.raises(ValueError, match='no usable records'):
    grain_pipeline.GrainTrainingData(config, tok, 0, 1).next_batch()
