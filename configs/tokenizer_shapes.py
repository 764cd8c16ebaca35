"""A small f4 VAE tokenizer for the shapes world (32x32 -> 8x8x4 latents; 16 tokens of 2x2 patches).

  nextstep-train-tokenizer --config configs/tokenizer_shapes.py --workdir runs/tokenizer_shapes
  nextstep-train-tokenizer --config configs/tokenizer_shapes.py:noise --workdir runs/tokenizer_shapes_noise
  nextstep-eval-tokenizer --workdir runs/tokenizer_shapes --workdir runs/tokenizer_shapes_noise

Variants: '' (no latent noise), 'noise' (noise regularisation gamma = 0.2, the paper's value),
'tiny' (seconds, for tests).
"""

from nextstep_jax import configlib

base = configlib.config_module('base.py', __file__)


def set_vae(c, arg=None) -> None:
  """The small VAE shared by the tokenizer and the AR configs that use it (configs/shapes_vae.py)."""
  c.image.tokenizer = 'vae'
  c.image.size = 32
  v = c.image.vae
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.norm_groups = 16, (1, 2, 2), 1, 4, 8
  v.psz = 2
  v.batch_chunk = 64
  c.model.latent_channels, c.model.latent_patch_size = 4, 2
  if arg == 'tiny':
    v.ch, v.ch_mult, v.norm_groups = 8, (1, 2), 4
    c.image.size = 16


def get_config(arg=None):
  if arg not in (None, '', 'noise', 'tiny'):
    raise ValueError(f'unknown tokenizer_shapes variant {arg!r}; use "noise", "tiny" or none')
  c = base.get_base_config()
  c.name = 'tokenizer_shapes' if not arg else f'tokenizer_shapes_{arg}'
  set_vae(c, arg)
  c.data.dataset = 'shapes'
  c.data.num_train = 20000
  set_vae_train(c, arg)
  return c


def set_vae_train(c, arg=None) -> None:
  """The tokenizer training recipe (vae_train.*), shared with configs/demo_vae.py; 'tiny' also
  shrinks data.num_train."""
  t = c.vae_train
  t.steps, t.batch_size, t.lr, t.warmup_steps = 1500, 32, 1e-3, 100
  t.l1_weight, t.l2_weight, t.kl_weight = 1.0, 1.0, 1e-6
  t.log_every, t.checkpoint_every, t.grid_every = 50, 500, 500
  if arg == 'noise':
    t.noise_max = 0.2
  elif arg == 'tiny':
    c.data.num_train = 64
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.num_eval = 16, 8, 3e-3, 1, 16
    t.log_every, t.checkpoint_every, t.grid_every = 4, 8, 0
    t.noise_max, t.disc_weight, t.disc_start, t.disc_ch = 0.2, 0.1, 2, 8
