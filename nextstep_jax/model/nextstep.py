"""The NextStep model: text embeddings + continuous image tokens -> decoder -> LM head / flow head.

Letters: B batch, L length, N image tokens per row, T token dim, D hidden, V vocab.
Official names: `embed_tokens.weight` (V, D) -> embed_tokens.embedding; `lm_head.weight` (V, D) ->
lm_head.kernel (D, V) = W.T; `image_in_projector` / `image_out_projector` Linear -> Dense
(kernel = W.T); `norm` and `layers.*` in `decoder`; `image_head.net.*` -> image_head.*
(see backbone.py and flow_head.py for the per-module tables).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax import nn as L
from nextstep_jax.model import backbone
from nextstep_jax.model import flow_head
from nextstep_jax.model import lora
from nextstep_jax.model import quant


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyper-parameters (from `config.model`)."""

  vocab_size: int
  backbone: backbone.BackboneConfig
  head: flow_head.FlowHeadConfig
  tie_word_embeddings: bool
  use_gen_pos_embed: bool
  base_image_grid_size: int

  @property
  def token_dim(self) -> int:
    return self.head.token_dim

  @classmethod
  def from_config(cls, m, mesh_rules=()) -> 'ModelConfig':
    """Builds from an ml_collections `config.model`; mesh_rules (config.mesh.rules) shard the
    splash attention kernel (needed with model.attention=splash under a multi-device mesh)."""
    dtype, param_dtype = L.DTYPES[m.dtype], L.DTYPES[m.param_dtype]
    rules = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_rules
    )
    bb = backbone.BackboneConfig(
      hidden_size=m.hidden_size,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim,
      intermediate_size=m.intermediate_size,
      rms_norm_eps=m.rms_norm_eps,
      rope_theta=m.rope_theta,
      attention_bias=m.attention_bias,
      o_attention_bias=m.o_attention_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      remat_policy=m.remat_policy,
      attention=m.attention,
      mesh_rules=rules,
      scan_unroll=m.scan_unroll,
    )
    head = flow_head.FlowHeadConfig(
      token_dim=m.latent_channels * m.latent_patch_size**2,
      cond_dim=m.hidden_size,
      width=m.fm_head_dim,
      depth=m.fm_head_layers,
      dtype=dtype,
      param_dtype=param_dtype,
      remat_policy=m.remat_policy,
      scan_unroll=m.scan_unroll,
      mesh_rules=rules,
      step_cond=m.get('fm_head_step_cond', False),
    )
    return cls(
      vocab_size=m.vocab_size,
      backbone=bb,
      head=head,
      tie_word_embeddings=m.tie_word_embeddings,
      use_gen_pos_embed=m.use_gen_pos_embed,
      base_image_grid_size=m.base_image_grid_size,
    )


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
  """MAE 2-D sin-cos table (grid*grid, dim) float32: first half encodes the column, second the
  row, each half [sin, cos] of position * 1/10000^(2i/(dim/2))."""
  if dim % 4:
    raise ValueError(f'gen_pos_embed needs hidden_size divisible by 4, got {dim}')

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(
    np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij'
  )
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


class NextStep(nnx.Module):
  """Parameters and the pure pieces of the forward; the objective and sampler compose them."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    bb = cfg.backbone
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      bb.hidden_size,
      dtype=bb.dtype,
      param_dtype=bb.param_dtype,
      rngs=rngs,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ('vocab', 'embed')),
    )
    self.decoder = backbone.Decoder(bb, rngs=rngs)
    kw = dict(use_bias=True, dtype=bb.dtype, param_dtype=bb.param_dtype, rngs=rngs)
    self.lm_head = (
      None
      if cfg.tie_word_embeddings
      else L.Dense(bb.hidden_size, cfg.vocab_size, ('embed', 'vocab'), **{**kw, 'use_bias': False})
    )
    self.image_in_projector = L.Dense(cfg.token_dim, bb.hidden_size, ('token', 'embed'), **kw)
    self.image_out_projector = L.Dense(bb.hidden_size, bb.hidden_size, ('embed', 'embed_out'), **kw)
    self.image_head = flow_head.FlowHead(cfg.head, rngs=rngs)

  def embed(
    self, input_ids: jax.Array, image_tokens: jax.Array | None, image_token_mask: jax.Array | None
  ) -> jax.Array:
    """input_ids (B, L) int; image_tokens (B, N, T) float; image_token_mask (B, L) bool marks
    placeholders, each row holding exactly N, filled in order. Returns (B, L, D) embeddings."""
    x = L.embed_lookup(self.embed_tokens, input_ids)
    if image_tokens is None:
      return x
    projected = self.image_in_projector(image_tokens)  # (B, N, D)
    order = jnp.clip(jnp.cumsum(image_token_mask, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(projected, order[..., None], axis=1)
    return jnp.where(image_token_mask[..., None], gathered.astype(x.dtype), x)

  def embed_image_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, L, T) -> (B, L, D) input embeddings (sampling feeds tokens this way)."""
    return self.image_in_projector(tokens).astype(self.cfg.backbone.dtype)

  def __call__(self, x, positions, token_valid, cache=None, read_slots=None):
    """Decoder on embeddings: see `backbone.Decoder.__call__`. Returns (hidden (B, L, D), cache)."""
    return self.decoder(x, positions, token_valid, cache, read_slots)

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """hidden (..., D) -> logits (..., V) float32."""
    if self.lm_head is None:
      logits = L.embed_attend(self.embed_tokens, hidden).astype(jnp.float32)
    else:
      logits = self.lm_head(hidden).astype(jnp.float32)
    return L.constrain(
      logits, self.cfg.backbone.mesh_rules, *(['batch'] + [None] * (logits.ndim - 2)), 'vocab'
    )

  def head_condition(self, hidden: jax.Array, image_index: jax.Array | None = None) -> jax.Array:
    """The flow head's condition c = image_out_projector(hidden (..., D) [+ gen_pos_embed at the
    predicted token's flat index `image_index` (...) int when enabled])."""
    if self.cfg.use_gen_pos_embed:
      table = jnp.asarray(
        sincos_pos_embed_2d(self.cfg.backbone.hidden_size, self.cfg.base_image_grid_size)
      )
      hidden = hidden + table[image_index].astype(hidden.dtype)
    return self.image_out_projector(hidden)


def count_params(state) -> int:
  """Number of scalars in an nnx.State or a pytree of (abstract) arrays."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def model_config(config) -> ModelConfig:
  """The ModelConfig of a full config (`config.model` under `config.mesh.rules`)."""
  return ModelConfig.from_config(config.model, mesh_rules=config.mesh.rules)


def build_model(config, seed: int, quantized: bool = True) -> NextStep:
  """The model of `config` initialised from `seed`: LoRA adapters when train.lora is on, then
  quantized kernels when model.quant.mode is set (and `quantized`; QLoRA when both)."""
  model = NextStep(model_config(config), rngs=nnx.Rngs(seed))
  lora_cfg = lora.LoraConfig.from_config(config)
  qcfg = quant.QuantConfig.from_config(config.model) if quantized else quant.QuantConfig()
  if lora_cfg is not None:
    lora.add_adapters(model, lora_cfg, nnx.Rngs(seed + 1), for_quantized_base=qcfg.enabled)
  return quant.quantize_model(model, qcfg)


def abstract_model(config, quantized: bool = True, lm_head: bool = True) -> NextStep:
  """The model with ShapeDtypeStruct params (no memory); its graphdef is the static half. With
  `config.model.quant.mode` set (and `quantized`) its linear layers hold quantized kernels
  (model/quant.py); quantized=False gives the float model the quantized one is made from.
  lm_head=False: the model as image sampling holds it, without the LM head (never evaluated)."""
  model = nnx.eval_shape(lambda: build_model(config, 0, quantized))
  if not lm_head:
    model.lm_head = None
  return model
