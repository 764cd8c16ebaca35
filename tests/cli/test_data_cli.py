"""Tests of the nextstep-data command line: build, cache-latents and train-spm end to end."""

import json

from nextstep_jax.cli import data as data_cli
from nextstep_jax.data import records
from nextstep_jax.data import text_tokenizer


def test_build_then_cache_latents_then_train_spm(tmp_path, capsys):
  out = str(tmp_path / 'shapes')
  assert (
    data_cli.main(
      [
        'build',
        '--from',
        'builtin',
        '--dataset',
        'shapes',
        '--num',
        '30',
        '--size',
        '16',
        '--num-shards',
        '2',
        '--out',
        out,
      ]
    )
    == 0
  )
  summary = json.loads((tmp_path / 'shapes.summary.json').read_text())
  assert summary['records'] == 30 and len(summary['shards']) == 2
  assert '"records": 30' in capsys.readouterr().out

  assert (
    data_cli.main(
      [
        'cache-latents',
        '--config',
        'configs/shapes.py',
        '--out',
        str(tmp_path / 'lat'),
        '--config.image.size=16',
        '--config.data.source=arrayrecord',
        f'--config.data.paths={out}-*.array_record',
      ]
    )
    == 0
  )
  cache = json.loads((tmp_path / 'lat.summary.json').read_text())
  assert cache['records'] == 30
  latent = records.decode_record(
    records.read_all(records.resolve_paths(str(tmp_path / 'lat-*')))[0]
  )
  assert latent.metadata['shape'] == [1, 16, 16, 3]

  assert (
    data_cli.main(
      [
        'train-spm',
        '--captions',
        f'{out}-*.array_record',
        '--vocab-size',
        '320',
        '--out',
        str(tmp_path / 'spm'),
      ]
    )
    == 0
  )
  tok = text_tokenizer.TextTokenizer.load(str(tmp_path / 'spm.model'))
  assert tok.decode(tok.encode('a red circle')) == 'a red circle'


def test_train_spm_from_a_captions_file(tmp_path):
  captions = tmp_path / 'captions.jsonl'
  captions.write_bytes(
    b'{"image": "x.png", "caption": "a tiny house"}\n'
    b'{"image": "y.png", "caption": "a big \xff tree"}\n'
  )
  assert (
    data_cli.main(
      [
        'train-spm',
        '--captions',
        str(captions),
        '--vocab-size',
        '300',
        '--out',
        str(tmp_path / 'm.model'),
      ]
    )
    == 0
  )
  assert text_tokenizer.TextTokenizer.load(str(tmp_path / 'm.model')).vocab_size <= 300


def test_bad_arguments_name_the_fix(tmp_path, capsys):
  assert data_cli.main(['build', '--from', 'folder', '--out', str(tmp_path / 'x')]) == 2
  assert capsys.readouterr().err == 'error: --from folder needs --images DIR and --captions FILE\n'
  assert (
    data_cli.main(
      [
        'build',
        '--from',
        'folder',
        '--images',
        str(tmp_path),
        '--captions',
        str(tmp_path / 'none.jsonl'),
        '--out',
        str(tmp_path / 'x'),
      ]
    )
    == 2
  )
  assert capsys.readouterr().err.count('\n') == 1
