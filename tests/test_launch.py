"""launch/tpu_pod.sh --dry-run: the gcloud commands it would run, and its argument errors."""

import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'launch' / 'tpu_pod.sh'


def dry_run(*args):
  return subprocess.run(
    ['bash', str(SCRIPT), '--dry-run', *args], capture_output=True, text=True, timeout=60
  )


def test_creates_installs_and_trains_on_every_worker():
  out = dry_run(
    '--name',
    'ns',
    '--zone',
    'us-east5-a',
    '--type',
    'v5p-64',
    '--config',
    'configs/shapes.py',
    '--workdir',
    'gs://b/run',
    '--spot',
    '--config.train.steps=9',
    '--',
    '--config.seed=3',
  )
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith('+ ')]
  assert lines[0].startswith(
    '+ gcloud compute tpus tpu-vm create ns --zone us-east5-a --accelerator-type v5p-64'
  )
  assert '--spot' in lines[0]
  assert all('--worker=all' in l for l in lines[1:]) and len(lines) == 4
  assert 'pip\\ install' in lines[2] and "\\'.\\[tpu\\,gcs\\]\\'" in lines[2]
  train = lines[3].replace('\\ ', ' ')
  assert (
    'nextstep_jax.cli.train --config configs/shapes.py --workdir gs://b/run --config.train.steps=9 '
    '--config.seed=3'
  ) in train
  assert 'gcloud compute tpus tpu-vm delete ns --zone us-east5-a' in out.stdout


def test_queued_resource_and_no_create():
  queued = dry_run(
    '--name',
    'ns',
    '--zone',
    'z',
    '--type',
    'v5e-16',
    '--config',
    'c.py',
    '--workdir',
    'gs://b/r',
    '--queued',
  )
  assert 'gcloud compute tpus queued-resources create ns --node-id ns' in queued.stdout
  assert 'queued-resources delete ns' in queued.stdout
  reuse = dry_run(
    '--name', 'ns', '--zone', 'z', '--config', 'c.py', '--workdir', 'gs://b/r', '--no-create'
  )
  assert reuse.returncode == 0 and 'create' not in reuse.stdout


def test_missing_arguments_are_named():
  out = dry_run('--name', 'ns', '--zone', 'z', '--config', 'c.py')
  assert out.returncode == 2 and '--workdir is required' in out.stderr
  out = dry_run('--name', 'ns', '--zone', 'z', '--config', 'c.py', '--workdir', 'gs://b/r')
  assert out.returncode == 2 and '--type' in out.stderr
  out = dry_run('--bogus')
  assert out.returncode == 2 and 'unknown argument --bogus' in out.stderr
