"""The jitted train step gives the single-device losses and params under every mesh layout."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nextstep_jax import configlib
from nextstep_jax.data import builtin_source
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

# Sharding only reorders f32 reductions (psum / reduce-scatter vs. one local sum); seen: 4e-7 rel.
RTOL = 1e-5
# Params: AdamW's m/sqrt(v) amplifies the reordering noise of near-zero gradients (seen: 4e-7 abs
# after 2 steps); 4e-6 is still 250x below one update (~lr = 1e-3 per entry).
PARAM_ATOL = 4e-6

NUM_STEPS = 2
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Sizes divisible by 8 (fsdp=8 on `embed`) and by 4 (tensor=4 on heads/kv_heads/mlp/vocab/head_mlp).
OVERRIDES = [
  'model.hidden_size=64',
  'model.num_heads=4',
  'model.num_kv_heads=4',
  'model.intermediate_size=128',
  'model.fm_head_dim=64',
  'model.vocab_size=512',
  'train.batch_size=8',
  'train.steps=20',
  # No warm-up: lr > 0 from step 0, so step 2's gradient is taken at updated params.
  'train.warmup_steps=0',
]


def config_for(cache_dir, sizes):
  data, fsdp, tensor = sizes
  return configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={cache_dir}',
      *OVERRIDES,
      f'mesh.data={data}',
      f'mesh.fsdp={fsdp}',
      f'mesh.tensor={tensor}',
    ],
  )


def run_steps(config, tok, batches, devices):
  """NUM_STEPS jitted steps on a mesh over `devices`: (per-step host metrics, host params, state)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  tx = state_lib.make_optimizer(config.train)
  graphdef, state, shardings = state_lib.create_sharded_state(config, tx, mesh)
  train_step = step_lib.build_train_step(
    config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, batches[0]
  )
  metrics = []
  for batch in batches:
    state, m = train_step(state, rules_lib.shard_batch(batch, mesh, config.mesh.rules))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))
  return metrics, params, state


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp('sharded_step') / 'cache'
  config = config_for(cache_dir, (1, 1, 1))
  configlib.validate(config)
  tok = builtin_source.load_text_tokenizer(config)
  source = builtin_source.BuiltinSource(config, tok)
  batches = [source.batch(s) for s in range(NUM_STEPS)]
  metrics, params, _ = run_steps(config, tok, batches, jax.devices()[:1])
  return cache_dir, tok, batches, metrics, params


@pytest.mark.slow
@pytest.mark.parametrize('sizes', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_step_matches_single_device(setup, sizes):
  cache_dir, tok, batches, ref_metrics, ref_params = setup
  config = config_for(cache_dir, sizes)
  configlib.validate(config)
  metrics, params, state = run_steps(config, tok, batches, jax.devices())

  for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(
        got[key], want[key], rtol=RTOL, atol=0, err_msg=f'step {step} metric {key}'
      )
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  assert flat_got.keys() == flat_ref.keys()
  for path, want in flat_ref.items():
    np.testing.assert_allclose(
      flat_got[path], want, rtol=RTOL, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path)
    )

  if sizes == (1, 8, 1):  # The params really are laid out as the rules say.
    embedding = state['params']['embed_tokens']['embedding'].get_value()
    assert embedding.sharding.spec == P('tensor', 'fsdp')  # ('vocab', 'embed')
    assert embedding.addressable_shards[0].data.shape == (512, 64 // 8)
    assert len({s.device for s in embedding.addressable_shards}) == 8
