"""Gradient accumulation (train.microbatches): the same loss pieces, grad norm and updated params as
the full-batch step, on one device and on a (2, 2, 2) mesh, with less temporary memory; bad values
are refused with the fix named."""

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

# Microbatching only reorders float32 sums (4 partial sums of the loss and of every gradient
# entry instead of one); seen on CPU: 2.4e-7 relative on the metrics.
RTOL = 1e-5
# Params after 2 AdamW steps: m / sqrt(v) amplifies the reordering noise of near-zero gradients
# (seen: 1.2e-7 abs); 4e-6 is still 250x below one update (~lr = 1e-3 per entry).
PARAM_ATOL = 4e-6

NUM_STEPS = 2
MICROBATCHES = 4
# 16 rows: 4 per data x fsdp device on the (2, 2, 2) mesh, one per device and microbatch.
OVERRIDES = ['train.batch_size=16', 'train.warmup_steps=0']


def config_for(cache_dir, microbatches, sizes=(1, 1, 1), *extra):
  data, fsdp, tensor = sizes
  return configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={cache_dir}',
      *OVERRIDES,
      f'train.microbatches={microbatches}',
      f'mesh.data={data}',
      f'mesh.fsdp={fsdp}',
      f'mesh.tensor={tensor}',
      *extra,
    ],
  )


def run_steps(config, tok, batches, devices):
  """NUM_STEPS steps of the compiled train step: (per-step host metrics, host params, compiled)."""
  configlib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  tx = state_lib.make_optimizer(config.train)
  graphdef, state, shardings = state_lib.create_sharded_state(config, tx, mesh)
  shard = lambda batch: rules_lib.shard_batch(batch, mesh, config.mesh.rules)
  compiled = (
    step_lib.build_train_step(
      config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, batches[0]
    )
    .lower(state, shard(batches[0]))
    .compile()
  )
  metrics = []
  for batch in batches:
    state, m = compiled(state, shard(batch))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return metrics, jax.tree.map(np.asarray, nnx.to_pure_dict(state['params'])), compiled


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp('microbatches') / 'cache'
  config = config_for(cache_dir, 1)
  tok = builtin_source.load_text_tokenizer(config)
  source = builtin_source.BuiltinSource(config, tok)
  batches = [source.batch(s) for s in range(NUM_STEPS)]
  return cache_dir, tok, batches, run_steps(config, tok, batches, jax.devices()[:1])


def assert_same_run(got, want):
  (got_metrics, got_params, _), (want_metrics, want_params, _) = got, want
  for step, (g, w) in enumerate(zip(got_metrics, want_metrics)):
    assert g.keys() == w.keys() == {'loss', 'lm_loss', 'im_loss', 'grad_norm', 'lr'}
    for key in w:
      np.testing.assert_allclose(
        g[key], w[key], rtol=RTOL, atol=0, err_msg=f'step {step} metric {key}'
      )
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_params)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got_params)[0])
  assert flat_got.keys() == flat_want.keys()
  for path, w in flat_want.items():
    np.testing.assert_allclose(
      flat_got[path], w, rtol=RTOL, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.slow
def test_microbatches_match_the_full_batch_on_one_device(setup):
  cache_dir, tok, batches, full = setup
  micro = run_steps(config_for(cache_dir, MICROBATCHES), tok, batches, jax.devices()[:1])
  assert_same_run(micro, full)
  # Only 1/4 of the activations are live at a time.
  full_temp = full[2].memory_analysis().temp_size_in_bytes
  micro_temp = micro[2].memory_analysis().temp_size_in_bytes
  assert micro_temp < 0.75 * full_temp, (micro_temp, full_temp)


@pytest.mark.slow
def test_microbatches_match_the_full_batch_on_a_2x2x2_mesh(setup):
  cache_dir, tok, batches, full = setup
  micro = run_steps(config_for(cache_dir, MICROBATCHES, (2, 2, 2)), tok, batches, jax.devices())
  assert_same_run(micro, full)


def test_split_is_strided():
  x = np.arange(16 * 3).reshape(16, 3)
  parts = np.asarray(step_lib.split_microbatches(x, 4))
  assert parts.shape == (4, 4, 3)
  for j in range(4):
    np.testing.assert_array_equal(parts[j], x[j::4])
  draws = np.arange(2 * 8 * 5).reshape(2, 8, 5)  # (copy, row, token)
  np.testing.assert_array_equal(
    np.asarray(step_lib.split_microbatches(draws, 2, axis=1))[1], draws[:, 1::2]
  )


def test_microbatch_split_moves_no_data_between_devices(tmp_path):
  """On the (2, 2, 2) mesh the batch and head-draw splits compile to local copies only."""
  config = config_for(tmp_path, MICROBATCHES, (2, 2, 2))
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices())
  rules = config.mesh.rules
  rows = jax.ShapeDtypeStruct(
    (16, 7, 5), np.float32, sharding=rules_lib.activation_spec(mesh, rules, 'batch', None, None)
  )
  draws = jax.ShapeDtypeStruct((4 * 16 * 7, 5), np.float32)
  split = mesh_lib.in_mesh(
    lambda x, d: (
      step_lib.split_batch_rows(x, MICROBATCHES, rules),
      step_lib.split_head_draws(d, MICROBATCHES, 16, 7, rules),
    ),
    mesh,
  )
  compiled = jax.jit(split).lower(rows, draws).compile()
  split_rows, split_draws = compiled.output_shardings
  assert split_rows.spec == P(None, ('data', 'fsdp'))
  assert split_draws.spec == P(None, None, ('data', 'fsdp'))
  hlo = compiled.as_text()
  for collective in ('all-to-all', 'all-gather', 'collective-permute', 'all-reduce'):
    assert collective not in hlo, collective


def test_microbatches_that_do_not_split_each_devices_rows_are_refused(tmp_path):
  """configlib.validate checks K | batch_size (tests/test_configlib.py); the mesh adds K | rows per device."""
  # 16 rows over data x fsdp = 8 devices: 2 per device, so 4 microbatches cannot split them.
  config = config_for(tmp_path, 4, (4, 2, 1))
  configlib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices())
  with pytest.raises(
    configlib.ConfigError,
    match=r'batch_size=16 does not split into 8 batch-sharding devices \(mesh axes data x fsdp\) '
    r'x 4 microbatches. Set train.batch_size to a multiple of 32 or '
    r'train.microbatches to one of \[1, 2\]',
  ):
    step_lib.check_microbatches(config, mesh)
