"""train.init_from: params of another run or a converted release, restored onto the training mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import multiprocess_testing
from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax.convert import official
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.training import init_from
from nextstep_jax.training import loop
from nextstep_jax.training import state as state_lib


def tiny_config(tmp_path, *overrides):
  return configlib.load_config(
    'configs/tiny.py', [f'data.cache_dir={tmp_path / "cache"}', *overrides]
  )


def numpy_params(params) -> dict:
  return {
    init_from.param_name(tuple(str(k) for k in path)): np.asarray(v.get_value())
    for path, v in nnx.to_flat_state(params)
  }


def save_source(config, directory, step: int, kind: str, dtype=None, seed: int = 7):
  """A source on disk: a run's checkpoints/<step> (full train state) or a converted params/0."""
  with config.unlocked():
    config.seed = seed
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  tx = state_lib.make_optimizer(config.train)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  _, state, _ = state_lib.create_sharded_state(config, tx, mesh)
  if dtype is not None:
    state['params'] = jax.tree.map(lambda x: x.astype(dtype), state['params'])
  if kind == 'run':
    ckpt = checkpoints.Checkpointer(directory / 'checkpoints', keep=5, async_save=False)
    tree = state
  else:
    ckpt = checkpoints.Checkpointer(directory / official.PARAMS_DIR, keep=1, async_save=False)
    (directory / official.TOKENIZER_FILE).write_text('{}')
    tree, step = state['params'], 0
  ckpt.save(step, tree)
  ckpt.close()
  return numpy_params(state['params'])


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['run', 'converted'])
def test_restores_the_exact_params_onto_a_sharded_mesh(tmp_path, kind):
  """Saved on one device, restored onto a (data 2, fsdp 2, tensor 2) mesh: every param equal
  bitwise and laid out with the training sharding; bf16 sources become f32 masters."""
  config = tiny_config(tmp_path, 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
  dtype = jnp.bfloat16 if kind == 'converted' else None
  expected = save_source(config.copy_and_resolve_references(), tmp_path / 'src', 3, kind, dtype)
  spec = str(tmp_path / 'src') + ('@3' if kind == 'run' else '')
  with config.unlocked():
    config.train.init_from = spec
  tx = state_lib.make_optimizer(config.train)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  state = init_from.initial_state(config, tx, abstract_state, shardings)
  got = numpy_params(state['params'])
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)
  for leaf, sharding in zip(jax.tree.leaves(state['params']), jax.tree.leaves(shardings['params'])):
    assert leaf.sharding == sharding
  assert int(state['step']) == 0
  assert all(
    float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0
  )  # Fresh Adam moments.


@pytest.mark.slow
def test_skip_patterns_keep_the_random_init(tmp_path):
  """A source whose head differs in width: skipping image_head.* restores everything else and
  leaves the head at the config's own init."""
  source_config = tiny_config(tmp_path, 'model.fm_head_dim=32')
  expected = save_source(source_config, tmp_path / 'src', 2, 'run')
  config = tiny_config(
    tmp_path, f'train.init_from={tmp_path / "src"}', "train.init_from_skip=('image_head.*',)"
  )
  tx = state_lib.make_optimizer(config.train)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  got = numpy_params(init_from.initial_state(config, tx, abstract_state, shardings)['params'])
  fresh = numpy_params(jax.jit(lambda: state_lib.init_state(config, tx)['params'])())
  for name, value in got.items():
    if name.startswith('image_head.'):
      np.testing.assert_array_equal(value, fresh[name], err_msg=name)
    else:
      np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.slow
def test_bad_init_from_is_one_clear_error(tmp_path):
  config = tiny_config(tmp_path)
  tx = state_lib.make_optimizer(config.train)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)

  def start(spec, skip=()):
    with config.unlocked():
      config.train.init_from, config.train.init_from_skip = spec, skip
    return init_from.initial_state(config, tx, abstract_state, shardings)

  with pytest.raises(init_from.InitFromError, match='does not exist'):
    start(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(init_from.InitFromError, match='neither a converted release'):
    start(str(tmp_path / 'empty'))
  save_source(
    tiny_config(tmp_path, 'model.hidden_size=32', 'model.fm_head_layers=3'),
    tmp_path / 'other',
    4,
    'run',
  )
  with pytest.raises(init_from.InitFromError, match=r'no checkpoint 9 .*steps: \[4\]'):
    start(f'{tmp_path / "other"}@9')
  with pytest.raises(init_from.InitFromError) as error:
    start(str(tmp_path / 'other'), ('nothing.*',))
  message = str(error.value)
  # One error: every mis-shaped name (hidden 32 vs 64), the extra head block, the unused pattern.
  assert 'params with another shape' in message and 'embed_tokens.embedding (512, 32)' in message
  assert 'decoder.layers.mlp.up_proj.kernel' in message
  assert 'image_head.res_blocks.in_ln.weight (3, 64) in the source vs (2, 64)' in message
  assert 'init_from_skip patterns matching no param:\n    nothing.*' in message


@pytest.mark.slow
def test_resume_uses_the_runs_own_checkpoint(tmp_path, capsys):
  """A fine-tune stopped at step 3 continues from its own checkpoint (not init_from again) and
  ends where an uninterrupted fine-tune ends."""
  base = tiny_config(tmp_path, 'train.steps=4', 'train.checkpoint_every=2')
  loop.train(base, str(tmp_path / 'base'))
  config = tiny_config(
    tmp_path, 'train.steps=6', 'train.checkpoint_every=3', f'train.init_from={tmp_path / "base"}@2'
  )
  loop.train(config, str(tmp_path / 'straight'))
  loop.train(config, str(tmp_path / 'resumed'), stop_at=3)
  assert 'initialised from' in capsys.readouterr().out
  loop.train(config, str(tmp_path / 'resumed'))
  out = capsys.readouterr().out
  assert 'resumed from step 3' in out and 'initialised from' not in out
  a, extra_a = multiprocess_testing.restore_on_one_device(tmp_path / 'straight')
  b, extra_b = multiprocess_testing.restore_on_one_device(tmp_path / 'resumed')
  assert extra_a['step'] == extra_b['step'] == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
