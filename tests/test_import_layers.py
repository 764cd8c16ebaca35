"""The import-layer contract (.importlinter, drawn in docs/architecture.md) holds, and it catches a
back-edge: the same check on a copy of the package with one injected upward import fails."""

import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LINT_IMPORTS = pathlib.Path(sys.executable).parent / 'lint-imports'


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs lint-imports with the repository's contract on the package under `root`."""
  env = {**os.environ, 'PYTHONPATH': str(root)}
  return subprocess.run(
    [str(LINT_IMPORTS), '--config', str(REPO / '.importlinter'), '--no-cache'],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )


def test_the_package_keeps_its_layers():
  result = lint_imports(REPO)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '0 broken' in result.stdout


def test_an_injected_back_edge_breaks_the_contract(tmp_path):
  shutil.copytree(
    REPO / 'nextstep_jax', tmp_path / 'nextstep_jax', ignore=shutil.ignore_patterns('__pycache__')
  )
  attention = tmp_path / 'nextstep_jax' / 'model' / 'attention.py'
  attention.write_text(
    attention.read_text() + '\nfrom nextstep_jax.training import loop  # back-edge\n'
  )
  result = lint_imports(tmp_path)
  assert result.returncode != 0, result.stdout
  assert 'BROKEN' in result.stdout
  assert 'nextstep_jax.model.attention -> nextstep_jax.training.loop' in result.stdout
