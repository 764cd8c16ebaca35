"""nextstep-jax: NextStep-1 (autoregressive text-to-image with continuous tokens) in JAX/Flax NNX.

Importing the package turns off Flax's eager variable sharding (`flax_always_shard_variable`):
variables keep their logical `out_sharding` metadata but are created unsharded, so models can be
built (or `nnx.eval_shape`d) without a mesh. Arrays are placed on the mesh explicitly, through
`jax.jit(..., out_shardings=nextstep_jax.parallel.rules.state_shardings(...))` or a checkpoint
restore onto those shardings.

Console scripts (`nextstep-*`) record SIGTERM and Ctrl-C from here on, before the slow imports
(`nextstep_jax/signals.py`), so an early stop request is never lost silently.
"""

import os as _os
import sys as _sys


def _is_console_script() -> bool:
  """`nextstep-*` entry points, or `python -m nextstep_jax.cli.*` (argv[0] is '-m' while the
  package imports; the original command line tells)."""
  if _os.path.basename(_sys.argv[0] if _sys.argv else '').startswith('nextstep-'):
    return True
  orig = list(getattr(_sys, 'orig_argv', []))
  return '-m' in orig[:-1] and orig[orig.index('-m') + 1].startswith('nextstep_jax.cli.')


if _is_console_script():
  from nextstep_jax import signals as _signals

  _signals.install()

import flax  # noqa: E402

__version__ = '0.1.0'

flax.config.update('flax_always_shard_variable', False)
