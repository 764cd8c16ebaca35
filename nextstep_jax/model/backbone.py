"""Qwen2/Llama-style causal decoder with RoPE, grouped-query attention and a fixed-size KV cache.

Dimension letters: B batch, L query length, S key length (cache slots), D hidden, H query heads,
K kv heads, G = H / K query heads per kv head, E head_dim, F mlp width.

Official names (torch `layers.N.*`) map onto the stacked params here (`layers.*`, leading axis N):
  self_attn.{q,k,v}_proj.weight (out, D) -> self_attn.{q,k,v}_proj.kernel (D, heads, E) = W.T
  self_attn.{q,k,v}_proj.bias (out,)     -> .bias (heads, E)
  self_attn.o_proj.weight (D, H*E)       -> self_attn.o_proj.kernel (H*E, D) = W.T
  mlp.{gate,up,down}_proj.weight         -> mlp.{gate,up,down}_proj.kernel = W.T
  input_layernorm / post_attention_layernorm .weight -> same names.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import nn as L
from nextstep_jax.model import attention as attention_lib

MASK_VALUE = -1e30  # Finite, so fully-masked (all-pad) rows stay finite.


class KVCache(NamedTuple):
  """Fixed-size cache for all layers: k, v (layers, B, S, K, E); key_valid (B, S) bool marks
  slots holding real tokens (False for left padding and not yet written slots); index () int32 is
  the next slot to write."""

  k: jax.Array
  v: jax.Array
  key_valid: jax.Array
  index: jax.Array


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float
  rope_theta: float
  attention_bias: bool
  o_attention_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  remat_policy: str
  attention: str = 'xla'  # Full-sequence passes: 'xla' or 'splash' (attention.py); decode: XLA.
  mesh_rules: tuple = ()  # Logical-axis rules (config.mesh.rules) for splash's shard_map.
  scan_unroll: bool = False  # Unroll the layer scan (exact compiler cost analysis; AOT only).


def rope_cos_sin(
  positions: jax.Array, head_dim: int, theta: float, dtype
) -> tuple[jax.Array, jax.Array]:
  """positions (B, L) int -> cos, sin (B, L, E): inv_freq_i = theta^(-2i/E), angles duplicated."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x (B, L, heads, E); cos/sin (B, L, E)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
  """GQA self-attention; query head j reads kv head j // G."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.q_proj = L.Dense(
      d, (h, e), ('embed', 'heads', 'head_dim'), use_bias=cfg.attention_bias, **kw
    )
    self.k_proj = L.Dense(
      d, (k, e), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.attention_bias, **kw
    )
    self.v_proj = L.Dense(
      d, (k, e), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.attention_bias, **kw
    )
    self.o_proj = L.Dense(h * e, d, ('heads', 'embed'), use_bias=cfg.o_attention_bias, **kw)
    # o_proj's kernel is stored (H*E, D) = W.T (heads-major rows: row j*E + e is head j, dim e).

  def __call__(self, x, cos, sin, cached, own):
    """x (B, L, D). own = (k, v, valid): this call's keys and values (B, L, K, E) and (B, L) bool,
    attended causally; cached = None or (k, v, valid): the cache's earlier slots (B, S, K, E) and
    (B, S) bool (False for padding and for slots this call writes). The cache is read as it was
    before this call's write, so a decode step reads each layer's slots straight from the stacked
    cache (no per-layer copy of the updated cache). Returns (B, L, D)."""
    cfg = self.cfg
    b, l, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = L.constrain(
      apply_rope(self.q_proj(x), cos, sin), cfg.mesh_rules, 'batch', 'length', 'heads', 'head_dim'
    )
    q = q.reshape(b, l, cfg.num_kv_heads, groups, cfg.head_dim)
    sources = ([] if cached is None else [cached]) + [own]
    causal = jnp.tril(jnp.ones((l, l), bool))
    masks = ([] if cached is None else [cached[2][:, None, :]]) + [own[2][:, None, :] & causal]
    scores = jnp.concatenate(
      [
        jnp.where(
          allowed[:, None, None],  # (B, 1, 1, L, S)
          jnp.einsum('blkge,bske->bkgls', q, k.astype(q.dtype)).astype(jnp.float32),
          MASK_VALUE,
        )
        for (k, _, _), allowed in zip(sources, masks)
      ],
      axis=-1,
    )
    probs = jax.nn.softmax(scores * (cfg.head_dim**-0.5), axis=-1)
    out, start = 0.0, 0
    for _, v, _ in sources:
      part = probs[..., start : start + v.shape[1]].astype(v.dtype)
      out = out + jnp.einsum('bkgls,bske->blkge', part, v).astype(jnp.float32)
      start += v.shape[1]
    out = out.reshape(b, l, cfg.num_heads * cfg.head_dim)
    return self.o_proj(out.astype(cfg.dtype))

  def attend_sequence(self, x, cos, sin, k, v, token_valid):
    """Full causal pass of splash attention over this call's own keys: x (B, L, D), k/v rotated
    (B, L, K, E), token_valid (B, L). Returns (B, L, D)."""
    cfg = self.cfg
    b, l, _ = x.shape
    q = L.constrain(
      apply_rope(self.q_proj(x), cos, sin), cfg.mesh_rules, 'batch', 'length', 'heads', 'head_dim'
    )
    out = attention_lib.splash_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), token_valid, cfg.mesh_rules
    )
    return self.o_proj(out.reshape(b, l, cfg.num_heads * cfg.head_dim).astype(cfg.dtype))

  def project_kv(self, x, cos, sin):
    """x (B, L, D) -> rotated keys and values (B, L, K, E)."""
    axes = (self.cfg.mesh_rules, 'batch', 'length', 'kv_heads', 'head_dim')
    return L.constrain(apply_rope(self.k_proj(x), cos, sin), *axes), L.constrain(
      self.v_proj(x), *axes
    )


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.rules = cfg.mesh_rules
    self.gate_proj = L.Dense(cfg.hidden_size, cfg.intermediate_size, ('embed', 'mlp'), **kw)
    self.up_proj = L.Dense(cfg.hidden_size, cfg.intermediate_size, ('embed', 'mlp'), **kw)
    self.down_proj = L.Dense(cfg.intermediate_size, cfg.hidden_size, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    hidden = L.constrain(
      jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), self.rules, 'batch', 'length', 'mlp'
    )
    return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
  """h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = L.RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
    )
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = L.RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
    )
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(
    self,
    x,
    cos,
    sin,
    kv,
    layer_index,
    key_valid,
    write_index,
    token_valid,
    read_slots=None,
  ):
    """One layer on x (B, L, D). kv: None (no cache) or the stacked caches (k, v), each (layers,
    B, S, K, E): attention reads this layer's first `read_slots` slots as they were before this
    call (None: all S; they must cover every slot written so far) plus this call's own keys, then
    this call's K/V are written in place at [layer_index, :, write_index] (a scalar: every row
    writes the same slots). key_valid (B, S): the cache's valid slots, this call's included.
    With attention='splash' a multi-token call attends only its own keys (token_valid (B, L)):
    without caches (training) or as the first call on an empty cache (prefill)."""
    normed = self.input_layernorm(x)
    k_new, v_new = self.self_attn.project_kv(normed, cos, sin)
    splash = self.self_attn.cfg.attention == 'splash' and x.shape[1] > 1
    if splash:
      attended = self.self_attn.attend_sequence(normed, cos, sin, k_new, v_new, token_valid)
    if kv is not None:  # This call's keys as the cache stores them.
      k_new, v_new = k_new.astype(kv[0].dtype), v_new.astype(kv[1].dtype)
    if not splash:
      cached = (
        None if kv is None else _earlier_slots(kv, layer_index, key_valid, write_index, read_slots)
      )
      attended = self.self_attn(normed, cos, sin, cached, (k_new, v_new, token_valid))
    if kv is not None:
      # The write below must follow this layer's read of the cache: through the barrier the
      # updated caches depend on the attention output, so XLA updates them in place instead of
      # copying both whole stacked caches to keep the value read (seen on a TPU int4 compile:
      # 50 copies of the 303 MB cache per token).
      attended, kv = jax.lax.optimization_barrier((attended, kv))
      at = (layer_index, 0, write_index, 0, 0)
      kv = tuple(
        jax.lax.dynamic_update_slice(c, new[None], at) for c, new in zip(kv, (k_new, v_new))
      )
    rules = self.self_attn.cfg.mesh_rules
    h = L.constrain(x + attended, rules, 'batch', 'length', 'embed')
    out = L.constrain(
      h + self.mlp(self.post_attention_layernorm(h)), rules, 'batch', 'length', 'embed'
    )
    return out, kv


def _earlier_slots(kv, layer_index, key_valid, write_index, read_slots):
  """Layer `layer_index`'s first `read_slots` (None: all) cache slots as (k, v, valid): k/v
  (B, S, K, E) sliced from the stacked caches, valid (B, S) only for slots before `write_index`."""
  k_all, v_all = kv
  read = k_all.shape[2] if read_slots is None else read_slots
  window = (1,) + k_all.shape[1:2] + (read,) + k_all.shape[3:]
  start = (layer_index, 0, 0, 0, 0)
  return (
    jax.lax.dynamic_slice(k_all, start, window)[0],
    jax.lax.dynamic_slice(v_all, start, window)[0],
    key_valid[:, :read] & (jnp.arange(read) < write_index)[None],
  )


class Decoder(nnx.Module):
  """Stacked decoder layers plus the final RMSNorm `norm` (embeddings live in the NextStep model)."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layers = L.create_stack(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
    self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """Empty cache of `max_len` slots (nothing valid, index 0)."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return KVCache(
      jnp.zeros(shape, dtype),
      jnp.zeros(shape, dtype),
      jnp.zeros((batch, max_len), bool),
      jnp.zeros((), jnp.int32),
    )

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    token_valid: jax.Array,
    cache: KVCache | None = None,
    read_slots: int | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """x (B, L, D) embeddings; positions (B, L) RoPE positions; token_valid (B, L) bool (False
    for padding). Without a cache: full causal pass. With a cache: the L tokens occupy slots
    [index, index + L) and attend to every valid earlier slot; the stacked cache rides in the
    layer scan's carry and each layer writes only its new slots (no copy of the cache).
    read_slots (static): attend only the cache's first slots (a decoder step that knows the
    filled part statically: index + L <= read_slots). With cfg.attention='splash' a multi-token
    call runs the splash kernel over its own tokens, so with a cache it must be the first call on
    an empty cache (the sampler's prefill); single-token decode steps use XLA.
    Returns (RMSNorm(h) (B, L, D), cache)."""
    cfg = self.cfg
    b, l, _ = x.shape
    write_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    key_valid = (
      token_valid
      if cache is None
      else jax.lax.dynamic_update_slice_in_dim(cache.key_valid, token_valid, write_index, axis=1)
    )
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

    def body(layer, carry, layer_index):
      h, kv = carry
      h, kv = layer(h, cos, sin, kv, layer_index, key_valid, write_index, token_valid, read_slots)
      return (h, kv), None

    kv = None if cache is None else (cache.k, cache.v)
    (h, kv), _ = L.scan_stack(
      self.layers,
      body,
      (x.astype(cfg.dtype), kv),
      jnp.arange(cfg.num_layers, dtype=jnp.int32),
      cfg.remat_policy,
      unroll=cfg.scan_unroll,
    )
    out = self.norm(h)
    if cache is None:
      return out, None
    return out, KVCache(kv[0], kv[1], key_valid, write_index + l)
