"""Mesh construction and logical-axis sharding on the 8 CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib

RULES = get_base_config().mesh.rules


def mesh_config(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


class Tiny(nnx.Module):
  """Annotated params: w (8, 16) embed x mlp, proj kernel (16, 32) mlp x vocab, scale unannotated."""

  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.Param(jnp.ones((8, 16)), out_sharding=('embed', 'mlp'))
    self.proj = nnx.Linear(
      16,
      32,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('mlp', 'vocab')),
      rngs=rngs,
    )
    self.scale = nnx.Param(jnp.ones((8,)))


@pytest.mark.parametrize(
  'sizes, expected',
  [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, 2, 2), (2, 2, 2)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 1, -1), (1, 1, 8)),
  ],
)
def test_make_mesh_shapes(sizes, expected):
  mesh = mesh_lib.make_mesh(mesh_config(*sizes))
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_make_mesh_on_a_device_subset():
  mesh = mesh_lib.make_mesh(mesh_config(-1, 2, 1), devices=jax.devices()[:4])
  assert tuple(mesh.shape.values()) == (2, 2, 1)


@pytest.mark.parametrize(
  'sizes, message',
  [
    ((3, -1, 1), 'does not divide the 8 devices'),
    ((2, 2, 1), 'multiply to 4 but there are 8 devices'),
    ((-1, -1, 1), 'at most one -1'),
    ((0, 1, -1), 'must be positive'),
  ],
)
def test_make_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(mesh_config(*sizes))


def test_logical_to_spec():
  assert rules_lib.logical_to_spec(('batch', 'length', None), RULES) == P(
    ('data', 'fsdp'), None, None
  )
  assert rules_lib.logical_to_spec(('embed', 'mlp'), RULES) == P('fsdp', 'tensor')
  assert rules_lib.logical_to_spec(('layers', 'embed', 'heads', 'head_dim'), RULES) == P(
    None, 'fsdp', 'tensor', None
  )


def test_logical_to_spec_drops_reused_mesh_axes():
  # batch takes data and fsdp, so embed (-> fsdp) is replicated; heads and mlp both want tensor.
  assert rules_lib.logical_to_spec(('batch', 'embed'), RULES) == P(('data', 'fsdp'), None)
  assert rules_lib.logical_to_spec(('heads', 'mlp'), RULES) == P('tensor', None)


def test_logical_to_spec_falls_back_to_later_rules():
  rules = (('embed', 'fsdp'), ('embed', 'data'), ('mlp', 'fsdp'))
  assert rules_lib.logical_to_spec(('mlp', 'embed'), rules) == P('fsdp', 'data')


def test_logical_to_spec_unknown_name():
  with pytest.raises(ValueError, match="'kv_head' has no sharding rule.*kv_heads"):
    rules_lib.logical_to_spec(('kv_head',), RULES)


@pytest.mark.parametrize('sizes', [(8, 1, 1), (2, 2, 2)])
def test_state_shardings_place_params(sizes):
  mesh = mesh_lib.make_mesh(mesh_config(*sizes))
  abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))
  shardings = rules_lib.state_shardings(abstract, mesh, RULES)
  assert shardings['w'].get_value().spec == P('fsdp', 'tensor')
  assert shardings['proj']['kernel'].get_value().spec == P('tensor', None)  # vocab: tensor taken.
  assert shardings['proj']['bias'].get_value().spec == P()
  assert shardings['scale'].get_value().spec == P()

  state = jax.jit(lambda: nnx.state(Tiny(nnx.Rngs(0))), out_shardings=shardings)()
  _, fsdp, tensor = sizes
  assert state['w'][...].sharding.spec == P('fsdp', 'tensor')
  assert state['w'][...].addressable_shards[0].data.shape == (8 // fsdp, 16 // tensor)
  np.testing.assert_array_equal(np.asarray(state['w'][...]), np.ones((8, 16)))


def test_state_shardings_cover_optimizer_state():
  mesh = mesh_lib.make_mesh(mesh_config(2, 2, 2))

  def create():
    model = Tiny(nnx.Rngs(0))
    return nnx.state((model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)))

  shardings = rules_lib.state_shardings(nnx.eval_shape(create), mesh, RULES)
  adam = shardings[1]['opt_state'][0]
  assert adam['mu']['w'].get_value().spec == P('fsdp', 'tensor')
  assert adam['count'].get_value().spec == P()
  state = jax.jit(create, out_shardings=shardings)()
  assert state[1]['opt_state'][0]['nu']['w'][...].sharding.spec == P('fsdp', 'tensor')


def test_abstract_with_shardings():
  mesh = mesh_lib.make_mesh(mesh_config(2, 2, 2))
  abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))
  target = rules_lib.abstract_with_shardings(abstract, mesh, RULES)
  leaf = target['w'].get_value()
  assert isinstance(leaf, jax.ShapeDtypeStruct)
  assert leaf.shape == (8, 16) and leaf.sharding.spec == P('fsdp', 'tensor')


def test_state_shardings_errors_name_the_path():
  mesh = mesh_lib.make_mesh(mesh_config(1, 1, 8))
  wrong_rank = {'layer': nnx.Param(jnp.ones((4, 4)), out_sharding=('embed',))}
  with pytest.raises(ValueError, match=r"\['layer'\].*1 names but the array has shape \(4, 4\)"):
    rules_lib.state_shardings(wrong_rank, mesh, RULES)
  indivisible = {'layer': nnx.Param(jnp.ones((4, 12)), out_sharding=('embed', 'mlp'))}
  with pytest.raises(
    ValueError,
    match=r"\['layer'\].*size 12, not divisible .*'tensor',\) of "
    r'total size 8',
  ):
    rules_lib.state_shardings(indivisible, mesh, RULES)


def test_bare_array_leaves_are_replicated():
  mesh = mesh_lib.make_mesh(mesh_config(8, 1, 1))
  shardings = rules_lib.state_shardings({'step': jnp.zeros(()), 'x': np.ones((4, 2))}, mesh, RULES)
  assert shardings['step'].spec == P() and shardings['x'].spec == P()


@pytest.mark.parametrize('sizes, per_device_rows', [((8, 1, 1), 2), ((2, 2, 2), 4)])
def test_shard_batch(sizes, per_device_rows):
  mesh = mesh_lib.make_mesh(mesh_config(*sizes))
  batch = {'ids': np.arange(16 * 3, dtype=np.int32).reshape(16, 3), 'flag': np.ones(16, bool)}
  sharded = rules_lib.shard_batch(batch, mesh, RULES)
  assert sharded['ids'].sharding.spec == P(('data', 'fsdp'), None)
  assert sharded['ids'].addressable_shards[0].data.shape == (per_device_rows, 3)
  np.testing.assert_array_equal(np.asarray(sharded['ids']), batch['ids'])
  assert sharded['flag'].dtype == jnp.bool_


def test_activation_spec():
  mesh = mesh_lib.make_mesh(mesh_config(2, 2, 2))
  sharding = rules_lib.activation_spec(mesh, RULES, 'batch', 'length', 'embed')
  assert sharding.mesh is mesh and sharding.spec == P(('data', 'fsdp'), None, None)
