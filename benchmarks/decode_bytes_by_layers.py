"""How the compiler's bytes-accessed count of one 14B decode token step grows with the layer count.

  python benchmarks/decode_bytes_by_layers.py [--layers 1 2 3 48] [--quantize int8] [--topology v5e:1x1]

The AOT rows (`planning/aot.py`) used to estimate bytes per image token by extrapolating unrolled
1- and 2-layer compiles (they now compile the token step at its real depth). This compiles the
sampler's token step (`aot.compile_sample`, NextStep-1-Large widths, 512x512, one image with 2
CFG rows, Euler on 2 head evaluations) fully unrolled at each layer count and writes the
compiler's bytes accessed and the HBM traffic counted from the compiled HLO
(`planning/hlo_traffic.py`) next to the floor (`aot.token_floor_bytes`), so the linearity the
extrapolation assumed can be checked.
Writes benchmarks/results/decode_bytes_by_layers.json (int8) or decode_bytes_by_layers_MODE.json.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

from nextstep_jax import configlib
from nextstep_jax.planning import aot

RESULTS = pathlib.Path(__file__).parent / 'results'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--layers', type=int, nargs='+', default=[1, 2, 3, 48])
  parser.add_argument('--quantize', default='int8', choices=('none', 'int8', 'int4'))
  parser.add_argument('--topology', default='v5e:1x1')
  args = parser.parse_args()
  rows = []
  for layers in args.layers:
    overrides = [
      'model.param_dtype=bfloat16',
      'sample.batch_size=1',
      'model.attention=splash',
      f'model.quant.mode={args.quantize}',
      f'model.num_layers={layers}',
      'model.scan_unroll=True',
      'sample.solver=euler',
      'sample.time_grid=A',
      'sample.num_steps=2',
    ]
    config = configlib.load_config('configs/nextstep1_large.py:512', overrides)
    mesh = aot.make_mesh(config, aot.topology_devices(args.topology))
    start = time.monotonic()
    compiled = aot.compile_sample(config, mesh, aot.CALIBRATION_OPTIONS, ('token_step',))
    _, accessed, hbm = aot.cost(compiled['token_step'], with_hbm=True)
    floor = aot.token_floor_bytes(config, mesh)['total']
    rows.append(
      {
        'layers': layers,
        'compiler_bytes': float(accessed),
        'hbm_bytes': float(hbm),
        'floor_bytes': floor,
        'ratio': float(accessed / floor),
        'hbm_ratio': float(hbm / floor),
        'compile_s': round(time.monotonic() - start, 1),
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  name = 'decode_bytes_by_layers' + ('' if args.quantize == 'int8' else f'_{args.quantize}')
  (RESULTS / f'{name}.json').write_text(
    json.dumps(
      {
        'quantize': args.quantize,
        'topology': args.topology,
        'rows': rows,
        'command': ' '.join(['python', 'benchmarks/decode_bytes_by_layers.py', *sys.argv[1:]]),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': f'{platform.machine()} {os.cpu_count()} CPUs (compile host); libtpu AOT',
      },
      indent=2,
    )
    + '\n'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
