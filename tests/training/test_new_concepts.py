"""Fine-tuning on new words: text.extra_words adds one piece per word without changing any other
tokenisation, train.init_word_rows seeds their rows, and LoRA starts from init_from with fresh
adapters and optimizer state for the trained params only."""

import jax
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax.data import builtin_source
from nextstep_jax.data import text_tokenizer
from nextstep_jax.data.builtin import shapes
from nextstep_jax.model import lora
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.training import init_from
from nextstep_jax.training import new_words
from nextstep_jax.training import state as state_lib


def tiny_config(cache, *overrides):
  return configlib.load_config('configs/tiny.py', [f'data.cache_dir={cache}', *overrides])


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  cache = tmp_path_factory.mktemp('words')
  base = builtin_source.load_text_tokenizer(tiny_config(cache))
  extended = builtin_source.load_text_tokenizer(
    tiny_config(cache, "text.extra_words=('orange', 'diamond')")
  )
  return base, extended


def test_extra_words_are_one_piece_each_and_nothing_else_changes(tokenizers):
  base, extended = tokenizers
  assert extended.vocab_size == base.vocab_size + 2
  orange, diamond = base.vocab_size, base.vocab_size + 1
  a_id = base.encode('a')
  assert extended.encode('a orange diamond') == a_id + [orange, diamond]
  assert len(base.encode('a orange diamond')) > 3  # Spelled out in pieces before.
  captions = shapes.make_dataset(200, seed=0, num_objects=(1, 2, 3))[1]
  for caption in captions:
    assert extended.encode(caption) == base.encode(caption)
  assert (
    extended.image_placeholder_id == base.image_placeholder_id and extended.boi_id == base.boi_id
  )
  with pytest.raises(ValueError, match='already a piece'):
    text_tokenizer.add_words(extended.path, ['orange'], extended.path + '.again')


@pytest.mark.slow
def test_init_word_rows_sets_the_mean_of_the_old_rows(tmp_path, tokenizers):
  _, tok = tokenizers
  model = nextstep.build_model(tiny_config(tmp_path), 0)
  params = nnx.state(model, nnx.Param)
  embedding = np.asarray(params['embed_tokens']['embedding'].get_value())
  head = np.asarray(params['lm_head']['kernel'].get_value())
  out = new_words.init_word_rows(params, tok, ('orange=red+blue', 'diamond=square'))
  ids = {w: tok.encode(' ' + w)[0] for w in ('orange', 'diamond', 'red', 'blue', 'square')}
  new_embedding = np.asarray(out['embed_tokens']['embedding'].get_value())
  new_head = np.asarray(out['lm_head']['kernel'].get_value())
  np.testing.assert_allclose(
    new_embedding[ids['orange']], (embedding[ids['red']] + embedding[ids['blue']]) / 2, rtol=1e-6
  )
  np.testing.assert_array_equal(new_embedding[ids['diamond']], embedding[ids['square']])
  np.testing.assert_allclose(
    new_head[:, ids['orange']], (head[:, ids['red']] + head[:, ids['blue']]) / 2, rtol=1e-6
  )
  untouched = np.ones(len(embedding), bool)
  untouched[[ids['orange'], ids['diamond']]] = False
  np.testing.assert_array_equal(new_embedding[untouched], embedding[untouched])
  with pytest.raises(ValueError, match='must read "new=old1'):
    new_words.parse_rules(['orange'])
  with pytest.raises(ValueError, match='text.extra_words'):
    new_words.init_word_rows(params, tok, ['orangeade=red'])


@pytest.mark.slow
def test_lora_starts_from_init_from_with_fresh_adapters(tmp_path):
  source = tiny_config(tmp_path, 'train.steps=1', 'train.checkpoint_every=1', 'train.batch_size=8')
  from nextstep_jax.training import loop

  loop.train(source, str(tmp_path / 'base'))
  config = tiny_config(tmp_path, f'train.init_from={tmp_path / "base"}', 'train.lora.rank=4')
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  tx = state_lib.make_optimizer(config.train)
  _, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  state = init_from.initial_state(config, tx, abstract_state, shardings)
  restored, _ = init_from.restore_params(
    str(tmp_path / 'base'),
    jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.state(nextstep.abstract_model(tiny_config(tmp_path)), nnx.Param),
      state_lib.state_shardings(tiny_config(tmp_path), tx, mesh)[2]['params'],
    ),
  )
  flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state['params'])}
  restored = {path[:-1] if path[-1] == 'value' else path: value for path, value in restored.items()}
  for path, value in restored.items():
    np.testing.assert_array_equal(flat[path], np.asarray(value), err_msg=str(path))
  adapters = [path for path in flat if str(path[-1]).endswith(lora.ADAPTER_SUFFIXES)]
  assert adapters and set(flat) == set(restored) | set(adapters)
  assert all(not flat[p].any() for p in adapters if p[-1].endswith('_lora_b'))
  moments = [leaf for leaf in jax.tree.leaves(state['opt_state']) if getattr(leaf, 'ndim', 0) > 0]
  assert len(moments) == 2 * len(adapters)
