"""Image tokenizers: images (B, S, S, 3) in [-1, 1] <-> latents (B, S/f, S/f, C).

Every tokenizer exposes `channels`, `downsample`, `latent_shape(size)`, `encode` and `decode`;
`image.tokenizer` picks `pixels` (below) or `vae` (`vae_tokenizer.VaeTokenizer`, weights from
`image.vae.checkpoint`).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PixelsTokenizer:
  """Latents are the normalised pixels themselves (f = 1, C = 3): x = uint8 / 127.5 - 1."""

  channels: int = 3
  downsample: int = 1

  def latent_shape(self, size: int) -> tuple[int, int, int]:
    return (size // self.downsample, size // self.downsample, self.channels)

  def encode(self, images):
    """images (B, S, S, 3) float in [-1, 1] -> latents (B, S, S, 3)."""
    return images

  def decode(self, latents):
    """latents (B, S, S, 3) -> images (B, S, S, 3) in [-1, 1] (clipped)."""
    return latents.clip(-1.0, 1.0)


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def get_tokenizer(config):
  """The image tokenizer named by `config.image.tokenizer`."""
  name = config.image.tokenizer
  if name == 'pixels':
    return PixelsTokenizer()
  if name == 'vae':
    from nextstep_jax.image import vae_tokenizer  # flax model

    return vae_tokenizer.VaeTokenizer.from_config(config)
  raise ValueError(f'image.tokenizer={name!r} is not available; use "pixels" or "vae"')
