"""Flow-matching head (`image_head.net`): an AdaLN residual MLP predicting a token's velocity.

Letters: M rows (tokens x CFG branches x batch-mul copies), T token dim (64 official), C condition
width (decoder hidden), W head width.

Official names map one-to-one (torch Linear weight (out, in) -> kernel (in, out) = W.T; the
digit-named torch submodules become `_N` attributes; res_blocks are stacked on a leading axis):
  time_embed.mlp.{0,2}        -> time_embed.mlp_0 / mlp_2
  cond_embed, input_proj      -> same names
  res_blocks.N.in_ln          -> res_blocks.in_ln (weight, bias)
  res_blocks.N.mlp.{0,2}      -> res_blocks.mlp_0 / mlp_2
  res_blocks.N.adaLN_modulation.1 -> res_blocks.adaLN_modulation_1 (W, 3W): (shift, scale, gate)
  final_layer.adaLN_modulation.1  -> final_layer.adaLN_modulation_1 (W, 2W): (shift, scale)
  final_layer.linear          -> final_layer.linear
Time convention: raw t in [0, 1], t = 0 noise, t = 1 data.

Few-step heads (`step_cond`, not in the official model): a `step_embed` MLP shaped like
`time_embed` embeds the step size d in [0, 1] the same way as t and is added to the condition,
y = time_embed(t) + step_embed(d) + cond_embed(c). Its output layer `step_embed.mlp_2` starts at
zero, so an official head copied into a step-conditioned one has exactly the official velocity
until training moves it; the head then predicts the average velocity over [t, t + d].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import nn as L

TIME_FREQ_DIM = 256
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FlowHeadConfig:
  token_dim: int
  cond_dim: int
  width: int
  depth: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  remat_policy: str = 'none'
  step_cond: bool = False  # Add the zero-initialised step-size embedding (few-step heads).
  scan_unroll: bool = False  # Unroll the res-block scan (exact compiler cost analysis; AOT only).
  mesh_rules: tuple = ()  # Logical-axis rules for activation sharding constraints.


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQ_DIM) -> jax.Array:
  """t (M,) float -> (M, dim) float32 = [cos(t f), sin(t f)], f_k = exp(-ln(1e4) k / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(rngs, cfg, din, dout, axes, init):
  return L.Dense(
    din,
    dout,
    axes,
    use_bias=True,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    rngs=rngs,
    kernel_init=init,
  )


_XAVIER = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()
_NORMAL = nnx.initializers.normal(0.02)


class TimestepEmbedder(nnx.Module):
  """t (M,) -> (M, W) = mlp_2(silu(mlp_0(timestep_embedding(t)))); `zero_out` starts mlp_2 at 0."""

  def __init__(self, cfg: FlowHeadConfig, *, rngs: nnx.Rngs, zero_out: bool = False):
    self.mlp_0 = _dense(rngs, cfg, TIME_FREQ_DIM, cfg.width, ('head_freq', 'head_embed'), _NORMAL)
    self.mlp_2 = _dense(
      rngs, cfg, cfg.width, cfg.width, ('head_embed', 'head_mlp'), _ZEROS if zero_out else _NORMAL
    )

  def __call__(self, t):
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_embedding(t))))


class ResBlock(nnx.Module):
  """x += gate * mlp(in_ln(x) * (1 + scale) + shift), (shift, scale, gate) = adaLN(silu(y))."""

  def __init__(self, cfg: FlowHeadConfig, *, rngs: nnx.Rngs):
    self.in_ln = L.LayerNorm(cfg.width, LN_EPS, param_dtype=cfg.param_dtype, rngs=rngs)
    self.mlp_0 = _dense(rngs, cfg, cfg.width, cfg.width, ('head_embed', 'head_mlp'), _XAVIER)
    self.mlp_2 = _dense(rngs, cfg, cfg.width, cfg.width, ('head_mlp', 'head_embed'), _XAVIER)
    self.adaLN_modulation_1 = _dense(
      rngs, cfg, cfg.width, 3 * cfg.width, ('head_embed', 'head_mlp'), _ZEROS
    )

  def __call__(self, x, y_act):
    return self.modulated(x, self.adaLN_modulation_1(y_act))

  def modulated(self, x, modulation):
    """The block given its adaLN output (..., 3W) = (shift, scale, gate)."""
    shift, scale, gate = jnp.split(modulation, 3, axis=-1)
    h = self.in_ln(x) * (1 + scale) + shift
    return x + gate * self.mlp_2(jax.nn.silu(self.mlp_0(h)))


class FinalLayer(nnx.Module):
  """v = linear(norm_final(x) * (1 + scale) + shift), (shift, scale) = adaLN(silu(y))."""

  def __init__(self, cfg: FlowHeadConfig, *, rngs: nnx.Rngs):
    self.adaLN_modulation_1 = _dense(
      rngs, cfg, cfg.width, 2 * cfg.width, ('head_embed', 'head_mlp'), _ZEROS
    )
    self.linear = _dense(rngs, cfg, cfg.width, cfg.token_dim, ('head_embed', 'token'), _ZEROS)

  def __call__(self, x, y_act):
    return self.modulated(x, self.adaLN_modulation_1(y_act))

  def modulated(self, x, modulation):
    """The layer given its adaLN output (..., 2W) = (shift, scale)."""
    shift, scale = jnp.split(modulation, 2, axis=-1)
    return self.linear(L.layer_norm(x, LN_EPS) * (1 + scale) + shift)


class FlowHead(nnx.Module):
  """velocity(x_t (M, T), t (M,), c (M, C)[, step_size (M,)]) -> (M, T) float32."""

  def __init__(self, cfg: FlowHeadConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.time_embed = TimestepEmbedder(cfg, rngs=rngs)
    self.cond_embed = _dense(rngs, cfg, cfg.cond_dim, cfg.width, ('embed', 'head_embed'), _XAVIER)
    self.input_proj = _dense(rngs, cfg, cfg.token_dim, cfg.width, ('token', 'head_embed'), _XAVIER)
    self.res_blocks = L.create_stack(lambda r: ResBlock(cfg, rngs=r), cfg.depth, rngs)
    self.final_layer = FinalLayer(cfg, rngs=rngs)
    self.step_embed = TimestepEmbedder(cfg, rngs=rngs, zero_out=True) if cfg.step_cond else None

  def condition(self, c: jax.Array) -> jax.Array:
    """The condition embedding (M, W), computed once per token outside the integration loop."""
    return self.cond_embed(c)

  def velocity_from_condition(
    self, x_t: jax.Array, t: jax.Array, cond_emb: jax.Array, step_size: jax.Array | None = None
  ) -> jax.Array:
    """x_t (M, T), t (M,) or () (one time for every row: embedded once), cond_emb = condition(c)
    (M, W), step_size like t (used by `step_cond` heads, None = 0) -> velocity (M, T) float32."""
    rules = self.cfg.mesh_rules
    y_act = self._activated_condition(t, cond_emb, step_size)
    x = L.constrain(self.input_proj(x_t), rules, 'batch', 'head_embed')

    def body(
      block, h, _
    ):  # adaLN inside the (rematerialised) block: no (depth, M, 3W) tensor in training.
      return L.constrain(block(h, y_act), rules, 'batch', 'head_embed'), None

    x, _ = L.scan_stack(
      self.res_blocks, body, x, remat_policy=self.cfg.remat_policy, unroll=self.cfg.scan_unroll
    )
    return self.final_layer(x, y_act).astype(jnp.float32)

  def step_modulations(
    self, t: jax.Array, cond_emb: jax.Array, step_size: jax.Array | None = None
  ) -> dict:
    """Every part of the velocity that depends only on (t, d, c), for E evaluation times:
    t (E,), step_size (E,) or None, cond_emb (M, W) -> {'blocks': (E, depth, M, 3W), 'final':
    (E, M, 2W)}, computed as batched matmuls over E x M rows (the samplers build it once per token
    instead of once per integration step)."""
    y_act = self._activated_condition(
      t[:, None], cond_emb[None], None if step_size is None else step_size[:, None]
    )
    mods = self._modulations(y_act)
    return {'blocks': jnp.moveaxis(mods['blocks'], 0, 1), 'final': mods['final']}

  def velocity_from_modulations(self, x_t: jax.Array, modulations: dict) -> jax.Array:
    """x_t (M, T) and one evaluation point's modulations {'blocks': (depth, M, 3W), 'final':
    (M, 2W)} -> velocity (M, T) float32."""
    rules = self.cfg.mesh_rules
    x = L.constrain(self.input_proj(x_t), rules, 'batch', 'head_embed')

    def body(block, h, modulation):
      return L.constrain(block.modulated(h, modulation), rules, 'batch', 'head_embed'), None

    x, _ = L.scan_stack(
      self.res_blocks, body, x, modulations['blocks'], unroll=self.cfg.scan_unroll
    )
    return self.final_layer.modulated(x, modulations['final']).astype(jnp.float32)

  def _activated_condition(self, t, cond_emb, step_size):
    """silu(time_embed(t) [+ step_embed(d)] + cond_emb): t (...,) broadcast against cond_emb
    (..., W) (a scalar t is embedded once for every row)."""
    y = self.time_embed(jnp.reshape(t, (-1,))).reshape(jnp.shape(t) + (-1,))
    if self.step_embed is not None:
      d = jnp.zeros_like(t) if step_size is None else jnp.broadcast_to(step_size, jnp.shape(t))
      y = y + self.step_embed(jnp.reshape(d, (-1,))).reshape(jnp.shape(d) + (-1,))
    return L.constrain(
      jax.nn.silu(y + cond_emb),
      self.cfg.mesh_rules,
      *(None,) * (jnp.ndim(cond_emb) - 2),
      'batch',
      'head_embed',
    )

  def _modulations(self, y_act: jax.Array) -> dict:
    """adaLN outputs of every block and the final layer: y_act (..., W) -> {'blocks': (depth, ...,
    3W), 'final': (..., 2W)}."""

    def body(block, carry, _):
      return carry, block.adaLN_modulation_1(y_act)

    _, blocks = L.scan_stack(self.res_blocks, body, None, unroll=self.cfg.scan_unroll)
    return {'blocks': blocks, 'final': self.final_layer.adaLN_modulation_1(y_act)}

  def __call__(
    self, x_t: jax.Array, t: jax.Array, c: jax.Array, step_size: jax.Array | None = None
  ) -> jax.Array:
    return self.velocity_from_condition(x_t, t, self.condition(c), step_size)
