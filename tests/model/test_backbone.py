"""The Qwen2-style decoder (docs/model.md §1): RoPE, GQA attention, RMSNorm, KV cache, padding, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from model_testing import randomize
from nextstep_jax import nn as L
from nextstep_jax.model import backbone as BB

ROPE_ATOL = 1e-5  # float32 cos/sin of angles up to ~40 rad (positions < 40) vs float64.
REF_RTOL = 1e-4  # float32 attention / decoder vs float64 numpy: softmax + 2 layers of rounding.
REF_ATOL = 1e-5  # Same, for entries near 0.
CACHE_ATOL = 2e-5  # Cached vs full forward: same math, different matmul shapes / reduction order.
PAD_ATOL = 2e-5  # Padded vs unpadded row: pads get exactly 0 weight (exp(-1e30)); RoPE relative
#                  only up to float32 rounding of angles at shifted positions.
REMAT_ATOL = 1e-5  # Remat recomputes the same float32 ops but XLA may fuse / reorder them:
#                   ~1e-6 relative to the largest gradient entries (~5).

CFG = BB.BackboneConfig(
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=96,
  rms_norm_eps=1e-5,
  rope_theta=1e4,
  attention_bias=True,
  o_attention_bias=False,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  remat_policy='none',
)


@pytest.fixture(scope='module')
def decoder():
  return randomize(BB.Decoder(CFG, rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(scope='module')
def forward():
  return nnx.jit(lambda m, x, pos, valid: m(x, pos, valid)[0])


@pytest.fixture(scope='module')
def cached_forward():
  return nnx.jit(lambda m, x, pos, valid, cache: m(x, pos, valid, cache))


def np_params(module):
  return {
    '.'.join(map(str, p)): np.asarray(v.get_value(), np.float64)
    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
  }


# ----- numpy references -----


def np_rope(x, positions, theta):
  """Rotate-half RoPE: x (B, L, heads, E), positions (B, L)."""
  e = x.shape[-1]
  inv_freq = theta ** (-2.0 * np.arange(e // 2) / e)
  ang = np.asarray(positions, np.float64)[..., None] * inv_freq
  ang = np.concatenate([ang, ang], -1)[:, :, None, :]
  rot = np.concatenate([-x[..., e // 2 :], x[..., : e // 2]], -1)
  return x * np.cos(ang) + rot * np.sin(ang)


def np_rms_norm(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_attention(p, x, positions, key_valid, cfg=CFG, prefix='', kv_of=None):
  """GQA: query head j uses kv head kv_of(j) = j // G; scale 1/sqrt(E); causal & key mask
  (finite -1e30)."""
  get = lambda n: p[prefix + n]
  b, l, _ = x.shape
  h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = h // k
  kv_of = kv_of or (lambda j: j // g)
  q = np.einsum('bld,dhe->blhe', x, get('q_proj.kernel')) + get('q_proj.bias')
  kk = np.einsum('bld,dhe->blhe', x, get('k_proj.kernel')) + get('k_proj.bias')
  v = np.einsum('bld,dhe->blhe', x, get('v_proj.kernel')) + get('v_proj.bias')
  q, kk = np_rope(q, positions, cfg.rope_theta), np_rope(kk, positions, cfg.rope_theta)
  out = np.zeros((b, l, h, e))
  causal = np.tril(np.ones((l, l), bool))
  for j in range(h):
    s = np.einsum('bie,bje->bij', q[:, :, j], kk[:, :, kv_of(j)]) / np.sqrt(e)
    allowed = causal[None] & key_valid[:, None, :]
    s = np.where(allowed, s, -1e30)
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(-1, keepdims=True)
    out[:, :, j] = np.einsum('bij,bje->bie', w, v[:, :, kv_of(j)])
  return out.reshape(b, l, h * e) @ get('o_proj.kernel')


def np_decoder(p, x, positions, key_valid, cfg=CFG):
  """Pre-norm blocks h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h)); final RMSNorm."""
  silu = lambda z: z / (1 + np.exp(-z))
  for i in range(cfg.num_layers):
    lp = {k[len('layers.') :]: v[i] for k, v in p.items() if k.startswith('layers.')}
    n = np_rms_norm(x, lp['input_layernorm.weight'], cfg.rms_norm_eps)
    h = x + np_attention(lp, n, positions, key_valid, prefix='self_attn.')
    n = np_rms_norm(h, lp['post_attention_layernorm.weight'], cfg.rms_norm_eps)
    x = (
      h
      + (silu(n @ lp['mlp.gate_proj.kernel']) * (n @ lp['mlp.up_proj.kernel']))
      @ lp['mlp.down_proj.kernel']
    )
  return np_rms_norm(x, p['norm.weight'], cfg.rms_norm_eps)


def random_inputs(b, l, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((b, l, CFG.hidden_size)).astype(np.float32)


# ----- RoPE -----


def test_rope_matches_rotate_half_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
  positions = np.array([np.arange(7), np.arange(30, 37)], np.int32)
  cos, sin = BB.rope_cos_sin(jnp.asarray(positions), 16, 1e6, jnp.float32)
  assert cos.shape == (2, 7, 16)
  out = np.asarray(BB.apply_rope(jnp.asarray(x), cos, sin))
  np.testing.assert_allclose(out, np_rope(x.astype(np.float64), positions, 1e6), atol=ROPE_ATOL)
  # Not interleaved: frequency i acts on the pair (i, i + E/2).
  np.testing.assert_allclose(np.asarray(cos)[..., :8], np.asarray(cos)[..., 8:])
  np.testing.assert_array_equal(out[0, 0], x[0, 0])  # Position 0 is the identity.


def test_rope_is_relative():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)

  def dot(pq, pk):
    cq, sq = BB.rope_cos_sin(jnp.array([[pq]]), 16, 1e4, jnp.float32)
    ck, sk = BB.rope_cos_sin(jnp.array([[pk]]), 16, 1e4, jnp.float32)
    return float(
      jnp.sum(BB.apply_rope(jnp.asarray(q), cq, sq) * BB.apply_rope(jnp.asarray(k), ck, sk))
    )

  assert dot(9, 4) == pytest.approx(dot(5, 0), abs=ROPE_ATOL)
  assert dot(9, 4) != pytest.approx(dot(9, 3), abs=1e-3)


# ----- RMSNorm -----


def test_rms_norm_float32_reference():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 64)).astype(np.float32) * 3
  norm = L.RMSNorm(64, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  w = (1 + rng.standard_normal(64)).astype(np.float32)
  norm.weight.set_value(jnp.asarray(w))
  np.testing.assert_allclose(
    np.asarray(norm(jnp.asarray(x))),
    np_rms_norm(x.astype(np.float64), w, 1e-5),
    rtol=REF_RTOL,
    atol=REF_ATOL,
  )


def test_rms_norm_order_in_bfloat16():
  """§1: normalise in float32, cast to the activation dtype, THEN multiply by the weight in that
  dtype. In bfloat16 this differs (bitwise) from multiplying in float32 and casting once."""
  bf16 = ml_dtypes.bfloat16
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((8, 64)) * 3).astype(bf16)
  w = (1 + rng.standard_normal(64)).astype(bf16)
  norm = L.RMSNorm(64, 1e-5, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  norm.weight.set_value(jnp.asarray(w))
  out = np.asarray(norm(jnp.asarray(x)))
  assert out.dtype == bf16
  x32 = x.astype(np.float32)
  normed = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True, dtype=np.float32) + np.float32(1e-5))
  official = (normed.astype(bf16).astype(np.float32) * w.astype(np.float32)).astype(bf16)
  wrong_order = (normed * w.astype(np.float32)).astype(bf16)
  # One bf16 ulp of slack for the float32 rsqrt vs sqrt + divide before the first rounding.
  ulp = np.abs(official.astype(np.float32)) * 2.0**-7
  diff = np.abs(out.astype(np.float32) - official.astype(np.float32))
  assert np.all(diff <= ulp + 1e-30)
  assert (out == official).mean() > 0.97
  assert (out != wrong_order).any()  # The test distinguishes the two orders.


# ----- attention -----


@pytest.mark.slow
@pytest.mark.parametrize('with_padding', [False, True])
def test_attention_matches_gqa_reference(decoder, with_padding):
  b, l = 2, 9
  x = random_inputs(b, l, seed=4)
  positions = np.broadcast_to(np.arange(l), (b, l)).astype(np.int32)
  key_valid = np.ones((b, l), bool)
  if with_padding:
    key_valid[0, :3] = False  # Left padding.
    key_valid[1, 4] = False  # A hole in the middle.
  p = np_params(decoder)
  lp = {
    k[len('layers.self_attn.') :]: v[0] for k, v in p.items() if k.startswith('layers.self_attn.')
  }
  stacked = decoder.layers.self_attn  # Params (layers, ...): take layer 0.
  attn = nnx.merge(nnx.graphdef(stacked), jax.tree.map(lambda a: a[0], nnx.state(stacked)))
  cos, sin = BB.rope_cos_sin(jnp.asarray(positions), CFG.head_dim, CFG.rope_theta, jnp.float32)
  k, v = attn.project_kv(jnp.asarray(x), cos, sin)
  valid = jnp.asarray(key_valid)
  out = np.asarray(attn(jnp.asarray(x), cos, sin, None, (k, v, valid)))
  ref = np_attention(lp, x.astype(np.float64), positions, key_valid)
  np.testing.assert_allclose(out, ref, rtol=REF_RTOL, atol=REF_ATOL)
  # Queries 5.. attending the first 5 keys as cached slots plus their own keys causally.
  split = np.asarray(
    attn(
      jnp.asarray(x[:, 5:]),
      cos[:, 5:],
      sin[:, 5:],
      (k[:, :5], v[:, :5], valid[:, :5]),
      (k[:, 5:], v[:, 5:], valid[:, 5:]),
    )
  )
  np.testing.assert_allclose(split, ref[:, 5:], rtol=REF_RTOL, atol=REF_ATOL)
  # The reference is sensitive to the GQA mapping: j % K instead of j // G differs.
  interleaved = np_attention(
    lp, x.astype(np.float64), positions, key_valid, kv_of=lambda j: j % CFG.num_kv_heads
  )
  assert np.abs(interleaved - ref).max() > 1e-3


def test_decoder_matches_numpy_reference(decoder, forward):
  b, l = 2, 8
  x = random_inputs(b, l, seed=5)
  positions = np.broadcast_to(np.arange(l), (b, l)).astype(np.int32)
  valid = np.ones((b, l), bool)
  valid[1, :2] = False
  out = np.asarray(forward(decoder, jnp.asarray(x), jnp.asarray(positions), jnp.asarray(valid)))
  ref = np_decoder(np_params(decoder), x.astype(np.float64), positions, valid)
  np.testing.assert_allclose(out, ref, rtol=REF_RTOL, atol=REF_ATOL)


# ----- KV cache -----


@pytest.mark.slow
@pytest.mark.parametrize('prefill, chunks', [(5, [1, 1, 1, 1, 1, 1, 1]), (3, [2, 4, 3]), (1, [11])])
def test_cached_decoding_equals_full_forward(decoder, forward, cached_forward, prefill, chunks):
  b, l = 3, 12
  assert prefill + sum(chunks) == l
  x = jnp.asarray(random_inputs(b, l, seed=6))
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  valid = np.ones((b, l), bool)
  valid[1, :2] = False  # Left-padded row.
  valid = jnp.asarray(valid)
  full = np.asarray(forward(decoder, x, positions, valid))

  cache = decoder.init_cache(b, l + 2)  # Spare slots must stay invisible.
  hidden, cache = cached_forward(
    decoder, x[:, :prefill], positions[:, :prefill], valid[:, :prefill], cache
  )
  outs = [np.asarray(hidden)]
  start = prefill
  for size in chunks:
    sl = slice(start, start + size)
    hidden, cache = cached_forward(decoder, x[:, sl], positions[:, sl], valid[:, sl], cache)
    outs.append(np.asarray(hidden))
    start += size
  assert int(cache.index) == l
  np.testing.assert_array_equal(np.asarray(cache.key_valid)[:, :l], np.asarray(valid))
  assert not np.asarray(cache.key_valid)[:, l:].any()
  cached = np.concatenate(outs, axis=1)
  real = np.asarray(valid)
  np.testing.assert_allclose(cached[real], full[real], atol=CACHE_ATOL, rtol=CACHE_ATOL)
  # Pad queries attend to nothing valid; they are garbage but must be finite.
  assert np.isfinite(cached).all() and np.isfinite(full).all()


# ----- left padding -----


@pytest.mark.slow
@pytest.mark.parametrize('pad', [1, 4])
def test_left_padding_does_not_change_results(decoder, forward, cached_forward, pad):
  n = 7
  rng = np.random.default_rng(7)
  x = random_inputs(1, n, seed=8)
  pads = rng.standard_normal((1, pad, CFG.hidden_size)).astype(np.float32) * 5  # Not zeros.
  x_pad = np.concatenate([pads, x], axis=1)
  valid_pad = np.r_[np.zeros(pad, bool), np.ones(n, bool)][None]
  pos_pad = np.arange(pad + n, dtype=np.int32)[None]  # Raw slots (padding not subtracted).
  plain = np.asarray(
    forward(decoder, jnp.asarray(x), jnp.arange(n, dtype=jnp.int32)[None], jnp.ones((1, n), bool))
  )
  padded = np.asarray(
    forward(decoder, jnp.asarray(x_pad), jnp.asarray(pos_pad), jnp.asarray(valid_pad))
  )
  np.testing.assert_allclose(padded[:, pad:], plain, atol=PAD_ATOL, rtol=PAD_ATOL)
  # Batched with the unpadded row (the sampler's situation) and through the cache.
  # Row 1: the same row with zero pad embeddings.
  x_b = np.concatenate([x_pad, np.concatenate([np.zeros_like(pads), x], axis=1)])
  valid_b = np.concatenate([valid_pad, valid_pad])
  pos_b = np.concatenate([pos_pad, pos_pad])
  cache = decoder.init_cache(2, pad + n)
  split = pad + n - 2
  h1, cache = cached_forward(
    decoder,
    jnp.asarray(x_b[:, :split]),
    jnp.asarray(pos_b[:, :split]),
    jnp.asarray(valid_b[:, :split]),
    cache,
  )
  h2, cache = cached_forward(
    decoder,
    jnp.asarray(x_b[:, split:]),
    jnp.asarray(pos_b[:, split:]),
    jnp.asarray(valid_b[:, split:]),
    cache,
  )
  both = np.concatenate([np.asarray(h1), np.asarray(h2)], axis=1)
  for row in range(2):
    np.testing.assert_allclose(both[row, pad:], plain[0], atol=PAD_ATOL, rtol=PAD_ATOL)


# ----- remat -----


REMAT_B, REMAT_L = 2, 6


def _value_and_grads(model, x):
  positions = jnp.broadcast_to(jnp.arange(REMAT_L, dtype=jnp.int32), (REMAT_B, REMAT_L))
  valid = jnp.ones((REMAT_B, REMAT_L), bool).at[1, 0].set(False)
  weights = jnp.asarray(
    np.random.default_rng(10).standard_normal((REMAT_B, REMAT_L, CFG.hidden_size)), jnp.float32
  )

  def loss(model, x):
    return jnp.sum(model(x, positions, valid)[0] * weights)

  return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(model, x)


@pytest.fixture(scope='module')
def remat_reference(decoder):
  x = jnp.asarray(random_inputs(REMAT_B, REMAT_L, seed=9))
  return x, _value_and_grads(decoder, x)


@pytest.mark.slow
@pytest.mark.parametrize('policy', [p for p in L.REMAT_POLICIES if p != 'none'])
def test_remat_policies_match_none(decoder, remat_reference, policy):
  other = BB.Decoder(dataclasses.replace(CFG, remat_policy=policy), rngs=nnx.Rngs(0))
  nnx.update(other, nnx.state(decoder, nnx.Param))
  x, (v0, (g0, gx0)) = remat_reference
  v1, (g1, gx1) = _value_and_grads(other, x)
  assert float(v1) == pytest.approx(float(v0), rel=REMAT_ATOL, abs=REMAT_ATOL)
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), atol=REMAT_ATOL, rtol=REMAT_ATOL)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=REMAT_ATOL, rtol=REMAT_ATOL), g1, g0
  )
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-3
