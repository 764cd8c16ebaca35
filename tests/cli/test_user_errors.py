"""Each console script's user errors print one `error: ...` line with no traceback and exit 2
(usage) or 1 (runtime); --debug / NEXTSTEP_DEBUG=1 show the traceback (probes: tests/cli_probes.py)."""

import os
import subprocess
import sys

import cli_probes
import pytest


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  return cli_probes.make_inputs(tmp_path_factory.mktemp('probes'))


PROBE_NAMES = [
  p.name
  for p in cli_probes.probes(
    dict.fromkeys(
      ('tmp', 'run', 'cache', 'release_bad_json', 'release_truncated', 'converted_no_tokenizer'),
      cli_probes.ROOT,
    )
  )
]


@pytest.mark.slow
@pytest.mark.parametrize('name', PROBE_NAMES)
def test_user_error_is_one_line(inputs, name):
  probe = next(p for p in cli_probes.probes(inputs) if p.name == name)
  result = cli_probes.run_probe(probe)
  assert result['ok'], (probe, result)


@pytest.mark.slow
def test_debug_shows_the_traceback(inputs):
  probe = cli_probes.probes(inputs)[0]
  for extra_env, extra_args in (({'NEXTSTEP_DEBUG': '1'}, ()), ({}, ('--debug',))):
    result = subprocess.run(
      [sys.executable, '-m', 'nextstep_jax.cli.train', *probe.args, *extra_args],
      cwd=cli_probes.ROOT,
      env={**cli_probes.env(), **extra_env},
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
    )
    assert result.returncode == 2 and 'Traceback (most recent call last)' in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith('error: ')


def test_entry_run_exit_codes_and_one_line(capsys):
  from nextstep_jax import errors
  from nextstep_jax.cli import entry

  def usage(argv):
    raise errors.UsageError('bad flag; use --good')

  def runtime(argv):
    raise errors.UserError('disk is gone; free some')

  def bug(argv):
    raise KeyError('a bug')

  os.environ.pop(entry.DEBUG_ENV, None)
  assert entry.run(usage, []) == 2 and capsys.readouterr().err == 'error: bad flag; use --good\n'
  assert (
    entry.run(runtime, []) == 1 and capsys.readouterr().err == 'error: disk is gone; free some\n'
  )
  with pytest.raises(KeyError):
    entry.run(bug, [])
