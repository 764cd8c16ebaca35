"""Mixed precision: float32 master params and optimizer state, bfloat16 compute (decoder, flow
head), float32 logits / velocities / loss; a bf16-compute train step stays close to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testing import randomize
from nextstep_jax import configlib
from nextstep_jax.data import builtin_source
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

# Random params, one step on 4 rows (seen on CPU: loss 1.5e-4, grad norm 1.4e-3 relative): bf16
# keeps 8 mantissa bits (2e-3 relative rounding per op), mostly averaged out by the reductions.
LOSS_RTOL = 2e-3
GRAD_NORM_RTOL = 1e-2
# One AdamW step moves each entry by ~lr (1e-3) in the direction of sign(grad); bf16 noise can flip
# the sign of tiny gradients, so an entry may differ by 2 lr (seen: 2.0e-3).
PARAM_ATOL = 2.5e-3

OVERRIDES = ['train.batch_size=4', 'train.warmup_steps=0', 'mesh.data=1']


def run_one_step(cache_dir, dtype):
  config = configlib.load_config(
    'configs/tiny.py', [f'data.cache_dir={cache_dir}', *OVERRIDES, f'model.dtype={dtype}']
  )
  configlib.validate(config)
  tok = builtin_source.load_text_tokenizer(config)
  batch = builtin_source.BuiltinSource(config, tok).batch(0)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = state_lib.make_optimizer(config.train)
  graphdef, state, shardings = state_lib.create_sharded_state(config, tx, mesh)
  # Random params everywhere (the flow head's zero-initialised output layers would make the
  # image loss independent of the compute dtype).
  params = nnx.state(randomize(nnx.merge(graphdef, state['params']), seed=4, std=0.1), nnx.Param)
  state = {'params': params, 'opt_state': tx.init(params), 'step': state['step']}
  train_step = step_lib.build_train_step(
    config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, batch
  )
  new_state, metrics = train_step(state, rules_lib.shard_batch(batch, mesh, config.mesh.rules))
  return config, graphdef, new_state, jax.device_get(metrics), tok, batch


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp('mixed_precision') / 'cache'
  return {dtype: run_one_step(cache_dir, dtype) for dtype in ('float32', 'bfloat16')}


@pytest.mark.slow
def test_bf16_step_close_to_f32(runs):
  _, _, f32_state, f32_metrics, _, _ = runs['float32']
  _, _, bf16_state, bf16_metrics, _, _ = runs['bfloat16']
  assert bf16_metrics['loss'] != f32_metrics['loss'], 'bf16 compute not in effect'
  np.testing.assert_allclose(bf16_metrics['loss'], f32_metrics['loss'], rtol=LOSS_RTOL)
  np.testing.assert_allclose(
    bf16_metrics['grad_norm'], f32_metrics['grad_norm'], rtol=GRAD_NORM_RTOL
  )
  want = nnx.to_pure_dict(f32_state['params'])
  got = nnx.to_pure_dict(bf16_state['params'])
  for (path, w), (_, g) in zip(
    jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_flatten_with_path(got)[0]
  ):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), atol=PARAM_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.slow
def test_params_and_optimizer_state_stay_f32(runs):
  _, _, state, metrics, _, _ = runs['bfloat16']
  leaves = jax.tree.leaves(state['params']) + [
    x for x in jax.tree.leaves(state['opt_state']) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  assert all(np.asarray(v).dtype == np.float32 for v in metrics.values())


@pytest.mark.slow
def test_bf16_compute_f32_outputs(runs):
  """Matmuls of the decoder and head run in bf16; logits, velocities and the loss are f32."""
  _, graphdef, state, _, _, batch = runs['bfloat16']
  model = nnx.merge(graphdef, state['params'])
  hidden, _ = model(
    model.embed(jnp.asarray(batch['input_ids']), None, None),
    jnp.asarray(batch['positions']),
    jnp.asarray(batch['attention_mask']),
  )
  assert hidden.dtype == jnp.bfloat16
  assert model.lm_logits(hidden).dtype == jnp.float32
  rows = hidden.reshape(-1, hidden.shape[-1])[:3]
  velocity = model.image_head(jnp.zeros((3, model.cfg.token_dim)), jnp.full((3,), 0.5), rows)
  assert velocity.dtype == jnp.float32

  jaxpr = str(
    jax.make_jaxpr(
      lambda h: model.image_head(jnp.zeros((3, model.cfg.token_dim)), jnp.full((3,), 0.5), h)
    )(rows)
  )
  dots = [line for line in jaxpr.splitlines() if 'dot_general' in line]
  assert dots and all('bf16[' in line.split('=')[0] for line in dots), 'head matmuls not in bf16'
