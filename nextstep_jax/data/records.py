"""The record layout of our ArrayRecord shards and atomic shard I/O.

A record is one bytes string: magic b'NSR1', three little-endian uint32 lengths, then the payload,
the caption (UTF-8 bytes as stored; readers must cope with anything) and a metadata JSON object.
Image records (`nextstep-data build`) carry the image file bytes (PNG/JPEG/... as given) as payload
and metadata {'kind': 'image', 'width', 'height', 'mode', 'format', 'source', ...}. Latent records
(`nextstep-data cache-latents`) carry float32 latents (V, h, w, C) in C order as payload and
metadata {'kind': 'latents', 'shape': [V, h, w, C], 'dtype': 'float32', 'source_index': i}.

Shards are named `<prefix>-SSSSS-of-NNNNN.array_record` and written with `group_size:1`
(single-record chunks: random access reads one record).
"""

import dataclasses
import glob
import json
import os
import struct
from collections.abc import Iterable, Sequence

from array_record.python import array_record_module

from nextstep_jax.data import bad_records

MAGIC = b'NSR1'
_HEADER = struct.Struct('<4sIII')
SHARD_SUFFIX = '.array_record'
SUMMARY_SUFFIX = '.summary.json'  # Build summaries beside shards; never read as shards.
WRITER_OPTIONS = 'group_size:1'


@dataclasses.dataclass(frozen=True)
class Record:
  payload: bytes
  caption: bytes
  metadata: dict


def encode_record(payload: bytes, caption: bytes | str, metadata: dict) -> bytes:
  """Serialises one record (see module docstring)."""
  if isinstance(caption, str):
    caption = caption.encode('utf-8')
  meta = json.dumps(metadata, sort_keys=True).encode('utf-8')
  return _HEADER.pack(MAGIC, len(payload), len(caption), len(meta)) + payload + caption + meta


def decode_record(data: bytes) -> Record:
  """Parses `encode_record` output; BadRecordError(malformed_record) on anything else."""
  if len(data) < _HEADER.size:
    raise bad_records.BadRecordError(bad_records.MALFORMED_RECORD, f'{len(data)} bytes')
  magic, n_payload, n_caption, n_meta = _HEADER.unpack_from(data)
  if magic != MAGIC or _HEADER.size + n_payload + n_caption + n_meta != len(data):
    raise bad_records.BadRecordError(
      bad_records.MALFORMED_RECORD, 'not a nextstep record (magic or lengths differ)'
    )
  start = _HEADER.size
  payload = bytes(data[start : start + n_payload])
  caption = bytes(data[start + n_payload : start + n_payload + n_caption])
  try:
    metadata = json.loads(bytes(data[start + n_payload + n_caption :]).decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise bad_records.BadRecordError(bad_records.MALFORMED_RECORD, f'metadata: {error}') from error
  return Record(payload, caption, metadata)


def decode_latent_record(data: bytes) -> Record:
  """A latent-cache record (metadata kind 'latents'); BadRecordError for a marker of a record
  skipped when the cache was built, or for any other kind."""
  record = decode_record(data)
  kind = record.metadata.get('kind')
  if kind == 'skipped':
    raise bad_records.BadRecordError(record.metadata['reason'], 'skipped when the cache was built')
  if kind != 'latents':
    raise bad_records.BadRecordError(
      bad_records.MALFORMED_RECORD, f'record kind {kind!r} in the latent cache'
    )
  return record


def shard_path(prefix: str, index: int, count: int) -> str:
  return f'{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}'


def resolve_paths(spec: str | Sequence[str], what: str = 'data.paths') -> list[str]:
  """Comma-separated (or listed) files / glob patterns -> sorted existing shard paths (summaries
  and temporary files of a build in progress left out)."""
  items = [p.strip() for p in (spec.split(',') if isinstance(spec, str) else spec) if p.strip()]
  if not items:
    raise ValueError(
      f'{what} is empty; set it to the shard files or a glob such as '
      '"/data/name-*.array_record" (written by `nextstep-data build`).'
    )
  paths = []
  for item in items:
    matches = [
      m
      for m in sorted(glob.glob(os.path.expanduser(item)))
      if not m.endswith(SUMMARY_SUFFIX) and '.tmp-' not in os.path.basename(m)
    ]
    if not matches:
      raise FileNotFoundError(
        f'{what}: nothing matches {item!r}; build the shards with '
        '`nextstep-data build` or fix the path.'
      )
    paths += [os.path.abspath(m) for m in matches]
  return paths


def write_shard_atomically(path: str, records: Iterable[bytes]) -> int:
  """Writes all `records` to `path` via a temporary file and a rename; returns the count.

  A crash leaves either no file at `path` or the complete old one, never a partial shard.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp_path = f'{path}.tmp-{os.getpid()}'
  writer = array_record_module.ArrayRecordWriter(temp_path, WRITER_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
    writer.close()
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise
  return count


def write_json_atomically(path: str, value) -> None:
  temp_path = f'{path}.tmp-{os.getpid()}'
  with open(temp_path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(temp_path, path)


def read_all(paths: Sequence[str]) -> list[bytes]:
  """Every record of the shards, in order (small data sets, tests and tools)."""
  out = []
  for path in paths:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      out += reader.read_all()
    finally:
      reader.close()
  return out
