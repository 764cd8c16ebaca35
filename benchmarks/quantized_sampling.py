"""NextStep-1-Large (14B) sampling where people run it: AOT plans of the one sampling program on one
TPU v5e chip (Colab), a v5e-8 (Kaggle), one v5p chip and one v6e chip, in bf16, int8 and int4, with
the 50-step head and the 4-step distilled head; compiled here without TPUs (libtpu).

  python benchmarks/quantized_sampling.py [--only KEY ...] [--timeout 1800] [--table]

It first computes the per-token floors on one v5e chip for bf16 / int8 / int4 with the 50-step and
the 4-step head (`floor_gb_per_token_v5e1`, `floor_speedup_v5e1_vs_bf16_50step`; `--only` with no
keys computes just these), then the rows.

Each row runs `nextstep-aot --task sample ... --json` in its own process at 512x512, one image with
2 CFG rows per call (`sample.batch_size=1`); a refused row (does not fit) is recorded with its
message. Rows are kept in benchmarks/results/quantized_sampling.json under `aot_rows`, and the
summary keys are recomputed from them (read-modify-write: keys other benchmarks wrote stay):
  v5e1_{bf16,int8,int4}_fits, v5e1_int8_total_gib: the v5e-1 rows' fit and per-chip total (int8:
    the embedding table quantized too, INT8_V5E1);
  bytes_per_token_over_floor: v5e-1 int8, compiler bytes accessed per image token / the floor
    (every weight a token uses once, head weights x head evaluations, the filled KV cache);
  hbm_bytes_per_token_over_floor: the same token step's HBM traffic counted from its optimized HLO
    (planning/hlo_traffic.py: buffers the compiler stages in VMEM are not HBM traffic) / the floor;
  hbm_speedup_per_token_v5e1_vs_bf16_50step_floor: the bf16 50-step token step's floor on one v5e
    chip (floor_gb_per_token_v5e1; bf16 does not fit, so no compile) over each row's HBM traffic
    per image token: their gain over bf16 at the weight-streaming bound, in traffic alone (a
    row whose token step is compute-bound by the estimate, such as int4's masked matmul, gains
    less: its `token_step_s` says so);
  speedup_14b_estimate: estimated seconds per 512x512 image, bf16 with the 50-step SDE head over
    int8 with the 4-step distilled head (2-way CFG kept), both on v5e-8 (tensor-parallel over 8
    chips; bf16 does not fit one v5e chip); `speedup_14b_v5e1_per_token` compares the two per
    image token on one v5e chip, the bf16 token step costed although its weights do not fit;
    speedup_14b_int4_4step_estimate: the same with int4 weights instead of int8.
Estimated seconds = max(FLOPs / peak, bytes / HBM bandwidth) of the prefill + 1024 token steps.
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

OUT = pathlib.Path(__file__).parent / 'results' / 'quantized_sampling.json'
CONFIG = 'configs/nextstep1_large.py:512'
BASE = [
  '--config.model.param_dtype=bfloat16',
  '--config.sample.batch_size=1',
  '--config.model.attention=splash',
]
TENSOR_8 = ['--config.mesh.data=1', '--config.mesh.fsdp=1', '--config.mesh.tensor=8']
# The distilled few-step head (training/distill.py; benchmarks/README.md headline: 4 Euler steps on
# uniform times with a step-size-conditioned head, 2-way CFG kept).
FOUR_STEP = [
  '--config.model.fm_head_step_cond=True',
  '--config.sample.solver=euler',
  '--config.sample.time_grid=B',
  '--config.sample.num_steps=4',
  '--config.sample.timestep_shift=1.0',
]

# int8 on one v5e chip also quantizes the embedding table (per row; the LM head is not on the
# device): with a bf16 table (1.45 GiB) the TPU compiler needs 16.15 GiB of the chip's 15.75.
INT8_V5E1 = ['--quantize', 'int8', '--config.model.quant.embedding=True']

# key: (topology, nextstep-aot flags), in the order they run (the keys first).
ROWS = {
  'v5e1_int8': ('v5e:1x1', BASE + INT8_V5E1),
  'v5e1_bf16': ('v5e:1x1', BASE + ['--cost-if-unfit']),
  'v5e8_bf16': ('v5e:2x4', BASE + TENSOR_8),
  'v5e8_int8_4step': ('v5e:2x4', BASE + TENSOR_8 + FOUR_STEP + ['--quantize', 'int8']),
  'v5e1_int4': ('v5e:1x1', BASE + ['--quantize', 'int4', '--no-calibrate']),  # Memory only.
  'v5e1_int8_4step': ('v5e:1x1', BASE + FOUR_STEP + INT8_V5E1),
  # Like the earlier AOT table's v5e-8 tensor-parallel row (8 images, bf16): the decode step
  # before (sampling/sharded.py, cache through the layer scan) and after (in-place cache).
  'v5e8_bf16_batch8': ('v5e:2x4', BASE + TENSOR_8 + ['--config.sample.batch_size=8']),
  'v5e1_int4_4step': ('v5e:1x1', BASE + FOUR_STEP + ['--quantize', 'int4']),
  'v5e8_int4_4step': ('v5e:2x4', BASE + TENSOR_8 + FOUR_STEP + ['--quantize', 'int4']),
  'v5e8_int8': ('v5e:2x4', BASE + TENSOR_8 + ['--quantize', 'int8']),
  'v5p1_int8': ('v5p:1x1x1', BASE + ['--quantize', 'int8']),
  'v6e1_int8': ('v6e:1x1', BASE + ['--quantize', 'int8']),
}
GIB = 2**30

# Per-token floors on one v5e chip (planning/aot.token_floor_bytes) for each precision and head.
FLOOR_CASES = {
  'bf16_50step': BASE,
  'bf16_4step': BASE + FOUR_STEP,
  'int8_50step': BASE + ['--quantize', 'int8'],
  'int8_4step': BASE + FOUR_STEP + ['--quantize', 'int8'],
  'int4_50step': BASE + ['--quantize', 'int4'],
  'int4_4step': BASE + FOUR_STEP + ['--quantize', 'int4'],
}


def token_floors() -> dict:
  """{'floor_gb_per_token_v5e1': {case: GB}, 'floor_speedup_v5e1_vs_bf16_50step': {case: x}}:
  the least HBM traffic of one image token step on one v5e chip per FLOOR_CASES entry."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # TPU devices from libtpu's topology, no TPU.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from nextstep_jax import configlib
  from nextstep_jax.planning import aot

  devices = aot.topology_devices('v5e:1x1')
  floors = {}
  for case, flags in FLOOR_CASES.items():
    overrides = [
      f'--config.model.quant.mode={flags[i + 1]}' if flag == '--quantize' else flag
      for i, flag in enumerate(flags)
      if flag.startswith('--')
    ]
    config = configlib.load_config(CONFIG, overrides)
    floors[case] = aot.token_floor_bytes(config, aot.make_mesh(config, devices))['total'] / 1e9
  return {
    'floor_gb_per_token_v5e1': {case: round(gb, 3) for case, gb in floors.items()},
    'floor_speedup_v5e1_vs_bf16_50step': {
      case: round(floors['bf16_50step'] / gb, 2)
      for case, gb in floors.items()
      if not case.startswith('bf16')
    },
  }


def image_seconds(row: dict) -> float | None:
  return row.get('estimated_step_s')


def summary(rows: dict, bf16_floor: float | None = None) -> dict:
  """The issue's keys from the rows present (a key whose rows are missing is left out).
  bf16_floor: the v5e-1 bf16 50-step token step's floor in bytes (bf16 does not fit one chip,
  so the faster rows' HBM traffic is compared with the least bf16 could stream)."""
  out = {}
  for precision in ('bf16', 'int8', 'int4'):
    row = rows.get(f'v5e1_{precision}')
    if row and 'fits' in row:
      out[f'v5e1_{precision}_fits'] = bool(row['fits'])
  int8 = rows.get('v5e1_int8', {})
  if 'total_bytes' in int8:
    out['v5e1_int8_total_gib'] = round(int8['total_bytes'] / GIB, 3)
    out['v5e1_int8_margin_gib'] = round((int8['hbm_bytes'] - int8['total_bytes']) / GIB, 3)
  if int8.get('bytes_per_token'):
    out['bytes_per_token_over_floor'] = round(
      int8['bytes_per_token'] / int8['floor_bytes_per_token'], 4
    )
  if int8.get('hbm_bytes_per_token'):
    out['hbm_bytes_per_token_over_floor'] = round(
      int8['hbm_bytes_per_token'] / int8['floor_bytes_per_token'], 4
    )
  for key in ('v5e1_int8', 'v5e1_int8_4step', 'v5e1_int4_4step'):
    if bf16_floor and rows.get(key, {}).get('hbm_bytes_per_token'):
      out.setdefault('hbm_speedup_per_token_v5e1_vs_bf16_50step_floor', {})[key] = round(
        bf16_floor / rows[key]['hbm_bytes_per_token'], 3
      )
  slow, fast = rows.get('v5e8_bf16', {}), rows.get('v5e8_int8_4step', {})
  if image_seconds(slow) and image_seconds(fast):
    out['speedup_14b_estimate'] = round(image_seconds(slow) / image_seconds(fast), 3)
    out['v5e8_bf16_50step_s_per_image'] = round(image_seconds(slow), 3)
    out['v5e8_int8_4step_s_per_image'] = round(image_seconds(fast), 3)
  fast = rows.get('v5e8_int4_4step', {})
  if image_seconds(slow) and image_seconds(fast):
    out['speedup_14b_int4_4step_estimate'] = round(image_seconds(slow) / image_seconds(fast), 3)
    out['v5e8_int4_4step_s_per_image'] = round(image_seconds(fast), 3)
  slow, fast = rows.get('v5e1_bf16', {}), rows.get('v5e1_int8_4step', {})
  if slow.get('token_step_s') and fast.get('token_step_s'):
    out['speedup_14b_v5e1_per_token'] = round(slow['token_step_s'] / fast['token_step_s'], 3)
  for key in ('v5e1_int8', 'v5e1_int4', 'v5e1_int8_4step', 'v5e1_int4_4step'):
    if image_seconds(rows.get(key, {})):
      out[f'{key}_s_per_image'] = round(image_seconds(rows[key]), 3)
  return out


def markdown_table(rows: dict) -> str:
  lines = [
    '| row | topology | mesh (d,f,t) | fits | total / HBM GiB per chip | margin GiB | GB per image token '
    '(compiler / floor) | ratio | HBM traffic GB per token (ratio) | ms per token (est.) | '
    's per image (est.) |',
    '|' + '---|' * 11,
  ]
  for key, row in rows.items():
    if 'total_bytes' not in row:
      fits = 'no' if row.get('fits') is False else 'not compiled'
      lines.append(
        f'| {key} | {row.get("topology")} | | {fits} | {row.get("error", "")[:100]} | | | | | | |'
      )
      continue
    mesh = row['mesh']
    hbm = (
      f'{row["hbm_bytes_per_token"] / 1e9:.2f} '
      f'({row["hbm_bytes_per_token"] / row["floor_bytes_per_token"]:.3f})'
      if row.get('hbm_bytes_per_token')
      else 'not counted'
    )
    per_token = (
      f'{row["bytes_per_token"] / 1e9:.2f} / {row["floor_bytes_per_token"] / 1e9:.2f} | '
      f'{row["bytes_per_token"] / row["floor_bytes_per_token"]:.3f} | {hbm} | '
      f'{1e3 * row["token_step_s"]:.1f}'
      if row.get('bytes_per_token')
      else ' | | | '
    )
    seconds = f'{row["estimated_step_s"]:.1f}' if row.get('estimated_step_s') else ''
    lines.append(
      f'| {key} | {row["topology"]} | {mesh["data"]},{mesh["fsdp"]},{mesh["tensor"]} | '
      f'{"yes" if row["fits"] else "**no**"} | {row["total_bytes"] / GIB:.2f} / {row["hbm_bytes"] / GIB:.0f} | '
      f'{(row["hbm_bytes"] - row["total_bytes"]) / GIB:.2f} | {per_token} | {seconds} |'
    )
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--only', nargs='*', default=None, choices=list(ROWS), help='rows to (re)run')
  parser.add_argument('--timeout', type=float, default=1800, help='seconds per row')
  parser.add_argument(
    '--table', action='store_true', help='print the rows as a markdown table and exit'
  )
  args = parser.parse_args()
  results = json.loads(OUT.read_text()) if OUT.exists() else {}
  rows = results.get('aot_rows', {})
  if args.table:
    print(markdown_table(rows))
    return 0
  results.update(token_floors())
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(results, indent=2) + '\n')
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd(), ALLOW_MULTIPLE_LIBTPU_LOAD='1'
  )
  for key, (topology, flags) in ROWS.items():
    if args.only is not None and key not in args.only:
      continue
    command = [
      sys.executable,
      '-m',
      'nextstep_jax.cli.aot',
      '--config',
      CONFIG,
      '--topology',
      topology,
      '--task',
      'sample',
      *flags,
    ]
    print(f'[{key}] {" ".join(command[3:])}', flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'plan.json'
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
          else {'topology': topology, 'error': proc.stderr[-2000:]}
        )
        print(
          '\n'.join(l for l in proc.stdout.splitlines()[-10:] if not l.startswith('E0000')),
          flush=True,
        )
        if 'error' in record:
          print(record['error'][-600:], flush=True)
      except subprocess.TimeoutExpired:
        record = {'topology': topology, 'error': f'timed out after {args.timeout:.0f} s'}
    record.update(
      wall_s=round(time.monotonic() - started, 1),
      command='JAX_PLATFORMS=cpu nextstep-aot ' + ' '.join(command[3:]),
    )
    current = (
      json.loads(OUT.read_text()) if OUT.exists() else {}
    )  # Others may have written keys since.
    current.setdefault('aot_rows', {})[key] = record
    floors = current.get('floor_gb_per_token_v5e1', {})
    bf16_floor = 1e9 * floors['bf16_50step'] if 'bf16_50step' in floors else None
    current.update(summary(current['aot_rows'], bf16_floor))
    current['aot_command'] = (
      'python benchmarks/quantized_sampling.py  # one process per row; each row has its command'
    )
    current['aot_date'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    current['aot_machine'] = (
      f'{platform.machine()}, {os.cpu_count()} CPUs (compile host); libtpu AOT'
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(current, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
