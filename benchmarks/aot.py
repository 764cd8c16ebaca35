"""AOT plans of NextStep-1-Large (14B) on TPU slices, compiled here without TPUs (needs libtpu).

  python benchmarks/aot.py [--only N ...] [--timeout 1500]   # a 14B train row: 10-30 min of CPU

Each row runs `python -m nextstep_jax.cli.aot ... --json` in its own process (rows are
independent; a row that times out is recorded as such) and the list is rewritten to
benchmarks/results/aot_nextstep1_large.json after every row, with the command, date and machine.
Rows run in the order below (the headline row first).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

OUT = pathlib.Path(__file__).parent / 'results' / 'aot_nextstep1_large.json'
TRAIN_512 = 'configs/nextstep1_large.py:512'
TRAIN_256 = 'configs/nextstep1_large.py'
# Sampling: bf16 weights (inference), 512x512 (the released model's size), 8 images x 2 CFG
# branches per call (one image per device on the 8-device slices).
SAMPLE = ['--config.model.param_dtype=bfloat16', '--config.sample.batch_size=8']
TENSOR_8 = ['--config.mesh.data=1', '--config.mesh.fsdp=1', '--config.mesh.tensor=8']
FINETUNE_LORA = [
  '--config.model.attention=splash',
  '--config.model.param_dtype=bfloat16',
  '--config.train.batch_size=8',
  '--config.train.lora.rank=16',
  '--config.train.lora.alpha=32',
]

ROWS = [
  ('train', TRAIN_512, 'v5p:4x4x4', ['--config.model.attention=splash']),  # v5p-128: 64 chips.
  ('train', TRAIN_256, 'v5p:4x4x4', ['--config.model.attention=splash']),
  ('train', TRAIN_512, 'v5p:2x4x4', ['--config.model.attention=splash']),  # v5p-64: 32 chips.
  ('train', TRAIN_512, 'v5p:4x4x8', ['--config.model.attention=splash']),  # v5p-256: 128 chips.
  ('train', TRAIN_512, 'v4:4x4x4', ['--config.model.attention=splash']),  # v4-128: 64 chips.
  ('sample', TRAIN_512, 'v5e:2x4', SAMPLE + ['--config.model.attention=splash']),  # v5e-8.
  ('sample', TRAIN_512, 'v5p:1x1x1', SAMPLE + ['--config.model.attention=splash']),  # One chip.
  ('sample', TRAIN_512, 'v2:2x2', SAMPLE + ['--config.model.attention=xla']),  # v2-8 (8 cores).
  ('train', TRAIN_512, 'v5p:4x4x4', ['--config.model.attention=xla']),
  ('train', TRAIN_256, 'v5p:2x4x4', ['--config.model.attention=splash']),
  ('train', TRAIN_256, 'v5p:4x4x8', ['--config.model.attention=splash']),
  ('train', TRAIN_256, 'v4:4x4x4', ['--config.model.attention=splash']),
  # Sampling reads every weight once per image token: tensor parallelism reads 1/8 of them per
  # device, where FSDP gathers (and so reads) all of them on every device.
  ('sample', TRAIN_512, 'v5e:2x4', SAMPLE + TENSOR_8 + ['--config.model.attention=splash']),
  ('sample', TRAIN_512, 'v2:2x2', SAMPLE + TENSOR_8 + ['--config.model.attention=xla']),
  # The headline row with matmul outputs saved instead of full recomputation.
  (
    'train',
    TRAIN_512,
    'v5p:4x4x4',
    ['--config.model.attention=splash', '--config.model.remat_policy=dots_saveable'],
  ),
  # Fine-tuning (issue 15): LoRA on a single v5e-8 host (bf16 frozen base, rank-16 adapters on
  # every decoder linear layer, global batch 8 = one 512px sequence per chip), full fine-tuning
  # on v5p-64 (f32 masters + AdamW, like training, fine-tune batch 64).
  ('finetune_lora', TRAIN_512, 'v5e:2x4', FINETUNE_LORA),
  (
    'finetune_full',
    TRAIN_512,
    'v5p:2x4x4',
    ['--config.model.attention=splash', '--config.train.batch_size=64'],
  ),
]


def markdown_table(rows) -> str:
  """The rows as the markdown table of benchmarks/README.md."""
  gib = lambda n: f'{n / 2**30:.1f}'
  lines = [
    '| task | topology (chips) | image | seq | batch | attention | remat | mesh (d,f,t) | '
    'arg / temp / total GiB per chip | HBM GiB | fits | model TFLOPs/step | compiler / model FLOPs | '
    'est. step s | MFU est. | compile s |',
    '|' + '---|' * 16,
  ]
  for r in rows:
    image = '512' if r['config'].endswith(':512') else '256'
    if 'error' in r and 'total_bytes' not in r:
      lines.append(
        f'| {r["task"]} | {r["topology"]} | {image} | | | | | | | | no: {r["error"][:80]} '
        '| | | | | |'
      )
      continue
    mesh = r['mesh']
    ratio = r.get('compiler_to_model_flops')
    timing = (
      f'{r["estimated_step_s"]:.3g} ({r["bound"]}) | {100 * r["mfu_estimate"]:.2g}%'
      if r.get('mfu_estimate') is not None
      else 'none | none'
    )
    lines.append(
      f'| {r["task"]} | {r["topology"]} ({r["chips"]}) | {image} | {r["seq_len"]} | {r["global_batch"]} | '
      f'{r["attention"]} | {r["remat"]} | {mesh["data"]},{mesh["fsdp"]},{mesh["tensor"]} | '
      f'{gib(r["argument_bytes"])} / {gib(r["temp_bytes"])} / {gib(r["total_bytes"])} | '
      f'{gib(r["hbm_bytes"])} | {"yes" if r["fits"] else "**no**"} | {r["flops_per_step"] / 1e12:,.0f} | '
      f'{"" if ratio is None else f"{ratio:.2f}"} | {timing} | {r["compile_s"]:.0f} |'
    )
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--only', type=int, nargs='*', default=None, help='row indices to (re)run')
  parser.add_argument('--timeout', type=float, default=1500, help='seconds per row')
  parser.add_argument(
    '--table', action='store_true', help='print the results as a markdown table and exit'
  )
  args = parser.parse_args()
  rows = json.loads(OUT.read_text())['rows'] if OUT.exists() else []
  if args.table:
    print(markdown_table(rows))
    return 0
  done = {(r['task'], r['config'], r['topology'], tuple(r['overrides'])): r for r in rows}
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  for index, (task, config, topology, overrides) in enumerate(ROWS):
    if args.only is not None and index not in args.only:
      continue
    command = [
      sys.executable,
      '-m',
      'nextstep_jax.cli.aot',
      '--config',
      config,
      '--topology',
      topology,
      '--task',
      task,
      *overrides,
    ]
    print(f'[{index + 1}/{len(ROWS)}] {" ".join(command[1:])}', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'plan.json'
      started = time.monotonic()
      try:
        proc = subprocess.run(
          command + ['--json', str(path)],
          env=env,
          capture_output=True,
          text=True,
          timeout=args.timeout,
          check=False,
        )
        record = (
          json.loads(path.read_text())
          if path.exists()
          else {'task': task, 'topology': topology, 'error': proc.stderr[-2000:]}
        )
        lines = [l for l in proc.stdout.splitlines() if not l.startswith('E0000')]
        print(
          '\n'.join(lines[-9:]) + (f'\n{record.get("error", "")}' if 'error' in record else ''),
          flush=True,
        )
      except subprocess.TimeoutExpired:
        record = {
          'task': task,
          'topology': topology,
          'error': f'timed out after {args.timeout:.0f} s',
        }
        print(record['error'], flush=True)
    record.update(
      config=config,
      overrides=overrides,
      wall_s=round(time.monotonic() - started, 1),
      command='JAX_PLATFORMS=cpu ' + ' '.join(['nextstep-aot'] + command[3:]),
    )
    # Read-modify-write: other runs may have added rows since this one started.
    latest = json.loads(OUT.read_text())['rows'] if OUT.exists() else []
    done = {
      **{(r['task'], r['config'], r['topology'], tuple(r['overrides'])): r for r in latest},
      (task, config, topology, tuple(overrides)): record,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
      json.dumps(
        {
          'benchmark': 'AOT plans of NextStep-1-Large on TPU slices (compiled on CPU with libtpu)',
          'command': 'python benchmarks/aot.py  # one process per row; each row has its own command',
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'machine': f'{platform.machine()}, {os.cpu_count()} CPUs (compile host); libtpu AOT',
          'rows': list(done.values()),
        },
        indent=2,
      )
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
