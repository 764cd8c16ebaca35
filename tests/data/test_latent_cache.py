"""Tests of the latent cache: training from it equals encoding on the fly; variants."""

import numpy as np
import pytest

import data_testing
from nextstep_jax import configlib
from nextstep_jax.data import bad_records
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import latent_cache
from nextstep_jax.data import records
from nextstep_jax.image import tokenizers


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return data_testing.tokenizer(tmp_path_factory.mktemp('tok'))


def _raw_shards(tmp_path) -> str:
  """12 records of assorted sizes, one undecodable, one grayscale, one with an empty caption."""
  recs = [
    data_testing.image_record(
      data_testing.image_bytes(data_testing.random_rgb(i, 16 + i, 20)), data_testing.CAPTIONS[i % 4]
    )
    for i in range(12)
  ]
  recs[2] = data_testing.image_record(b'garbage', 'a red circle')
  recs[5] = data_testing.image_record(
    data_testing.image_bytes(data_testing.random_rgb(5)[..., 1]), 'a blue square'
  )
  recs[7] = data_testing.image_record(data_testing.image_bytes(data_testing.random_rgb(7)), '')
  data_testing.write_shards(str(tmp_path / 'raw'), recs, 2)
  return str(tmp_path / 'raw-*.array_record')


def test_training_from_the_cache_equals_encoding_on_the_fly(tmp_path, tok):
  config = data_testing.tiny_config(
    tmp_path, source='arrayrecord', paths=_raw_shards(tmp_path), drop_text_prob=0.5
  )
  summary = latent_cache.build_latent_cache(
    config, str(tmp_path / 'latents'), num_shards=3, batch_size=5
  )
  assert summary['skipped'] == {
    bad_records.UNDECODABLE_IMAGE: 1
  }  # Captions are judged at read time.
  raw = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  config.data.use_latent_cache = True
  config.data.latent_cache_paths = str(tmp_path / 'latents-*')
  cached = grain_pipeline.GrainTrainingData(config, tok, 0, 1)
  for _ in range(6):  # Two epochs of 10 good records.
    expected, got = raw.next_batch(), cached.next_batch()
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  assert cached.bad_record_counts == raw.bad_record_counts
  assert {
    bad_records.UNDECODABLE_IMAGE,
    bad_records.EMPTY_CAPTION,
    bad_records.GRAYSCALE_CONVERTED,
  } <= set(raw.bad_record_counts)


def test_cache_variants_are_the_plain_and_augmented_encodings(tmp_path, tok):
  config = data_testing.tiny_config(
    tmp_path,
    source='arrayrecord',
    paths=_raw_shards(tmp_path),
    augment='hflip,random_crop',
    cache_variants=3,
    shuffle_seed=7,
  )
  latent_cache.build_latent_cache(config, str(tmp_path / 'var'), num_shards=1)
  stored = records.decode_record(
    records.read_all(records.resolve_paths(str(tmp_path / 'var-*')))[4]
  )
  assert stored.metadata['shape'] == [3, 16, 16, 3] and stored.metadata['source_index'] == 4
  latents = np.frombuffer(stored.payload, np.float32).reshape(3, 16, 16, 3)
  image = data_testing.random_rgb(4, 20, 20)
  expected = [image_preprocess.to_training_image(image, 16, 16)] + [
    image_preprocess.augment(
      image, 16, 16, ('hflip', 'random_crop'), 1.125, np.random.default_rng([7, 4, k])
    )
    for k in (1, 2)
  ]
  np.testing.assert_array_equal(latents, tokenizers.uint8_to_unit(np.stack(expected)))
  config.data.use_latent_cache = True
  config.data.latent_cache_paths = str(tmp_path / 'var-*')
  batch = grain_pipeline.GrainTrainingData(config, tok, 0, 1).next_raw_batch()
  assert batch['latents'].shape == (4, 16, 16, 3)


@pytest.mark.slow
def test_vae_config_trains_from_the_cache_by_one_config_change(tmp_path, tok):
  """configs/shapes_vae.py:cached (here with the tiny random VAE) differs from the plain config
  only in reading the cache; the cache of the built-in data gives the on-the-fly VAE batches."""
  shapes_vae = configlib.config_module('configs/shapes_vae.py')
  tokenizer_shapes = configlib.config_module('configs/tokenizer_shapes.py')
  from nextstep_jax.data import training_data

  def small(arg):
    c = shapes_vae.get_config(arg)
    tokenizer_shapes.set_vae(c, 'tiny')
    c.image.vae.checkpoint = ''  # Random weights: the equality below does not need trained ones.
    c.data.num_train, c.data.cache_dir, c.train.batch_size, c.data.read_threads = (
      12,
      str(tmp_path),
      4,
      1,
    )
    return c

  plain, cached = small(''), small('cached')
  changed = {k for k, v in cached.data.items() if plain.data[k] != v}
  assert changed == {'use_latent_cache', 'latent_cache_paths'}
  with cached.unlocked():
    cached.data.latent_cache_paths = str(tmp_path / 'latents-*.array_record')
  latent_cache.build_latent_cache(plain, str(tmp_path / 'latents'), num_shards=2)
  on_the_fly = plain.copy_and_resolve_references()
  on_the_fly.data.grain_builtin = True  # The same Grain order, encoding every batch.
  from_cache = training_data.make_training_data(cached, tok, 0, 1)
  assert from_cache.kind == 'grain'
  encoding = grain_pipeline.GrainTrainingData(on_the_fly, tok, 0, 1)
  for _ in range(4):
    expected, got = encoding.next_batch(), from_cache.next_batch()
    assert got['image_tokens'].shape == (4, 16, 16)  # 4x4 grid of 4-channel 2x2 patches.
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], atol=1e-5, rtol=0, err_msg=key)
