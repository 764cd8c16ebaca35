"""A checkpoint written under one mesh restores onto another, bit for bit, and training resumes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.training import loop
from nextstep_jax.training import state as state_lib

# Sizes divisible by 8 on `fsdp` and by 2 on `tensor`.
SIZES = [
  'model.hidden_size=64',
  'model.num_heads=4',
  'model.num_kv_heads=4',
  'model.intermediate_size=128',
  'model.fm_head_dim=64',
  'train.steps=4',
  'train.checkpoint_every=2',
]


def config_for(tmp_path, data, fsdp, tensor):
  return configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={tmp_path / "cache"}',
      *SIZES,
      f'mesh.data={data}',
      f'mesh.fsdp={fsdp}',
      f'mesh.tensor={tensor}',
    ],
  )


@pytest.mark.slow
def test_fsdp8_checkpoint_restores_on_2x2x2_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  fsdp8 = config_for(tmp_path, 1, 8, 1)
  loop.train(fsdp8, str(workdir), stop_at=2)

  cube = config_for(tmp_path, 2, 2, 2)
  tx = state_lib.make_optimizer(cube.train)
  ckpt = checkpoints.Checkpointer(workdir / runs.CHECKPOINT_DIR, keep=10)
  try:
    _, abstract8, shardings8 = state_lib.state_shardings(fsdp8, tx, mesh_lib.make_mesh(fsdp8.mesh))
    _, abstract222, shardings222 = state_lib.state_shardings(
      cube, tx, mesh_lib.make_mesh(cube.mesh)
    )
    target = lambda abstract, shardings: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    on8, _ = ckpt.restore(2, target(abstract8, shardings8))
    on222, _ = ckpt.restore(2, target(abstract222, shardings222))
  finally:
    ckpt.close()
  embed8 = on8['params']['embed_tokens']['embedding']
  embed222 = on222['params']['embed_tokens']['embedding']
  shard_shape = lambda x: x.addressable_shards[0].data.shape
  assert shard_shape(embed8) == (512, 8) and shard_shape(embed222) == (
    256,
    32,
  )  # Really re-laid out.
  for a, b in zip(jax.tree.leaves(on8), jax.tree.leaves(on222)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # runs.restore_run gives the same arrays: the full state, and the params alone (optimizer
  # moments left on disk) cast while they load.
  cube_mesh = mesh_lib.make_mesh(cube.mesh)
  full = runs.restore_run(
    str(workdir), 2, params_only=False, mesh=cube_mesh, config=cube, abstract_state=abstract222
  )
  assert full.step == 2 and full.extra['step'] == 2
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(on222)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params = runs.restore_run(
    str(workdir), params_only=True, mesh=cube_mesh, config=cube, dtype=jnp.bfloat16
  )
  assert params.step == 2 and set(params.state.keys()) == set(on222['params'].keys())
  for a, b in zip(jax.tree.leaves(params.state), jax.tree.leaves(on222['params'])):
    assert a.dtype == jnp.bfloat16 and a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))

  # For image sampling the LM head is not read at all; everything else is the same.
  sampling = runs.restore_run(
    str(workdir), params_only=True, mesh=cube_mesh, config=cube, without_lm_head=True
  )
  assert 'lm_head' in on222['params'] and 'lm_head' not in sampling.state
  assert set(sampling.state.keys()) == set(on222['params'].keys()) - {'lm_head'}
  for key in sampling.state.keys():
    for a, b in zip(jax.tree.leaves(sampling.state[key]), jax.tree.leaves(on222['params'][key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The stopped run continues on the other mesh (the model config is unchanged).
  result = loop.train(cube, str(workdir))
  assert result.step == 4 and np.isfinite(result.metrics['loss'])
