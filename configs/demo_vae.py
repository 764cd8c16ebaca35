"""`make demo DEMO_ARGS='--tokenizer vae'`: the shapes demo on a small VAE tokenizer trained first.

  python -m nextstep_jax.cli.demo --tokenizer vae [--workdir runs/demo_vae] [--config.x=y]

does, in one command (each stage resumes; a finished tokenizer is reused):
  nextstep-train-tokenizer --config configs/demo_vae.py --workdir runs/demo_vae/tokenizer
  nextstep-train --config configs/demo_vae.py --workdir runs/demo_vae \\
      --config.image.vae.checkpoint=runs/demo_vae/tokenizer
then samples and scores like `make demo`. The tokenizer is configs/tokenizer_shapes.py's f4 VAE
(32x32 -> 8x8x4, 800 steps, the recipe of benchmarks/README.md's tokenizer table) and the AR model
is configs/shapes_vae.py's on the `make demo` budget (1000 steps).

Variants: '' and 'tiny' (seconds: 16x16 images, tiny models, for tests).
"""

from nextstep_jax import configlib

shapes_vae = configlib.config_module('shapes_vae.py', __file__)
tokenizer_shapes = configlib.config_module('tokenizer_shapes.py', __file__)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown demo_vae variant {arg!r}; use "tiny" or none')
  c = shapes_vae.get_config()
  c.name = 'shapes_vae_demo' if not arg else f'shapes_vae_demo_{arg}'
  c.image.vae.checkpoint = ''  # The demo points it at <workdir>/tokenizer.
  tokenizer_shapes.set_vae_train(c, arg)
  c.vae_train.steps = 800  # ~3 min on the 2-core CPU.
  c.train.steps = 1000  # The `make demo` budget of configs/shapes.py:demo.
  c.train.sample_every = 250
  if arg == 'tiny':
    tokenizer_shapes.set_vae(c, 'tiny')  # 16x16 images -> 8x8x4 latents -> 4x4 tokens.
    vt = c.vae_train
    vt.steps, vt.checkpoint_every, vt.log_every, vt.disc_weight = 4, 4, 2, 0.0
    m = c.model
    m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 64, 2, 4, 2, 16
    m.intermediate_size, m.fm_head_dim, m.fm_head_layers = 128, 64, 2
    c.sample.num_steps, c.sample.batch_size = 4, 4
    t = c.train
    t.steps, t.batch_size, t.warmup_steps, t.log_every, t.checkpoint_every = 4, 8, 1, 2, 4
    t.sample_every, t.num_grid_samples = 0, 4
  return c
