"""Ahead-of-time planning for TPU slices without TPUs: compile the real train step or sampling
steps for a topology (`jax.experimental.topologies`, needs the `libtpu` package), then report
per-chip memory against HBM, calibrated compiler costs, model FLOPs, step time and MFU estimates.

Method (also in benchmarks/README.md):
- Memory: `compiled.memory_analysis()` of the real (scanned) executable, per device: arguments +
  outputs - aliased (donated) + temporaries. It fits when that is <= the device's HBM.
- Cost: `compiled.cost_analysis()` counts a while-loop body once, so the scanned layer stack is
  off by the layer count. We compile the same step with 1 and 2 decoder layers, every scan
  unrolled (`model.scan_unroll`), and extrapolate linearly: C(L) = C(1) + (L - 1) (C(2) - C(1)).
  (The sampling token step, small enough to compile whole, is unrolled at its real depth.)
  At 14B the TPU SPMD partitioner also rewrites the large FSDP matmuls as windowed einsums
  (collective matmuls: a while loop over the gathered shards), which the cost analysis would
  again count once (a 1-layer 14B compile on v5p-64 had 20 such loops and reported less than
  the model FLOPs); the calibration compiles disable them (CALIBRATION_OPTIONS, same matmuls) and
  a calibration compile that still holds any while loop is refused (CalibrationError).
  The sampling token step is likewise calibrated in the head's integration steps (grid A with 1
  and 2 steps: one more velocity evaluation). Pallas kernels (splash attention) carry no cost for
  the compiler, so their FLOPs are added from the formula (causal half of QK^T and PV; backward
  2.5x forward; one forward recompute under remat).
- Validity: every device runs its share of the model plus recomputation and non-matmul work, so
  the devices' total compiler FLOPs must be at least the model FLOPs. A lower (or uncalibrated)
  cost is reported with a note and no step time or MFU. Full remat recomputes each layer's
  forward except its last matmul (the MLP down projection, whose output the backward does not
  need): 14B training costs 1.244x its model FLOPs, below the naive 4/3.
- Step time per device: max(FLOPs / peak, bytes accessed / HBM bandwidth, FSDP collective bytes /
  ICI bandwidth), i.e. perfect overlap; MFU = model FLOPs / (step time * devices * peak).
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax import nn
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.planning import costs
from nextstep_jax.planning import hlo_traffic
from nextstep_jax.sampling import generate
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

GIB = 2**30
TASKS = ('train', 'sample', 'finetune_full', 'finetune_lora')
# Tasks that compile the train step: fine-tuning is the same step started from released params
# (train.init_from); finetune_lora needs train.lora.rank > 0 (adapters + optional head trained).
TRAIN_TASKS = ('train', 'finetune_full', 'finetune_lora')


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a TPU generation (a chip; a TensorCore on v2/v3, which JAX shows as
  devices). Public Cloud TPU figures: HBM bytes, peak bf16 FLOP/s, HBM and ICI bytes/s."""

  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float
  devices_per_chip: int = 1


# cloud.google.com/tpu/docs/{v2,v3,v4,v5e,v5p,v6e} system architecture tables (per chip; v2/v3
# split over their 2 TensorCores). ICI: the chip's total inter-chip bandwidth.
CHIPS = {
  'v2': Chip(8 * GIB, 45e12 / 2, 700e9 / 2, 62.5e9, devices_per_chip=2),
  'v3': Chip(16 * GIB, 123e12 / 2, 900e9 / 2, 81.25e9, devices_per_chip=2),
  'v4': Chip(32 * GIB, 275e12, 1228e9, 300e9),
  'v5e': Chip(16 * GIB, 197e12, 819e9, 200e9),
  'v5p': Chip(95 * GIB, 459e12, 2765e9, 600e9),
  'v6e': Chip(32 * GIB, 918e12, 1640e9, 448e9),
}


class DoesNotFit(RuntimeError):
  """The step needs more memory per device than the chip has; the message names the knobs.
  `plan` is the Plan when compilation finished, None when the TPU compiler itself ran out of HBM."""

  def __init__(self, message: str, plan: 'Plan | None' = None):
    super().__init__(message)
    self.plan = plan


@dataclasses.dataclass
class Plan:
  """One AOT result (a row of benchmarks/results/aot_*.json)."""

  task: str
  topology: str
  chips: int
  devices: int
  mesh: dict
  seq_len: int
  global_batch: int
  attention: str
  remat: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  total_bytes: int
  hbm_bytes: int
  fits: bool
  compiler_flops_per_device: float
  compiler_bytes_per_device: float
  flops_per_step: float
  compiler_to_model_flops: float  # Compiler FLOPs of all devices / model FLOPs (>= 1 when valid).
  estimated_step_s: float | None  # None: no valid calibrated cost, so no timing claim.
  bound: str | None
  mfu_estimate: float | None
  compile_s: float
  notes: str = ''
  # Sampling only: per image token (one decoder step for all rows + the head's evaluations), per
  # device, the calibrated compiler bytes accessed and the floor (`token_floor_bytes`).
  bytes_per_token: float | None = None
  floor_bytes_per_token: float | None = None
  # The same token step's HBM traffic counted from its optimized HLO (planning/hlo_traffic.py):
  # the compiler's bytes also count buffers staged in on-chip memory, once per copy and read.
  hbm_bytes_per_token: float | None = None
  # max(FLOPs / peak, bytes / HBM bandwidth) of one token step (HBM traffic when calibrated).
  token_step_s: float | None = None

  def table(self) -> str:
    """Human-readable summary lines."""
    gib = lambda n: f'{n / GIB:8.2f} GiB'
    return '\n'.join(
      [
        f'{self.task} on {self.topology} ({self.chips} chips, {self.devices} devices), mesh {self.mesh}, '
        f'attention={self.attention}, remat={self.remat}',
        f'  sequence {self.seq_len} tokens, global batch {self.global_batch}',
        f'  per device: arguments {gib(self.argument_bytes)}  outputs {gib(self.output_bytes)}  '
        f'aliased {gib(self.alias_bytes)}  temporaries {gib(self.temp_bytes)}',
        f'  per device total {gib(self.total_bytes)} of HBM {gib(self.hbm_bytes)}: '
        f'{"fits" if self.fits else "DOES NOT FIT"}',
        f'  compiler cost per device: {self.compiler_flops_per_device:.4g} FLOPs, '
        f'{self.compiler_bytes_per_device:.4g} bytes accessed',
        f'  model FLOPs per step {self.flops_per_step:.4g}; compiler / model FLOPs '
        f'{self.compiler_to_model_flops:.3f}; '
        + (
          f'estimated step {self.estimated_step_s:.4g} s ({self.bound}-bound); MFU estimate '
          f'{100 * self.mfu_estimate:.1f}%'
          if self.mfu_estimate is not None
          else 'no step time or MFU estimate'
        ),
        f'  compile time {self.compile_s:.1f} s' + (f'; {self.notes}' if self.notes else ''),
      ]
      + (
        [
          f'  per image token: {self.bytes_per_token / 1e9:.3f} GB accessed per device, floor '
          f'{self.floor_bytes_per_token / 1e9:.3f} GB ({self.bytes_per_token / self.floor_bytes_per_token:.3f}x), '
          + (
            f'HBM traffic {self.hbm_bytes_per_token / 1e9:.3f} GB '
            f'({self.hbm_bytes_per_token / self.floor_bytes_per_token:.3f}x); '
            if self.hbm_bytes_per_token
            else 'HBM traffic not counted (uncalibrated); '
          )
          + f'token step {1e3 * self.token_step_s:.2f} ms; '
          f'margin {(self.hbm_bytes - self.total_bytes) / GIB:.2f} GiB of HBM per chip'
        ]
        if self.bytes_per_token
        else []
      )
    )


def chip_for(topology: str) -> Chip:
  generation = topology.split(':')[0]
  if generation not in CHIPS:
    raise ValueError(
      f'topology {topology!r}: unknown TPU generation {generation!r}; use one of '
      f'{", ".join(CHIPS)} (e.g. v5p:4x4x4, v5e:2x4).'
    )
  return CHIPS[generation]


def topology_devices(topology: str) -> list:
  """Devices of a TPU slice description such as 'v5p:4x4x4' or 'v5e:2x4' (libtpu, no TPU needed).

  v4 is described as megacore (one device per chip, as on real v4 VMs); slices smaller than one
  host get a host of exactly their size."""
  try:
    from jax.experimental import topologies
  except ImportError as error:  # pragma: no cover
    raise RuntimeError('jax.experimental.topologies is unavailable; upgrade jax.') from error
  # An AOT compile owns no TPU: let several planner processes load libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  generation, _, shape = topology.partition(':')
  chip_for(topology)
  dims = tuple(int(d) for d in shape.split('x')) if shape else ()
  if not dims or any(d < 1 for d in dims):
    raise ValueError(f'topology {topology!r} must look like v5p:4x4x4 or v5e:2x4.')
  kwargs = {'chip_config_name': 'megacore'} if generation == 'v4' else {}
  try:
    description = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs)
  except Exception as error:
    if 'chips_per_host_bounds' not in str(error):
      raise RuntimeError(
        f'libtpu cannot describe topology {topology!r}: {error}. Is the libtpu '
        "package installed (pip install -e '.[tpu-aot]')?"
      ) from error
    bounds = dims + (1,) * (3 - len(dims))
    description = topologies.get_topology_desc(
      platform='tpu', topology_name=topology, chips_per_host_bounds=bounds, **kwargs
    )
  return list(description.devices)


def make_mesh(config, devices) -> jax.sharding.Mesh:
  """The config's (data, fsdp, tensor) mesh over topology devices, laid out along the torus."""
  shape = mesh_lib.mesh_shape(config.mesh, len(devices))
  try:
    from jax.experimental import mesh_utils

    array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    array = np.array(devices).reshape(shape)
  return jax.sharding.Mesh(
    array, mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.MESH_AXES)
  )


def train_batch_spec(config, mesh) -> dict:
  """ShapeDtypeStructs of one global training batch (global batch, the longest sequence)."""
  b, l = config.train.batch_size, configlib.required_seq_len(config)
  h, w = configlib.image_grid(config)
  shapes = {
    'input_ids': ((b, l), jnp.int32),
    'labels': ((b, l), jnp.int32),
    'attention_mask': ((b, l), jnp.bool_),
    'positions': ((b, l), jnp.int32),
    'image_tokens': ((b, h * w, configlib.token_dim(config)), jnp.float32),
    'image_valid': ((b,), jnp.bool_),
  }
  specs = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
  shardings = step_lib.batch_shardings(config, mesh, specs)
  return {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in specs.items()
  }


def compile_train(config, mesh, compiler_options: dict | None = None):
  """The real jitted train step (training/step.py) compiled for `mesh` from abstract values."""
  tx = state_lib.make_optimizer(config.train)
  graphdef, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  batch = train_batch_spec(config, mesh)
  placeholder_id = config.text.vocab_size  # Any valid id: a spare embedding row.
  step = step_lib.build_train_step(config, graphdef, tx, shardings, mesh, placeholder_id, batch)
  return step.lower(state, batch).compile(compiler_options=compiler_options)


def sampling_state(config) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, abstract params) as the sampler holds them: no LM head, floating params in the
  compute dtype (quantized kernels when `model.quant` is set)."""
  graphdef, abstract_params = nnx.split(nextstep.abstract_model(config), nnx.Param)
  return generate.for_sampling(graphdef, abstract_params, config.model.dtype)


def sampling_program(config, mesh) -> tuple[generate.SamplingProgram, Any]:
  """(the sampling program every entry point runs, its abstract params with shardings) on `mesh`."""
  graphdef, abstract_params = sampling_state(config)
  rules = config.mesh.rules
  shardings = rules_lib.state_shardings(abstract_params, mesh, rules)
  params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
  )
  return generate.SamplingProgram(graphdef, shardings, mesh, rules), params


def compile_sample(
  config,
  mesh,
  compiler_options: dict | None = None,
  pieces: tuple[str, ...] = ('generate', 'prefill', 'token_step'),
) -> dict:
  """The sampling program (generate.SamplingProgram) compiled for `mesh` from abstract values:
  {'generate': the whole generation (its memory is the sampler's), 'prefill', 'token_step': the
  two pieces it is made of (costed separately)} for the names in `pieces`."""
  program, params = sampling_program(config, mesh)
  rules = config.mesh.rules
  images, rows, width, cfg = costs.sample_shapes(config)
  batch_axes = rules_lib.logical_to_spec(('batch',), rules)[0]
  split = math.prod(
    mesh.shape[axis]
    for axis in ((batch_axes,) if isinstance(batch_axes, str) else (batch_axes or ()))
  )
  if images % split:
    raise ValueError(
      f'sample.batch_size={images} images must be divisible by the {split} devices '
      'that shard the logical batch axis; change sample.batch_size or the mesh.'
    )
  m = config.model
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  row_sh = program._spec(rows, 'batch', None)
  prompt = {
    'input_ids': sds((rows, width), jnp.int32, row_sh),
    'attention_mask': sds((rows, width), jnp.bool_, row_sh),
    'positions': sds((rows, width), jnp.int32, row_sh),
  }
  keys = sds((images,), jax.random.key(0).dtype, program._spec(images, 'batch'))
  compiled = {}
  if 'generate' in pieces:
    compiled['generate'] = (
      program.generate_program(rows, images)
      .lower(params, prompt, keys, cfg)
      .compile(compiler_options=compiler_options)
    )
  if 'prefill' in pieces:
    compiled['prefill'] = (
      program.prefill_program(rows)
      .lower(params, prompt, cfg)
      .compile(compiler_options=compiler_options)
    )
  if 'token_step' in pieces:
    slots = width + cfg.num_tokens - 1
    cache_sh = program.cache_shardings(rows)
    kv_shape = (m.num_layers, rows, slots, m.num_kv_heads, m.head_dim)
    dtype = nn.DTYPES[m.dtype]
    cache = type(cache_sh)(
      sds(kv_shape, dtype, cache_sh.k),
      sds(kv_shape, dtype, cache_sh.v),
      sds((rows, slots), jnp.bool_, cache_sh.key_valid),
      sds((), jnp.int32, cache_sh.index),
    )
    replicated = rules_lib.activation_spec(mesh, rules)
    compiled['token_step'] = (
      program.token_step_program(rows, images)
      .lower(
        params,
        cache,
        sds((rows, m.hidden_size), dtype, row_sh),
        sds((rows, 1), jnp.int32, row_sh),
        sds((), jnp.int32, replicated),
        keys,
        cfg,
      )
      .compile(compiler_options=compiler_options)
    )
  return compiled


def memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  out = {
    'argument_bytes': int(stats.argument_size_in_bytes),
    'output_bytes': int(stats.output_size_in_bytes),
    'alias_bytes': int(stats.alias_size_in_bytes),
    'temp_bytes': int(stats.temp_size_in_bytes),
  }
  out['total_bytes'] = (
    out['argument_bytes']
    + out['output_bytes']
    - out['alias_bytes']
    + out['temp_bytes']
    + int(stats.generated_code_size_in_bytes)
  )
  return out


def cost(compiled, with_hbm: bool = False) -> np.ndarray:
  """(flops, bytes accessed) per device from the compiler's cost analysis; with_hbm appends the
  HBM traffic counted from the optimized HLO (hlo_traffic.hbm_bytes; loop-free compiles)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  values = [float(analysis.get('flops', 0.0)), float(analysis.get('bytes accessed', 0.0))]
  if with_hbm:
    values.append(hlo_traffic.hbm_bytes(compiled.as_text()))
  return np.array(values)


def with_overrides(config, **fields):
  """A copy of `config` with `model.x` / `sample.x` fields replaced (`model__num_layers=1`)."""
  copy = config.copy_and_resolve_references()
  copy.unlock()
  for key, value in fields.items():
    group, name = key.split('__')
    copy[group][name] = value
  copy.lock()
  return copy


# XLA's TPU SPMD partitioner turns large FSDP matmuls into windowed einsums (collective matmuls):
# a while loop over the all-gathered / reduce-scattered shards, whose body the cost analysis counts
# once. Calibration compiles switch them off: the same matmuls, no loops.
CALIBRATION_OPTIONS = {
  'xla_tpu_enable_windowed_einsum_for_all_gather': False,
  'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False,
}


# The sampling token step is calibrated with every decoder layer unrolled (a 48-layer 14B token
# step compiles in 78 s for v5e-1, 500 s for v5e-8 on a 2-core host): extrapolating 1- and
# 2-layer compiles charged each layer the first layers' extra fusions
# (benchmarks/decode_bytes_by_layers.py: 1 -> 2 layers +0.42 GB, the mean layer of 48 +0.35 GB,
# so an 18% overstatement at 48 layers).
# Step calibration of sampling starts at 2 head evaluations per token: with one, the per-token
# modulation table (FlowHead.step_modulations) has a single row and compiles to other fusions than
# at E >= 2 (on v5e tensor-parallel the 1 -> 2 difference charged ~27 MB per device of table
# building to every integration step).
TABLE_STEPS_BASE = 2


class CalibrationError(RuntimeError):
  """A calibration compile still holds loops, so its cost analysis would undercount."""


def while_loops(compiled) -> int:
  """Number of while loops in the optimised HLO (each body is costed once)."""
  return compiled.as_text().count(' while(')


def calibrated_cost(
  config, compile_fn: Callable, axes: dict, bases: dict | None = None, with_hbm: bool = False
) -> np.ndarray:
  """Cost of `compile_fn(config, compiler_options)` with every loop counted, by linear extrapolation.

  axes: {'model__num_layers': real_count, ...}; bases: {axis: b} (default 1, at most the real
  count). For each axis a compile at b + 1 (others at their base) gives its per-unit cost:
  C(n) = C(b) + (n - b) (C(b + 1) - C(b)). Every compile unrolls the model's scans and the
  integrator's steps and disables windowed einsums (CALIBRATION_OPTIONS); a compile that still has
  a while loop raises CalibrationError."""

  def loop_free_cost(fields: dict) -> np.ndarray:
    compiled = compile_fn(with_overrides(config, **fields), CALIBRATION_OPTIONS)
    loops = while_loops(compiled)
    if loops:
      raise CalibrationError(
        f'the calibration compile with {fields} has {loops} while loops whose '
        'bodies the cost analysis counts once.'
      )
    return cost(compiled, with_hbm)

  base_counts = {name: min((bases or {}).get(name, 1), count) for name, count in axes.items()}
  base_fields = base_counts | {'model__scan_unroll': True}
  base = loop_free_cost(base_fields)
  total = base.copy()
  for name, count in axes.items():
    if count > base_counts[name]:
      total += (count - base_counts[name]) * (
        loop_free_cost(base_fields | {name: base_counts[name] + 1}) - base
      )
  return total


def _bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bool_:
    return 8
  return (jnp.iinfo(dtype) if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype)).bits


def _device_bytes(leaf, sharding) -> float:
  """Bytes of one device's shard of `leaf` (a ShapeDtypeStruct) under `sharding`."""
  return math.prod(sharding.shard_shape(leaf.shape)) * _bits(leaf.dtype) / 8


# Flow-head weights used by every velocity evaluation (the x path); the rest of the head (time /
# step / condition embeddings, every adaLN modulation) depends only on (t, d, c) and is evaluated
# once per token for all of its evaluation points (FlowHead.step_modulations).
HEAD_PER_EVALUATION = ("'input_proj'", "'mlp_0'", "'mlp_2'", "'in_ln'", "'linear'", "'norm_final'")


def token_floor_bytes(config, mesh) -> dict:
  """The least HBM traffic of one image token step per device: every weight a token uses read
  once (decoder layers, final norm, image projectors, the head's condition path; the embedding
  table is not read by a decode step), the head's x-path weights (HEAD_PER_EVALUATION) once per
  head evaluation (`velocity_calls`), and the filled part of the KV cache (prompt + half the
  image tokens on average). Sizes are the sampler's (compute dtype or quantized) shards on
  `mesh`. Returns the parts and 'total'."""
  program, params = sampling_program(config, mesh)
  flat = {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  in_head = lambda k: "'image_head'" in k
  per_eval = lambda k: (
    in_head(k)
    and "'time_embed'" not in k
    and "'step_embed'" not in k
    and any(name in k for name in HEAD_PER_EVALUATION)
  )
  head_eval = sum(_device_bytes(x, x.sharding) for k, x in flat.items() if per_eval(k))
  once = sum(
    _device_bytes(x, x.sharding)
    for k, x in flat.items()
    if not per_eval(k) and "'embed_tokens'" not in k
  )
  images, rows, width, cfg = costs.sample_shapes(config)
  m = config.model
  slots = width + cfg.num_tokens - 1
  kv = jax.ShapeDtypeStruct(
    (m.num_layers, rows, slots, m.num_kv_heads, m.head_dim), nn.DTYPES[m.dtype]
  )
  filled = (width + (cfg.num_tokens - 1) / 2) / slots
  kv_read = 2 * _device_bytes(kv, program.cache_shardings(rows).k) * filled
  calls = cfg.integrator.velocity_calls
  return {
    'weights_once': once,
    'head_per_evaluation': head_eval,
    'head_calls': calls,
    'kv_read': kv_read,
    'total': once + head_eval * calls + kv_read,
  }


def step_estimate(
  chip: Chip,
  devices: int,
  model_flops: float,
  flops: float,
  bytes_: float,
  comm_s: float,
  calibrated: bool,
) -> tuple[float | None, str | None, float | None, str]:
  """(step seconds, bound, MFU, note) from per-device compiler FLOPs / bytes and collective seconds.

  Every device runs its share of the model plus recomputation and non-matmul work, so the
  devices' total compiler FLOPs below the model FLOPs means the calibration missed work: such a
  cost (or an uncalibrated one) gives no step time and no MFU, only the note saying why."""
  ratio = flops * devices / model_flops
  if not calibrated:
    return None, None, None, 'no step time or MFU claim'
  if ratio < 1:
    return (
      None,
      None,
      None,
      (
        f'INVALID calibration: compiler FLOPs are {ratio:.2f}x the model FLOPs '
        '(< 1); no step time or MFU claim'
      ),
    )
  estimated, bound = max(
    (flops / chip.peak_flops, 'compute'),
    (bytes_ / chip.hbm_bandwidth, 'memory'),
    (comm_s, 'collective'),
  )
  return (
    float(estimated),
    bound,
    float(model_flops / (estimated * devices * chip.peak_flops)),
    f'compiler FLOPs {ratio:.3f}x model FLOPs',
  )


def plan(
  config,
  topology: str,
  task: str = 'train',
  hbm_bytes: int | None = None,
  calibrate: bool = True,
  log: Callable[[str], None] = print,
  cost_if_unfit: bool = False,
) -> Plan:
  """Compiles `task` for `topology` and returns its Plan (see the module docstring).
  cost_if_unfit: calibrate the cost even when it does not fit (a per-token comparison with a
  layout that fits; the calibration compiles hold 1-2 layers).

  Raises DoesNotFit (after logging the plan) when the per-device total exceeds the HBM."""
  if task not in TASKS:
    raise ValueError(f'task={task!r}; use one of {TASKS}.')
  lora_on = bool(config.train.get('lora') and config.train.lora.rank)
  if task == 'finetune_lora' and not lora_on:
    raise ValueError('task=finetune_lora needs LoRA: set --config.train.lora.rank (e.g. 16).')
  if task in ('train', 'finetune_full') and lora_on:
    raise ValueError(
      f'task={task} trains every param; use task=finetune_lora with train.lora.rank > 0.'
    )
  configlib.validate(config)
  chip = chip_for(topology)
  hbm = hbm_bytes or chip.hbm_bytes
  devices = topology_devices(topology)
  mesh = make_mesh(config, devices)
  log(f'[aot] {task} on {topology}: {len(devices)} devices, mesh {dict(mesh.shape)}')
  started = time.monotonic()
  try:
    if task in TRAIN_TASKS:
      compiled = compile_train(config, mesh)
      mem = memory(compiled)
    else:
      mem = memory(compile_sample(config, mesh, pieces=('generate',))['generate'])
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    raise DoesNotFit(
      knobs_message(
        config,
        dict(mesh.shape),
        task,
        f'{task} does not fit {topology}: the TPU compiler says "{str(error).splitlines()[0]}"',
      )
    ) from error
  compile_s = time.monotonic() - started
  log(f'[aot] compiled in {compile_s:.1f} s; per-device total {mem["total_bytes"] / GIB:.2f} GiB')
  if mem['total_bytes'] > hbm and not cost_if_unfit:
    calibrate = False  # It does not fit: report the memory without the calibration compiles.

  m = config.model
  notes = []
  uncalibrated = 'uncalibrated cost (loop bodies counted once)'
  if task in TRAIN_TASKS:
    batch, seq_len = config.train.batch_size, configlib.required_seq_len(config)
    model_flops = costs.train_model_flops(config)
    if lora_on:  # Frozen weights get no weight gradients: forward + input gradients only.
      model_flops *= 2 / 3
      notes.append(
        'LoRA model FLOPs = 2/3 of full training (no weight gradients of the frozen base)'
      )
    flops, bytes_ = cost(compiled)
    if calibrate:
      log('[aot] calibrating the cost analysis (1- and 2-layer unrolled compiles)')
      try:
        flops, bytes_ = calibrated_cost(
          config,
          lambda c, options: compile_train(c, mesh, options),
          {'model__num_layers': m.num_layers},
        )
      except CalibrationError as error:
        calibrate, uncalibrated = False, f'{uncalibrated}: {error}'
    if m.attention == 'splash':
      batch_split = mesh.shape['data'] * mesh.shape['fsdp']
      flops += (
        costs.splash_compiler_flops(config, batch / batch_split, seq_len) / mesh.shape['tensor']
      )
      notes.append('splash FLOPs added by formula')
    params = sum(
      math.prod(x.shape)
      for x in jax.tree.leaves(nnx.state(nextstep.abstract_model(config), nnx.Param))
    )
    comm_s = costs.collective_bytes(config, mesh, params) / chip.ici_bandwidth
    traffic = bytes_
  else:
    images, rows, width, cfg = costs.sample_shapes(config)
    batch, seq_len = images, width + cfg.num_tokens
    model_flops = costs.sample_model_flops(config)
    n = cfg.num_tokens
    uncalibrated_costs = lambda: tuple(
      cost(c) for c in compile_sample(config, mesh, pieces=('prefill', 'token_step')).values()
    )
    if calibrate:
      log(
        '[aot] calibrating the cost analysis (prefill: 1-/2-layer unrolled compiles; token step: '
        f'all {m.num_layers} layers unrolled at {TABLE_STEPS_BASE} and {TABLE_STEPS_BASE + 1} '
        'head evaluations)'
      )
      try:
        prefill_cost = calibrated_cost(
          config,
          lambda c, options: compile_sample(c, mesh, options, ('prefill',))['prefill'],
          {'model__num_layers': m.num_layers},
          with_hbm=True,
        )
        token_cost = calibrated_cost(
          with_overrides(config, sample__time_grid='A', sample__solver='euler'),
          lambda c, options: compile_sample(c, mesh, options, ('token_step',))['token_step'],
          {
            'model__num_layers': m.num_layers,
            'sample__num_steps': costs.sample_shapes(config)[3].integrator.velocity_calls,
          },
          bases={'model__num_layers': m.num_layers, 'sample__num_steps': TABLE_STEPS_BASE},
          with_hbm=True,
        )
      except CalibrationError as error:
        calibrate, uncalibrated = False, f'{uncalibrated}: {error}'
    if not calibrate:
      prefill_cost, token_cost = uncalibrated_costs()
    flops, bytes_ = (prefill_cost + n * token_cost)[:2]
    # Decode streams weights from HBM, and the compiler's bytes also count buffers it stages in
    # on-chip memory (how much it stages changes between compiles: on v5e-8 the 3-evaluation
    # token step staged the whole KV cache and the 2-evaluation one did not), so calibrated
    # sampling times use the HBM traffic counted from the HLO (loop-free compiles only: a while
    # loop's state would count as read and written, so uncalibrated costs keep the compiler's).
    traffic_index = 2 if calibrate else 1
    traffic = (prefill_cost + n * token_cost)[traffic_index]
    token_traffic = token_cost[traffic_index]
    if calibrate:
      notes.append('time from HBM traffic counted in the HLO (hlo_traffic.py)')
    sample_extra = {
      'bytes_per_token': float(token_cost[1]),
      'hbm_bytes_per_token': float(token_cost[2]) if calibrate else None,
      'floor_bytes_per_token': float(token_floor_bytes(config, mesh)['total']),
      'token_step_s': float(
        max(token_cost[0] / chip.peak_flops, token_traffic / chip.hbm_bandwidth)
      ),
    }
    if m.attention == 'splash':  # The prefill's kernels, per device.
      rows_split = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['tensor']
      flops += costs.attention_flops(config, rows / rows_split, width, width, causal=True)
      notes.append('splash FLOPs added by formula')
    comm_s = 0.0
    notes.append(f'step = prefill + {n} token steps')
  flops_ratio = float(flops) * len(devices) / model_flops
  estimated, bound, mfu, note = step_estimate(
    chip, len(devices), model_flops, flops, traffic, comm_s, calibrated=calibrate
  )
  notes.append(note if calibrate else f'{uncalibrated}; {note}')
  result = Plan(
    task=task,
    topology=topology,
    chips=len(devices) // chip.devices_per_chip,
    devices=len(devices),
    mesh=dict(mesh.shape),
    seq_len=seq_len,
    global_batch=batch,
    attention=m.attention,
    remat=m.remat_policy,
    **mem,
    hbm_bytes=hbm,
    fits=mem['total_bytes'] <= hbm,
    compiler_flops_per_device=float(flops),
    compiler_bytes_per_device=float(bytes_),
    flops_per_step=float(model_flops),
    compiler_to_model_flops=flops_ratio,
    estimated_step_s=estimated,
    bound=bound,
    mfu_estimate=mfu,
    compile_s=compile_s,
    notes='; '.join(notes),
    **(sample_extra if task == 'sample' and calibrate else {}),
  )
  log(result.table())
  if not result.fits:
    over = (result.total_bytes - result.hbm_bytes) / GIB
    raise DoesNotFit(
      knobs_message(
        config,
        result.mesh,
        task,
        f'{task} does not fit {topology}: {result.total_bytes / GIB:.2f} GiB per device > '
        f'{result.hbm_bytes / GIB:.2f} GiB HBM ({over:.2f} GiB over).',
      ),
      result,
    )
  return result


def knobs_message(config, mesh: dict, task: str, headline: str) -> str:
  """`headline` plus the knobs that lower per-device memory, with their current values."""
  m = config.model
  if mesh['data'] > 1:
    knobs = [
      f'more FSDP: --config.mesh.fsdp=-1 --config.mesh.data=1 (now data={mesh["data"]}, '
      f'fsdp={mesh["fsdp"]}: data-parallel devices hold full replicas of params and optimizer)'
    ]
  else:
    knobs = [
      f'a larger slice (params and optimizer state are already sharded {mesh["fsdp"]}-way '
      f'over fsdp, {mesh["tensor"]}-way over tensor)'
    ]
  if task in TRAIN_TASKS:
    per_device = config.train.batch_size / (mesh['data'] * mesh['fsdp'])
    k, rows = config.train.microbatches, int(per_device)
    more = [d for d in range(2 * k, rows + 1, k) if rows == per_device and rows % d == 0]
    if more:
      knobs.append(
        f'gradient accumulation: --config.train.microbatches={more[0]} (now {k}; activations '
        f'of {rows // more[0]} of the {rows} rows per data/fsdp device at a time, same global '
        'batch and update)'
      )
    knobs.append(
      f'a smaller per-device batch: --config.train.batch_size (now '
      f'{config.train.batch_size} global, {per_device:g} per data/fsdp device)'
    )
    if m.remat_policy != 'full':
      knobs.append(f'rematerialise more: --config.model.remat_policy=full (now {m.remat_policy})')
  else:
    mode = config.model.quant.mode if 'quant' in config.model else 'none'
    if mode in ('none', 'int8'):
      knobs.insert(
        0,
        f'quantized weights: --quantize {"int4" if mode == "int8" else "int8"} (or int4; '
        f'config model.quant.mode, now {mode}): int8 halves the bf16 weights, int4 quarters them',
      )
    knobs.append(
      f'fewer images per call: --config.sample.batch_size (now {config.sample.batch_size})'
    )
    if m.param_dtype != 'bfloat16':
      knobs.append(
        f'bfloat16 weights for inference: --config.model.param_dtype=bfloat16 (now {m.param_dtype})'
      )
  return f'{headline} Try:\n  - ' + '\n  - '.join(knobs)
