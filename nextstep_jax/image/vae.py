"""The f8ch16 KL autoencoder (Flux/LDM layout) in Flax NNX, NHWC, and the latent normalisation.

images (B, S, S, 3) in [-1, 1] --Encoder--> moments (B, S/f, S/f, 2Z) = [mean | logvar]
  mean --encoder_norm: patchify psz x psz in (c, py, px) order, LayerNorm per position (no affine,
         eps 1e-6), unpatchify--> posterior N(mean, exp(logvar)) (logvar clipped to [-30, 20])
  z = mean (deterministic) or mean + std * eps;   latents = (z - shift_factor) * scaling_factor
latents --(latents / scaling_factor + shift_factor)--Decoder--> images (B, S, S, 3)
`encode`/`decode` take an optional `vae_tiling.Tiling`: overlapping spatial tiles, blended (large images).

f = 2 ** (len(ch_mult) - 1). Parameter names follow the official checkpoint (`encoder.down.0.block.1
.conv1` -> encoder/down/0/block/1/conv1); conv `kernel` is the torch OIHW weight transposed to HWIO,
GroupNorm `weight`/`bias` as in torch. Logical axes: conv kernels ('conv_height', 'conv_width',
'conv_in', 'conv_out'), biases ('conv_out',), norms ('norm',); all replicated by the default rules
(84M parameters), activations sharded over `batch`.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import nn
from nextstep_jax.image import patchify as patchify_lib
from nextstep_jax.image import vae_tiling

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6
CONV_AXES = ('conv_height', 'conv_width', 'conv_in', 'conv_out')


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig:
  """Official `AutoEncoderParams` fields plus our dtypes and GroupNorm group count."""

  in_channels: int = 3
  out_ch: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scaling_factor: float = 1.0
  shift_factor: float = 0.0
  deterministic: bool = True
  encoder_norm: bool = True
  psz: int = 2
  norm_groups: int = 32  # Official: 32.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def from_config(cls, vae_cfg) -> 'AutoEncoderConfig':
    """From the `image.vae` config group."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'dtype', 'param_dtype'}
    kwargs = {name: vae_cfg[name] for name in fields}
    kwargs['ch_mult'] = tuple(kwargs['ch_mult'])
    return cls(**kwargs, dtype=jnp.dtype(vae_cfg.dtype), param_dtype=jnp.dtype(vae_cfg.param_dtype))

  def check(self) -> None:
    """Raises ValueError when channel counts do not divide into GroupNorm groups."""
    widths = {self.ch * m for m in self.ch_mult} | {self.ch}
    bad = sorted(w for w in widths if w % self.norm_groups)
    if bad:
      raise ValueError(
        f'VAE widths {bad} (ch={self.ch} x ch_mult={self.ch_mult}) are not divisible '
        f'by norm_groups={self.norm_groups}; pick ch a multiple of norm_groups.'
      )


class Conv(nnx.Module):
  """k x k convolution, NHWC activations, HWIO `kernel` (torch weight.transpose(2, 3, 1, 0)).

  padding: 'SAME' (torch padding=(k-1)/2) or 'VALID'."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    size: int,
    cfg: AutoEncoderConfig,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: str = 'SAME',
  ):
    fan_in = in_ch * size * size
    init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')  # torch's default.
    self.kernel = nn.annotated_param(
      rngs, init, (size, size, in_ch, out_ch), CONV_AXES, cfg.param_dtype
    )
    bound = 1.0 / math.sqrt(fan_in)
    self.bias = nn.annotated_param(
      rngs,
      lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
      (out_ch,),
      ('conv_out',),
      cfg.param_dtype,
    )
    self.stride, self.padding, self.dtype = stride, padding, cfg.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm(groups, eps 1e-6, affine) over (H, W, C/groups), statistics in float32."""

  def __init__(self, channels: int, cfg: AutoEncoderConfig):
    self.groups = cfg.norm_groups
    self.weight = nnx.Param(jnp.ones((channels,), cfg.param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((channels,), cfg.param_dtype), out_sharding=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    normed = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(b, h, w, c)
    return (normed * self.weight[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
  """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), 1x1 `nin_shortcut` when channels change."""

  def __init__(self, in_ch: int, out_ch: int, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(in_ch, cfg)
    self.conv1 = Conv(in_ch, out_ch, 3, cfg, rngs)
    self.norm2 = GroupNorm(out_ch, cfg)
    self.conv2 = Conv(out_ch, out_ch, 3, cfg, rngs)
    self.nin_shortcut = Conv(in_ch, out_ch, 1, cfg, rngs) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.swish(self.norm1(x)))
    h = self.conv2(jax.nn.swish(self.norm2(h)))
    shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
    return shortcut + h


class AttnBlock(nnx.Module):
  """x + proj_out(softmax(q k^T / sqrt(C)) v) over the H*W positions, one head; softmax in f32."""

  def __init__(self, channels: int, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.norm = GroupNorm(channels, cfg)
    self.q = Conv(channels, channels, 1, cfg, rngs)
    self.k = Conv(channels, channels, 1, cfg, rngs)
    self.v = Conv(channels, channels, 1, cfg, rngs)
    self.proj_out = Conv(channels, channels, 1, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    normed = self.norm(x)
    q, k, v = (proj(normed).reshape(b, h * w, 1, c) for proj in (self.q, self.k, self.v))
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
    return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Zero-pad bottom/right by 1, then a 3x3 stride-2 'VALID' conv (halves H and W)."""

  def __init__(self, channels: int, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.conv = Conv(channels, channels, 3, cfg, rngs, stride=2, padding='VALID')

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest x2, then a 3x3 conv."""

  def __init__(self, channels: int, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.conv = Conv(channels, channels, 3, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: ResnetBlocks `block`, then a `downsample` (encoder) or `upsample`
  (decoder) when given."""

  def __init__(
    self, blocks: list, downsample: Downsample | None = None, upsample: Upsample | None = None
  ):
    self.block = nnx.List(blocks)
    self.downsample = downsample
    self.upsample = upsample

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.block:
      x = block(x)
    for resample in (self.downsample, self.upsample):
      if resample is not None:
        x = resample(x)
    return x


class Mid(nnx.Module):
  """block_1, attn_1, block_2 at the lowest resolution."""

  def __init__(self, channels: int, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, cfg, rngs)
    self.attn_1 = AttnBlock(channels, cfg, rngs)
    self.block_2 = ResnetBlock(channels, channels, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
  """images (B, S, S, in_channels) -> moments (B, S/f, S/f, 2 * z_channels)."""

  def __init__(self, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    self.conv_in = Conv(cfg.in_channels, cfg.ch, 3, cfg, rngs)
    widths = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
    levels = []
    for i in range(len(cfg.ch_mult)):
      blocks = [
        ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], cfg, rngs)
        for j in range(cfg.num_res_blocks)
      ]
      last = i == len(cfg.ch_mult) - 1
      levels.append(
        Level(blocks, downsample=None if last else Downsample(widths[i + 1], cfg, rngs))
      )
    self.down = nnx.List(levels)
    self.mid = Mid(widths[-1], cfg, rngs)
    self.norm_out = GroupNorm(widths[-1], cfg)
    self.conv_out = Conv(widths[-1], 2 * cfg.z_channels, 3, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """z (B, h, w, z_channels) -> images (B, h*f, w*f, out_ch). `up[0]` is full resolution, runs last."""

  def __init__(self, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    widths = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = Conv(cfg.z_channels, widths[-1], 3, cfg, rngs)
    self.mid = Mid(widths[-1], cfg, rngs)
    levels = [None] * len(widths)
    block_in = widths[-1]
    for i in reversed(range(len(widths))):
      blocks = []
      for _ in range(cfg.num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, widths[i], cfg, rngs))
        block_in = widths[i]
      levels[i] = Level(blocks, upsample=Upsample(block_in, cfg, rngs) if i else None)
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(widths[0], cfg)
    self.conv_out = Conv(widths[0], cfg.out_ch, 3, cfg, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(jax.nn.swish(self.norm_out(h)))


class AutoEncoder(nnx.Module):
  """Encoder + Decoder with the official posterior and latent normalisation (module docstring)."""

  def __init__(self, cfg: AutoEncoderConfig, rngs: nnx.Rngs):
    cfg.check()
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)

  def posterior(
    self, images: jax.Array, tiling: vae_tiling.Tiling | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """images (B, S, S, 3) in [-1, 1] -> (mean, logvar), each (B, S/f, S/f, Z) float32; the mean
    is normalised per psz x psz patch when `encoder_norm` (after blending, when tiled)."""
    if tiling is None:
      moments = self.encoder(images).astype(jnp.float32)
    else:
      moments = vae_tiling.tiled_apply(self.encoder, images, tiling, self.cfg.downsample, 1)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if self.cfg.encoder_norm:
      mean = normalize_patches(mean, self.cfg.psz)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def encode(
    self, images: jax.Array, key: jax.Array | None = None, tiling: vae_tiling.Tiling | None = None
  ) -> jax.Array:
    """images -> normalised latents (z - shift) * scale; z = mean unless `deterministic` is off and
    a key is given. `tiling`: encode overlapping tiles and blend them (vae_tiling)."""
    mean, logvar = self.posterior(images, tiling)
    z = mean
    if not self.cfg.deterministic and key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.normalize(z)

  def normalize(self, z: jax.Array) -> jax.Array:
    return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

  def denormalize(self, latents: jax.Array) -> jax.Array:
    return latents / self.cfg.scaling_factor + self.cfg.shift_factor

  def decode(self, latents: jax.Array, tiling: vae_tiling.Tiling | None = None) -> jax.Array:
    """Normalised latents (B, h, w, Z) -> images (B, h*f, w*f, 3) float32 (not clipped).
    `tiling`: decode overlapping latent tiles and blend them (vae_tiling)."""
    z = self.denormalize(latents)
    if tiling is None:
      return self.decoder(z).astype(jnp.float32)
    return vae_tiling.tiled_apply(self.decoder, z, tiling, 1, self.cfg.downsample)


def normalize_patches(mean: jax.Array, psz: int) -> jax.Array:
  """LayerNorm (no affine, eps 1e-6) over each psz x psz patch's Z*psz^2 values, in (c, py, px)
  order: (B, h, w, Z) -> same shape."""
  b, h, w, _ = mean.shape
  tokens = patchify_lib.patchify(mean, psz)
  return patchify_lib.unpatchify(nn.layer_norm(tokens, NORM_EPS), h // psz, w // psz, psz)


def chunked(fn, x: jax.Array, chunk: int) -> jax.Array:
  """fn applied to `chunk` rows at a time with lax.map (peak memory of one chunk); exact.

  x (B, ...) with B divisible by chunk (callers pad)."""
  b = x.shape[0]
  if b <= chunk:
    return fn(x)
  out = jax.lax.map(fn, x.reshape(b // chunk, chunk, *x.shape[1:]))
  return out.reshape(b, *out.shape[2:])


def pad_rows(x, multiple: int):
  """Pads the leading axis of a numpy/jax array with copies of its last row to a multiple."""
  extra = -x.shape[0] % multiple
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def config_dict(cfg: AutoEncoderConfig) -> Mapping[str, Any]:
  """The model fields as plain JSON-able values (no dtypes)."""
  out = {
    f.name: getattr(cfg, f.name)
    for f in dataclasses.fields(cfg)
    if f.name not in ('dtype', 'param_dtype')
  }
  out['ch_mult'] = list(cfg.ch_mult)
  return out
