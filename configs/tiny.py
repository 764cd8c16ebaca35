"""Tiny config for tests and smoke runs (seconds on one CPU core).

nextstep-train --config configs/tiny.py --workdir /tmp/tiny
"""

from nextstep_jax import configlib

base = configlib.config_module('base.py', __file__)


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.name = 'tiny'
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 64, 2, 4, 2, 16
  m.intermediate_size = 128
  m.fm_head_dim, m.fm_head_layers = 64, 2
  m.latent_patch_size = 4
  m.max_seq_len = 64
  c.image.size = 16  # 4x4 grid of 48-dim tokens.
  c.data.num_train = 256
  c.sample.num_steps = 4
  c.sample.batch_size = 4
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.sample_every = 0
  c.train.num_grid_samples = 4
  return c
