"""Text-to-image generation: prefill the prompt rows once, then `lax.scan` over image positions.

Letters: B images, R = branches * B prompt rows (branch-major: [cond; uncond(; uncond2)]), P prompt
width (left padded), N = h * w image tokens, T token dim, D hidden.

For image token k: c = image_out_projector(last hidden (R, D) [+ gen_pos_embed[k]]); the head's
condition embedding is computed once; the per-token integrator (itself a `lax.scan` over steps)
runs on x (B, T) with every branch evaluated in one batched head call and combined by CFG; the
token (optionally LayerNorm-ed, `use_norm`) is fed to every branch's row for one cached decoder
step at slot P + k. The whole generation is one jitted function of (graphdef, state, prompt, keys).
`token_steps` (training-free few-step baseline) splits the N tokens into equal raster-order
segments, segment j integrating with token_steps[j] steps (e.g. (8, 4, 2, 1): many steps for the
early tokens that fix the layout, few for the late ones); each segment is its own `lax.scan`.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nextstep_jax import nn as L
from nextstep_jax.model import backbone
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.sampling import guidance
from nextstep_jax.sampling import integrators
from nextstep_jax.sampling import progress


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('integrator', 'cfg', 'cfg_img'),
  meta_fields=(
    'grid_h',
    'grid_w',
    'num_branches',
    'cfg_schedule',
    'use_norm',
    'progress_every',
    'token_steps',
    'decode_blocks',
  ),
)
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling settings. A pytree: the guidance scales `cfg` / `cfg_img` and the integrator's
  temperature and timestep shift are its leaves, traced by the sampling program (new values
  reuse the compiled program); every other field is static structure (part of the jit cache key)."""

  grid_h: int
  grid_w: int
  integrator: integrators.IntegratorConfig = integrators.IntegratorConfig()
  num_branches: int = 2  # 1 = no guidance, 2 = text CFG, 3 = edit CFG.
  cfg: float = 1.0
  cfg_img: float = 1.0  # Image guidance of the 3-way form.
  cfg_schedule: str = 'constant'
  use_norm: bool = False
  progress_every: int = 0  # > 0: host callback every this many tokens (sampling/progress.py).
  token_steps: tuple[int, ...] = ()  # Annealed steps per token segment; () = integrator.num_steps.
  decode_blocks: int = (
    1  # Decode in this many token blocks, each reading only the cache filled by its end.
  )

  def __post_init__(self):
    if self.num_branches not in (1, 2, 3):
      raise ValueError(f'num_branches={self.num_branches}; use 1 (no CFG), 2 (text) or 3 (edit)')
    if self.cfg_schedule not in guidance.SCHEDULES:
      raise ValueError(
        f'sample.cfg_schedule={self.cfg_schedule!r}; choose one of {guidance.SCHEDULES}'
      )
    if self.token_steps and (len(self.token_steps) > self.num_tokens or min(self.token_steps) < 1):
      raise ValueError(
        f'sample.token_steps={self.token_steps}: need 1..{self.num_tokens} segments of >= 1 steps'
      )
    if not 1 <= self.decode_blocks <= self.num_tokens:
      raise ValueError(
        f'sample.decode_blocks={self.decode_blocks}: need 1..{self.num_tokens} (image tokens)'
      )

  def token_segments(self) -> list[tuple[int, int, integrators.IntegratorConfig]]:
    """[(first token, end token, integrator)] covering 0..N-1 in order: the `token_steps`
    segments, each cut further at the `decode_blocks` boundaries."""

    def bounds(parts):
      return [round(j * self.num_tokens / parts) for j in range(parts + 1)]

    steps = self.token_steps or (self.integrator.num_steps,)
    step_bounds = bounds(len(steps))
    cuts = sorted(set(step_bounds) | set(bounds(self.decode_blocks)))
    segments = []
    for start, end in zip(cuts, cuts[1:]):
      segment = max(j for j in range(len(steps)) if step_bounds[j] <= start)
      integrator = (
        self.integrator
        if not self.token_steps
        else dataclasses.replace(self.integrator, num_steps=steps[segment])
      )
      segments.append((start, end, integrator))
    return segments

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  @classmethod
  def from_config(
    cls, config, grid_h: int, grid_w: int, num_branches: int | None = None
  ) -> 'SamplerConfig':
    s = config.sample
    integ = integrators.IntegratorConfig(
      num_steps=s.num_steps,
      solver=s.solver,
      time_grid=s.time_grid,
      timestep_shift=s.timestep_shift,
      last_step_size=s.last_step_size,
      temperature=s.temperature,
      times=tuple(s.get('times', ())),
      unroll=config.model.scan_unroll,
    )
    if num_branches is None:
      num_branches = 1 if s.cfg == 1.0 else 2
    return cls(
      grid_h=grid_h,
      grid_w=grid_w,
      integrator=integ,
      num_branches=num_branches,
      cfg=s.cfg,
      cfg_schedule=s.cfg_schedule,
      use_norm=config.image.use_norm,
      token_steps=tuple(s.get('token_steps', ())),
      decode_blocks=s.get('decode_blocks', 1),
    )


def guided_velocity(
  head, cond_emb: jax.Array, cfg: SamplerConfig, scale: jax.Array
) -> integrators.ConditionedVelocity:
  """The guided velocity of one token: its table is the head's step_modulations of every
  evaluation point (all branches' rows, built once per token); each step tiles x over the
  branches, runs the head's x-path once for all rows, then combines the branches (CFG)."""
  branches = cfg.num_branches

  def apply(x, modulations):
    v = head.velocity_from_modulations(jnp.tile(x, (branches, 1)), modulations)
    if branches == 1:
      return v
    if branches == 2:
      return guidance.combine_two_way(v, scale)
    return guidance.combine_three_way(v, scale, jnp.asarray(cfg.cfg_img, jnp.float32))

  return integrators.ConditionedVelocity(
    condition=lambda t, d: head.step_modulations(t, cond_emb, d), apply=apply
  )


def sample_token(
  model,
  last_hidden: jax.Array,
  token_index: jax.Array,
  row_keys: jax.Array,
  cfg: SamplerConfig,
  integrator: integrators.IntegratorConfig | None = None,
) -> jax.Array:
  """Samples image token `token_index` for B images from the rows' last hidden (R, D).
  row_keys (B,) keys of this token; integrator defaults to cfg.integrator. Returns (B, T) float32."""
  integrator = integrator or cfg.integrator
  cond = model.head_condition(last_hidden, token_index)
  cond_emb = model.image_head.condition(cond)  # Once per token, outside the integration loop.
  scale = guidance.guidance_scale(cfg.cfg, cfg.cfg_schedule, token_index, cfg.num_tokens)
  velocity = guided_velocity(model.image_head, cond_emb, cfg, scale)
  x0 = integrator.temperature * integrators.row_normal(row_keys, 0, (model.cfg.token_dim,))
  token = integrators.integrate(velocity, x0, row_keys, integrator)
  return L.layer_norm(token) if cfg.use_norm else token


def prefill(model, prompt: dict, num_tokens: int) -> tuple[backbone.KVCache, jax.Array]:
  """The prompt rows through the decoder once, into a cache of P + N - 1 slots.
  prompt: see `generate_tokens_fn`. Returns (cache, last hidden (R, D))."""
  ids = prompt['input_ids']
  rows, width = ids.shape
  cache = model.decoder.init_cache(rows, width + num_tokens - 1)
  embeds = model.embed(ids, prompt.get('image_tokens'), prompt.get('image_token_mask'))
  hidden, cache = model(embeds, prompt['positions'], prompt['attention_mask'], cache)
  return cache, hidden[:, -1]


def decode_token(
  model,
  cache: backbone.KVCache,
  last_hidden: jax.Array,
  next_position: jax.Array,
  k: jax.Array,
  image_keys: jax.Array,
  cfg: SamplerConfig,
  integrator: integrators.IntegratorConfig,
  read_slots: int | None = None,
):
  """One image token's work: samples token k (B, T) from the rows' last hidden (R, D) with the
  head, then feeds it to every branch's row for one cached decoder step at position
  next_position + k (next_position (R, 1)), attending the first `read_slots` cache slots (None:
  all). Returns (cache, hidden (R, D), token (B, T) float32)."""
  token_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, k)
  token = sample_token(model, last_hidden, k, token_keys, cfg, integrator)
  x = jnp.tile(
    model.embed_image_tokens(token[:, None]), (cfg.num_branches, 1, 1)
  )  # Project once, not per branch.
  rows = last_hidden.shape[0]
  hidden, cache = model(
    x, next_position + k, jnp.ones((rows, 1), bool), cache, read_slots=read_slots
  )
  return cache, hidden[:, 0], token


def generate_tokens_fn(model, prompt: dict, image_keys: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """The whole generation. prompt: input_ids (R, P) int32, attention_mask (R, P) bool,
  positions (R, P) int32 (left padded, raw slots), optionally image_tokens (R, Ns, T) +
  image_token_mask (R, P) bool (edit prompts: source tokens fed at the placeholders);
  image_keys (B,) one key per image. Returns tokens (B, N, T) float32.

  Token k's decoder step writes cache slot P + k and attends slots <= P + k; each segment of
  `cfg.token_segments()` is one `lax.scan` whose steps read only the P + end slots filled by the
  segment's end (`decode_blocks` > 1 makes these reads shorter on average)."""
  rows, width = prompt['input_ids'].shape
  if rows != cfg.num_branches * image_keys.shape[0]:
    raise ValueError(
      f'{rows} prompt rows for {image_keys.shape[0]} images and {cfg.num_branches} branches'
    )
  cache, last_hidden = prefill(model, prompt, cfg.num_tokens)
  next_position = prompt['positions'][:, -1:] + 1  # (R, 1)

  def step_with(integrator, read_slots):
    def step(carry, k):
      cache, last_hidden = carry
      cache, hidden, token = decode_token(
        model, cache, last_hidden, next_position, k, image_keys, cfg, integrator, read_slots
      )
      if cfg.progress_every:
        progress.report(k + 1, cfg.progress_every)
      return (cache, hidden), token

    return step

  # Tokens 0..N-2 each feed one decoder step; the last token needs no decoder step after it.
  carry, pieces = (cache, last_hidden), []
  for start, end, integrator in cfg.token_segments():
    end_scanned = min(end, cfg.num_tokens - 1)
    if end_scanned > start:
      carry, tokens = jax.lax.scan(
        step_with(integrator, width + end_scanned), carry, jnp.arange(start, end_scanned)
      )
      pieces.append(tokens.transpose(1, 0, 2))
    if end == cfg.num_tokens:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, cfg.num_tokens - 1)
      pieces.append(
        sample_token(model, carry[1], jnp.asarray(cfg.num_tokens - 1), keys, cfg, integrator)[
          :, None
        ]
      )
  return jnp.concatenate(pieces, axis=1)


# ----- the sampling program: one explicitly sharded jit that every entry point runs -----


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
    mesh = mesh_lib.make_mesh(
      ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=tensor)), devices
    )
    try:
      rules_lib.state_shardings(params, mesh, config.mesh.rules)
    except ValueError as e:  # A dimension this split does not divide: try a smaller tensor axis.
      error = e
      continue
    return mesh
  raise ValueError(f'no (fsdp, tensor) split of {len(devices)} devices divides the model: {error}')


def for_sampling(graphdef: nnx.GraphDef, state, dtype=None) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, state) of the model as image sampling uses it: without the LM head (image-only
  sampling never evaluates it; 0.78B params at 14B) and, given `dtype`, floating arrays cast to
  it (once, instead of per token). Abstract (ShapeDtypeStruct) states work too."""
  model = nnx.merge(graphdef, state)
  model.lm_head = None
  graphdef, state = nnx.split(model)
  if dtype is not None:
    dtype = jnp.dtype(dtype)

    def cast(x):
      if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
        return x
      if isinstance(x, jax.Array):
        return x.astype(dtype)
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, 'sharding', None))

    state = jax.tree.map(cast, state)
  return graphdef, state


def _one_device_mesh(device) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
    np.array([device]).reshape(1, 1, 1),
    mesh_lib.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.MESH_AXES),
  )


class SamplingProgram:
  """The one sampling program: `generate_tokens_fn` jitted with explicit shardings on `mesh`.

  Params (any pytree the graphdef merges with: plain or quantized arrays) on `state_shardings`;
  prompt rows, image keys and the tokens over the logical `batch` axis (replicated when the rows
  do not divide over it); the SamplerConfig is an argument whose leaves (guidance scales,
  temperature, timestep shift) are traced and whose structure is static. `prefill_program` and
  `token_step_program` jit the two pieces the generation is made of (`prefill`, `decode_token`)
  with the same shardings: the AOT planner costs them separately.
  """

  def __init__(self, graphdef: nnx.GraphDef, state_shardings, mesh: jax.sharding.Mesh, rules=()):
    self.graphdef, self.state_shardings, self.mesh, self.rules = (
      graphdef,
      state_shardings,
      mesh,
      tuple(rules),
    )
    self._jitted = {}

  @classmethod
  def for_state(cls, graphdef: nnx.GraphDef, state, rules=()) -> 'SamplingProgram':
    """The program on the placement `state` already has: its arrays' mesh and shardings (every
    array on one device: that device's mesh)."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    named = [s for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.NamedSharding)]
    mesh = (
      named[0].mesh
      if named
      else _one_device_mesh(next(iter(jax.tree.leaves(shardings)[0].device_set)))
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(
      lambda s: s if isinstance(s, jax.sharding.NamedSharding) else replicated, shardings
    )
    return cls(graphdef, shardings, mesh, rules)

  def _spec(self, rows: int, *logical) -> jax.sharding.NamedSharding:
    """`logical` axes, `batch` replicated when `rows` do not divide over its mesh axes."""
    spec = (
      rules_lib.logical_to_spec(
        ['batch' if name == 'batch' else name for name in logical], self.rules
      )
      if self.rules
      else jax.sharding.PartitionSpec()
    )
    axes = spec[0] if len(spec) else None
    split = math.prod(
      self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ()))
    )
    if rows % split:
      spec = jax.sharding.PartitionSpec(None, *spec[1:])
    return jax.sharding.NamedSharding(self.mesh, spec)

  def _replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def _jit(self, kind: str, rows: int, images: int):
    key = (kind, rows, images)
    if key not in self._jitted:
      self._jitted[key] = getattr(self, f'_build_{kind}')(rows, images)
    return self._jitted[key]

  def _build_generate(self, rows: int, images: int):
    def fn(state, prompt, image_keys, cfg):
      return generate_tokens_fn(nnx.merge(self.graphdef, state), prompt, image_keys, cfg)

    return jax.jit(
      mesh_lib.in_mesh(fn, self.mesh),
      in_shardings=(
        self.state_shardings,
        self._spec(rows, 'batch'),
        self._spec(images, 'batch'),
        self._replicated(),
      ),
      out_shardings=self._spec(images, 'batch', None, None),
    )

  def _build_prefill(self, rows: int, images: int):
    del images

    def fn(state, prompt, cfg):
      return prefill(nnx.merge(self.graphdef, state), prompt, cfg.num_tokens)

    return jax.jit(
      mesh_lib.in_mesh(fn, self.mesh),
      in_shardings=(self.state_shardings, self._spec(rows, 'batch'), self._replicated()),
      out_shardings=(self.cache_shardings(rows), self._spec(rows, 'batch', None)),
    )

  def _build_token_step(self, rows: int, images: int):
    def fn(state, cache, last_hidden, next_position, k, image_keys, cfg):
      return decode_token(
        nnx.merge(self.graphdef, state),
        cache,
        last_hidden,
        next_position,
        k,
        image_keys,
        cfg,
        cfg.integrator,
      )

    row = self._spec(rows, 'batch', None)
    cache = self.cache_shardings(rows)
    return jax.jit(
      mesh_lib.in_mesh(fn, self.mesh),
      in_shardings=(
        self.state_shardings,
        cache,
        row,
        row,
        self._replicated(),
        self._spec(images, 'batch'),
        self._replicated(),
      ),
      out_shardings=(cache, row, self._spec(images, 'batch', None)),
      donate_argnums=(1,),
    )

  def cache_shardings(self, rows: int) -> backbone.KVCache:
    """KVCache shardings: k/v (layers, R, S, K, E) rows over `batch`, kv heads by the rules."""
    kv = (
      self._spec(rows, None, 'batch', None, 'kv_heads', None) if self.rules else self._replicated()
    )
    return backbone.KVCache(kv, kv, self._spec(rows, 'batch', None), self._replicated())

  def generate_program(self, rows: int, images: int):
    """The jitted generation for `rows` prompt rows and `images` images: (state, prompt,
    image_keys (B,), cfg) -> tokens (B, N, T) float32 (`.lower(...)` for AOT)."""
    return self._jit('generate', rows, images)

  def prefill_program(self, rows: int):
    """jit of (state, prompt, cfg) -> (cache, last hidden (R, D)): `prefill`."""
    return self._jit('prefill', rows, 0)

  def token_step_program(self, rows: int, images: int):
    """jit of (state, cache, last_hidden (R, D), next_position (R, 1), k (), image_keys (B,), cfg)
    -> (cache, hidden (R, D), token (B, T)): `decode_token` with cfg.integrator, the cache donated."""
    return self._jit('token_step', rows, images)

  def __call__(self, state, prompt: dict, image_keys: jax.Array, cfg: SamplerConfig) -> jax.Array:
    """Tokens (B, N, T) float32 of one generation (see `generate_tokens_fn`). Prompt and keys are
    put on the program's row shardings first (a no-op when they are there already)."""
    rows, images = prompt['input_ids'].shape[0], image_keys.shape[0]
    prompt = jax.tree.map(lambda x: _put_global(x, self._spec(rows, 'batch')), prompt)
    image_keys = _put_global(image_keys, self._spec(images, 'batch'))
    return self.generate_program(rows, images)(state, prompt, image_keys, cfg)


def _put_global(x, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """`x`, which every process holds in full (prompt rows, image keys), on `sharding`: one
  device_put within a process; on a multi-process mesh each process fills its own shards."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x  # Already global: the program's in_shardings lay it out.
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data_sharding = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, None)
    )
    return jax.random.wrap_key_data(_put_global(jax.random.key_data(x), data_sharding))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def generate_tokens(
  graphdef, state, prompt: dict, image_keys: jax.Array, cfg: SamplerConfig, rules=()
) -> jax.Array:
  """The sampling program on the placement `state` already has (`SamplingProgram.for_state`);
  programs are kept per (graphdef, placement), so repeated calls reuse the compiled one."""
  return _program_for(graphdef, tuple(rules), _placement(state))(state, prompt, image_keys, cfg)


def _placement(state):
  leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
  return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _program_for(graphdef, rules, placement) -> SamplingProgram:
  treedef, leaves = placement
  return SamplingProgram.for_state(
    graphdef, jax.tree.unflatten(treedef, [_Placed(s) for s in leaves]), rules
  )


class _Placed:
  """A stand-in leaf carrying only a sharding (what `for_state` reads)."""

  def __init__(self, sharding):
    self.sharding = sharding


def image_keys_from_seeds(seeds) -> jax.Array:
  """(B,) int seeds -> (B,) keys; image b's noise depends only on its seed."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
