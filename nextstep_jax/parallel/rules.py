"""Logical axis names -> mesh partition specs and shardings.

Model code names axes logically (`embed`, `heads`, `mlp`, `layers`, ... on parameters through the
`out_sharding` variable metadata; `batch`, `length` on activations). A rule set, ordered data such
as `config.mesh.rules`, maps each logical name to None, one mesh axis or a tuple of mesh axes:

  (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

For each logical axis the first rule naming it whose mesh axes are still free in that spec is
used; mesh axes already taken by an earlier dimension are dropped. Size-1 mesh axes are kept
(harmless), so one rule set serves every mesh shape.
"""

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names (one per array dimension, None = replicated) to a PartitionSpec."""
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    candidates = [targets for logical, targets in rules if logical == name]
    if not candidates:
      known = sorted({logical for logical, _ in rules})
      close = difflib.get_close_matches(name, known, n=3)
      hint = f' Did you mean: {", ".join(close)}?' if close else ''
      raise ValueError(
        f"Logical axis {name!r} has no sharding rule; add ('{name}', mesh_axes "
        f'or None) to the rules (config.mesh.rules).{hint}'
      )
    spec.append(_first_free(candidates, used))
  return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of `nnx.Variable`s (e.g. an `nnx.State`) or arrays.

  A Variable's `out_sharding` metadata (logical names, one per dimension) gives its spec; Variables
  without it and bare array leaves are replicated. The result has the structure of
  `abstract_state` (Variables holding NamedShardings), usable as jit in/out shardings.

  Raises:
    ValueError: naming the variable's path when its annotation has the wrong rank or a dimension
      is not divisible by the size of the mesh axes it is sharded over.
  """

  def leaf_sharding(path, leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get('out_sharding')
      return leaf.replace(_named_sharding(path, leaf.get_value().shape, names, mesh, rules))
    return _named_sharding(path, np.shape(leaf), None, mesh, rules)

  return jax.tree_util.tree_map_with_path(
    leaf_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def abstract_with_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """`abstract_state` with every leaf a `jax.ShapeDtypeStruct` carrying its NamedSharding.

  The target for `Checkpointer.restore` and for `jax.jit(...).lower` against a mesh.
  """
  shardings = state_shardings(abstract_state, mesh, rules)
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    abstract_state,
    shardings,
  )


def activation_spec(mesh: jax.sharding.Mesh, rules: Rules, *logical: str | None) -> NamedSharding:
  """NamedSharding for an activation or batch array, e.g. `activation_spec(mesh, rules, 'batch',
  'length', None)`."""
  return NamedSharding(mesh, logical_to_spec(logical, rules))


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, rules: Rules) -> dict:
  """Puts this process's host arrays onto the mesh, sharded over their leading `batch` dimension.

  Args:
    batch: a pytree (typically a dict) of numpy arrays (B_local, ...); B_local is this process's
      share of the global batch (the whole batch on a single host).
    mesh: the device mesh.
    rules: the logical axis rules; `batch` decides the mesh axes of dimension 0.

  Returns:
    The same pytree of global jax.Arrays (B_local * process_count, ...).
  """

  def put(array):
    array = np.asarray(array)
    sharding = activation_spec(mesh, rules, 'batch', *([None] * (array.ndim - 1)))
    return jax.make_array_from_process_local_data(sharding, array)

  return jax.tree.map(put, batch)


def _first_free(candidates: Sequence[Any], used: set[str]) -> str | tuple[str, ...] | None:
  """The first candidate's mesh axes not yet used in this spec (None = replicated)."""
  for targets in candidates:
    if targets is None:
      return None
    axes = (targets,) if isinstance(targets, str) else tuple(targets)
    free = tuple(axis for axis in axes if axis not in used)
    if free:
      used.update(free)
      return free[0] if len(free) == 1 else free
  return None


def _named_sharding(
  path, shape: tuple[int, ...], names: Any, mesh: jax.sharding.Mesh, rules: Rules
) -> NamedSharding:
  where = jax.tree_util.keystr(path)
  if not names:
    return NamedSharding(mesh, PartitionSpec())
  names = tuple(names)
  if len(names) != len(shape):
    raise ValueError(
      f'{where}: out_sharding {names} has {len(names)} names but the array has '
      f'shape {shape}; give one logical name (or None) per dimension.'
    )
  spec = logical_to_spec(names, rules)
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    split = math.prod(mesh.shape[axis] for axis in axes)
    if size % split:
      raise ValueError(
        f'{where}: dimension {dim} ({names[dim]!r}) of shape {shape} has size {size}, not '
        f'divisible by mesh axes {axes} of total size {split}; change the model size or the '
        'mesh / rules.'
      )
  return NamedSharding(mesh, spec)
