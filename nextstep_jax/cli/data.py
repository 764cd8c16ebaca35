"""nextstep-data: build ArrayRecord data sets, cache latents, train a sentencepiece model.

  nextstep-data build --from folder --images DIR --captions captions.jsonl|.csv --out DIR/name
  nextstep-data build --from edit-folder --images DIR --edits edits.jsonl --out DIR/name   (edit triplets)
  nextstep-data build --from tfds --name N --split S [--data-dir D] --out DIR/name
  nextstep-data build --from builtin --dataset shapes|digits [--num 50000 --size 32] --out DIR/name
      [--num-shards K] [--workers W]       (resumable: rerun the same command after a crash)
  nextstep-data cache-latents --config configs/shapes.py --out DIR/name_latents [--config.data.x=...]
  nextstep-data train-spm --captions FILE.jsonl|.csv|.txt|SHARD_GLOB --vocab-size N --out DIR/model

Summaries (records, bytes, skipped / fixed by reason) are printed and written as JSON next to --out.
"""

import argparse
import json
import os
import sys

from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax.cli import entry


def _records_captions(spec: str) -> list[str]:
  """Captions of ArrayRecord shards (image or latent records), cleaned; bad ones left out."""
  from nextstep_jax.data import bad_records
  from nextstep_jax.data import captions as captions_lib
  from nextstep_jax.data import records

  out = []
  for data in records.read_all(records.resolve_paths(spec, '--captions')):
    try:
      out.append(captions_lib.decode_caption(records.decode_record(data).caption)[0])
    except bad_records.BadRecordError:
      continue
  return out


def caption_corpus(path: str) -> list[str]:
  """Captions of a .jsonl / .csv captions file, a .txt file (one per line) or record shards."""
  from nextstep_jax.data import bad_records
  from nextstep_jax.data import builder
  from nextstep_jax.data import captions as captions_lib

  if path.endswith(('.jsonl', '.json', '.csv')):
    raw = [item.caption for item in builder.folder_items('', path)[0]]
  elif path.endswith('.txt'):
    with open(path, 'rb') as f:
      raw = f.read().splitlines()
  else:
    return _records_captions(path)
  out = []
  for caption in raw:
    try:
      out.append(captions_lib.decode_caption(caption)[0])
    except bad_records.BadRecordError:
      continue
  return out


def _build(args) -> dict:
  from nextstep_jax.data import builder

  if args.source == 'folder':
    if not (args.images and args.captions):
      raise errors.UsageError('--from folder needs --images DIR and --captions FILE')
    for flag, path, kind in (
      ('--images', args.images, 'directory'),
      ('--captions', args.captions, 'file'),
    ):
      if not os.path.exists(path):
        raise errors.UsageError(f'{flag} {path}: no such {kind}')
    items, counts = builder.folder_items(args.images, args.captions)
    source = f'folder {args.images} ({args.captions})'
  elif args.source == 'edit-folder':
    from nextstep_jax.data import edit_builder

    if not (args.images and args.edits):
      raise SystemExit('--from edit-folder needs --images DIR and --edits FILE.jsonl')
    items, counts = edit_builder.edit_folder_items(args.images, args.edits)
    return edit_builder.build_edits(
      items,
      args.out,
      args.num_shards,
      args.workers,
      f'edit folder {args.images} ({args.edits})',
      counts,
    )
  elif args.source == 'tfds':
    if not args.name:
      raise errors.UsageError('--from tfds needs --name (a prepared array_record data set)')
    items, counts = (
      builder.tfds_items(args.name, args.split, args.data_dir, args.image_key, args.caption_key),
      {},
    )
    source = f'tfds {args.name}:{args.split}'
  else:
    items, counts = builder.builtin_items(args.dataset, args.num, args.seed, args.size), {}
    source = f'builtin {args.dataset} (num {args.num}, seed {args.seed}, size {args.size})'
  return builder.build(items, args.out, args.num_shards, args.workers, source, counts)


def _cache_latents(args, overrides) -> dict:
  from nextstep_jax.data import latent_cache

  config = configlib.load_config(args.config, overrides)
  configlib.validate(config)
  return latent_cache.build_latent_cache(config, args.out, args.num_shards, args.batch_size)


def _train_spm(args) -> dict:
  from nextstep_jax.data import text_tokenizer

  corpus = caption_corpus(args.captions)
  prefix = args.out[: -len('.model')] if args.out.endswith('.model') else args.out
  path = text_tokenizer.train_sentencepiece(corpus, prefix, args.vocab_size)
  tok = text_tokenizer.TextTokenizer.load(path)
  summary = {'model': path, 'captions': len(corpus), 'vocab_size': tok.vocab_size}
  print(f'train-spm: {path} with {tok.vocab_size} pieces from {len(corpus)} captions', flush=True)
  return summary


def make_parser() -> argparse.ArgumentParser:
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  commands = parser.add_subparsers(dest='command', required=True)
  build = commands.add_parser('build', help='write ArrayRecord shards of image records')
  build.add_argument(
    '--from', dest='source', required=True, choices=('folder', 'edit-folder', 'tfds', 'builtin')
  )
  build.add_argument('--out', required=True, help='output prefix DIR/name')
  build.add_argument('--images', help='folder: image root the captions file paths are relative to')
  build.add_argument('--captions', help='folder: captions .jsonl ({"image", "caption"}) or .csv')
  build.add_argument(
    '--edits',
    help='edit-folder: .jsonl of {"source", "target", "instruction"} (paths under --images)',
  )
  build.add_argument('--name', help='tfds: data set name')
  build.add_argument('--split', default='train', help='tfds: split')
  build.add_argument('--data-dir', default='', help='tfds: data_dir ("" = TFDS default)')
  build.add_argument('--image-key', default='image', help='tfds: image feature')
  build.add_argument('--caption-key', default='caption', help='tfds: caption feature')
  build.add_argument(
    '--dataset', default='shapes', choices=('shapes', 'digits'), help='builtin data set'
  )
  build.add_argument('--num', type=int, default=50000, help='builtin: examples')
  build.add_argument('--seed', type=int, default=0, help='builtin: generator seed')
  build.add_argument('--size', type=int, default=32, help='builtin: image side')
  build.add_argument('--num-shards', type=int, default=0, help='0 = one per 1000 records')
  build.add_argument('--workers', type=int, default=1, help='worker processes writing shards')
  cache = commands.add_parser('cache-latents', help='encode a data set with the image tokenizer')
  cache.add_argument('--config', required=True, help='config naming the raw source and tokenizer')
  cache.add_argument('--out', required=True, help='output prefix DIR/name')
  cache.add_argument('--num-shards', type=int, default=0, help='0 = one per 1000 records')
  cache.add_argument('--batch-size', type=int, default=64, help='images per encode call')
  spm = commands.add_parser('train-spm', help='train a sentencepiece model on captions')
  spm.add_argument(
    '--captions', required=True, help='.jsonl / .csv / .txt captions or record shards'
  )
  spm.add_argument('--vocab-size', type=int, required=True, help='pieces (an upper bound)')
  spm.add_argument('--out', required=True, help='model path (".model" appended if missing)')
  return parser


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  args, rest = make_parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  if len(overrides) != len(rest) or (overrides and args.command != 'cache-latents'):
    make_parser().error(f'unrecognised arguments {rest}')
  if args.command == 'build':
    summary = _build(args)
  elif args.command == 'cache-latents':
    summary = _cache_latents(args, overrides)
  else:
    summary = _train_spm(args)
  print(json.dumps(summary, indent=1, sort_keys=True))
  return 0


if __name__ == '__main__':
  sys.exit(main())
