"""User-error probes of every console script: the inputs a new user gets wrong, each expected to
print exactly one `error: ...` line (no traceback) and exit 2 (usage) or 1 (runtime).

Shared by tests/cli/test_user_errors.py and benchmarks/fault_probes.py. `make_inputs(tmp)` builds
what the probes point at (a 2-step tiny training run, a non-UTF-8 prompt file, broken releases);
`probes(inputs)` lists them; `run_probe` runs one in a subprocess (`python -m nextstep_jax.cli.X`).
"""

import dataclasses
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ['--config', 'configs/tiny.py']


@dataclasses.dataclass(frozen=True)
class Probe:
  name: str
  module: str  # nextstep_jax.cli.<module>
  args: tuple
  code: int  # Expected exit code.
  says: str  # Expected substring of the error line.


def env() -> dict:
  out = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  out.pop('NEXTSTEP_DEBUG', None)
  return out


def make_inputs(tmp: pathlib.Path) -> dict:
  """Files and runs the probes point at, under `tmp`."""
  sys.path.insert(0, str(ROOT / 'tests'))
  import hf_testing

  cache = tmp / 'cache'
  run = tmp / 'run'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'nextstep_jax.cli.train',
      *TINY,
      '--workdir',
      str(run),
      '--config.train.steps=2',
      '--config.train.checkpoint_every=2',
      f'--config.data.cache_dir={cache}',
    ],
    cwd=ROOT,
    env=env(),
    check=True,
    capture_output=True,
    timeout=900,
  )
  (tmp / 'latin1.txt').write_bytes('un caf\xe9 rouge\n'.encode('latin-1'))
  (tmp / 'a_file').write_text('not a directory')
  release = tmp / 'release_bad_json'
  release.mkdir()
  (release / 'config.json').write_text('{"hidden_size": 64,')
  truncated = tmp / 'release_truncated'
  truncated.mkdir()
  (truncated / 'config.json').write_text('{}')
  hf_testing.build_tokenizer(str(truncated / 'tokenizer.json'))
  import numpy as np
  from safetensors.numpy import save_file

  save_file({'w': np.zeros((64, 64), np.float32)}, str(truncated / 'model.safetensors'))
  data = (truncated / 'model.safetensors').read_bytes()
  (truncated / 'model.safetensors').write_bytes(data[: len(data) // 2])
  converted = tmp / 'converted_no_tokenizer'
  converted.mkdir()
  (converted / 'config.json').write_text('{}')
  return {
    'tmp': tmp,
    'run': run,
    'cache': cache,
    'release_bad_json': release,
    'release_truncated': truncated,
    'converted_no_tokenizer': converted,
  }


def probes(x: dict) -> list[Probe]:
  tmp, run, cache = x['tmp'], str(x['run']), f'--config.data.cache_dir={x["cache"]}'
  out = str(tmp / 'samples')
  sample = ('--workdir', run, '--prompt', 'a red circle', '--out', out)
  return [
    Probe(
      'train: unknown config field',
      'train',
      (*TINY, '--workdir', str(tmp / 't1'), '--config.train.stepz=3'),
      2,
      'stepz',
    ),
    Probe('train: unknown flag', 'train', (*TINY, '--bogus'), 2, 'unrecognised arguments'),
    Probe(
      'train: indivisible batch',
      'train',
      (*TINY, '--workdir', str(tmp / 't2'), '--config.train.batch_size=6', cache),
      2,
      'does not divide',
    ),
    Probe(
      'train: --step not saved',
      'train',
      (*TINY, '--workdir', run, '--step', '7', cache),
      1,
      'no checkpoint for that step',
    ),
    Probe(
      'train: other model in workdir',
      'train',
      (*TINY, '--workdir', run, '--config.model.hidden_size=128', cache),
      2,
      'different model config',
    ),
    Probe('sample: --height 0', 'sample', (*sample, '--height', '0'), 2, '--height 0 must be > 0'),
    Probe('sample: --cfg -1', 'sample', (*sample, '--cfg', '-1'), 2, '--cfg -1.0 must be >= 0'),
    Probe(
      'sample: --temperature -1',
      'sample',
      (*sample, '--temperature', '-1'),
      2,
      '--temperature -1.0 must be > 0',
    ),
    Probe(
      'sample: --batch-size 0',
      'sample',
      (*sample, '--batch-size', '0'),
      2,
      '--batch-size 0 must be >= 1',
    ),
    Probe(
      'sample: non-UTF-8 prompt file',
      'sample',
      ('--workdir', run, '--prompts', str(tmp / 'latin1.txt'), '--out', out),
      2,
      'is not UTF-8',
    ),
    Probe(
      'sample: unwritable --out',
      'sample',
      ('--workdir', run, '--prompt', 'a red circle', '--out', str(tmp / 'a_file' / 'sub')),
      2,
      'is not writable',
    ),
    Probe(
      'sample: not a run',
      'sample',
      ('--workdir', str(tmp / 'nothing'), '--prompt', 'x', '--out', out),
      1,
      'is not a training run',
    ),
    Probe(
      'sample: missing step', 'sample', (*sample, '--step', '99'), 1, 'No checkpoint for step 99'
    ),
    Probe(
      'sample: too-long prompt',
      'sample',
      ('--workdir', run, '--prompt', 'zebra quartz violin ' * 12, '--out', out),
      2,
      '--max-caption-tokens',
    ),
    Probe(
      'sample: converted without tokenizer.json',
      'sample',
      ('--converted', str(x['converted_no_tokenizer']), '--prompt', 'x', '--out', out),
      1,
      'tokenizer.json is missing',
    ),
    Probe(
      'convert: no release',
      'convert',
      ('--hf-dir', str(tmp / 'nothing'), '--out', str(tmp / 'c1')),
      1,
      'config.json is missing',
    ),
    Probe(
      'convert: invalid config.json',
      'convert',
      ('--hf-dir', str(x['release_bad_json']), '--out', str(tmp / 'c2')),
      1,
      'config.json is not valid JSON',
    ),
    Probe(
      'convert: truncated safetensors',
      'convert',
      ('--hf-dir', str(x['release_truncated']), '--out', str(tmp / 'c3')),
      1,
      'model.safetensors is not a readable safetensors file',
    ),
    Probe(
      'data: captions file missing',
      'data',
      (
        'build',
        '--from',
        'folder',
        '--images',
        str(tmp),
        '--captions',
        str(tmp / 'none.jsonl'),
        '--out',
        str(tmp / 'd'),
      ),
      2,
      'no such file',
    ),
    Probe(
      'aot: unknown config field',
      'aot',
      (*TINY, '--topology', 'v5e:1x1', '--config.model.layerz=2'),
      2,
      'layerz',
    ),
    Probe(
      'eval-tokenizer: --num 0',
      'eval_tokenizer',
      ('--workdir', run, '--num', '0'),
      2,
      '--num 0 must be >= 1',
    ),
    Probe(
      'train-tokenizer: --step',
      'train_tokenizer',
      ('--config', 'configs/tokenizer_shapes.py', '--step', '3'),
      2,
      '--step is not supported',
    ),
    Probe('sweep: missing flags', 'sweep', (), 2, 'required'),
    Probe('demo: unknown tokenizer', 'demo', ('--tokenizer', 'jpeg'), 2, "--tokenizer 'jpeg'"),
  ]


def run_probe(probe: Probe, timeout: int = 600) -> dict:
  """Runs `probe`; its exit code, stderr lines, whether a traceback was printed and whether it
  behaved as expected (code, one `error:` line holding `says`, no traceback)."""
  result = subprocess.run(
    [sys.executable, '-m', f'nextstep_jax.cli.{probe.module}', *probe.args],
    cwd=ROOT,
    env=env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  traceback = 'Traceback (most recent call last)' in result.stderr + result.stdout
  ok = (
    result.returncode == probe.code
    and len(lines) == 1
    and lines[0].startswith('error: ')
    and probe.says in lines[0]
    and not traceback
  )
  return {
    'probe': probe.name,
    'exit_code': result.returncode,
    'lines_printed': len(lines),
    'traceback': traceback,
    'ok': ok,
    'line': lines[-1] if lines else '',
  }
