"""Patch discriminator for tokenizer training: images (B, S, S, 3) -> logits (B, S/4, S/4, 1).

conv 4x4 stride 2, leaky ReLU(0.2), conv 4x4 stride 2, GroupNorm, leaky ReLU, conv 3x3 -> 1 logit
per patch (a small PatchGAN; each logit sees a 18x18-pixel receptive field).
"""

import dataclasses
import math

import jax
from flax import nnx

from nextstep_jax.image import vae


class PatchDiscriminator(nnx.Module):
  def __init__(self, width: int, cfg: vae.AutoEncoderConfig, rngs: nnx.Rngs):
    self.conv_0 = vae.Conv(cfg.out_ch, width, 4, cfg, rngs, stride=2)
    self.conv_1 = vae.Conv(width, 2 * width, 4, cfg, rngs, stride=2)
    groups = dataclasses.replace(cfg, norm_groups=math.gcd(cfg.norm_groups, 2 * width))
    self.norm_1 = vae.GroupNorm(2 * width, groups)
    self.conv_2 = vae.Conv(2 * width, 1, 3, cfg, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    h = jax.nn.leaky_relu(self.conv_0(images), 0.2)
    h = jax.nn.leaky_relu(self.norm_1(self.conv_1(h)), 0.2)
    return self.conv_2(h)
