"""Tests of aspect-ratio buckets: assignment, the step schedule, process shards, resume, training."""

import json

import jax
import numpy as np
import pytest

import data_testing
import multiprocess_testing
from nextstep_jax import configlib
from nextstep_jax.data import aspect_buckets
from nextstep_jax.data import bad_records
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import latent_cache
from nextstep_jax.data import sequences
from nextstep_jax.image import aspect
from nextstep_jax.training import loop

BUCKETS = ('2*2', '1*4', '4*1')  # Tiny config: 8-px tokens -> 16x16, 8x32 and 32x8 pixels.
SIZES = [(16, 16), (8, 32), (32, 8), (12, 20), (40, 12)]  # -> buckets 0, 1, 2, 0, 2.
EXPECTED_BUCKET = [0, 1, 2, 0, 2]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return data_testing.tokenizer(tmp_path_factory.mktemp('tok'))


def _shards(
  tmp_path, num: int, truncated: tuple[int, ...] = (), garbage: tuple[int, ...] = ()
) -> str:
  """`num` PNG records of the SIZES in turn; `truncated` ones keep a readable header (they get a
  bucket, then fail to decode), `garbage` ones have none (left out of the buckets)."""
  recs = []
  for i in range(num):
    png = data_testing.image_bytes(data_testing.random_rgb(i, *SIZES[i % len(SIZES)]))
    png = png[: len(png) // 2] if i in truncated else b'not an image' if i in garbage else png
    recs.append(data_testing.image_record(png, data_testing.CAPTIONS[i % 4]))
  data_testing.write_shards(str(tmp_path / 'mixed'), recs, 2)
  return str(tmp_path / 'mixed-*.array_record')


def _config(tmp_path, paths: str, **fields):
  return data_testing.tiny_config(
    tmp_path, **{'source': 'arrayrecord', 'paths': paths, 'aspect_buckets': BUCKETS, **fields}
  )


def test_area_strings_parse_and_records_go_to_the_nearest_aspect():
  assert aspect.parse_area('12*21') == (12, 21) and aspect.parse_area(' 3 * 5 ') == (3, 5)
  for bad in ('12x21', '0*4', '4*', 'a*b'):
    with pytest.raises(ValueError, match='is not "h\\*w"'):
      aspect.parse_area(bad)
  grids = [aspect.parse_area(t) for t in BUCKETS]
  assert [aspect_buckets.nearest_bucket(h, w, grids) for h, w in SIZES] == EXPECTED_BUCKET
  official = [(h // 16, w // 16) for h, w in aspect.buckets(256)]  # Sampling's buckets agree.
  for ratio in (16 / 9, 0.3, 1.0, 2.7):
    height, width = 1000, round(1000 * ratio)
    h, w = official[aspect_buckets.nearest_bucket(height, width, official)]
    assert (h * 16, w * 16) == aspect.size_for_ratio(ratio, 256)


def test_schedule_uses_every_record_once_per_pass_of_its_bucket():
  assignment = np.array([0] * 13 + [1] * 10 + [2] * 7 + [-1] * 2)
  np.random.default_rng(0).shuffle(assignment)
  schedule = aspect_buckets.BucketSchedule(assignment, 3, global_batch=6, seed=5)
  epochs = 6
  steps = schedule.steps_before_epoch(epochs)
  streams = {b: [] for b in range(3)}
  for step in range(steps):
    bucket, rows = schedule.rows(step, 0, 1)
    streams[bucket].extend(rows.tolist())
  for b in range(3):  # With epochs = global batch, bucket b fills exactly n_b * epochs rows.
    members = np.flatnonzero(assignment == b).tolist()
    n = len(members)
    assert len(streams[b]) == n * epochs, 'bucket batches in proportion to bucket size'
    for start in range(0, len(streams[b]), n):
      assert sorted(streams[b][start : start + n]) == members, (
        f'bucket {b} pass at {start} is not complete'
      )
  assert streams[0][:13] != streams[0][13:26], 'each pass of a bucket is reshuffled'
  assert {schedule.bucket_and_batch(s)[0] for s in range(steps)} == {0, 1, 2}


def test_processes_share_each_step_bucket_and_split_its_batch(tmp_path, tok):
  config = _config(tmp_path, _shards(tmp_path, 20))
  config.train.batch_size = 12  # 3 processes x 4 rows.
  batches = []
  for process in range(3):
    data = grain_pipeline.GrainTrainingData(config, tok, process, 3)
    batches.append([data.next_raw_batch() for _ in range(5)])
  source = grain_pipeline.open_raw_source(config)
  schedule = grain_pipeline.bucket_schedule(config, source, 3)
  for step in range(5):
    buckets = {int(batches[p][step][grain_pipeline.BUCKET_KEY]) for p in range(3)}
    assert len(buckets) == 1, f'step {step}: processes disagree on the bucket {buckets}'
    union = np.concatenate([batches[p][step][grain_pipeline.INDEX_KEY] for p in range(3)])
    _, global_rows = schedule.rows(step, 0, 1)
    np.testing.assert_array_equal(union, global_rows)  # Disjoint slices that make up the batch.
    bucket = buckets.pop()
    assert all(EXPECTED_BUCKET[i % len(SIZES)] == bucket for i in union)
    h, w = aspect.parse_area(BUCKETS[bucket])
    for p in range(3):
      assert batches[p][step]['image'].shape == (4, 8 * h, 8 * w, 3)
      placeholders = sequences.placeholder_mask(batches[p][step]['input_ids'], tok).sum(axis=1)
      assert (placeholders == h * w).all()


TRUNCATED, GARBAGE = 7, 3


def test_bad_records_become_ignored_rows(tmp_path, tok, capsys):
  config = _config(tmp_path, _shards(tmp_path, 15, (TRUNCATED,), (GARBAGE,)))
  data = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  assert 'left out skipped 1 (undecodable_image 1)' in capsys.readouterr().out
  seen_truncated = 0
  for _ in range(8):
    raw = data.next_raw_batch()
    indices = raw[grain_pipeline.INDEX_KEY]
    assert GARBAGE not in indices
    bad_rows = indices == TRUNCATED
    np.testing.assert_array_equal(raw[grain_pipeline.VALID_KEY], ~bad_rows)
    assert (raw['labels'][bad_rows] == sequences.IGNORE_ID).all()
    seen_truncated += int(bad_rows.sum())
  assert seen_truncated and data.bad_record_counts[bad_records.TRUNCATED_IMAGE] == seen_truncated


@pytest.mark.slow
@pytest.mark.parametrize('worker_count', [0, 1])
def test_resume_from_state_yields_exactly_the_uninterrupted_batches(tmp_path, tok, worker_count):
  config = _config(
    tmp_path,
    _shards(tmp_path, 15, (TRUNCATED,), (GARBAGE,)),
    augment='hflip,random_crop',
    drop_text_prob=0.5,
    worker_count=worker_count,
  )
  uninterrupted = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  for _ in range(3):
    uninterrupted.next_batch()
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = [uninterrupted.next_batch() for _ in range(5)]
  assert any(not batch['image_valid'].all() for batch in expected)
  resumed = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  resumed.set_state(state)
  for want in expected:
    got = resumed.next_batch()
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for data in (uninterrupted, resumed):
    data.close()


def test_the_latent_cache_stores_each_record_at_its_bucket_and_trains_the_same(tmp_path, tok):
  config = _config(tmp_path, _shards(tmp_path, 15, garbage=(3,)), drop_text_prob=0.5)
  latent_cache.build_latent_cache(config, str(tmp_path / 'latents'), num_shards=2, batch_size=4)
  raw = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  cached_config = config.copy_and_resolve_references()
  cached_config.data.use_latent_cache = True
  cached_config.data.latent_cache_paths = str(tmp_path / 'latents-*')
  cached = grain_pipeline.GrainTrainingData(cached_config, tok, 0, 1)
  for _ in range(6):
    expected, got = raw.next_batch(), cached.next_batch()
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  other = cached_config.copy_and_resolve_references()
  other.data.aspect_buckets = ('2*2', '1*4')  # 4:1 records were cached at a grid not listed here.
  with pytest.raises(ValueError, match='rebuild the cache'):
    grain_pipeline.GrainTrainingData(other, tok, 0, 1)


def test_bucket_configs_are_checked(tmp_path):
  config = _config(tmp_path, 'x-*.array_record')
  configlib.validate(config)
  for fields, message in (
    ({'aspect_buckets': ('2*2', '2x4')}, 'is not "h\\*w"'),
    ({'aspect_buckets': ('2*2', '2*2')}, 'lists a grid twice'),
    ({'source': 'builtin'}, 'needs the Grain pipeline'),
    ({'aspect_buckets': ('2*2', '2*20')}, 'max_seq_len'),
  ):
    bad = _config(tmp_path, 'x-*.array_record', **fields)
    with pytest.raises(configlib.ConfigError, match=message):
      configlib.validate(bad)
  bad = _config(tmp_path, 'x-*.array_record', aspect_buckets=('2*2', '1*8'))
  bad.model.use_gen_pos_embed, bad.model.base_image_grid_size = True, 2
  with pytest.raises(configlib.ConfigError, match='base_image_grid_size'):
    configlib.validate(bad)


@pytest.mark.slow
def test_non_square_training_runs(tmp_path):
  """configs/tiny.py (4-px tokens) on square and 4:1 (portrait) buckets: the loop compiles one step shape per
  bucket and trains (exact resume of the bucketed stream is tested above on the pipeline)."""
  paths = _shards(tmp_path, 24)
  overrides = [
    f'data.cache_dir={tmp_path / "cache"}',
    'data.source=arrayrecord',
    f'data.paths={paths}',
    "data.aspect_buckets=('4*4', '8*2')",
    'train.steps=3',
    'train.batch_size=8',
    'train.checkpoint_every=3',
    'data.read_threads=1',
  ]
  config = configlib.load_config('configs/tiny.py', overrides)
  schedule = grain_pipeline.bucket_schedule(config, grain_pipeline.open_raw_source(config), 1)
  assert {schedule.bucket_and_batch(s)[0] for s in range(3)} == {0, 1}, (
    'the run must see both buckets'
  )
  result = loop.train(config, str(tmp_path / 'run'))
  assert result.step == 3 and all(
    np.isfinite(result.metrics[k]) for k in ('loss', 'lm_loss', 'im_loss')
  )
  params, extra = multiprocess_testing.restore_on_one_device(tmp_path / 'run')
  assert extra['step'] == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
