"""Causal self-attention over a whole sequence with the Pallas TPU splash kernel.

Letters: B batch, L length, H query heads, K kv heads (GQA: query head j reads kv head j // (H/K)),
E head_dim. `splash_attention` takes q (B, L, H, E) (RoPE applied, not scaled), k, v (B, L, K, E) and
token_valid (B, L) bool; valid query i attends key j iff j <= i and j is a valid token (the
XLA path in backbone.py computes the same). Outputs at padding tokens are don't-care: their keys
are never read by a valid query.

`splash_attention` runs `jax.experimental.pallas.ops.tpu.splash_attention` (causal mask, padding
as segment ids: valid tokens 1, padding 0) per example. Under a mesh (`jax.set_mesh`) it is wrapped
in `shard_map`: batch over the mesh axes of the logical `batch` axis and heads over those of
`heads` / `kv_heads` (`config.mesh.rules`); the sequence stays whole on every device. The
sequence is zero-padded to a multiple of the kernel's block (128). On CPU the kernel runs in
Pallas interpret mode (tests); on TPU (including AOT compilation for a TPU topology) compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from nextstep_jax.parallel import rules as rules_lib

IMPLEMENTATIONS = ('xla', 'splash')
SPLASH_BLOCK = 128  # The kernel's sequence tile (the minimum the TPU lane width allows).


def splash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, token_valid: jax.Array, rules: rules_lib.Rules = ()
) -> jax.Array:
  """The splash kernel (see module docstring). rules: logical-axis rules for the mesh in context
  (required when that mesh has more than one device). Returns (B, L, H, E) in q's dtype."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = mesh.abstract_device.platform if not mesh.empty else jax.default_backend()
  run = functools.partial(_splash_local, interpret=platform != 'tpu')
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, token_valid)
  if not rules:
    raise ValueError(
      'splash attention under a multi-device mesh needs the logical-axis rules '
      '(config.mesh.rules) to shard batch and heads; pass them via ModelConfig.'
    )
  q_spec = rules_lib.logical_to_spec(('batch', None, 'heads', None), rules)
  kv_spec = rules_lib.logical_to_spec(('batch', None, 'kv_heads', None), rules)
  valid_spec = PartitionSpec(q_spec[0], None)
  for name, array, spec in (('query heads', q, q_spec), ('kv heads', k, kv_spec)):
    for dim in (0, 2):
      axes = (spec[dim],) if isinstance(spec[dim], str) else (spec[dim] or ())
      split = int(np.prod([mesh.shape[axis] for axis in axes]))
      if array.shape[dim] % split:
        raise ValueError(
          f'splash attention: {"batch" if dim == 0 else name} size {array.shape[dim]} is not '
          f'divisible by mesh axes {axes} (size {split}); change the batch per step, the '
          'head counts, or the mesh / rules (or use model.attention=xla).'
        )
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, valid_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, token_valid)


def _splash_local(q, k, v, token_valid, *, interpret: bool):
  """Splash on this device's examples and heads: q (b, L, h, E), k/v (b, L, k, E)."""
  b, l, h, e = q.shape
  padded = -(-l // SPLASH_BLOCK) * SPLASH_BLOCK
  pad = ((0, 0), (0, padded - l), (0, 0), (0, 0))
  # Heads-major (b, heads, L, E), as the kernel takes them; the 1/sqrt(E) scale goes on q.
  q, k, v = (
    jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q * jnp.asarray(e**-0.5, q.dtype), k, v)
  )
  segments = jnp.pad(token_valid.astype(jnp.int32), ((0, 0), (0, padded - l)))
  kernel = _causal_kernel(h, padded, interpret)
  out = jax.vmap(
    lambda qi, ki, vi, si: kernel(qi, ki, vi, segment_ids=splash.SegmentIds(q=si, kv=si))
  )(q, k.astype(q.dtype), v.astype(q.dtype), segments)
  return out.transpose(0, 2, 1, 3)[:, :l]


@functools.lru_cache(maxsize=32)
def _causal_kernel(num_heads: int, length: int, interpret: bool):
  """A causal splash kernel for `num_heads` heads of `length` (a multiple of SPLASH_BLOCK)."""
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * num_heads)
  block = max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return splash.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
