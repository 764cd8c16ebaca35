"""`nextstep-data build`: ArrayRecord shards of (image bytes, caption, metadata) records.

Sources: a folder of images with a captions file (JSONL lines {"image": relative path,
"caption": text}, or CSV with header image,caption), a prepared TFDS data set (by name/split via
`tfds.data_source`, nothing downloaded), or the built-in shapes / digits. Items are split into
contiguous shard ranges written by worker processes. Each shard is written atomically (temp file +
rename) and then gets a `<shard>.summary.json`; a rerun skips shards whose summary matches their
item range and rewrites the rest, so an interrupted build resumes. The build summary (records,
bytes, skipped and fixed counts by reason) is printed and written to `<out>.summary.json`.

Images are stored as given (file bytes) after checking they decode fully (JPEG entropy data
walked too: `jpeg_check.py`, garbled middles decode without an error otherwise); arrays (built-in,
TFDS) are stored as PNG. A null caption, and an image path listed again with the same caption (paths
normalised, so `./x.png` is `x.png`; each record's source is its path relative to the image
folder, so `sub/x.png` and `x.png` stay apart), are skipped and counted. Image conversions
(grayscale, alpha, 16-bit, palette) are counted here and applied
when the pipeline reads the record; non-UTF-8 captions are stored repaired (U+FFFD), empty ones
and undecodable / truncated / unreadable images are skipped.
"""

import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from nextstep_jax import errors
from nextstep_jax.data import bad_records
from nextstep_jax.data import captions as captions_lib
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import jpeg_check
from nextstep_jax.data import records

RECORDS_PER_SHARD = 1000  # Default shard size when --num-shards is not given.


class DatasetInputError(errors.UsageError, ValueError):
  """The captions file or build arguments are unusable as a whole (not one bad record)."""


@dataclasses.dataclass(frozen=True)
class FileItem:
  """An image file and its raw caption bytes (from the captions file, possibly not UTF-8);
  source: its path relative to the image folder (recorded in the metadata)."""

  path: str
  caption: bytes
  source: str = ''

  def load(self) -> tuple[bytes, bytes, str]:
    try:
      with open(self.path, 'rb') as f:
        return f.read(), self.caption, self.source or os.path.basename(self.path)
    except OSError as error:
      raise bad_records.BadRecordError(bad_records.UNREADABLE_FILE, str(error)) from error


@dataclasses.dataclass(frozen=True)
class ArrayItem:
  """A decoded image (H, W, 3) uint8 and its caption."""

  image: np.ndarray
  caption: str
  source: str

  def load(self) -> tuple[bytes, str, str]:
    return encode_png(self.image), self.caption, self.source


@dataclasses.dataclass(frozen=True)
class TfdsItem:
  """Example `index` of a prepared TFDS data set."""

  name: str
  split: str
  data_dir: str
  image_key: str
  caption_key: str
  index: int

  def load(self) -> tuple[bytes, Any, str]:
    from nextstep_jax.data import grain_pipeline  # grain

    key = (self.name, self.split, self.data_dir, self.image_key, self.caption_key)
    if key not in _TFDS_SOURCES:
      _TFDS_SOURCES[key] = grain_pipeline.TfdsRecords(*key)
    example = _TFDS_SOURCES[key][self.index]
    image = example['image']
    data = encode_png(image) if isinstance(image, np.ndarray) else bytes(image)
    return data, example['caption'], f'{self.name}:{self.split}[{self.index}]'


_TFDS_SOURCES: dict = {}  # Per worker process: open TFDS data sources.


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format='PNG')
  return buffer.getvalue()


def folder_items(images_dir: str, captions_path: str) -> tuple[list[FileItem], dict[str, int]]:
  """Items of a captions file (JSONL or CSV, by extension) and the counts of unusable lines."""
  counts: dict[str, int] = {}
  with open(captions_path, 'rb') as f:
    # surrogateescape keeps undecodable caption bytes intact for decode_caption to count.
    text = f.read().decode('utf-8', errors='surrogateescape')
  if captions_path.endswith('.csv'):
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {'image', 'caption'} <= set(rows[0]):
      raise DatasetInputError(
        f'{captions_path}: CSV header must have columns image,caption; got {list(rows[0])}'
      )
  elif captions_path.endswith(('.jsonl', '.json')):
    rows = []
    for line in text.splitlines():
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict) or 'image' not in row or 'caption' not in row:
          raise ValueError('needs "image" and "caption"')
        rows.append(row)
      except ValueError:
        bad_records.add(counts, {bad_records.MALFORMED_RECORD: 1})
  else:
    raise DatasetInputError(f'captions file {captions_path!r} must end in .jsonl or .csv')
  items, seen = [], set()
  for row in rows:
    caption = row['caption']
    if caption is None or not isinstance(caption, (str, int, float)) or isinstance(caption, bool):
      bad_records.add(counts, {bad_records.MISSING_CAPTION: 1})
      continue
    relative = os.path.normpath(str(row['image']))
    if (relative, str(caption)) in seen:
      bad_records.add(counts, {bad_records.PATH_COLLISION: 1})
      continue
    seen.add((relative, str(caption)))
    items.append(
      FileItem(
        os.path.join(images_dir, relative),
        str(caption).encode('utf-8', errors='surrogateescape'),
        relative,
      )
    )
  return items, counts


def builtin_items(dataset: str, num: int, seed: int, size: int) -> list[ArrayItem]:
  """The built-in data set's training images and captions (as `data.dataset` generates them)."""
  import ml_collections

  from nextstep_jax.data import builtin_source

  config = ml_collections.ConfigDict(
    {'data': {'dataset': dataset, 'num_train': num}, 'image': {'size': size}, 'seed': seed}
  )
  images, captions = builtin_source.load_images_and_captions(config)
  return [
    ArrayItem(image, caption, f'{dataset}[{i}]')
    for i, (image, caption) in enumerate(zip(images, captions))
  ]


def tfds_items(
  name: str, split: str, data_dir: str, image_key: str = 'image', caption_key: str = 'caption'
) -> list[TfdsItem]:
  from nextstep_jax.data import grain_pipeline

  count = len(grain_pipeline.TfdsRecords(name, split, data_dir, image_key, caption_key))
  return [TfdsItem(name, split, data_dir, image_key, caption_key, i) for i in range(count)]


def image_record(item) -> tuple[bytes, list[str]]:
  """One item -> (record bytes, fixes noted). Raises BadRecordError when it must be skipped."""
  data, caption_raw, source = item.load()
  image, fixes = image_preprocess.decode_image(data)
  caption, caption_fixes = captions_lib.decode_caption(caption_raw)
  with Image.open(io.BytesIO(data)) as header:
    mode, image_format = header.mode, header.format
  if image_format == 'JPEG':
    problem = jpeg_check.check_jpeg(data)
    if problem:
      raise bad_records.BadRecordError(bad_records.CORRUPT_IMAGE, f'{source}: {problem}')
  metadata = {
    'kind': 'image',
    'height': int(image.shape[0]),
    'width': int(image.shape[1]),
    'mode': mode,
    'format': image_format,
    'source': source,
  }
  return records.encode_record(data, caption, metadata), fixes + caption_fixes


@dataclasses.dataclass(frozen=True)
class ShardJob:
  path: str
  start: int  # Item range [start, end).
  end: int


def shard_jobs(out_prefix: str, num_items: int, num_shards: int) -> list[ShardJob]:
  """Contiguous, near-equal item ranges, one per shard."""
  bounds = np.linspace(0, num_items, num_shards + 1).round().astype(int)
  return [
    ShardJob(records.shard_path(out_prefix, s, num_shards), int(bounds[s]), int(bounds[s + 1]))
    for s in range(num_shards)
  ]


def _summary_path(shard: str) -> str:
  return shard + records.SUMMARY_SUFFIX


def finished_summary(job: ShardJob) -> dict | None:
  """The shard's summary if it was completely written for this item range, else None."""
  try:
    with open(_summary_path(job.path), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if not os.path.exists(job.path) or (summary.get('start'), summary.get('end')) != (
    job.start,
    job.end,
  ):
    return None
  return summary


def write_shard(
  job: ShardJob, make_records: Callable[[], Iterator[tuple[bytes | None, list[str]]]]
) -> dict:
  """Writes `job`'s shard from (record or None when skipped, reasons) pairs; then its summary."""
  counts: dict[str, int] = {}
  sizes = []

  def good_records():
    for record, reasons in make_records():
      for reason in reasons:
        bad_records.add(counts, {reason: 1})
      if record is not None:
        sizes.append(len(record))
        yield record

  written = records.write_shard_atomically(job.path, good_records())
  summary = {
    'start': job.start,
    'end': job.end,
    'records': written,
    'bytes': int(sum(sizes)),
    'counts': counts,
  }
  records.write_json_atomically(_summary_path(job.path), summary)
  return summary


def _image_shard(args) -> dict:
  job, items = args

  def make_records():
    for item in items:
      try:
        yield image_record(item)
      except bad_records.BadRecordError as error:
        yield None, [error.reason]

  return write_shard(job, make_records)


def run_jobs(
  jobs: Sequence[ShardJob],
  work: Callable[[Any], dict],
  job_args: Callable[[ShardJob], Any],
  workers: int,
  label: str,
) -> tuple[list[dict], int]:
  """Runs the unfinished jobs (in `workers` spawned processes when > 1); returns every shard's
  summary in order and how many were reused."""
  summaries = {job.path: finished_summary(job) for job in jobs}
  todo = [job for job in jobs if summaries[job.path] is None]
  reused = len(jobs) - len(todo)
  print(
    f'{label}: {len(jobs)} shards, {reused} already finished, writing {len(todo)} with '
    f'{max(1, min(workers, len(todo)))} worker(s)',
    flush=True,
  )
  from nextstep_jax.utils import logging as log_utils  # jax; parent only

  items_per_shard = round(sum(job.end - job.start for job in todo) / max(len(todo), 1))
  progress = log_utils.ProgressLogger(len(todo), every=1, items_per_step=items_per_shard)

  def report(done: int, job: ShardJob, summary: dict) -> None:
    summaries[job.path] = summary
    progress.update(done, {'records': summary['records']})

  if workers > 1 and len(todo) > 1:
    with multiprocessing.get_context('spawn').Pool(min(workers, len(todo))) as pool:
      results = pool.imap(work, [job_args(job) for job in todo])
      for done, (job, summary) in enumerate(zip(todo, results), 1):
        report(done, job, summary)
  else:
    for done, job in enumerate(todo, 1):
      report(done, job, work(job_args(job)))
  return [summaries[job.path] for job in jobs], reused


def total_summary(
  shard_summaries: Sequence[dict],
  extra_counts: dict,
  reused: int,
  seconds: float,
  source: str,
  paths: Sequence[str],
) -> dict:
  counts = dict(extra_counts)
  for summary in shard_summaries:
    bad_records.add(counts, summary['counts'])
  skipped, fixed = bad_records.split(counts)
  return {
    'source': source,
    'records': sum(s['records'] for s in shard_summaries),
    'bytes': sum(s['bytes'] for s in shard_summaries),
    'skipped': skipped,
    'fixed': fixed,
    'shards': list(paths),
    'shards_reused': reused,
    'seconds': round(seconds, 3),
  }


def build(
  items: Sequence,
  out_prefix: str,
  num_shards: int = 0,
  workers: int = 1,
  source: str = '',
  extra_counts: dict | None = None,
) -> dict:
  """Writes `items` as image-record shards `<out_prefix>-SSSSS-of-NNNNN.array_record`; returns
  (and writes to `<out_prefix>.summary.json`) the build summary."""
  return build_shards(
    items, out_prefix, _image_shard, 'build', num_shards, workers, source, extra_counts
  )


def build_shards(
  items: Sequence,
  out_prefix: str,
  shard_fn: Callable,
  label: str,
  num_shards: int = 0,
  workers: int = 1,
  source: str = '',
  extra_counts: dict | None = None,
) -> dict:
  """Writes `items` as shards, each by `shard_fn(job, items of the job)` (e.g. `_image_shard`), on
  `workers` processes; writes and returns the summary, printed as one `label:` line."""
  if not items:
    raise DatasetInputError(f'nothing to build for {source}: no items')
  out_prefix = os.path.abspath(out_prefix)
  num_shards = num_shards or max(1, math.ceil(len(items) / RECORDS_PER_SHARD))
  if num_shards > len(items):
    raise DatasetInputError(f'--num-shards={num_shards} is more than the {len(items)} items')
  start = time.monotonic()
  jobs = shard_jobs(out_prefix, len(items), num_shards)
  summaries, reused = run_jobs(
    jobs, shard_fn, lambda job: (job, items[job.start : job.end]), workers, label
  )
  summary = total_summary(
    summaries,
    extra_counts or {},
    reused,
    time.monotonic() - start,
    source,
    [job.path for job in jobs],
  )
  records.write_json_atomically(out_prefix + records.SUMMARY_SUFFIX, summary)
  print(
    f'{label}: {summary["records"]} records, {summary["bytes"]} bytes in {num_shards} shards; '
    f'{bad_records.describe({**summary["skipped"], **summary["fixed"]})}',
    flush=True,
  )
  return summary
