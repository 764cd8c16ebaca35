"""Weight-only quantization of a NextStep model with qwix (config `model.quant`).

A quantized linear layer keeps its module and its name: `Dense.kernel` (or `nnx.Embed.embedding`)
becomes a `qwix.QArray` whose `qvalue` (int8 or int4; the kernel's shape with its output axes
merged into one, `flat_shape`) and `scale` are Params,
so the state paths are `<layer>.kernel.qvalue` / `<layer>.kernel.scale`. Layers run it through
`qwix.dot_general` (nextstep_jax/nn.py), which dequantizes into the compute dtype inside the matmul; the
activations stay in `model.dtype`. This works wherever the model runs: inside jit, the layer
scans (`lax.scan` over stacked Params slices a QArray like any pytree) and shard_map.

Modes (contracted axis = the kernel's input axis; a stacked kernel's leading `layers` axis always
gets its own scales):
  int8  symmetric absmax, one scale per output channel.
  int4  symmetric absmax, one scale per `group_size` inputs of each output channel (qwix
        sub-channel tiling); an input axis the group does not divide (e.g. the 64-wide token
        projection) falls back to one scale per output channel.
Scales are stored in the compute dtype (no per-token cast) and carry the kernel's logical axis
names on the channel axes and None on the contracted axis, so they shard with their channels on
any mesh (the contracted axis' scales, 1/group of it at most, stay replicated).

Which layers: every backbone linear layer (decoder q/k/v/o and MLP projections, the image in/out
projectors), the flow head's linear layers with `quant.head`, the vocab tables (embed_tokens, one
scale per row, and lm_head) with `quant.embedding`. Norm weights and biases stay in param_dtype.

`quantize_model(model, qcfg)` quantizes a float model in place (concrete or inside
`nnx.eval_shape`); `abstract_model` of a config with `model.quant.mode != 'none'` is the
quantized model, so restores, shardings and AOT plans follow the config. `quantize_params` turns
float params into the quantized model's params on their shardings, one variable at a time.
`quantize_tensor` quantizes one (per-layer) slice exactly as the model would, for streaming
conversion (convert/official.py).
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from nextstep_jax import nn as L

QTYPES = L.QUANT_TYPES


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """`config.model.quant` (fields documented in configs/base.py)."""

  mode: str = 'none'
  group_size: int = 128
  head: bool = True
  embedding: bool = False

  @property
  def enabled(self) -> bool:
    return self.mode != 'none'

  @classmethod
  def from_config(cls, model_config) -> 'QuantConfig':
    """From `config.model` (a config without `quant` means no quantization)."""
    q = model_config.get('quant')
    if q is None:
      return cls()
    qcfg = cls(mode=q.mode, group_size=q.group_size, head=q.head, embedding=q.embedding)
    if qcfg.mode != 'none' and qcfg.mode not in QTYPES:
      raise ValueError(f'model.quant.mode={qcfg.mode!r} must be one of none, {", ".join(QTYPES)}.')
    return qcfg


@dataclasses.dataclass(frozen=True)
class Target:
  """One quantizable variable: `module.<attr>` at `path`, contracted along `contract_axis`."""

  path: tuple
  module: nnx.Module
  attr: str
  contract_axis: int


def targets(model: nnx.Module, qcfg: QuantConfig) -> list[Target]:
  """The variables `qcfg` quantizes in `model` (a NextStep), in module order."""
  found = []
  for path, module in nnx.iter_modules(model):
    top = path[0] if path else None
    if isinstance(module, L.Dense):
      if top == 'image_head' and not qcfg.head:
        continue
      if top == 'lm_head' and not qcfg.embedding:
        continue
      found.append(Target(tuple(path), module, 'kernel', _leading_layers(module.kernel)))
    elif isinstance(module, nnx.Embed) and qcfg.embedding:
      found.append(Target(tuple(path), module, 'embedding', 1))  # (V, D): one scale per row.
  return found


def _leading_layers(variable) -> int:
  """1 when the variable is stacked on a leading `layers` axis (its contracted axis is then 1)."""
  if isinstance(variable, qwix.QArray):
    variable = variable.qvalue
  names = variable.get_metadata().get('out_sharding') or ()
  return 1 if names and names[0] == 'layers' else 0


def _how(shape: tuple[int, ...], contract_axis: int, qcfg: QuantConfig) -> dict:
  """qwix.quantize keyword arguments: channelwise on every axis but the contracted one, which
  int4 tiles by group_size when the group divides it (and is smaller than it)."""
  dim = shape[contract_axis]
  tiled = {}
  if qcfg.mode == 'int4' and dim % qcfg.group_size == 0 and dim > qcfg.group_size:
    tiled = {contract_axis: qcfg.group_size}
  channels = tuple(a for a in range(len(shape)) if a != contract_axis)
  return {'channelwise_axes': channels, 'tiled_axes': tiled}


def quantize_tensor(
  value: jax.Array, contract_axis: int, qcfg: QuantConfig, scale_dtype
) -> qwix.QArray:
  """One float kernel (or a per-layer slice of a stacked one: drop the layer axis from
  `contract_axis`) -> QArray (qvalue in QTYPES[mode], scale in `scale_dtype`). Slices of a stacked
  kernel quantize exactly like the whole (every layer has its own scales)."""
  value = value.reshape(flat_shape(value.shape, contract_axis))
  how = _how(value.shape, contract_axis, qcfg)
  return qwix.quantize(value, QTYPES[qcfg.mode], scale_dtype=scale_dtype, **how)


def flat_shape(shape: tuple[int, ...], contract_axis: int) -> tuple[int, ...]:
  """The stored shape of a quantized kernel: its output axes (after the contracted one) merged
  into one, e.g. a q_proj kernel (layers, D, heads, head_dim) -> (layers, D, heads * head_dim).
  TPUs tile int8/int4 arrays in (32, 128) blocks over the two minor axes; a (heads, head_dim)
  minor pair gets another layout than the matmul wants and XLA would copy every stacked q/k/v
  kernel on every decode step. A row-major (D, heads * head_dim) kernel is the matmul's layout."""
  if len(shape) - contract_axis <= 2:  # At most one output axis (or a vocab table's rows).
    return tuple(shape)
  return (*shape[: contract_axis + 1], math.prod(shape[contract_axis + 1 :]))


def _quantized_variable(
  param: nnx.Variable, contract_axis: int, qcfg: QuantConfig, scale_dtype
) -> qwix.QArray:
  """A float Param -> QArray of two Params carrying the param's metadata; the scale's contracted
  axis (size 1 or groups) is unnamed so it never constrains the mesh."""
  q = quantize_tensor(param[...], contract_axis, qcfg, scale_dtype)
  names = param.get_metadata().get('out_sharding')
  qvalue = param.replace(q.qvalue)
  scale = param.replace(q.scale)
  if names:
    # Merged output axes keep the name of the major one (heads): sharding heads * head_dim over
    # the mesh axis of heads splits it between whole heads, as the float kernel is split.
    names = tuple(names[: len(q.qvalue.shape)])
    qvalue.set_metadata('out_sharding', names)
    scale.set_metadata(
      'out_sharding', tuple(None if a == contract_axis else n for a, n in enumerate(names))
    )
  return qwix.QArray(qvalue, scale, None, q.qtype)


def quantize_model(model: nnx.Module, qcfg: QuantConfig) -> nnx.Module:
  """Quantizes `model`'s targets in place (a no-op with mode 'none'); returns the model. Scales
  take the compute dtype of the layer. Works on concrete models and under nnx.eval_shape."""
  if not qcfg.enabled:
    return model
  for target in targets(model, qcfg):
    param = getattr(target.module, target.attr)
    if isinstance(param, qwix.QArray):
      raise TypeError(f'{".".join(map(str, target.path))} is already quantized.')
    setattr(
      target.module,
      target.attr,
      _quantized_variable(param, target.contract_axis, qcfg, target.module.dtype),
    )
  return model


def quantized_paths(model: nnx.Module) -> dict[tuple, int]:
  """{path of a quantized variable (ending in 'kernel'/'embedding'): contracted axis} of a
  quantized model (concrete or abstract)."""
  found = {}
  for path, module in nnx.iter_modules(model):
    for attr, axis in (('kernel', None), ('embedding', 1)):
      value = getattr(module, attr, None)
      if isinstance(value, qwix.QArray):
        found[(*path, attr)] = _leading_layers(value) if axis is None else axis
  return found


def quantize_params(
  float_params: Any,
  quantized_model: nnx.Module,
  qcfg: QuantConfig,
  shardings: Any = None,
  delete_float: bool = True,
) -> nnx.State:
  """Float params (nnx.State of the unquantized model, e.g. a bf16 conversion restored onto a
  mesh) -> the params of `quantized_model` (abstract is fine), one variable at a time: each
  kernel is quantized by a jit whose outputs land on `shardings` (an nnx.State of NamedShardings
  of the quantized params; None = where jit puts them) and the float kernel is then deleted
  (unless delete_float=False), so device memory peaks at the float params plus one quantized
  kernel, falling as it goes. Norm weights and biases are passed through as they are."""
  contract = quantized_paths(quantized_model)
  scale_dtypes = _scale_dtypes(quantized_model)
  flat_float = dict(nnx.to_flat_state(float_params))
  flat_target = dict(nnx.to_flat_state(nnx.state(quantized_model, nnx.Param)))
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else None
  out = {}
  for path, var in flat_target.items():
    if path in out:
      continue
    if path[:-1] in contract:
      kernel_path = path[:-1]
      parts = ((*kernel_path, 'qvalue'), (*kernel_path, 'scale'))
      source = _take(flat_float, kernel_path)
      placed = (
        None if flat_shardings is None else tuple(flat_shardings[p].get_value() for p in parts)
      )
      quantize = functools.partial(
        _quantized_parts,
        contract_axis=contract[kernel_path],
        qcfg=qcfg,
        scale_dtype=scale_dtypes[kernel_path],
      )
      values = jax.jit(quantize, out_shardings=placed)(source)
      for part, value in zip(parts, values):
        out[part] = flat_target[part].replace(value)
      if delete_float and isinstance(source, jax.Array):
        source.delete()
    else:
      out[path] = var.replace(_take(flat_float, path))
  if flat_float:
    raise ValueError(
      'float params not in the quantized model: '
      f'{sorted(".".join(map(str, p)) for p in flat_float)}'
    )
  return nnx.from_flat_state(list(out.items()))


def _take(flat: dict, path: tuple):
  """Pops the value at `path` from a flat float state; a clear error when it is absent."""
  if path not in flat:
    raise ValueError(
      f'{".".join(map(str, path))} is missing from the float params (were they '
      'saved by a model with another architecture or already quantized?).'
    )
  value = flat.pop(path)
  return value.get_value() if isinstance(value, nnx.Variable) else value


def _quantized_parts(value, *, contract_axis, qcfg, scale_dtype) -> tuple[jax.Array, jax.Array]:
  q = quantize_tensor(value, contract_axis, qcfg, scale_dtype)
  return q.qvalue, q.scale


def _scale_dtypes(model: nnx.Module) -> dict[tuple, Any]:
  """{quantized variable path: the compute dtype of its layer (the scale dtype)}."""
  dtypes = {}
  for path, module in nnx.iter_modules(model):
    for attr in ('kernel', 'embedding'):
      if isinstance(getattr(module, attr, None), qwix.QArray):
        dtypes[(*path, attr)] = module.dtype
  return dtypes


def quantized_bytes(params: Any) -> int:
  """Bytes of a params state as stored (int4 counted at half a byte)."""
  total = 0
  for leaf in jax.tree.leaves(params):
    dtype = jnp.dtype(leaf.dtype)
    bits = 4 if dtype == jnp.int4 else dtype.itemsize * 8
    total += int(np.prod(leaf.shape)) * bits // 8
  return total
