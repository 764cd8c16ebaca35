"""How an int4 (sub-channel, group 128) weight-only matmul should be written for decode on TPU:
HBM traffic of five forms of y = x @ dequant(q, s) for a 2-row activation (one image, 2 CFG rows)
against a stack of int4 kernels at NextStep-1-Large's MLP shape (5120 x 13824, 4 layers unrolled as
in the planner's calibration compiles), compiled with libtpu for one v5e chip (no TPU needed).

  JAX_PLATFORMS=cpu python benchmarks/int4_matmul_forms.py   # -> results/int4_matmul_forms.json

Forms (nn.Dense uses `masked` up to nn.MASKED_MATMUL_MAX_ROWS rows, `grouped` up to
nn.GROUPED_MATMUL_MAX_ROWS, qwix's dequantizing matmul above):
  dequantized: q * s written as a bf16 kernel, then x @ w (qwix's float path);
  grouped: einsum over (group, in-group) axes, then the scales: sum_g (x_g @ q_g) s_g;
  chunked P: P 2-D matmuls on K/P slices of q, rows masked per group within each slice;
  masked: one 2-D matmul of (rows x groups) masked rows against the whole q, then the scales;
  per_channel: int4 with one scale per output channel, (x @ q) * s (a lower-quality int4).
The floor is the int4 kernels plus their bf16 group scales read once.
"""

import datetime
import json
import os
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

from nextstep_jax.planning import aot
from nextstep_jax.planning import hlo_traffic

OUT = pathlib.Path(__file__).parent / 'results' / 'int4_matmul_forms.json'
LAYERS, K, N, GROUP, ROWS = 4, 5120, 13824, 128, 2
G = K // GROUP


def masked_rows(x: jax.Array, groups: int) -> jax.Array:
  """(R, k) -> (R * groups, k): row (r, g) keeps only group g's inputs."""
  xg = x.reshape(x.shape[0], groups, -1)
  return (xg[:, None] * jnp.eye(groups, dtype=x.dtype)[None, :, :, None]).reshape(-1, x.shape[1])


def dequantized(x, q, s):
  w = (q.reshape(G, GROUP, N).astype(jnp.bfloat16) * s[:, None, :]).reshape(K, N)
  return x @ w


def grouped(x, q, s):
  xg = x.reshape(x.shape[0], G, GROUP)
  partial = jnp.einsum('rgk,gkn->rgn', xg, q.reshape(G, GROUP, N).astype(jnp.bfloat16))
  return jnp.einsum('rgn,gn->rn', partial, s)


def chunked(parts: int):
  def form(x, q, s):
    k, g = K // parts, G // parts
    out = 0.0
    for p in range(parts):
      xm = masked_rows(x[:, p * k : (p + 1) * k], g)
      partial = (xm @ q[p * k : (p + 1) * k].astype(jnp.bfloat16)).reshape(x.shape[0], g, N)
      out = out + jnp.einsum('rgn,gn->rn', partial, s[p * g : (p + 1) * g])
    return out

  return form


def masked(x, q, s):
  partial = (masked_rows(x, G) @ q.astype(jnp.bfloat16)).reshape(x.shape[0], G, N)
  return jnp.einsum('rgn,gn->rn', partial, s)


def per_channel(x, q, s):
  return (x @ q.astype(jnp.bfloat16)) * s[0]


FORMS = {
  'dequantized': dequantized,
  'grouped': grouped,
  'chunked_5': chunked(5),
  'chunked_8': chunked(8),
  'masked': masked,
  'per_channel': per_channel,
}


def measure(form, mesh) -> dict:
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def program(x, kernels, scales):
    for layer in range(LAYERS):
      x = x + 0.01 * form(x, kernels[layer], scales[layer])[:, :K]
    return x

  compiled = (
    jax.jit(program, in_shardings=(one, one, one), out_shardings=one)
    .lower(
      jax.ShapeDtypeStruct((ROWS, K), jnp.bfloat16),
      jax.ShapeDtypeStruct((LAYERS, K, N), jnp.int4),
      jax.ShapeDtypeStruct((LAYERS, G, N), jnp.bfloat16),
    )
    .compile()
  )
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  floor = LAYERS * (K * N / 2 + G * N * 2)
  hbm = hlo_traffic.hbm_bytes(compiled.as_text())
  return {
    'hbm_mb': round(hbm / 1e6, 1),
    'hbm_over_floor': round(hbm / floor, 3),
    'compiler_mb': round(analysis['bytes accessed'] / 1e6, 1),
    'gflops': round(analysis['flops'] / 1e9, 2),
    'floor_mb': round(floor / 1e6, 1),
  }


def main() -> int:
  mesh = jax.sharding.Mesh(aot.topology_devices('v5e:1x1'), ('x',))
  forms = {}
  for name, form in FORMS.items():
    forms[name] = measure(form, mesh)
    print(name, forms[name], flush=True)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(
    json.dumps(
      {
        'forms': forms,
        'shape': {'layers': LAYERS, 'K': K, 'N': N, 'group': GROUP, 'rows': ROWS},
        'topology': 'v5e:1x1',
        'command': 'JAX_PLATFORMS=cpu python benchmarks/int4_matmul_forms.py',
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs (compile host); libtpu AOT',
      },
      indent=2,
    )
    + '\n'
  )
  return 0


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.exit(main())
