"""The shapes AR model on the small VAE tokenizer of configs/tokenizer_shapes.py instead of pixels:
32x32 images -> 8x8x4 latents -> a 4x4 grid of 16-dim tokens (2x2 patches, per-token norm).

  nextstep-train-tokenizer --config configs/tokenizer_shapes.py --workdir runs/tokenizer_shapes
  nextstep-train --config configs/shapes_vae.py --workdir runs/shapes_vae
  nextstep-train --config configs/shapes_vae.py:noise --workdir runs/shapes_vae_noise   # gamma 0.2 tokenizer

Variants: '' (tokenizer runs/tokenizer_shapes), 'noise' (runs/tokenizer_shapes_noise); point
elsewhere with --config.image.vae.checkpoint=DIR.
"""
from configs import shapes
from configs import tokenizer_shapes


def get_config(arg=None):
  if arg not in (None, '', 'noise'):
    raise ValueError(f'unknown shapes_vae variant {arg!r}; use "noise" or none')
  c = shapes.get_config()
  c.name = 'shapes_vae' if not arg else f'shapes_vae_{arg}'
  tokenizer_shapes.set_vae(c)
  c.image.use_norm = True  # Official NextStep-1: tokens are LayerNormed like encoder_norm's patches.
  c.image.vae.checkpoint = 'runs/tokenizer_shapes' if not arg else 'runs/tokenizer_shapes_noise'
  return c
