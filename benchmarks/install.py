"""The `make demo` install before and after the dependency tiers, and the test tiers' wall time.

For each git ref (--before, --after) a fresh clone under --scratch gets what `make demo` installs
before it runs the demo (a new .venv: `.[test]` before the tiers, the runtime `.` after): the wall
time of that install, the venv's size on disk, the heavy packages it holds, and how many libtpu
warnings the demo prints in its first --demo-seconds (it is stopped then; JAX prints libtpu's
TPU-initialisation error, if any, as it starts). Then `make test-fast` (and with --full `make test`)
runs in this checkout with --test-python (the venv that has every extra), wall time recorded.

  python benchmarks/install.py [--before main] [--after HEAD] [--full] [--skip-install]

Writes benchmarks/results/install.json (merged: --skip-install keeps the install figures, a run
without --full keeps an earlier test_full_s). pip reads its cache (~/.cache/pip) and this machine's
wheel folders; the result records whether the cache held wheels before the run.
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
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'benchmarks' / 'results' / 'install.json'
HEAVY = ('torch', 'transformers', 'tensorflow-datasets', 'tensorflow', 'libtpu', 'pytest')
LIBTPU_WARNING = re.compile(r'libtpu|TPU worker|Unable to initialize backend .tpu', re.IGNORECASE)


def run(cmd, cwd, **kwargs) -> subprocess.CompletedProcess:
  print('$', ' '.join(map(str, cmd)), flush=True)
  return subprocess.run(cmd, cwd=cwd, check=True, text=True, **kwargs)


def dir_mb(path: pathlib.Path) -> float:
  total = sum(f.lstat().st_size for f in path.rglob('*') if f.is_file() or f.is_symlink())
  return round(total / 2**20, 1)


def pip_cache_mb() -> float:
  cache = pathlib.Path(os.environ.get('PIP_CACHE_DIR', pathlib.Path.home() / '.cache' / 'pip'))
  return dir_mb(cache) if cache.exists() else 0.0


def demo_stamp(clone: pathlib.Path) -> str:
  """The Makefile target `make demo` installs through (before the tiers: one stamp for all)."""
  makefile = (clone / 'Makefile').read_text()
  return '.venv/.installed-runtime' if 'installed-runtime' in makefile else '.venv/.installed'


def demo_warnings(clone: pathlib.Path, seconds: float, workdir: pathlib.Path) -> dict:
  """Starts the demo as `make demo` does, stops it after `seconds`; counts libtpu warning lines."""
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'JAX_PLATFORMS')}
  env['PYTHONUNBUFFERED'] = '1'
  proc = subprocess.Popen(
    [str(clone / '.venv/bin/python'), '-m', 'nextstep_jax.cli.demo', '--workdir', str(workdir)],
    cwd=clone,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  try:
    out, _ = proc.communicate(timeout=seconds)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate()
  lines = out.splitlines()
  warnings = [line for line in lines if LIBTPU_WARNING.search(line)]
  return {
    'demo_libtpu_warnings': len(warnings),
    'demo_warning_example': warnings[:1],
    'demo_first_lines': lines[:3],
    'demo_seconds_watched': seconds,
  }


def measure_install(ref: str, scratch: pathlib.Path, demo_seconds: float) -> dict:
  clone = scratch / f'clone-{ref.replace("/", "_")}'
  if clone.exists():
    shutil.rmtree(clone)
  run(['git', 'clone', '--quiet', '--no-local', str(ROOT), str(clone)], cwd=scratch)
  commit = subprocess.run(
    ['git', 'rev-parse', ref], cwd=ROOT, check=True, text=True, capture_output=True
  ).stdout.strip()
  run(['git', 'checkout', '--quiet', commit], cwd=clone)
  stamp = demo_stamp(clone)
  cache_before = pip_cache_mb()
  start = time.monotonic()
  with open(scratch / f'install-{ref.replace("/", "_")}.log', 'w') as log:
    run(['make', stamp], cwd=clone, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.monotonic() - start
  listed = subprocess.run(
    [str(clone / '.venv/bin/python'), '-m', 'pip', 'list', '--format=json'],
    check=True,
    text=True,
    capture_output=True,
  ).stdout
  names = {p['name'].lower().replace('_', '-') for p in json.loads(listed)}
  return {
    'ref': ref,
    'commit': commit[:12],
    'make_target': stamp,
    'demo_install_s': round(seconds, 1),
    'demo_install_mb': dir_mb(clone / '.venv'),
    'packages': len(names),
    'heavy_packages': sorted(n for n in names if n in HEAVY),
    'pip_cache_mb_before': cache_before,
    **demo_warnings(clone, demo_seconds, scratch / f'demo-{ref.replace("/", "_")}'),
  }


def time_make(target: str, python: str) -> float:
  """Wall seconds of `make <target>` in this checkout with `python` (its venv has every extra)."""
  start = time.monotonic()
  subprocess.run(
    ['make', '-o', '.venv/.installed-test', target, f'PY={python}'],
    cwd=ROOT,
    check=True,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  return round(time.monotonic() - start, 1)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before', default='main', help='git ref before the dependency tiers')
  parser.add_argument('--after', default='HEAD', help='git ref with the tiers')
  parser.add_argument('--scratch', default='/tmp/nextstep-install', help='clones and venvs go here')
  parser.add_argument('--demo-seconds', type=float, default=60.0)
  parser.add_argument(
    '--test-python',
    default=sys.executable,
    help='python of a venv with every extra, for make test-fast / test',
  )
  parser.add_argument('--skip-install', action='store_true', help='only the test tiers')
  parser.add_argument('--skip-fast', action='store_true', help='keep the recorded test_fast_s')
  parser.add_argument('--full', action='store_true', help='also time `make test` (test_full_s)')
  args = parser.parse_args()
  result = json.loads(OUT.read_text()) if OUT.exists() else {}
  scratch = pathlib.Path(args.scratch)
  scratch.mkdir(parents=True, exist_ok=True)
  if not args.skip_install:
    before = measure_install(args.before, scratch, args.demo_seconds)
    after = measure_install(args.after, scratch, args.demo_seconds)
    result.update(
      {
        'demo_install_s': {'before': before['demo_install_s'], 'after': after['demo_install_s']},
        'demo_install_mb': {'before': before['demo_install_mb'], 'after': after['demo_install_mb']},
        'demo_libtpu_warnings': after['demo_libtpu_warnings'],
        'demo_libtpu_warnings_before': before['demo_libtpu_warnings'],
        'before': before,
        'after': after,
        'pip_cache_warm': before['pip_cache_mb_before'] > 100,
        'install_load_average': load_average(),
      }
    )
  if not args.skip_fast:
    result['test_fast_load_average_start'] = load_average()
    result['test_fast_s'] = time_make('test-fast', args.test_python)
  if args.full:
    result['test_full_load_average_start'] = load_average()
    result['test_full_s'] = time_make('test', args.test_python)
  result.setdefault('test_full_s', None)
  result.update(
    {
      'command': ' '.join(['python'] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': f'{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), shared',
    }
  )
  OUT.write_text(json.dumps(result, indent=2) + '\n')
  print(
    json.dumps(
      {
        k: result[k]
        for k in (
          'demo_install_s',
          'demo_install_mb',
          'demo_libtpu_warnings',
          'test_fast_s',
          'test_full_s',
        )
        if k in result
      },
      indent=2,
    )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
