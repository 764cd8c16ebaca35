"""Shapes world on CPU: 32x32 images, pixels tokenizer, 8x8 patches -> 4x4 grid of 192-dim tokens.

nextstep-train --config configs/shapes.py --workdir runs/shapes
nextstep-train --config configs/shapes.py:demo      # the `make demo` budget
"""

from nextstep_jax import configlib

base = configlib.config_module('base.py', __file__)


def get_config(arg=None):
  c = base.get_base_config()
  c.name = 'shapes' if not arg else f'shapes_{arg}'
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 256, 6, 4, 2, 64
  m.intermediate_size = 704
  m.fm_head_dim, m.fm_head_layers = 256, 3
  m.latent_patch_size = 8
  m.max_seq_len = 48
  c.image.size = 32
  c.text.max_caption_tokens = 14
  c.data.dataset = 'shapes'
  c.data.num_train = 50000
  c.data.drop_text_prob = 0.1
  c.loss.fm_head_batch_mul = 4
  c.sample.num_steps = 50
  c.sample.cfg = 3.0
  c.train.steps = 3600  # ~34 min at ~112 sequences/s on a quiet 2-core CPU.
  c.train.batch_size = 64
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.log_every = 50
  c.train.checkpoint_every = 600
  c.train.sample_every = 1000
  if arg == 'demo':
    c.train.steps = 1000  # `make demo`: ~10 min of training.
    c.train.sample_every = 250
  elif arg:
    raise ValueError(f'unknown shapes variant {arg!r}; use "demo" or none')
  return c
