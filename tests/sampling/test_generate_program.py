"""The sampling program (generate.SamplingProgram) with explicit shardings on a (2, 2, 2) mesh: the
same tokens as on one device; prefill + token steps reproduce the whole generation; guidance,
temperature and timestep shift are traced (no recompile); decode blocks read less, change nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from model_testing import TINY_MODEL
from model_testing import tiny_model
from nextstep_jax import configlib
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.sampling import generate as G
from nextstep_jax.sampling import integrators as I

FIRST_TOKEN_ATOL = 3e-5  # Token 0: sharded reductions only reorder float32 sums.
# Later tokens feed back through CFG 3, which amplifies float32 reordering noise ~2-3x per token
# (test_generate.py: unsharded float32 vs float64 reaches 4e-3 on the last token).
ALL_TOKENS_ATOL = 4e-3

IMAGES, WIDTH = 4, 7
SAMPLER = G.SamplerConfig(
  grid_h=2,
  grid_w=3,
  num_branches=2,
  cfg=3.0,
  integrator=I.IntegratorConfig(num_steps=4, solver='sde', time_grid='A', timestep_shift=3.2),
)


@pytest.fixture(scope='module')
def setup():
  config = get_base_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = mesh_lib.make_mesh(config.mesh)
  graphdef, params = nnx.split(tiny_model(seed=5), nnx.Param)
  shardings = rules_lib.state_shardings(params, mesh, config.mesh.rules)
  rng = np.random.default_rng(0)
  rows = SAMPLER.num_branches * IMAGES
  pads = rng.integers(0, 4, rows)
  prompt = {
    'input_ids': jnp.asarray(rng.integers(0, TINY_MODEL['vocab_size'], (rows, WIDTH)), jnp.int32),
    'attention_mask': jnp.asarray(np.arange(WIDTH)[None] >= pads[:, None]),
    'positions': jnp.asarray(np.broadcast_to(np.arange(WIDTH, dtype=np.int32), (rows, WIDTH))),
  }
  keys = G.image_keys_from_seeds([3, 4, 5, 6])
  unsharded = np.asarray(G.generate_tokens(graphdef, params, prompt, keys, SAMPLER))
  return config, mesh, graphdef, params, shardings, prompt, keys, unsharded


@pytest.mark.slow
def test_sharded_generate_equals_unsharded(setup):
  config, mesh, graphdef, params, shardings, prompt, keys, unsharded = setup
  program = G.SamplingProgram(graphdef, shardings, mesh, config.mesh.rules)
  tokens = program(jax.device_put(params, shardings), prompt, keys, SAMPLER)
  assert tokens.sharding.spec == P(('data', 'fsdp'), None, None)
  assert len(tokens.sharding.device_set) == 8
  np.testing.assert_allclose(
    np.asarray(tokens)[:, 0], unsharded[:, 0], atol=FIRST_TOKEN_ATOL, rtol=0
  )
  np.testing.assert_allclose(np.asarray(tokens), unsharded, atol=ALL_TOKENS_ATOL, rtol=0)


@pytest.mark.slow
def test_prefill_and_token_steps_reproduce_generate(setup):
  config, mesh, graphdef, params, shardings, prompt, keys, _ = setup
  rules = config.mesh.rules
  sharded_params = jax.device_put(params, shardings)
  program = G.SamplingProgram(graphdef, shardings, mesh, rules)
  rows = prompt['input_ids'].shape[0]
  want = np.asarray(program(sharded_params, prompt, keys, SAMPLER))
  cache, hidden = program.prefill_program(rows)(sharded_params, prompt, SAMPLER)
  assert cache.k.shape[2] == WIDTH + SAMPLER.num_tokens - 1
  token_step = program.token_step_program(rows, IMAGES)
  next_position = prompt['positions'][:, -1:] + 1
  tokens = []
  for k in range(SAMPLER.num_tokens - 1):  # The last token needs no decoder step after it.
    cache, hidden, token = token_step(
      sharded_params, cache, hidden, next_position, jnp.int32(k), keys, SAMPLER
    )
    tokens.append(np.asarray(token))
  model = nnx.merge(graphdef, params)
  token_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, SAMPLER.num_tokens - 1)
  tokens.append(
    np.asarray(
      G.sample_token(model, hidden, jnp.int32(SAMPLER.num_tokens - 1), token_keys, SAMPLER)
    )
  )
  # Same ops, called per token instead of scanned: XLA fuses them differently (seen: 3e-4 by the
  # last token, the CFG amplification above).
  got = np.stack(tokens, axis=1)
  np.testing.assert_allclose(got[:, 0], want[:, 0], atol=FIRST_TOKEN_ATOL, rtol=0)
  np.testing.assert_allclose(got, want, atol=ALL_TOKENS_ATOL, rtol=0)


def test_sampling_mesh_is_tensor_parallel_as_far_as_the_model_divides():
  nextstep1_large = configlib.config_module('configs/nextstep1_large.py')
  tiny = configlib.config_module('configs/tiny.py')
  large = nextstep1_large.get_config()  # 40 heads, 8 kv heads, MLP 13824, vocab 152064, head 1536.
  assert dict(G.sampling_mesh(large).shape) == {'data': 1, 'fsdp': 1, 'tensor': 8}
  assert dict(G.sampling_mesh(large, jax.devices()[:4]).shape) == {
    'data': 1,
    'fsdp': 1,
    'tensor': 4,
  }
  small = tiny.get_config()  # 2 kv heads: tensor 2 at most, the other devices FSDP.
  assert dict(G.sampling_mesh(small).shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert dict(G.sampling_mesh(small, jax.devices()[:1]).shape) == {
    'data': 1,
    'fsdp': 1,
    'tensor': 1,
  }
  with small.unlocked():
    small.model.hidden_size, small.model.num_heads, small.model.num_kv_heads = 63, 7, 7
    small.model.head_dim, small.model.intermediate_size = 8, 63
  with pytest.raises(
    ValueError, match='no .fsdp, tensor. split of 8 devices divides the model.*not divisible'
  ):
    G.sampling_mesh(small)


@pytest.mark.slow
def test_new_guidance_temperature_and_shift_do_not_recompile(setup):
  """The SamplerConfig's scalars are traced: new values reuse the compiled generation (counted by
  the jitted function's cache); a structural change (step count) compiles a new one."""
  config, mesh, graphdef, params, shardings, prompt, keys, _ = setup
  program = G.SamplingProgram(graphdef, shardings, mesh, config.mesh.rules)
  run = program.generate_program(prompt['input_ids'].shape[0], IMAGES)
  sharded_params = jax.device_put(params, shardings)
  first = np.asarray(program(sharded_params, prompt, keys, SAMPLER))
  assert run._cache_size() == 1
  outputs = [first]
  for cfg, temperature, shift in ((4.5, 0.9, 3.2), (3.0, 0.7, 3.2), (3.0, 1.0, 1.5)):
    changed = dataclasses.replace(
      SAMPLER,
      cfg=cfg,
      integrator=dataclasses.replace(
        SAMPLER.integrator, temperature=temperature, timestep_shift=shift
      ),
    )
    outputs.append(np.asarray(program(sharded_params, prompt, keys, changed)))
  assert run._cache_size() == 1
  for other in outputs[1:]:
    assert np.abs(other - first).max() > 1e-2  # Each value is live, not ignored.
  edit = G.SamplerConfig(
    grid_h=2, grid_w=3, num_branches=2, cfg=3.0, cfg_img=1.5, integrator=SAMPLER.integrator
  )
  program(sharded_params, prompt, keys, edit)
  assert run._cache_size() == 1
  fewer_steps = dataclasses.replace(
    SAMPLER, integrator=dataclasses.replace(SAMPLER.integrator, num_steps=2)
  )
  program(sharded_params, prompt, keys, fewer_steps)
  assert run._cache_size() == 2


@pytest.mark.slow
def test_decode_blocks_read_less_and_sample_the_same_tokens(setup):
  """decode_blocks=3: three token scans, each attending only the cache slots filled by its end
  (static lengths P + 2, P + 4, P + 5): the same tokens as one scan over the whole cache."""
  config, mesh, graphdef, params, shardings, prompt, keys, _ = setup
  program = G.SamplingProgram(graphdef, shardings, mesh, config.mesh.rules)
  sharded_params = jax.device_put(params, shardings)
  blocks = dataclasses.replace(SAMPLER, decode_blocks=3)
  assert [(a, b) for a, b, _ in blocks.token_segments()] == [(0, 2), (2, 4), (4, 6)]
  want = np.asarray(program(sharded_params, prompt, keys, SAMPLER))
  got = np.asarray(program(sharded_params, prompt, keys, blocks))
  np.testing.assert_allclose(got[:, 0], want[:, 0], atol=FIRST_TOKEN_ATOL, rtol=0)
  np.testing.assert_allclose(got, want, atol=ALL_TOKENS_ATOL, rtol=0)
  lowered = program.generate_program(prompt['input_ids'].shape[0], IMAGES).lower(
    sharded_params, prompt, keys, blocks
  )
  text = lowered.as_text()
  rows = 2 * IMAGES
  for read in (WIDTH + 2, WIDTH + 4, WIDTH + 5):  # One layer's (1, R, read, K, E) cache window.
    assert f'tensor<1x{rows}x{read}x2x16xf32>' in text, read
