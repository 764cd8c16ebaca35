"""Real handwritten digits (sklearn) upsampled to 32x32; pixels tokenizer, 4x4 grid of 192-dim tokens.

  nextstep-train --config configs/digits.py --workdir runs/digits
"""
from configs import shapes


def get_config(arg=None):
  c = shapes.get_config(arg)
  c.name = 'digits' if not arg else f'digits_{arg}'
  c.data.dataset = 'digits'
  c.data.num_train = 20000
  return c
