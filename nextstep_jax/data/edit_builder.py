"""`nextstep-data build --from edit-folder`: ArrayRecord shards of (source, instruction, target) edits.

Input: a folder of images and a JSONL file of lines {"source": path, "target": path,
"instruction": text} (paths relative to the folder). Each edit becomes one record (records.py
layout) with kind 'edit': payload = source file bytes + target file bytes (as given), caption =
the instruction, metadata {'kind': 'edit', 'source_bytes': len(source), 'source': {height,
width, format, path}, 'target': {...}}. Bad records are handled as the image builder does
(bad_records.py): malformed JSONL lines, unreadable files, undecodable or truncated images and
empty instructions are skipped and counted, conversions and repaired captions counted as fixed;
shards are written atomically and an interrupted build resumes (builder.run_jobs).
"""

import dataclasses
import io
import json
import os
from collections.abc import Sequence

from PIL import Image

from nextstep_jax.data import bad_records
from nextstep_jax.data import builder
from nextstep_jax.data import captions as captions_lib
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import records

EDIT_KIND = 'edit'
EDIT_KEYS = ('source', 'target', 'instruction')


@dataclasses.dataclass(frozen=True)
class EditItem:
  """Two image files and the raw instruction bytes."""

  source: str
  target: str
  instruction: bytes

  def load(self) -> tuple[bytes, bytes, bytes]:
    try:
      with open(self.source, 'rb') as f:
        source = f.read()
      with open(self.target, 'rb') as f:
        target = f.read()
    except OSError as error:
      raise bad_records.BadRecordError(bad_records.UNREADABLE_FILE, str(error)) from error
    return source, target, self.instruction


def edit_folder_items(images_dir: str, edits_path: str) -> tuple[list[EditItem], dict[str, int]]:
  """Items of an edits JSONL file and the counts of unusable lines (malformed_record)."""
  if not edits_path.endswith(('.jsonl', '.json')):
    raise ValueError(
      f'edits file {edits_path!r} must be JSONL (lines {{"source", "target", "instruction"}}).'
    )
  with open(edits_path, 'rb') as f:
    text = f.read().decode('utf-8', errors='surrogateescape')
  counts: dict[str, int] = {}
  items = []
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in EDIT_KEYS):
        raise ValueError(f'needs string fields {EDIT_KEYS}')
    except ValueError:
      bad_records.add(counts, {bad_records.MALFORMED_RECORD: 1})
      continue
    items.append(
      EditItem(
        os.path.join(images_dir, row['source']),
        os.path.join(images_dir, row['target']),
        row['instruction'].encode('utf-8', errors='surrogateescape'),
      )
    )
  return items, counts


def _image_metadata(data: bytes, image, path: str) -> dict:
  with Image.open(io.BytesIO(data)) as header:
    image_format = header.format
  return {
    'height': int(image.shape[0]),
    'width': int(image.shape[1]),
    'format': image_format,
    'path': os.path.basename(path),
  }


def edit_record(item: EditItem) -> tuple[bytes, list[str]]:
  """One edit -> (record bytes, fixes noted). Raises BadRecordError when it must be skipped."""
  source, target, instruction_raw = item.load()
  source_image, source_fixes = image_preprocess.decode_image(source)
  target_image, target_fixes = image_preprocess.decode_image(target)
  instruction, caption_fixes = captions_lib.decode_caption(instruction_raw)
  metadata = {
    'kind': EDIT_KIND,
    'source_bytes': len(source),
    'source': _image_metadata(source, source_image, item.source),
    'target': _image_metadata(target, target_image, item.target),
  }
  return records.encode_record(
    source + target, instruction, metadata
  ), source_fixes + target_fixes + caption_fixes


def split_edit_record(data: bytes) -> tuple[bytes, bytes, bytes]:
  """Edit record bytes -> (source image bytes, target image bytes, instruction bytes); raises
  BadRecordError(malformed_record) for other records."""
  record = records.decode_record(data)
  n = record.metadata.get('source_bytes')
  if (
    record.metadata.get('kind') != EDIT_KIND
    or not isinstance(n, int)
    or not 0 < n < len(record.payload)
  ):
    raise bad_records.BadRecordError(
      bad_records.MALFORMED_RECORD,
      f'record kind {record.metadata.get("kind")!r} where an edit record was expected',
    )
  return record.payload[:n], record.payload[n:], record.caption


def _edit_shard(args) -> dict:
  job, items = args

  def make_records():
    for item in items:
      try:
        yield edit_record(item)
      except bad_records.BadRecordError as error:
        yield None, [error.reason]

  return builder.write_shard(job, make_records)


def build_edits(
  items: Sequence[EditItem],
  out_prefix: str,
  num_shards: int = 0,
  workers: int = 1,
  source: str = '',
  extra_counts: dict | None = None,
) -> dict:
  """Writes edit-record shards `<out_prefix>-SSSSS-of-NNNNN.array_record`; returns (and writes to
  `<out_prefix>.summary.json`) the build summary."""
  return builder.build_shards(
    items, out_prefix, _edit_shard, 'build edits', num_shards, workers, source, extra_counts
  )
