"""Shared building blocks: annotated parameters, dense layers, norms, stacked-layer scan, remat.

Every parameter carries logical axis names in its `out_sharding` metadata; the mesh rules in the
config map them to mesh axes (`nextstep_jax.parallel.rules`). Main activations are constrained to
logical axes (`constrain`) under the mesh in context, so FSDP all-gathers weights rather than
activations. Parameters are stored in
`param_dtype` and cast to the compute `dtype` at use; norms and softmax run in float32.
A weight-only quantized kernel or embedding table (model/quant.py) is a `qwix.QArray` whose
`qvalue` and `scale` are Params; `Dense`, `embed_lookup` and `embed_attend` run it through qwix
(dequantized to the compute dtype inside the matmul), activations unchanged.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from nextstep_jax.parallel import rules as rules_lib

Initializer = Callable[..., jax.Array]

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}  # model.*dtype
QUANT_TYPES = {
  'int8': jnp.int8,
  'int4': jnp.int4,
}  # model.quant.mode (besides 'none'): model/quant.py.

REMAT_POLICIES = {  # model.remat_policy
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain(x: jax.Array, rules: rules_lib.Rules, *logical: str | None) -> jax.Array:
  """Sharding constraint of activation `x` to logical axes (one per dimension) under the mesh in
  context (`jax.sharding.use_abstract_mesh`, set by the jitted entry points); identity without a
  multi-device mesh or without rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, rules_lib.logical_to_spec(logical, rules))


def annotated_param(
  rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: tuple, param_dtype
) -> nnx.Param:
  """A parameter of `shape` initialised by `init`, annotated with logical `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {axes} do not match parameter shape {tuple(shape)}')
  return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), out_sharding=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel (+ bias) contracting the last axis of x: (..., I) -> (..., *out_shape).

  `kernel` has shape (I, *out_shape) (the transpose of a torch Linear weight for 1-D outputs).
  """

  def __init__(
    self,
    in_features: int,
    out_shape: int | Sequence[int],
    axes: tuple,
    *,
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    kernel_init: Initializer = nnx.initializers.normal(0.02),
    bias_init: Initializer = nnx.initializers.zeros_init(),
  ):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.dtype = dtype
    self.out_shape = out_shape
    self.kernel = annotated_param(rngs, kernel_init, (in_features, *out_shape), axes, param_dtype)
    self.bias = (
      annotated_param(rngs, bias_init, out_shape, axes[1:], param_dtype) if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    contract = ((x.ndim - 1,), (0,))
    quantized = unbox_quantized(self.kernel) if isinstance(self.kernel, qwix.QArray) else None
    if quantized is None:
      kernel = self.kernel[...].astype(self.dtype)
      y = jnp.tensordot(x, kernel, axes=contract)
      if self.bias is not None:
        y = y + self.bias[...].astype(self.dtype)
      return y
    # A quantized kernel is stored (I, prod(out_shape)) (model/quant.py flat_shape); the output
    # is reshaped to out_shape at the end.
    flat = (quantized.shape[0], math.prod(self.out_shape))
    rows, groups = math.prod(x.shape[:-1]), quantized.scale.shape[0]
    if groups == 1:
      # One scale per output channel: it factors out of the contraction, y = (x @ q) * s, so the
      # matmul reads the int8 kernel itself (its convert fuses into the dot) and no dequantized
      # copy of the weights is written (qwix's float path materialises q * s first).
      y = jnp.tensordot(x, quantized.qvalue.reshape(flat).astype(self.dtype), axes=contract)
      y = y * quantized.scale.reshape(flat[1]).astype(self.dtype)
    elif rows * groups <= MASKED_MATMUL_MAX_ROWS:
      # Sub-channel groups (int4), few rows x groups (a decode step): row r is repeated once per
      # group g with the other groups' inputs zeroed, so one plain matmul against the int4 kernel
      # gives every group's partial sums, y = sum_g ((x * 1_g) @ q) * s_g. A 2-D matmul reads the
      # int4 kernel where it lies (its convert fuses into the dot, as int8's does); the batched
      # per-group form below makes XLA copy each layer's slice of a stacked int4 kernel first. It
      # costs G times the matmul's FLOPs on G times the rows, cheap while those rows are few.
      xg = x.reshape(-1, groups, flat[0] // groups)
      one_group = jnp.eye(groups, dtype=x.dtype)[None, :, :, None]  # (1, g, g', 1)
      masked = (xg[:, None] * one_group).reshape(-1, flat[0])  # Row (r, g): x_r on group g only.
      partial = jnp.dot(masked, quantized.qvalue.reshape(flat).astype(self.dtype))
      y = jnp.einsum(
        'rgn,gn->rn',
        partial.reshape(-1, groups, flat[1]),
        quantized.scale.reshape(groups, flat[1]).astype(self.dtype),
      ).reshape(*x.shape[:-1], flat[1])
    elif rows <= GROUPED_MATMUL_MAX_ROWS:
      # Sub-channel groups (int4), a decode step of more images: contract each group with its
      # int4 block, then scale and sum the groups, y = sum_g (x_g @ q_g) * s_g, so no dequantized
      # kernel is built first (benchmarks/int4_matmul_forms.py: 1.49x the int4 bytes against
      # 11.7x for the dequantized kernel, and G times fewer FLOPs than the masked form).
      xg = x.reshape(*x.shape[:-1], groups, flat[0] // groups)
      qg = quantized.qvalue.reshape(groups, flat[0] // groups, flat[1]).astype(self.dtype)
      partial = jnp.einsum('...gk,gkn->...gn', xg, qg)
      y = jnp.einsum(
        '...gn,gn->...n', partial, quantized.scale.reshape(groups, flat[1]).astype(self.dtype)
      )
    else:  # Many rows (prefill, training): qwix dequantizes the kernel once for the matmul.
      kernel = quantized.reshape(flat).astype(self.dtype)
      y = qwix.dot_general(x, kernel, (contract, ((), ())))
    if hasattr(self, 'kernel_lora_a'):
      # QLoRA: qwix's adapters (model/lora.py) on a quantized kernel, which qwix cannot intercept.
      low = jnp.tensordot(x, self.kernel_lora_a[...].astype(self.dtype), axes=1)
      low = jnp.tensordot(low, self.kernel_lora_b[...].astype(self.dtype), axes=1)
      y = y + (self.lora_scale * low).reshape(y.shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype).reshape(flat[1])
    return y.reshape(*y.shape[:-1], *self.out_shape)


# Up to this many rows an int4 (grouped) matmul contracts group by group instead of dequantizing
# the kernel: at decode the dequantized bf16 copy written and read on every token is ~12x the int4
# weights' bytes; at prefill the (rows, groups, outputs) partials would be the larger cost.
GROUPED_MATMUL_MAX_ROWS = 64
# Up to this many masked rows (rows x groups) the int4 matmul masks rows per group (one 2-D matmul):
# its FLOPs grow with rows x groups, so wider contractions or more rows go to the grouped form.
MASKED_MATMUL_MAX_ROWS = 128


def unbox_quantized(value: qwix.QArray) -> qwix.QArray:
  """A QArray whose leaves are Variables (as stored in a module) -> the same QArray of arrays."""
  return jax.tree.map(lambda leaf: leaf[...], value, is_leaf=lambda x: isinstance(x, nnx.Variable))


def embed_lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
  """embed(ids): ids (...) int -> (..., D) in the module's dtype; a quantized table (per-row
  scales) is gathered row-wise and dequantized by qwix."""
  if not isinstance(embed.embedding, qwix.QArray):
    return embed(ids)
  rows = unbox_quantized(embed.embedding)[ids]
  return qwix.dequantize(rows).astype(embed.dtype)


def embed_attend(embed: nnx.Embed, query: jax.Array) -> jax.Array:
  """embed.attend(query): (..., D) -> (..., V) logits against the (possibly quantized) table."""
  if not isinstance(embed.embedding, qwix.QArray):
    return embed.attend(query)
  table = unbox_quantized(embed.embedding).astype(embed.dtype)
  return qwix.dot_general(query.astype(embed.dtype), table, (((query.ndim - 1,), (1,)), ((), ())))


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast to the input dtype, then * weight (official order)."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(
      x.dtype
    )
    return normed * self.weight[...].astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with affine `weight`/`bias` (torch names), eps 1e-6, float32 statistics."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.eps) * self.weight[...].astype(x.dtype) + self.bias[...].astype(
      x.dtype
    )


def create_stack(factory: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `num` copies of `factory(rngs)` with independent RNG streams, stacked on a leading
  axis whose logical name is `layers` (one module whose params have shape (num, ...))."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def build(layer_rngs: nnx.Rngs) -> nnx.Module:
    return factory(layer_rngs)

  return build(rngs)


def scan_stack(
  stack: nnx.Module,
  body: Callable,
  carry,
  xs=None,
  remat_policy: str = 'none',
  unroll: bool = False,
):
  """Applies a stacked module layer by layer with `lax.scan` (compile time independent of depth).

  body(layer_module, carry, x) -> (carry, y); `xs` (optional) is scanned alongside the layers.
  unroll=True unrolls the scan (the compiler's cost analysis then counts every layer).
  """
  graphdef, stacked_state = nnx.split(stack)

  def step(carry, layer_and_x):
    layer_state, x = layer_and_x
    return body(nnx.merge(graphdef, layer_state), carry, x)

  if remat_policy != 'none':
    # Inside a scan the loop boundary keeps XLA from merging the recomputation with the forward;
    # unrolled layers need the optimisation barriers of prevent_cse (else remat costs vanish).
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=unroll)
  return jax.lax.scan(step, carry, (stacked_state, xs), unroll=unroll)
