"""nextstep-aot --config configs/nextstep1_large.py --topology v5p:4x4x4
[--task train|sample|finetune_full|finetune_lora] [--quantize int8|int4] [--hbm-gib 95] [--no-calibrate]
[--json out.json] [--config.field=value ...]

Compiles the real train step (or the sampling prefill + token step) for a TPU slice without TPUs
(needs the libtpu package: pip install -e '.[tpu-aot]') and prints per-device memory against HBM,
the calibrated compiler cost, model FLOPs, estimated step time and MFU (none when the calibration
is invalid); for sampling also the bytes accessed per image token against their floor. --quantize
plans the sampler with weight-only int8 / int4 weights (model.quant.mode). Exits 1 when it does
not fit, naming the knobs to turn. Run with JAX_PLATFORMS=cpu on
a machine without TPUs.
"""

import argparse
import dataclasses
import json
import sys

from nextstep_jax import configlib
from nextstep_jax.cli import entry


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--config', required=True, help='config file, e.g. configs/nextstep1_large.py:512'
  )
  parser.add_argument(
    '--topology', required=True, help='TPU slice, e.g. v5p:4x4x4, v4:4x4x4, v5e:2x4'
  )
  parser.add_argument(
    '--task', default='train', choices=('train', 'sample', 'finetune_full', 'finetune_lora')
  )
  parser.add_argument(
    '--quantize',
    choices=('int8', 'int4'),
    default=None,
    help='weight-only quantized weights (sets model.quant.mode)',
  )
  parser.add_argument(
    '--hbm-gib', type=float, default=None, help='override the chip HBM per device (GiB)'
  )
  parser.add_argument(
    '--no-calibrate',
    action='store_true',
    help='skip the 1-/2-layer compiles (memory only: no step time or MFU)',
  )
  parser.add_argument(
    '--cost-if-unfit',
    action='store_true',
    help='calibrate the cost even when it does not fit (per-token comparisons)',
  )
  parser.add_argument('--json', default=None, help='write the plan as JSON to this path')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(
      f'unrecognised arguments {bad}; config overrides look like --config.train.batch_size=256'
    )
  if args.quantize:
    rest = [f'--config.model.quant.mode={args.quantize}'] + rest
  config = configlib.load_config(args.config, rest)
  configlib.validate(config)
  from nextstep_jax.planning import aot  # after flag errors

  hbm = None if args.hbm_gib is None else int(args.hbm_gib * aot.GIB)
  try:
    result = aot.plan(
      config,
      args.topology,
      args.task,
      hbm_bytes=hbm,
      calibrate=not args.no_calibrate,
      cost_if_unfit=args.cost_if_unfit,
    )
    record, code = dataclasses.asdict(result), 0
  except aot.DoesNotFit as error:
    print(f'error: {error}', file=sys.stderr)
    record = (
      dataclasses.asdict(error.plan)
      if error.plan
      else {'task': args.task, 'topology': args.topology, 'fits': False}
    )
    record['error'], code = str(error), 1
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
  return code


if __name__ == '__main__':
  sys.exit(main())
