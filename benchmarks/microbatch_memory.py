"""Per-device memory of the real train step against `train.microbatches`, from AOT compiles for a
TPU topology (libtpu, no TPU needed): the same global batch and update, with the activations of
1/K of it live at a time.

  python benchmarks/microbatch_memory.py                     # shapes config, v5e:2x2, K = 1..16
  flock /tmp/nextstep-heavy.lock timeout 900 python benchmarks/microbatch_memory.py \\
      --config configs/nextstep1_large.py:512 --topology v5p:2x4x4 --microbatches 1,2,4,8 \\
      --set model.attention=splash

Each run updates its (config, topology, overrides) entry in benchmarks/results/microbatch_memory.json
(command, date, machine, per-K argument / temp / total bytes per device, compile seconds; rows of
other K values from an earlier run are kept) and redraws benchmarks/results/microbatch_memory.png.
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import matplotlib

matplotlib.use('Agg')
import jax
import matplotlib.pyplot as plt

from nextstep_jax import configlib
from nextstep_jax.planning import aot
from nextstep_jax.utils import logging as log_utils

RESULTS = pathlib.Path(__file__).parent / 'results'
OUT = RESULTS / 'microbatch_memory.json'
PLOT = RESULTS / 'microbatch_memory.png'


def measure(
  config_path: str, topology: str, overrides: list[str], microbatches: list[int]
) -> list[dict]:
  """One compile per K: the per-device memory of the real train step for `topology`."""
  devices = aot.topology_devices(topology)
  rows = []
  progress = log_utils.ProgressLogger(len(microbatches), 1)
  for i, k in enumerate(microbatches):
    config = configlib.load_config(config_path, [*overrides, f'train.microbatches={k}'])
    configlib.validate(config)
    mesh = aot.make_mesh(config, devices)
    started = time.monotonic()
    memory = aot.memory(aot.compile_train(config, mesh))
    rows.append(
      {
        'microbatches': k,
        'global_batch': config.train.batch_size,
        'mesh': dict(mesh.shape),
        'rows_per_microbatch_per_device': config.train.batch_size
        // (mesh.shape['data'] * mesh.shape['fsdp'])
        // k,
        **memory,
        'compile_s': round(time.monotonic() - started, 1),
      }
    )
    progress.update(i + 1, {'temp_GiB': memory['temp_bytes'] / aot.GIB})
  return rows


def plot(runs: list[dict]) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for run in runs:
    ks = [r['microbatches'] for r in run['rows']]
    full = run['rows'][0]['temp_bytes']
    ax.plot(
      ks,
      [r['temp_bytes'] / full for r in run['rows']],
      'o-',
      label=f'{run["config"]} {" ".join(run["overrides"])} on {run["topology"]}, global batch '
      f'{run["rows"][0]["global_batch"]} ({full / aot.GIB:.2f} GiB at K={ks[0]})',
    )
  ax.set_xscale('log', base=2)
  ax.set_xlabel('train.microbatches K')
  ax.set_ylabel('temporaries per device / at K = 1')
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.2))
  ax.set_title(
    'Train-step temporaries vs gradient accumulation (AOT, same global batch)', fontsize=9
  )
  fig.tight_layout()
  fig.savefig(PLOT, dpi=120, bbox_inches='tight')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/shapes.py')
  parser.add_argument('--topology', default='v5e:2x2')
  parser.add_argument('--microbatches', default='1,2,4,8,16')
  parser.add_argument('--set', action='append', default=[], help='config override field=value')
  args = parser.parse_args(argv)
  microbatches = [int(k) for k in args.microbatches.split(',')]
  rows = measure(args.config, args.topology, args.set, microbatches)
  record = {
    'config': args.config,
    'topology': args.topology,
    'overrides': args.set,
    'rows': rows,
    'command': ' '.join(['python', 'benchmarks/microbatch_memory.py', *(argv or sys.argv[1:])]),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {platform.node()}, jax {jax.__version__}, AOT for {args.topology}',
  }
  data = (
    json.loads(OUT.read_text()) if OUT.exists() else {'benchmark': 'microbatch_memory', 'runs': []}
  )
  key = lambda run: (run['config'], run['topology'], run['overrides'])
  earlier = [run for run in data['runs'] if key(run) == key(record)]
  if earlier:  # Keep the other K values of an earlier run of the same setup.
    kept = [r for r in earlier[0]['rows'] if r['microbatches'] not in microbatches]
    record['rows'] = sorted(kept + rows, key=lambda r: r['microbatches'])
  data['runs'] = [run for run in data['runs'] if key(run) != key(record)] + [record]
  OUT.write_text(json.dumps(data, indent=2) + '\n')
  plot(data['runs'])
  for r in rows:
    print(
      f'K={r["microbatches"]:3d}: arguments {r["argument_bytes"] / aot.GIB:7.3f} GiB, temporaries '
      f'{r["temp_bytes"] / aot.GIB:7.3f} GiB, total {r["total_bytes"] / aot.GIB:7.3f} GiB per device '
      f'(compile {r["compile_s"]} s)'
    )
  print(f'wrote {OUT} and {PLOT}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
