"""The shapes AR model on the small VAE tokenizer of configs/tokenizer_shapes.py instead of pixels:
32x32 images -> 8x8x4 latents -> a 4x4 grid of 16-dim tokens (2x2 patches, per-token norm).

  nextstep-train-tokenizer --config configs/tokenizer_shapes.py --workdir runs/tokenizer_shapes
  nextstep-train --config configs/shapes_vae.py --workdir runs/shapes_vae
  nextstep-train --config configs/shapes_vae.py:noise --workdir runs/shapes_vae_noise   # gamma 0.2 tokenizer

Training from the latent cache (the VAE encoder runs once per image instead of every step):

  nextstep-data cache-latents --config configs/shapes_vae.py --out runs/shapes_vae_latents/latents
  nextstep-train --config configs/shapes_vae.py:cached --workdir runs/shapes_vae_cached

Variants: '' (tokenizer runs/tokenizer_shapes), 'noise' (runs/tokenizer_shapes_noise), 'cached' /
'noise_cached' (the same, reading the latents that `cache-latents` wrote with that config to
runs/shapes_vae_latents / runs/shapes_vae_noise_latents; rebuild the cache when the tokenizer
changes). Point elsewhere with --config.image.vae.checkpoint=DIR and
--config.data.latent_cache_paths='DIR/latents-*.array_record'.
"""

from nextstep_jax import configlib

shapes = configlib.config_module('shapes.py', __file__)
tokenizer_shapes = configlib.config_module('tokenizer_shapes.py', __file__)

VARIANTS = ('', 'noise', 'cached', 'noise_cached')


def get_config(arg=None):
  arg = arg or ''
  if arg not in VARIANTS:
    raise ValueError(f'unknown shapes_vae variant {arg!r}; use one of {VARIANTS[1:]} or none')
  noise = arg.startswith('noise')
  c = shapes.get_config()
  c.name = 'shapes_vae_noise' if noise else 'shapes_vae'
  tokenizer_shapes.set_vae(c)
  c.image.use_norm = (
    True  # Official NextStep-1: tokens are LayerNormed like encoder_norm's patches.
  )
  c.image.vae.checkpoint = 'runs/tokenizer_shapes_noise' if noise else 'runs/tokenizer_shapes'
  if arg.endswith('cached'):  # The one change: read latents (built from the same data and VAE).
    c.data.use_latent_cache = True
    c.data.latent_cache_paths = f'runs/{c.name}_latents/latents-*.array_record'
    c.name += '_cached'
  return c
