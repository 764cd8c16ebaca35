"""Fault probes: what a user or an on-call engineer does to a run, and what it costs.

  flock /tmp/nextstep-heavy.lock nice -n 5 python benchmarks/fault_probes.py

Runs the tiny config (configs/tiny.py, 8 emulated CPU devices) through: Ctrl-C mid-run then a
rerun (compared bitwise with an uninterrupted run), a double Ctrl-C, SIGTERM in the first second,
a damaged newest checkpoint (truncated data file, deleted manifest.ocdbt / _METADATA / data file;
training and sampling), a second trainer on a held workdir, every console script's user-error
probes (tests/cli_probes.py) and the checkpoint.pt fuzz (tests/checkpoint_fuzz.py). Each probe row:
probe, exit code, lines printed, work lost (steps or images) and verdict. Writes
benchmarks/results/fault_probes.json with the headline keys steps_lost_sigint,
fallback_on_damaged_checkpoint, concurrent_writers_refused, tracebacks_for_user_errors and
malformed_checkpoint_crashes.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'  # As the tests run.
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.pop('NEXTSTEP_DEBUG', None)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

import cli_probes  # noqa: E402

STEPS = 24  # Tiny-config steps of the interrupted and uninterrupted runs.
SIGNAL_AFTER_RECORDS = 3  # Signal once metrics.jsonl holds this many rows (log_every=1).


def train_command(workdir, cache, *overrides):
  return [
    sys.executable,
    '-m',
    'nextstep_jax.cli.train',
    '--config',
    'configs/tiny.py',
    '--workdir',
    str(workdir),
    f'--config.data.cache_dir={cache}',
    '--config.train.log_every=1',
    *overrides,
  ]


def run(command, timeout=900):
  start = time.monotonic()
  result = subprocess.run(
    command,
    cwd=ROOT,
    env=cli_probes.env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  return result, time.monotonic() - start


def lines_of(*texts) -> list[str]:
  return [line for text in texts for line in text.splitlines() if line.strip()]


def saved_steps(workdir) -> list[int]:
  root = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def wait_for_rows(proc, metrics: pathlib.Path, rows: int, timeout=600) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
      return True
    time.sleep(0.01)
  return False


def final_params(workdir):
  import multiprocess_testing  # jax

  return multiprocess_testing.restore_on_one_device(pathlib.Path(workdir))[0]


def bitwise_equal(a_dir, b_dir) -> bool:
  import jax
  import numpy as np

  a, b = final_params(a_dir), final_params(b_dir)
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def row(probe, code, lines, lost, ok, note=''):
  return {
    'probe': probe,
    'exit_code': code,
    'lines_printed': lines,
    'work_lost': lost,
    'verdict': 'ok' if ok else 'FAIL',
    **({'note': note} if note else {}),
  }


def interrupt_probes(tmp, cache) -> tuple[list, dict]:
  rows, keys = [], {}
  straight = tmp / 'straight'
  result, _ = run(
    train_command(
      straight, cache, f'--config.train.steps={STEPS}', f'--config.train.checkpoint_every={STEPS}'
    )
  )
  assert result.returncode == 0, result.stderr[-3000:]

  # Ctrl-C mid-run: saves at the step boundary, exits 0; a rerun finishes bitwise equal.
  workdir = tmp / 'sigint'
  proc = subprocess.Popen(
    train_command(
      workdir, cache, f'--config.train.steps={STEPS}', f'--config.train.checkpoint_every={STEPS}'
    ),
    cwd=ROOT,
    env=cli_probes.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_rows(proc, workdir / 'metrics.jsonl', SIGNAL_AFTER_RECORDS)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  stopped = re.search(r'stopped at step (\d+)', out)
  stop_step = int(stopped.group(1)) if stopped else None
  steps = saved_steps(workdir)
  lost = (stop_step - max(steps)) if (stop_step and steps) else None
  rerun, _ = run(
    train_command(
      workdir, cache, f'--config.train.steps={STEPS}', f'--config.train.checkpoint_every={STEPS}'
    )
  )
  equal = rerun.returncode == 0 and bitwise_equal(straight, workdir)
  keys['steps_lost_sigint'] = lost
  keys['sigint_rerun_bitwise_equal'] = equal
  rows.append(
    row(
      'Ctrl-C mid-run, then rerun',
      proc.returncode,
      len(lines_of(err)),
      f'{lost} steps',
      proc.returncode == 0 and lost == 0 and equal,
      f'stopped at step {stop_step}, checkpoint {steps}; rerun bitwise equal: {equal}; '
      'stderr lines counted (progress goes to stdout)',
    )
  )

  # A second Ctrl-C exits at once (the steps since the last checkpoint are lost, by request).
  workdir = tmp / 'sigint_twice'
  proc = subprocess.Popen(
    train_command(
      workdir, cache, f'--config.train.steps={STEPS}', f'--config.train.checkpoint_every={STEPS}'
    ),
    cwd=ROOT,
    env=cli_probes.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_rows(proc, workdir / 'metrics.jsonl', SIGNAL_AFTER_RECORDS)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  start = time.monotonic()
  out, err = proc.communicate(timeout=600)
  rows.append(
    row(
      'Ctrl-C twice',
      proc.returncode,
      len(lines_of(err)),
      'steps since the last checkpoint (asked for)',
      proc.returncode in (0, 130) and 'Traceback' not in err,
      f'exited {time.monotonic() - start:.2f} s after the second Ctrl-C; '
      f'{"saved first" if proc.returncode == 0 else "no save"}',
    )
  )

  # SIGTERM in the first second (while jax imports).
  workdir = tmp / 'early_sigterm'
  proc = subprocess.Popen(
    train_command(workdir, cache, f'--config.train.steps={STEPS}'),
    cwd=ROOT,
    env=cli_probes.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  printed = lines_of(out, err)
  rows.append(
    row(
      'SIGTERM 1 s after start',
      proc.returncode,
      len(printed),
      '0 steps',
      proc.returncode in (0, 143) and bool(printed) and 'Traceback' not in err,
      printed[-1] if printed else 'silent',
    )
  )
  return rows, keys


DAMAGES = {
  'truncated data file': lambda d: _truncate(_largest(d / 'state' / 'd')),
  'deleted manifest.ocdbt': lambda d: (d / 'state' / 'manifest.ocdbt').unlink(),
  'deleted _METADATA': lambda d: (d / 'state' / '_METADATA').unlink(),
  'deleted data file': lambda d: _largest(d / 'state' / 'd').unlink(),
}


def _largest(folder):
  return max(folder.iterdir(), key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damaged_checkpoint_probes(tmp, cache) -> tuple[list, dict]:
  rows, fallbacks = [], []
  base = tmp / 'damaged_base'
  overrides = ('--config.train.steps=8', '--config.train.checkpoint_every=4')
  result, _ = run(train_command(base, cache, *overrides))
  assert result.returncode == 0, result.stderr[-3000:]
  for name, damage in DAMAGES.items():
    workdir = tmp / f'damaged_{name.replace(" ", "_")}'
    shutil.copytree(base, workdir)
    damage(workdir / 'checkpoints' / '8')
    result, _ = run(train_command(workdir, cache, *overrides))
    text = result.stdout + result.stderr
    ok = (
      result.returncode == 0
      and 'checkpoint step 8 is damaged' in text
      and 'resumed from step 4' in text
      and 'Traceback' not in text
    )
    fallbacks.append(ok)
    cause = re.search(r'is damaged \(([^)]*\)?)\)', text)
    rows.append(
      row(
        f'train, newest checkpoint: {name}',
        result.returncode,
        len(lines_of(result.stderr)) + text.count('warning:'),
        '4 steps (re-run)',
        ok,
        cause.group(1) if cause else text[-300:],
      )
    )
  workdir = tmp / 'damaged_sample'
  shutil.copytree(base, workdir)
  DAMAGES['truncated data file'](workdir / 'checkpoints' / '8')
  result, _ = run(
    [
      sys.executable,
      '-m',
      'nextstep_jax.cli.sample',
      '--workdir',
      str(workdir),
      '--prompt',
      'a red circle',
      '--out',
      str(tmp / 'damaged_samples'),
    ]
  )
  text = result.stdout + result.stderr
  ok = result.returncode == 0 and 'checkpoint step 8 is damaged' in text and 'Traceback' not in text
  fallbacks.append(ok)
  rows.append(
    row(
      'sample, newest checkpoint: truncated data file',
      result.returncode,
      len(lines_of(result.stderr)) + text.count('is damaged'),
      '0 images',
      ok,
      'sampled from step 4',
    )
  )
  result, _ = run(
    [
      sys.executable,
      '-m',
      'nextstep_jax.cli.sample',
      '--workdir',
      str(workdir),
      '--step',
      '8',
      '--prompt',
      'x',
      '--out',
      str(tmp / 'damaged_samples2'),
    ]
  )
  rows.append(
    row(
      'sample --step of a moved-aside checkpoint',
      result.returncode,
      len(lines_of(result.stderr)),
      '0 images',
      result.returncode == 1 and len(lines_of(result.stderr)) == 1,
      lines_of(result.stderr)[-1] if result.stderr else '',
    )
  )
  return rows, {'fallback_on_damaged_checkpoint': all(fallbacks)}


def concurrent_writer_probe(tmp, cache) -> tuple[list, dict]:
  workdir = tmp / 'shared'
  first = subprocess.Popen(
    train_command(workdir, cache, '--config.train.steps=100000'),
    cwd=ROOT,
    env=cli_probes.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_rows(first, workdir / 'metrics.jsonl', 1)
  second, _ = run(train_command(workdir, cache, '--config.train.steps=100000'))
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=600)
  err = lines_of(second.stderr)
  refused = second.returncode == 1 and len(err) == 1 and f'pid {first.pid}' in err[0]
  return (
    [
      row(
        'second trainer on a running workdir',
        second.returncode,
        len(err),
        '0 steps',
        refused,
        err[-1] if err else '',
      ),
      row(
        'first trainer after the refusal (SIGTERM)',
        first.returncode,
        0,
        '0 steps',
        first.returncode == 0,
        'kept running, saved and stopped on SIGTERM',
      ),
    ],
    {'concurrent_writers_refused': refused},
  )


def user_error_probes(tmp) -> tuple[list, dict]:
  inputs = cli_probes.make_inputs(tmp / 'probes')
  rows, tracebacks, failures = [], 0, 0
  for probe in cli_probes.probes(inputs):
    start = time.monotonic()
    result = cli_probes.run_probe(probe)
    tracebacks += result['traceback']
    failures += not result['ok']
    lost = '0 images' if probe.module == 'sample' else '0 steps' if probe.module == 'train' else '-'
    rows.append(
      row(
        f'nextstep-{probe.module.replace("_", "-")}: {probe.name.split(": ", 1)[1]}',
        result['exit_code'],
        result['lines_printed'],
        lost,
        result['ok'],
        f'{result["line"][:200]} ({time.monotonic() - start:.1f} s)',
      )
    )
  return rows, {
    'tracebacks_for_user_errors': tracebacks,
    'user_error_probes': len(rows),
    'user_error_probes_failed': failures,
  }


def fuzz_probe(tmp, cases: int) -> tuple[list, dict]:
  out = tmp / 'fuzz.json'
  result, seconds = run(
    [
      sys.executable,
      str(ROOT / 'tests' / 'checkpoint_fuzz.py'),
      '--cases',
      str(cases),
      '--json',
      str(out),
    ]
  )
  summary = json.loads(out.read_text()) if out.exists() else {}
  crashes = int(result.returncode != 0) + summary.get('unexpected', 0)
  ok = crashes == 0 and summary.get('wrong', 1) == 0
  return (
    [
      row(
        f'checkpoint.pt fuzz ({cases} mutated files)',
        result.returncode,
        0,
        '-',
        ok,
        f'exact {summary.get("exact")}, refused {summary.get("refused")}, wrong '
        f'{summary.get("wrong")}, unexpected {summary.get("unexpected")} ({seconds:.0f} s)',
      )
    ],
    {
      'malformed_checkpoint_crashes': crashes,
      'malformed_checkpoint_wrong_values': summary.get('wrong'),
      'fuzz_cases': cases,
      'fuzz': summary,
    },
  )


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'fault_probes.json'))
  parser.add_argument('--fuzz-cases', type=int, default=400)
  args = parser.parse_args()
  start = time.monotonic()
  table, keys = [], {}
  with tempfile.TemporaryDirectory(prefix='fault_probes_') as tmp:
    tmp = pathlib.Path(tmp)
    cache = tmp / 'cache'
    for name, probe in (
      ('fuzz', lambda: fuzz_probe(tmp, args.fuzz_cases)),
      ('user errors', lambda: user_error_probes(tmp)),
      ('interrupts', lambda: interrupt_probes(tmp, cache)),
      ('damaged checkpoints', lambda: damaged_checkpoint_probes(tmp, cache)),
      ('concurrent writers', lambda: concurrent_writer_probe(tmp, cache)),
    ):
      rows, found = probe()
      table += rows
      keys.update(found)
      print(f'{name}: ' + ', '.join(f'{r["probe"]} {r["verdict"]}' for r in rows), flush=True)
  record = {
    **{
      k: keys[k]
      for k in (
        'steps_lost_sigint',
        'fallback_on_damaged_checkpoint',
        'concurrent_writers_refused',
        'tracebacks_for_user_errors',
        'malformed_checkpoint_crashes',
      )
    },
    'probes_failed': sum(r['verdict'] != 'ok' for r in table),
    'probes': table,
    'details': {k: v for k, v in keys.items() if k not in ('steps_lost_sigint',)},
    'command': 'flock /tmp/nextstep-heavy.lock nice -n 5 python benchmarks/fault_probes.py',
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPUs (shared), 8 emulated CPU devices',
    'minutes': round((time.monotonic() - start) / 60, 1),
  }
  pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + '\n')
  for r in table:
    print(
      f'{r["probe"]:<55} exit {r["exit_code"]!s:>4}  lines {r["lines_printed"]:>2}  '
      f'lost {r["work_lost"]:<12} {r["verdict"]}'
    )
  print(json.dumps({k: record[k] for k in list(record)[:6]}))
  return 0 if record['probes_failed'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
