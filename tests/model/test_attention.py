"""The Pallas splash attention kernel (interpret mode on CPU) against numpy and the XLA decoder path:
causal, GQA, right-padded training rows, left-padded prompts, gradients, and sharded over a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testing import tiny_model
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.model import attention
from nextstep_jax.model import nextstep as ns

KERNEL_ATOL = 2e-5  # float32 kernel (online softmax over 128-blocks) vs float64 numpy; |out| ~ 1.
DECODER_ATOL = (
  2e-5  # Splash vs XLA decoder (2 layers, float32): only the softmax's blocking differs.
)
GRAD_ATOL = 5e-5  # Gradients through the kernel's backward vs XLA autodiff (|grad| up to ~5).
SHARDED_ATOL = 1e-6  # Same kernel per shard: identical math, rows and heads just distributed.

B, L, H, K, E = 3, 40, 4, 2, 16  # L is not a multiple of the kernel block: exercises its padding.


def validity():
  """Row 0 full, row 1 right-padded (training), row 2 left-padded (sampling prompts)."""
  valid = np.ones((B, L), bool)
  valid[1, 29:] = False
  valid[2, :7] = False
  return valid


def np_attention(q, k, v, valid):
  """float64 causal GQA reference: query i of a valid token attends valid keys j <= i."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k = np.repeat(k, H // K, axis=2)
  v = np.repeat(v, H // K, axis=2)
  scores = np.einsum('blhe,bshe->bhls', q, k) / np.sqrt(E)
  allowed = np.tril(np.ones((L, L), bool))[None] & valid[:, None, :]
  scores = np.where(allowed[:, None], scores, -1e30)  # Padding queries: uniform, never compared.
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhls,bshe->blhe', probs, v)


def qkv(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (B, L, H, E)),
    jax.random.normal(keys[1], (B, L, K, E)),
    jax.random.normal(keys[2], (B, L, K, E)),
  )


def test_kernel_matches_numpy_on_valid_tokens():
  q, k, v = qkv()
  valid = validity()
  got = np.asarray(attention.splash_attention(q, k, v, jnp.asarray(valid)))
  want = np_attention(q, k, v, valid)
  np.testing.assert_allclose(got[valid], want[valid], atol=KERNEL_ATOL, rtol=0)


def test_kernel_sharded_over_mesh_matches_single_device():
  q, k, v = qkv(1)
  valid = jnp.asarray(validity())
  rules = get_base_config().mesh.rules
  # Batch 3 does not split 2 ways: use 4 rows; heads 4 / kv heads 2 over tensor=2.
  q4, k4, v4 = (jnp.concatenate([x, x[:1]]) for x in (q, k, v))
  valid4 = jnp.concatenate([valid, valid[:1]])
  mesh = jax.make_mesh(
    (2, 1, 2),
    ('data', 'fsdp', 'tensor'),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def fn(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return attention.splash_attention(*args, rules)

  got = jax.jit(fn, in_shardings=replicated, out_shardings=replicated)(q4, k4, v4, valid4)
  want = attention.splash_attention(q4, k4, v4, valid4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=SHARDED_ATOL, rtol=0)


def test_kernel_under_mesh_rejects_indivisible_heads():
  q, k, v = qkv()
  mesh = jax.make_mesh(
    (1, 1, 4),
    ('data', 'fsdp', 'tensor'),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    with pytest.raises(ValueError, match='kv heads size 2 is not divisible'):
      jax.eval_shape(
        lambda *a: attention.splash_attention(*a, get_base_config().mesh.rules),
        q,
        k,
        v,
        jnp.asarray(validity()),
      )


@pytest.fixture(scope='module')
def xla_and_splash_models():
  xla_model = tiny_model(seed=3)
  cfg = xla_model.cfg
  splash_cfg = dataclasses.replace(
    cfg, backbone=dataclasses.replace(cfg.backbone, attention='splash')
  )
  graphdef = nnx.split(ns.NextStep(splash_cfg, rngs=nnx.Rngs(0)))[0]
  return xla_model, nnx.merge(graphdef, nnx.state(xla_model))


def decoder_inputs(seed=2):
  valid = validity()
  x = jax.random.normal(jax.random.key(seed), (B, L, 64))
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  return x, jnp.asarray(positions), jnp.asarray(valid)


@pytest.mark.slow
def test_decoder_full_pass_splash_equals_xla(xla_and_splash_models):
  xla_model, splash_model = xla_and_splash_models
  x, positions, valid = decoder_inputs()
  want, _ = xla_model(x, positions, valid)
  got, _ = splash_model(x, positions, valid)
  mask = np.asarray(valid)
  np.testing.assert_allclose(
    np.asarray(got)[mask], np.asarray(want)[mask], atol=DECODER_ATOL, rtol=0
  )


@pytest.mark.slow
def test_decoder_gradients_splash_equal_xla(xla_and_splash_models):
  xla_model, splash_model = xla_and_splash_models
  x, positions, valid = decoder_inputs(4)
  weights = jax.random.normal(jax.random.key(5), (B, L, 64)) * valid[..., None]

  def grads(model):
    def loss(params):
      hidden, _ = nnx.merge(nnx.graphdef(model), params)(x, positions, valid)
      return jnp.sum(hidden * weights)

    return nnx.to_flat_state(jax.grad(loss)(nnx.state(model, nnx.Param)))

  for (path, want), (_, got) in zip(grads(xla_model), grads(splash_model)):
    np.testing.assert_allclose(
      np.asarray(got.get_value()),
      np.asarray(want.get_value()),
      atol=GRAD_ATOL,
      rtol=0,
      err_msg=str(path),
    )


@pytest.mark.slow
def test_prefill_with_cache_splash_equals_xla(xla_and_splash_models):
  """The sampler's prefill (left-padded prompts into an empty cache) and one decode step."""
  xla_model, splash_model = xla_and_splash_models
  x, positions, valid = decoder_inputs(6)
  step_x = jax.random.normal(jax.random.key(7), (B, 1, 64))
  outs = []
  for model in (xla_model, splash_model):
    cache = model.decoder.init_cache(B, L + 1)
    hidden, cache = model(x, positions, valid, cache)
    step_hidden, _ = model(step_x, positions[:, -1:] + 1, jnp.ones((B, 1), bool), cache)
    outs.append((np.asarray(hidden), np.asarray(cache.k), np.asarray(step_hidden)))
  (want_h, want_k, want_step), (got_h, got_k, got_step) = outs
  mask = np.asarray(valid)
  np.testing.assert_allclose(got_h[mask], want_h[mask], atol=DECODER_ATOL, rtol=0)
  np.testing.assert_allclose(
    got_k[:, :, :L][:, mask], want_k[:, :, :L][:, mask], atol=DECODER_ATOL, rtol=0
  )
  np.testing.assert_allclose(got_step, want_step, atol=DECODER_ATOL, rtol=0)


def test_config_rejects_unknown_attention():
  from nextstep_jax import configlib

  config = get_base_config()
  config.model.attention = 'flash'
  with pytest.raises(configlib.ConfigError, match='model.attention'):
    configlib.validate(config)
