"""Aspect-ratio buckets for training: which records form each global batch, as a pure function.

`data.aspect_buckets` lists token grids as the official model writes them in the sequence, 'h*w'
(rows * columns of image tokens; official: pixels / 16, e.g. '16*16', '12*21', '21*12' at 256 px).
A bucket's image is (h * u, w * u) pixels with u = tokenizer downsample * latent_patch_size.
Every record goes to the bucket nearest its aspect ratio (in |log(w/h)|, first listed wins ties),
is resized to cover the bucket and centre-cropped (or augmented) to it, and every global batch
holds one bucket, so the train step sees one static shape per bucket (one compile each).

Schedule (B = global batch, n_b records in bucket b, N = sum n_b): bucket b's records form an
endless stream, epoch e of it a permutation of the bucket seeded by (seed, b, e); its k-th global
batch is stream positions [k B, (k + 1) B). Schedule epoch e holds
floor(n_b (e + 1) / B) - floor(n_b e / B) batches of bucket b, in an order shuffled by (seed, e),
so over time every record is used once per pass of its bucket, none is dropped, and buckets are
drawn in proportion to their size. Process p of P takes rows [p R, (p + 1) R) (R = B / P) of each
global batch: disjoint, and together the whole batch. Everything is a function of
(seed, global step), so the iterator state is just the next step.
"""

import math

import numpy as np

from nextstep_jax import configlib
from nextstep_jax.data import bad_records
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import records
from nextstep_jax.image import aspect

_SCHEDULE_SALT = 0xB0C4  # Separates the schedule's rng stream from the buckets' permutations.


def grids(config) -> list[tuple[int, int]]:
  """The configured buckets as token grids (h, w), in config order ([] without buckets)."""
  return [aspect.parse_area(text) for text in config.data.get('aspect_buckets', ())]


def pixel_unit(config) -> int:
  """Pixels per image token side: tokenizer downsample * model.latent_patch_size."""
  return configlib.tokenizer_downsample(config) * config.model.latent_patch_size


def nearest_bucket(height: int, width: int, bucket_grids: list[tuple[int, int]]) -> int:
  """Index of the bucket whose w/h is nearest width/height in log ratio (first on ties)."""
  ratio = math.log(width / height)
  return min(
    range(len(bucket_grids)),
    key=lambda b: abs(math.log(bucket_grids[b][1] / bucket_grids[b][0]) - ratio),
  )


def record_size(element) -> tuple[int, int]:
  """(height, width) of a raw source element without decoding its pixels where possible (the
  record's metadata, the array's shape, or the image file header). Raises BadRecordError."""
  if isinstance(element, dict):
    image = element['image']
  else:
    record = records.decode_record(element)
    meta = record.metadata
    if meta.get('kind') != 'image':
      raise bad_records.BadRecordError(
        bad_records.MALFORMED_RECORD,
        f'record kind {meta.get("kind")!r} where an image record was expected',
      )
    if isinstance(meta.get('height'), int) and isinstance(meta.get('width'), int):
      return meta['height'], meta['width']
    image = record.payload
  if isinstance(image, np.ndarray):
    if image.ndim not in (2, 3) or 0 in image.shape[:2]:
      raise bad_records.BadRecordError(
        bad_records.UNDECODABLE_IMAGE, f'array of shape {image.shape} is not an image'
      )
    return int(image.shape[0]), int(image.shape[1])
  return image_preprocess.image_file_size(image)


def cached_bucket(element, bucket_grids: list[tuple[int, int]], patch: int) -> int:
  """The bucket of a latent-cache record, from its stored latent shape (V, h, w, C); raises
  BadRecordError for skipped markers and ValueError for a grid that is not a bucket."""
  meta = records.decode_latent_record(element).metadata
  grid = (meta['shape'][1] // patch, meta['shape'][2] // patch)
  if grid not in bucket_grids:
    raise ValueError(
      f'latent-cache record {meta.get("source_index")} holds a {grid[0]}*{grid[1]} token grid, '
      f'not one of data.aspect_buckets {bucket_grids}; rebuild the cache (`nextstep-data '
      "cache-latents`) with the training config's aspect buckets"
    )
  return bucket_grids.index(grid)


def assign_buckets(source, bucket_of, progress=None) -> tuple[np.ndarray, dict]:
  """(N,) int32 bucket of every source record (-1: left out) and {reason: count} of the records
  left out. bucket_of(element) -> bucket or BadRecordError; `progress(done)` after each record."""
  assignment = np.empty(len(source), np.int32)
  left_out: dict[str, int] = {}
  for index in range(len(source)):
    try:
      assignment[index] = bucket_of(source[index])
    except bad_records.BadRecordError as error:
      assignment[index] = -1
      left_out[error.reason] = left_out.get(error.reason, 0) + 1
    if progress:
      progress(index + 1)
  return assignment, left_out


class BucketSchedule:
  """Global step -> (bucket, source indices of a process's rows); see the module docstring.

  Holds only the (seed, assignment) inputs plus caches of the last epoch's arrays, so it can be
  pickled to Grain workers and gives the same answer in every process."""

  def __init__(self, assignment: np.ndarray, num_buckets: int, global_batch: int, seed: int):
    self.members = [np.flatnonzero(assignment == b) for b in range(num_buckets)]
    self.sizes = [len(m) for m in self.members]
    self.total = sum(self.sizes)
    if self.total == 0:
      raise ValueError(
        'no record could be assigned to an aspect bucket (all unreadable); check '
        'the data set with `nextstep-data build` summaries'
      )
    self.global_batch = global_batch
    self.seed = seed
    self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
    self._permutation_cache: dict[tuple[int, int], np.ndarray] = {}

  def steps_before_epoch(self, epoch: int) -> int:
    return sum(n * epoch // self.global_batch for n in self.sizes)

  def epoch_of_step(self, step: int) -> int:
    """The schedule epoch e with steps_before_epoch(e) <= step < steps_before_epoch(e + 1)."""
    epoch = step * self.global_batch // self.total
    while epoch > 0 and self.steps_before_epoch(epoch) > step:
      epoch -= 1
    while self.steps_before_epoch(epoch + 1) <= step:
      epoch += 1
    return epoch

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(buckets, batch numbers) of the epoch's steps in order."""
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      counts = [
        n * (epoch + 1) // self.global_batch - n * epoch // self.global_batch for n in self.sizes
      ]
      order = np.repeat(np.arange(len(self.sizes)), counts)
      order = np.random.default_rng([self.seed, epoch, _SCHEDULE_SALT]).permutation(order)
      batch_numbers = np.empty(len(order), np.int64)
      for b, n in enumerate(self.sizes):
        at = np.flatnonzero(order == b)
        batch_numbers[at] = n * epoch // self.global_batch + np.arange(len(at))
      self._epoch_cache = (epoch, order, batch_numbers)
    return self._epoch_cache[1], self._epoch_cache[2]

  def bucket_and_batch(self, step: int) -> tuple[int, int]:
    """(bucket, k): global step `step` is the k-th global batch of that bucket."""
    epoch = self.epoch_of_step(step)
    order, batch_numbers = self._epoch(epoch)
    position = step - self.steps_before_epoch(epoch)
    return int(order[position]), int(batch_numbers[position])

  def _permutation(self, bucket: int, bucket_epoch: int) -> np.ndarray:
    key = (bucket, bucket_epoch)
    if key not in self._permutation_cache:
      if len(self._permutation_cache) > 2 * len(self.sizes):
        self._permutation_cache.clear()
      rng = np.random.default_rng([self.seed, bucket, bucket_epoch])
      self._permutation_cache[key] = self.members[bucket][rng.permutation(self.sizes[bucket])]
    return self._permutation_cache[key]

  def rows(self, step: int, process_index: int, process_count: int) -> tuple[int, np.ndarray]:
    """(bucket, (R,) int64 source indices) of process `process_index`'s rows at `step`."""
    bucket, k = self.bucket_and_batch(step)
    rows = self.global_batch // process_count
    n = self.sizes[bucket]
    positions = k * self.global_batch + process_index * rows + np.arange(rows)
    return bucket, np.array(
      [self._permutation(bucket, int(q) // n)[int(q) % n] for q in positions], np.int64
    )
