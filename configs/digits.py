"""Real handwritten digits (sklearn) upsampled to 32x32; pixels tokenizer, 4x4 grid of 192-dim tokens.

nextstep-train --config configs/digits.py --workdir runs/digits
"""

from nextstep_jax import configlib

shapes = configlib.config_module('shapes.py', __file__)


def get_config(arg=None):
  c = shapes.get_config(arg)
  c.name = 'digits' if not arg else f'digits_{arg}'
  c.data.dataset = 'digits'
  c.data.num_train = 20000
  if not arg:
    c.train.steps = 1800  # 97-98% digit accuracy after ~17 min (benchmarks/README.md).
    c.train.checkpoint_every = 450
  return c
