"""The device mesh: axes ('data', 'fsdp', 'tensor') sized from `config.mesh`."""

import functools
import math
from collections.abc import Sequence

import jax
import ml_collections

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves `config.mesh` sizes (one may be -1: the remaining devices) for `num_devices`."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f'mesh sizes {named} must be positive, with at most one -1.')
  fixed = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(
        f'mesh sizes {named}: the fixed axes multiply to {fixed}, which does not divide the '
        f'{num_devices} devices; choose sizes whose product divides {num_devices}.'
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f'mesh sizes {named} multiply to {fixed} but there are {num_devices} devices; make the '
      'product equal the device count or set one axis to -1.'
    )
  return tuple(sizes)


def make_mesh(
  mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with Auto axes ('data', 'fsdp', 'tensor')."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def in_mesh(fn, mesh):
  """`fn` traced with `mesh` as the abstract mesh in context: the model's activation sharding
  constraints and splash attention's shard_map read it (jit entry points wrap their function)."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped
