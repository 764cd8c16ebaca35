"""Checkpoint save/restore onto shardings, keep-N, mismatch errors, partial-write handling."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from nextstep_jax import checkpoints
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib

RULES = get_base_config().mesh.rules


class Tiny(nnx.Module):
  """w (8, 16) embed x mlp, b (16,) mlp, step () unannotated."""

  def __init__(self, seed: int):
    key = jax.random.key(seed)
    self.w = nnx.Param(jax.random.normal(key, (8, 16)), out_sharding=('embed', 'mlp'))
    self.b = nnx.Param(jnp.arange(16.0), out_sharding=('mlp',))
    self.step = nnx.Variable(jnp.array(seed, jnp.int32))


def make_mesh(data, fsdp, tensor):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def sharded_state(seed, mesh):
  abstract = nnx.state(nnx.eval_shape(lambda: Tiny(seed)))
  shardings = rules_lib.state_shardings(abstract, mesh, RULES)
  return jax.jit(lambda: nnx.state(Tiny(seed)), out_shardings=shardings)()


def restore_target(mesh, module=lambda: Tiny(0)):
  abstract = nnx.state(nnx.eval_shape(module))
  return rules_lib.abstract_with_shardings(abstract, mesh, RULES)


def test_round_trip_onto_another_mesh(tmp_workdir):
  state = sharded_state(3, make_mesh(8, 1, 1))
  extra = {'data': {'position': 123}, 'config': {'train': {'steps': 10}}}
  ckpt = checkpoints.Checkpointer(tmp_workdir / 'ckpt', keep=2)
  assert ckpt.save(5, state, extra)
  ckpt.wait()
  assert ckpt.latest_step() == 5

  target = restore_target(make_mesh(2, 2, 2))
  restored, restored_extra = ckpt.restore(5, target)
  ckpt.close()
  assert restored_extra == extra
  w = restored['w'][...]
  assert w.sharding.spec == P('fsdp', 'tensor') and w.sharding.mesh.shape['tensor'] == 2
  assert w.addressable_shards[0].data.shape == (4, 8)
  for path in (('w',), ('b',), ('step',)):
    np.testing.assert_array_equal(
      np.asarray(restored[path[0]][...]), np.asarray(state[path[0]][...])
    )


def test_restore_latest_and_missing_step(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=3, async_save=False)
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    ckpt.restore(None, restore_target(mesh))
  ckpt.save(1, sharded_state(1, mesh))
  ckpt.save(2, sharded_state(2, mesh), {'position': 2})
  assert not ckpt.save(2, sharded_state(9, mesh))  # Not newer than the latest step.
  restored, extra = ckpt.restore(None, restore_target(mesh))
  assert int(restored['step'][...]) == 2 and extra == {'position': 2}
  with pytest.raises(FileNotFoundError, match='step 7'):
    ckpt.restore(7, restore_target(mesh))
  ckpt.close()


def test_keeps_the_newest_n(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=2)
  for step in (10, 20, 30, 40):
    ckpt.save(step, sharded_state(step, mesh))
  ckpt.wait()
  assert ckpt.all_steps() == [30, 40]
  ckpt.close()
  assert sorted(p.name for p in tmp_workdir.iterdir()) == ['30', '40']


def test_mismatch_lists_paths_and_shapes(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=1, async_save=False)
  ckpt.save(1, sharded_state(0, mesh))

  class Changed(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((8, 32)), out_sharding=('embed', 'mlp'))
      self.b = nnx.Param(jnp.zeros((16,)), out_sharding=('mlp',))
      self.extra = nnx.Param(jnp.zeros((2,)))

  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    ckpt.restore(1, restore_target(mesh, Changed))
  message = str(error.value)
  assert 'expected but not in the checkpoint:\n    extra/value (2,)' in message
  assert 'in the checkpoint but not expected:\n    step/value ()' in message
  assert 'w/value (8, 16) vs (8, 32)' in message
  assert 'b/value' not in message
  ckpt.close()


def test_partial_write_is_ignored(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=3, async_save=False)
  ckpt.save(1, sharded_state(1, mesh))
  ckpt.close()
  # A save of step 2 killed before orbax's final rename leaves only its temporary directory.
  partial = tmp_workdir / '2.orbax-checkpoint-tmp-1700000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'half_written').write_bytes(b'\0' * 16)

  reopened = checkpoints.Checkpointer(tmp_workdir, keep=3)
  assert reopened.latest_step() == 1 and reopened.all_steps() == [1]
  restored, _ = reopened.restore(None, restore_target(mesh))
  assert int(restored['step'][...]) == 1
  reopened.save(2, sharded_state(2, mesh))  # Saving first finishes the cleanup begun on open.
  reopened.wait()
  assert reopened.all_steps() == [1, 2] and not partial.exists()
  reopened.close()


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoints.Checkpointer('relative/ckpts', keep=2)
  ckpt.save(1, {'w': jnp.ones((2,))})
  ckpt.wait()
  assert ckpt.latest_step() == 1
  ckpt.close()
  assert (tmp_path / 'relative' / 'ckpts' / '1').exists()


def test_data_state_is_saved_per_process_and_restored(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=3)
  ckpt.save(1, sharded_state(1, mesh))
  ckpt.save(2, sharded_state(2, mesh), {'step': 2}, data_state={'kind': 'builtin', 'step': 2})
  ckpt.wait()
  assert ckpt.restore_data_state(1) is None  # A checkpoint without data state says so.
  assert ckpt.restore_data_state(2) == {'kind': 'builtin', 'step': 2}
  assert (tmp_workdir / '2' / 'data' / 'process_0-of-1.json').exists()
  assert ckpt.restore(2, restore_target(mesh))[1] == {'step': 2}
  ckpt.close()


def test_data_state_of_another_process_count(tmp_path):
  handler = checkpoints.ProcessJsonHandler()
  same, different = tmp_path / 'same', tmp_path / 'different'
  for directory, states in (
    (same, ({'step': 4}, {'step': 4})),
    (different, ({'pos': 1}, {'pos': 7})),
  ):
    directory.mkdir()
    for i, state in enumerate(states):
      (directory / f'process_{i}-of-2.json').write_text(json.dumps(state))
  assert handler.restore(epath.Path(same)) == {'step': 4}  # A global state: any process count.
  with pytest.raises(ValueError, match='process count that saved them'):
    handler.restore(epath.Path(different))


def _damage(step_dir, how):
  """Deletes or truncates one file of a committed checkpoint directory."""
  if how == 'missing_manifest':
    (step_dir / 'state' / 'manifest.ocdbt').unlink()
  elif how == 'missing_metadata':
    (step_dir / 'state' / '_METADATA').unlink()
  else:
    data_files = sorted((step_dir / 'state' / 'd').iterdir(), key=lambda p: -p.stat().st_size)
    target = data_files[0]
    if how == 'missing_data':
      target.unlink()
    else:  # Truncated data file.
      target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
  'how', ['missing_manifest', 'missing_metadata', 'missing_data', 'truncated_data']
)
def test_damaged_newest_falls_back_and_is_kept_aside(tmp_workdir, how):
  mesh = make_mesh(8, 1, 1)
  root = tmp_workdir / 'checkpoints'
  ckpt = checkpoints.Checkpointer(root, keep=3, async_save=False)
  ckpt.save(1, sharded_state(1, mesh), {'position': 1}, data_state={'step': 1})
  ckpt.save(2, sharded_state(2, mesh), {'position': 2}, data_state={'step': 2})
  ckpt.close()
  _damage(root / '2', how)
  logged = []
  ckpt = checkpoints.Checkpointer(root, keep=3, async_save=False)
  restored = ckpt.restore_newest(restore_target(mesh), with_data=True, log=logged.append)
  assert (
    restored.step == 1 and restored.extra == {'position': 1} and restored.data_state == {'step': 1}
  )
  np.testing.assert_array_equal(
    np.asarray(restored.state['w'][...]), np.asarray(sharded_state(1, mesh)['w'][...])
  )
  assert len(logged) == 1 and 'checkpoint step 2 is damaged' in logged[0]
  assert 'moved it aside' in logged[0] and 'not deleted' in logged[0]
  kept = list((tmp_workdir / 'checkpoints.damaged').iterdir())
  assert [p.name.split('-')[0] for p in kept] == ['2'] and str(kept[0]) in logged[0]
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_damaged_explicit_step_is_one_clear_error(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir, keep=3, async_save=False)
  ckpt.save(1, sharded_state(1, mesh))
  ckpt.save(2, sharded_state(2, mesh))
  _damage(tmp_workdir / '2', 'missing_manifest')
  with pytest.raises(checkpoints.CheckpointDamagedError) as error:
    ckpt.restore(2, restore_target(mesh))
  message = str(error.value)
  assert '\n' not in message and f'{tmp_workdir}/2' in message
  assert 'state/manifest.ocdbt is missing' in message and 'saved steps: [1, 2]' in message
  ckpt.close()


def test_every_checkpoint_damaged(tmp_workdir):
  mesh = make_mesh(8, 1, 1)
  ckpt = checkpoints.Checkpointer(tmp_workdir / 'c', keep=3, async_save=False)
  ckpt.save(1, sharded_state(1, mesh))
  _damage(tmp_workdir / 'c' / '1', 'truncated_data')
  with pytest.raises(checkpoints.CheckpointDamagedError, match='every checkpoint .* is damaged'):
    ckpt.restore_newest(restore_target(mesh), log=lambda line: None)
  ckpt.close()
