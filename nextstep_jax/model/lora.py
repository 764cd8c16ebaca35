"""LoRA adapters on the decoder's linear layers, through qwix's LoRA for NNX.

`add_adapters` gives every targeted Dense of the stacked decoder layers two `nnx.LoRAParam`s next
to its kernel (qwix's names and shapes): for a kernel (I, *out) contracted over I,
  kernel_lora_a (layers, I, r)   he_uniform (qwix's default),
  kernel_lora_b (layers, r, prod(out))   zeros,
and the layer computes y = x @ kernel + (alpha / r) (x @ a) @ b (qwix's `LoraProvider` adds the
second term when it intercepts the Dense's dot_general). With b = 0 the adapted model equals the
base model exactly.

Why per layer: the decoder applies its layers with `lax.scan` over stacked params
(`layers.scan_stack`), and variables that qwix creates inside the scan body would live only in
the traced per-layer module. So the adapters are created by `nnx.vmap` over the stack, one
`qwix.apply_lora_to_model` per layer (independent RNG streams), and come back stacked on the
`layers` axis like every other layer param; the returned layers keep qwix's intercepted
`__call__`, so the scan body finds its adapter slice and qwix adds the low-rank term.

`targets` are regular expressions matched (re.fullmatch) against a Dense's path inside one
decoder layer, e.g. 'self_attn/q_proj' or 'mlp/.*'. Only adapters (and the flow head with
`train_head`) are trained: `trainable_filter` selects them and the optimizer state covers nothing
else (training/state.py). `merge_adapters` folds the adapters into the kernels,
W' = W + (alpha / r) a @ b, giving plain base params that sample with the base model's graph.

QLoRA: with model.quant.mode set the adapters are made on the float model, then the kernels are
quantized (model/quant.py) and the quantized Dense adds the low-rank term (see `add_adapters`).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from nextstep_jax.model import backbone

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
DENSE_PATHS = (
  'self_attn/q_proj',
  'self_attn/k_proj',
  'self_attn/v_proj',
  'self_attn/o_proj',
  'mlp/gate_proj',
  'mlp/up_proj',
  'mlp/down_proj',
)  # Every linear layer of a decoder layer.
HEAD_PATH = 'image_head'  # The flow head (fully trained with `train_head`).
INIT_FROM_SKIP = (
  '*_lora_a',
  '*_lora_b',
)  # train.init_from: adapters start fresh (sources have none).


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter rank r, scale alpha (the update is alpha / r * a @ b), target path patterns, and
  whether the flow head trains fully as well."""

  rank: int
  alpha: float
  targets: tuple[str, ...] = DENSE_PATHS
  train_head: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, config) -> 'LoraConfig | None':
    """From `config.train.lora`; None when LoRA is off (rank 0 or no such section)."""
    lc = config.train.get('lora')
    if lc is None or not lc.rank:
      return None
    return cls(
      rank=int(lc.rank),
      alpha=float(lc.alpha),
      targets=tuple(lc.targets),
      train_head=bool(lc.train_head),
    )


def targeted_paths(cfg: LoraConfig) -> tuple[str, ...]:
  """The decoder-layer Dense paths the target patterns select; an error if a pattern selects none."""
  for pattern in cfg.targets:
    if not any(re.fullmatch(pattern, path) for path in DENSE_PATHS):
      raise ValueError(
        f'train.lora.targets pattern {pattern!r} matches no linear layer of a decoder '
        f'layer; the layers are {DENSE_PATHS} (patterns are full regex matches).'
      )
  return tuple(p for p in DENSE_PATHS if any(re.fullmatch(t, p) for t in cfg.targets))


def lora_provider(cfg: LoraConfig) -> qwix.LoraProvider:
  """qwix's LoRA provider for the targeted Dense layers (paths relative to a decoder layer)."""
  module_path = '|'.join(f'(?:{p})' for p in targeted_paths(cfg))
  return qwix.LoraProvider(module_path=module_path, rank=cfg.rank, alpha=cfg.alpha)


def _layer_call_inputs(bb: backbone.BackboneConfig) -> tuple:
  """Placeholder inputs of one decoder layer (one token, no cache: the layer's keys are its own):
  qwix runs the layer once on them to create the adapters (XLA attention path, no splash kernel)."""
  x = jnp.zeros((1, 1, bb.hidden_size), bb.dtype)
  rope = jnp.zeros((1, 1, bb.head_dim), bb.dtype)
  valid = jnp.ones((1, 1), bool)
  index = jnp.zeros((), jnp.int32)
  return x, rope, rope, None, index, valid, index, valid


def add_adapters(
  model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs, for_quantized_base: bool = False
) -> nnx.Module:
  """Gives `model.decoder.layers` qwix LoRA adapters (see module docstring); returns the model
  (updated in place). The base params keep their values; b = 0, so outputs are unchanged.

  for_quantized_base (QLoRA, the kernels are quantized next by model/quant.py): the layers drop
  qwix's interception, whose dot_general hook cannot see a quantized kernel; the quantized
  `layers.Dense` adds the same term, lora_scale * (x @ a) @ b, itself."""
  decoder = model.decoder
  provider = lora_provider(cfg)
  inputs = _layer_call_inputs(decoder.cfg)

  @nnx.split_rngs(splits=decoder.cfg.num_layers)
  @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def adapt(layer, layer_rngs):
    return qwix.apply_lora_to_model(layer, provider, *inputs, rngs=layer_rngs)

  decoder.layers = adapt(decoder.layers, rngs)
  for _, module in nnx.iter_modules(decoder.layers):
    if hasattr(module, 'kernel_lora_a'):
      module.lora_scale = cfg.scale  # Read by a quantized Dense (QLoRA).
  if for_quantized_base:
    decoder.layers.__class__ = type(decoder.layers)._unquantized_type
  return model


def has_adapters(params) -> bool:
  """Whether an nnx.State of params holds LoRA adapters."""
  return any(str(path[-1]).endswith(ADAPTER_SUFFIXES) for path, _ in nnx.to_flat_state(params))


def trainable_filter(cfg: LoraConfig):
  """nnx filter of the trained params: the adapters, plus the flow head with `train_head`."""
  if cfg.train_head:
    return nnx.Any(nnx.LoRAParam, nnx.PathContains(HEAD_PATH))
  return nnx.LoRAParam


def split_trainable(params, cfg: LoraConfig | None):
  """params (nnx.State) -> (trained, frozen) nnx.States; (params, None) without LoRA."""
  if cfg is None:
    return params, None
  return nnx.split_state(params, trainable_filter(cfg), ...)


def join_params(trained, frozen):
  """Inverse of `split_trainable`."""
  return trained if frozen is None else nnx.merge_state(trained, frozen)


def merge_adapters(params, cfg: LoraConfig):
  """Adapter params (nnx.State) -> base params: every adapted kernel W (layers, I, *out) becomes
  W + scale * (a @ b).reshape(W.shape) in W's dtype (product in float32); adapters dropped."""
  flat = dict(nnx.to_flat_state(params))
  for path in flat:
    name = str(path[-1])
    if name.endswith('_lora_a') and path[:-1] + (name.removesuffix('_lora_a'),) not in flat:
      raise ValueError(
        f'{".".join(map(str, path))} adapts a kernel that is not a float param here (a '
        'quantized QLoRA base?): merge into the float base params and quantize afterwards.'
      )
  merged = {}
  for path, var in flat.items():
    name = str(path[-1])
    if name.endswith(ADAPTER_SUFFIXES):
      continue
    a_path = path[:-1] + (name + '_lora_a',)
    if a_path in flat:
      kernel = var.get_value()
      a = flat[a_path].get_value().astype(jnp.float32)
      b = flat[path[:-1] + (name + '_lora_b',)].get_value().astype(jnp.float32)
      delta = jnp.matmul(a, b).reshape(kernel.shape) * cfg.scale
      var = var.replace(value=(kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    merged[path] = var
  return nnx.from_flat_state(merged)


def count_trainable(params, cfg: LoraConfig | None) -> tuple[int, int]:
  """(trained scalars, all scalars) of an nnx.State of params."""
  trained, _ = split_trainable(params, cfg)
  count = lambda s: int(sum(x.size for x in jax.tree.leaves(s)))
  return count(trained), count(params)
