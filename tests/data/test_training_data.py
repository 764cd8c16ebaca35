"""Training-data interface: per-process rows of the global batch, exact continuation from a state."""

import json

import numpy as np
import pytest

from nextstep_jax import configlib
from nextstep_jax.data import builtin_source
from nextstep_jax.data import training_data


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cache = tmp_path_factory.mktemp('cache')
  config = configlib.load_config('configs/tiny.py', [f'data.cache_dir={cache}'])
  tok = builtin_source.load_text_tokenizer(config)
  return config, tok, builtin_source.BuiltinSource(config, tok)


def test_processes_get_their_rows_of_the_global_batch(setup):
  config, tok, source = setup
  parts = [training_data.make_training_data(config, tok, i, 2) for i in range(2)]
  for step in range(2):
    rows = [part.next_batch() for part in parts]
    expected = source.batch(step)
    for key, value in expected.items():
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), value, err_msg=key)
      assert rows[0][key].shape[0] == config.train.batch_size // 2


def test_state_round_trips_through_json_and_continues_exactly(setup):
  config, tok, _ = setup
  data = training_data.make_training_data(config, tok, 0, 1)
  for _ in range(3):
    data.next_batch()
  state = json.loads(json.dumps(data.get_state()))
  expected = data.next_batch()
  resumed = training_data.make_training_data(config, tok, 0, 1)
  resumed.set_state(state)
  got = resumed.next_batch()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  assert resumed.get_state() == {'kind': 'builtin', 'step': 4}


def test_bad_state_and_unknown_dataset_are_refused(setup):
  config, tok, _ = setup
  data = training_data.make_training_data(config, tok, 0, 1)
  with pytest.raises(ValueError, match='not a builtin data state'):
    data.set_state({'kind': 'grain', 'iterator': {}})
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.data.dataset = 'imagenet'
  with pytest.raises(ValueError, match='has no training data'):
    training_data.make_training_data(other, tok, 0, 1)


def test_heldout_batch_is_fixed_and_not_training_data(setup):
  config, tok, source = setup
  a = training_data.heldout_batch(config, tok, 16)
  b = training_data.heldout_batch(config, tok, 16)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  train_tokens = source.image_tokens(source.images).reshape(len(source), -1)
  held = a['image_tokens'].reshape(16, -1)
  distances = np.abs(held[:, None, :] - train_tokens[None, :, :]).max(-1)
  assert distances.min() > 0, 'a held-out image equals a training image'
