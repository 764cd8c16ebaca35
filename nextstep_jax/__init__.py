"""nextstep-jax: NextStep-1 (autoregressive text-to-image with continuous tokens) in JAX/Flax NNX.

Importing the package turns off Flax's eager variable sharding (`flax_always_shard_variable`):
variables keep their logical `out_sharding` metadata but are created unsharded, so models can be
built (or `nnx.eval_shape`d) without a mesh. Arrays are placed on the mesh explicitly, through
`jax.jit(..., out_shardings=nextstep_jax.parallel.rules.state_shardings(...))` or a checkpoint
restore onto those shardings.
"""
import flax

__version__ = '0.1.0'

flax.config.update('flax_always_shard_variable', False)
