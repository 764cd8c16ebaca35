"""Sampling entry points jitted with explicit shardings: params by the mesh rules, prompt rows and
images over the logical `batch` axis.

`sampling_mesh` picks the layout sampling runs fastest on (tensor parallelism within a host).
`build_generate` wraps `generate.generate_tokens_fn` (the whole generation). `build_prefill` and
`build_token_step` split it into the prefill and one image token's work (head sampling of token k
with the configured steps and CFG, then the decoder step that feeds it back), the pieces the AOT
planner compiles and costs separately. Letters as in generate.py: B images, R = branches * B
prompt rows, P prompt width, N image tokens, T token dim, D hidden.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nextstep_jax.model import backbone
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.sampling import generate


def sampling_mesh(config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh over `devices` (default: all) that sampling `config`'s model runs fastest on.

  Every image token step reads all decoder weights: under FSDP each device gathers and reads the
  whole model per token, under tensor parallelism 1/t of it (NextStep-1-Large, 8 images at 512x512
  on v5e-8, AOT estimates: 133 s FSDP, 13.8 s tensor-parallel; benchmarks/README.md). So `tensor`
  is the largest divisor of this process's device count that every parameter dimension sharded
  over it divides (heads, kv heads, MLP, vocab, head MLP under `config.mesh.rules`), keeping
  tensor-parallel collectives within a host; the remaining devices form `fsdp` (`data` = 1).
  """
  devices = list(jax.devices() if devices is None else devices)
  local = sum(d.process_index == jax.process_index() for d in devices) or len(devices)
  params = nnx.state(nextstep.abstract_model(config), nnx.Param)
  error = None
  for tensor in (t for t in range(local, 0, -1) if local % t == 0 and len(devices) % t == 0):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=tensor)), devices)
    try:
      rules_lib.state_shardings(params, mesh, config.mesh.rules)
    except ValueError as e:  # A dimension this split does not divide: try a smaller tensor axis.
      error = e
      continue
    return mesh
  raise ValueError(f'no (fsdp, tensor) split of {len(devices)} devices divides the model: {error}')


def _rows(mesh, rules, ndim: int):
  return rules_lib.activation_spec(mesh, rules, 'batch', *([None] * (ndim - 1)))


def prompt_shardings(mesh, rules) -> dict:
  """input_ids, attention_mask, positions (R, P): rows over `batch`."""
  return {name: _rows(mesh, rules, 2) for name in ('input_ids', 'attention_mask', 'positions')}


def cache_shardings(mesh, rules):
  """KVCache shardings: k/v (layers, R, S, K, E) rows over `batch`, kv heads by the rules."""
  kv = rules_lib.activation_spec(mesh, rules, None, 'batch', None, 'kv_heads', None)
  replicated = rules_lib.activation_spec(mesh, rules)
  return backbone.KVCache(kv, kv, _rows(mesh, rules, 2), replicated)


def build_generate(graphdef: nnx.GraphDef, param_shardings, mesh, rules, cfg: generate.SamplerConfig):
  """jit of generate(params, prompt, image_keys (B,)) -> tokens (B, N, T) float32, sharded."""

  def fn(params, prompt, image_keys):
    return generate.generate_tokens_fn(nnx.merge(graphdef, params), prompt, image_keys, cfg)

  return jax.jit(mesh_lib.in_mesh(fn, mesh),
                 in_shardings=(param_shardings, prompt_shardings(mesh, rules), _rows(mesh, rules, 1)),
                 out_shardings=_rows(mesh, rules, 3))


def build_prefill(graphdef: nnx.GraphDef, param_shardings, mesh, rules, cfg: generate.SamplerConfig):
  """jit of prefill(params, prompt) -> (cache with P + N - 1 slots, last hidden (R, D)): the
  prompt rows through the decoder once, as `generate.generate_tokens_fn` starts."""

  def fn(params, prompt):
    model = nnx.merge(graphdef, params)
    ids = prompt['input_ids']
    cache = model.decoder.init_cache(ids.shape[0], ids.shape[1] + cfg.num_tokens - 1)
    hidden, cache = model(model.embed(ids, None, None), prompt['positions'], prompt['attention_mask'], cache)
    return cache, hidden[:, -1]

  return jax.jit(mesh_lib.in_mesh(fn, mesh),
                 in_shardings=(param_shardings, prompt_shardings(mesh, rules)),
                 out_shardings=(cache_shardings(mesh, rules), _rows(mesh, rules, 2)))


def build_token_step(graphdef: nnx.GraphDef, param_shardings, mesh, rules, cfg: generate.SamplerConfig):
  """jit of token_step(params, cache, last_hidden (R, D), next_position (R, 1), k (), image_keys
  (B,)) -> (cache, hidden (R, D), token (B, T)): samples image token k with the head (configured
  steps, CFG) and runs the cached decoder step that feeds it back (one step of generate's scan).
  The cache is donated."""

  def fn(params, cache, last_hidden, next_position, k, image_keys):
    model = nnx.merge(graphdef, params)
    token_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, k)
    token = generate.sample_token(model, last_hidden, k, token_keys, cfg)
    rows = last_hidden.shape[0]
    x = model.embed_image_tokens(jnp.tile(token, (cfg.num_branches, 1))[:, None])
    hidden, cache = model(x, next_position + k, jnp.ones((rows, 1), bool), cache)
    return cache, hidden[:, 0], token

  replicated = rules_lib.activation_spec(mesh, rules)
  cache = cache_shardings(mesh, rules)
  return jax.jit(mesh_lib.in_mesh(fn, mesh),
                 in_shardings=(param_shardings, cache, _rows(mesh, rules, 2), _rows(mesh, rules, 2),
                               replicated, _rows(mesh, rules, 1)),
                 out_shardings=(cache, _rows(mesh, rules, 2), _rows(mesh, rules, 2)),
                 donate_argnums=(1,))
