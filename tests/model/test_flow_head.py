"""The flow-matching head against a numpy reference of docs/model.md §5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testing import randomize
from nextstep_jax.model import flow_head as FH

EMBED_ATOL = 2e-6  # float32 cos/sin of arguments <= 1 vs float64: a few ulps.
HEAD_RTOL = 2e-5  # float32 head (2 blocks, width 32) vs float64 numpy: accumulated rounding.
HEAD_ATOL = 2e-5  # Same, for entries near 0.
INIT_STD_RTOL = 0.25  # Sample std of >= 1000 draws is within ~5% of the true std; loose margin.

T_DIM, C_DIM, WIDTH, DEPTH = 12, 20, 32, 2


def head_config(**kw):
  return FH.FlowHeadConfig(
    token_dim=T_DIM,
    cond_dim=C_DIM,
    width=WIDTH,
    depth=DEPTH,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    **kw,
  )


def np_params(module):
  return {
    '.'.join(map(str, p)): np.asarray(v.get_value(), np.float64)
    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
  }


def np_timestep_embedding(t):
  k = np.arange(128, dtype=np.float64)
  f = np.exp(-math.log(1e4) * k / 128)
  a = np.asarray(t, np.float64)[:, None] * f[None]
  return np.concatenate([np.cos(a), np.sin(a)], axis=-1)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_layer_norm(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps)


def np_head(p, x_t, t, c):
  """§5 written out: y = time_embed(t) + cond_embed(c); x = input_proj(x_t); AdaLN blocks with
  (shift, scale, gate); final layer (shift, scale) on a non-affine LayerNorm."""
  lin = lambda x, name, i=None: (
    x @ (p[name + '.kernel'] if i is None else p[name + '.kernel'][i])
    + (p[name + '.bias'] if i is None else p[name + '.bias'][i])
  )
  temb = lin(np_silu(lin(np_timestep_embedding(t), 'time_embed.mlp_0')), 'time_embed.mlp_2')
  y = temb + lin(c, 'cond_embed')
  x = lin(x_t, 'input_proj')
  ya = np_silu(y)
  for i in range(DEPTH):
    mod = lin(ya, 'res_blocks.adaLN_modulation_1', i)
    shift, scale, gate = mod[:, :WIDTH], mod[:, WIDTH : 2 * WIDTH], mod[:, 2 * WIDTH :]
    h = np_layer_norm(x) * p['res_blocks.in_ln.weight'][i] + p['res_blocks.in_ln.bias'][i]
    h = h * (1 + scale) + shift
    x = x + gate * lin(np_silu(lin(h, 'res_blocks.mlp_0', i)), 'res_blocks.mlp_2', i)
  mod = lin(ya, 'final_layer.adaLN_modulation_1')
  shift, scale = mod[:, :WIDTH], mod[:, WIDTH:]
  return lin(np_layer_norm(x) * (1 + scale) + shift, 'final_layer.linear')


def inputs(m=5, seed=0):
  rng = np.random.default_rng(seed)
  x_t = rng.standard_normal((m, T_DIM)).astype(np.float32)
  t = np.concatenate([[0.0, 1.0], rng.uniform(0, 1, m - 2)]).astype(np.float32)
  c = rng.standard_normal((m, C_DIM)).astype(np.float32)
  return x_t, t, c


def test_timestep_embedding():
  t = np.array([0.0, 0.25, 0.9609375, 1.0], np.float32)
  emb = np.asarray(FH.timestep_embedding(jnp.asarray(t)))
  assert emb.shape == (4, 256) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, np_timestep_embedding(t), atol=EMBED_ATOL)
  # cos first: t = 0 gives [1 ... 1, 0 ... 0].
  np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])
  # Raw t (no x1000): the fastest frequency is 1, so cos(t) at k = 0.
  np.testing.assert_allclose(emb[:, 0], np.cos(t), atol=EMBED_ATOL)
  np.testing.assert_allclose(emb[:, 128], np.sin(t), atol=EMBED_ATOL)


def test_zero_init_gives_zero_velocity():
  head = FH.FlowHead(head_config(), rngs=nnx.Rngs(0))
  p = np_params(head)
  for name in (
    'res_blocks.adaLN_modulation_1',
    'final_layer.adaLN_modulation_1',
    'final_layer.linear',
  ):
    assert not p[name + '.kernel'].any() and not p[name + '.bias'].any(), name
  for name in (
    'time_embed.mlp_0',
    'time_embed.mlp_2',
    'cond_embed',
    'input_proj',
    'res_blocks.mlp_0',
    'res_blocks.mlp_2',
  ):
    assert not p[name + '.bias'].any(), name  # Biases 0.
  for name in ('time_embed.mlp_0', 'time_embed.mlp_2'):
    assert p[name + '.kernel'].std() == pytest.approx(0.02, rel=INIT_STD_RTOL), name
  # xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
  bound = math.sqrt(6 / (C_DIM + WIDTH))
  assert np.abs(p['cond_embed.kernel']).max() <= bound
  assert p['cond_embed.kernel'].std() == pytest.approx(bound / math.sqrt(3), rel=INIT_STD_RTOL)
  np.testing.assert_array_equal(p['res_blocks.in_ln.weight'], 1.0)
  x_t, t, c = inputs()
  out = head(jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(c))
  assert out.shape == (5, T_DIM) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_head_matches_numpy_reference():
  head = FH.FlowHead(head_config(), rngs=nnx.Rngs(1))
  randomize(head, seed=2, std=0.2)
  p = np_params(head)
  assert len(p) == 20  # Every param of §5 (affine in_ln; no norm_final params).
  x_t, t, c = inputs(7)
  out = np.asarray(head(jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(c)))
  ref = np_head(p, x_t, t, c)
  assert np.abs(ref).mean() > 0.1  # Non-trivial outputs.
  np.testing.assert_allclose(out, ref, rtol=HEAD_RTOL, atol=HEAD_ATOL)
  # The split entry points agree with __call__.
  split = head.velocity_from_condition(
    jnp.asarray(x_t), jnp.asarray(t), head.condition(jnp.asarray(c))
  )
  np.testing.assert_allclose(np.asarray(split), out, rtol=HEAD_RTOL, atol=HEAD_ATOL)
  # Each input matters.
  for i, arr in enumerate((x_t, t, c)):
    args = [x_t, t, c]
    args[i] = arr + 0.5
    assert np.abs(np.asarray(head(*map(jnp.asarray, args))) - out).max() > 1e-3


def test_adaln_chunk_order_matters():
  """Swapping the (shift, scale, gate) chunks of block 0 must change the output (so the reference
  comparison above really checks the order)."""
  head = FH.FlowHead(head_config(), rngs=nnx.Rngs(3))
  randomize(head, seed=4, std=0.2)
  p = np_params(head)
  x_t, t, c = inputs(4, seed=1)
  q = dict(p)
  k = p['res_blocks.adaLN_modulation_1.kernel'].copy()
  k[:, :, :WIDTH], k[:, :, WIDTH : 2 * WIDTH] = (
    p['res_blocks.adaLN_modulation_1.kernel'][:, :, WIDTH : 2 * WIDTH],
    p['res_blocks.adaLN_modulation_1.kernel'][:, :, :WIDTH],
  )
  q['res_blocks.adaLN_modulation_1.kernel'] = k
  assert np.abs(np_head(q, x_t, t, c) - np_head(p, x_t, t, c)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_policy_same_output(policy):
  base = FH.FlowHead(head_config(), rngs=nnx.Rngs(5))
  randomize(base, seed=6, std=0.2)
  other = FH.FlowHead(head_config(remat_policy=policy), rngs=nnx.Rngs(5))
  nnx.update(other, nnx.state(base, nnx.Param))
  x_t, t, c = map(jnp.asarray, inputs(3, seed=2))
  loss = lambda m: jnp.sum(jnp.sin(m(x_t, t, c)))
  g_base = nnx.jit(nnx.grad(loss))(base)
  g_other = nnx.jit(nnx.grad(loss))(other)
  np.testing.assert_allclose(
    np.asarray(other(x_t, t, c)), np.asarray(base(x_t, t, c)), rtol=HEAD_RTOL, atol=HEAD_ATOL
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=HEAD_RTOL, atol=HEAD_ATOL), g_other, g_base
  )


# ----- few-step heads: the zero-initialised step-size embedding -----


@pytest.mark.slow
def test_step_conditioning_starts_as_the_official_head():
  """An official head's params copied into a step-conditioned head: same velocity for any d; the
  new params are exactly `step_embed.*` with a zero output layer."""
  official = randomize(FH.FlowHead(head_config(), rngs=nnx.Rngs(0)), seed=3)
  stepped = FH.FlowHead(head_config(step_cond=True), rngs=nnx.Rngs(1))
  flat = dict(nnx.to_flat_state(nnx.state(stepped, nnx.Param)))
  official_flat = dict(nnx.to_flat_state(nnx.state(official, nnx.Param)))
  assert set(flat) - set(official_flat) == {p for p in flat if p[0] == 'step_embed'}
  assert not np.any(np.asarray(stepped.step_embed.mlp_2.kernel.get_value()))
  for path, var in official_flat.items():
    flat[path].set_value(var.get_value())
  nnx.update(stepped, nnx.from_flat_state(flat))
  rng = np.random.default_rng(0)
  x, c = rng.standard_normal((5, T_DIM)), rng.standard_normal((5, C_DIM))
  t = rng.uniform(0, 1, 5)
  want = np.asarray(
    official(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(c, jnp.float32))
  )
  for d in (None, 0.0, 0.25, 1.0):
    step = None if d is None else jnp.full((5,), d, jnp.float32)
    got = np.asarray(
      stepped(
        jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(c, jnp.float32), step
      )
    )
    np.testing.assert_array_equal(got, want)


def test_step_size_changes_a_trained_step_embedding():
  head = randomize(FH.FlowHead(head_config(step_cond=True), rngs=nnx.Rngs(0)), seed=4)
  x, c, t = jnp.ones((2, T_DIM)), jnp.ones((2, C_DIM)), jnp.full((2,), 0.3)
  v_small, v_big = head(x, t, c, jnp.full((2,), 0.125)), head(x, t, c, jnp.full((2,), 1.0))
  assert np.abs(np.asarray(v_small - v_big)).max() > 1e-3


def test_scalar_time_equals_per_row_time():
  """t of shape () (embedded once per step, the sampler's path) equals t broadcast to rows."""
  head = randomize(FH.FlowHead(head_config(), rngs=nnx.Rngs(0)), seed=5)
  x, c = (
    jnp.asarray(np.random.default_rng(1).standard_normal((4, T_DIM)), jnp.float32),
    jnp.ones((4, C_DIM)),
  )
  cond_emb = head.condition(c)
  np.testing.assert_array_equal(
    np.asarray(head.velocity_from_condition(x, jnp.float32(0.7), cond_emb)),
    np.asarray(head.velocity_from_condition(x, jnp.full((4,), 0.7), cond_emb)),
  )


def test_step_modulations_give_the_velocity_of_each_point():
  """The sampler's split of the head (adaLN of every block and the final layer tabulated for E
  (t, d) points, then the x-path per point) equals the one-call velocity at each point, for a
  step-conditioned head with random weights (float32, same operations in another order)."""
  head = FH.FlowHead(head_config(step_cond=True), rngs=nnx.Rngs(3))
  randomize(head, seed=4)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((5, T_DIM)), jnp.float32)
  cond_emb = head.condition(jnp.asarray(rng.standard_normal((5, C_DIM)), jnp.float32))
  t, d = jnp.asarray([0.0, 0.37, 0.9]), jnp.asarray([0.37, 0.53, 0.04])
  table = head.step_modulations(t, cond_emb, d)
  assert table['blocks'].shape == (3, DEPTH, 5, 3 * WIDTH) and table['final'].shape == (
    3,
    5,
    2 * WIDTH,
  )
  for e in range(3):
    split = head.velocity_from_modulations(x, jax.tree.map(lambda a, e=e: a[e], table))
    np.testing.assert_allclose(
      np.asarray(split),
      np.asarray(head.velocity_from_condition(x, t[e], cond_emb, d[e])),
      rtol=HEAD_RTOL,
      atol=HEAD_ATOL,
    )
