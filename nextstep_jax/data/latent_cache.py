"""`nextstep-data cache-latents`: encode a data set once with the image tokenizer.

Reads the raw source the config names (data.source: arrayrecord / tfds / builtin) in index order and
writes latent records (records.py) with the same indices, so a pipeline reading the cache
(data.use_latent_cache) shuffles, shards and skips exactly as the raw one: record i holds
data.cache_variants latents (V, h, w, C) float32 of source record i (at image.size, or at its
nearest data.aspect_buckets bucket's size), variant 0 the resized, centre-cropped image and variant
k >= 1 `image_preprocess.augment` with default_rng([shuffle seed, i, k]) (data.augment); records
that must be skipped are stored as {'kind': 'skipped', 'reason'} markers. Captions are stored as
read; the pipeline cleans them.
Shards are resumable like `nextstep-data build` (builder.run_jobs); encoding runs in this process
(the tokenizer may use the accelerator), `batch_size` images per encode call.
"""

import math
import os
import time

import numpy as np

from nextstep_jax.data import aspect_buckets
from nextstep_jax.data import bad_records
from nextstep_jax.data import builder
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import records
from nextstep_jax.image import tokenizers


def training_size(image: np.ndarray, config) -> tuple[int, int]:
  """(height, width) in pixels the image trains at: its nearest aspect bucket, else image.size."""
  grids = aspect_buckets.grids(config)
  if not grids:
    return config.image.size, config.image.size
  h, w = grids[aspect_buckets.nearest_bucket(image.shape[0], image.shape[1], grids)]
  unit = aspect_buckets.pixel_unit(config)
  return h * unit, w * unit


def image_variants(image: np.ndarray, index: int, config) -> np.ndarray:
  """(V, H, W, 3) uint8 at `training_size`: the plain training image, then V - 1 augmented ones."""
  (height, width), ops = training_size(image, config), grain_pipeline.augment_ops(config)
  seed = config.seed if config.data.shuffle_seed < 0 else config.data.shuffle_seed
  out = [image_preprocess.to_training_image(image, height, width)]
  for variant in range(1, config.data.cache_variants):
    rng = np.random.default_rng([seed, index, variant])
    out.append(
      image_preprocess.augment(image, height, width, ops, config.data.random_crop_scale, rng)
    )
  return np.stack(out)


class _LatentShard:
  """Writes one shard's latent records, encoding `batch_size` source records at a time."""

  def __init__(self, config, source, tokenizer, batch_size: int):
    self.config, self.source, self.tokenizer, self.batch_size = (
      config,
      source,
      tokenizer,
      batch_size,
    )

  def __call__(self, job: builder.ShardJob) -> dict:
    return builder.write_shard(job, lambda: self._records(job.start, job.end))

  def _records(self, start: int, end: int):
    for chunk_start in range(start, end, self.batch_size):
      indices = range(chunk_start, min(end, chunk_start + self.batch_size))
      decoded, markers = [], {}
      for index in indices:
        try:
          data, caption = grain_pipeline.read_raw(self.source[index])
          image, fixes = image_preprocess.decode_image(data)
          decoded.append((index, image_variants(image, index, self.config), caption, fixes))
        except bad_records.BadRecordError as error:
          markers[index] = error.reason
      by_index = {}
      for shape in sorted(
        {variants.shape for _, variants, _, _ in decoded}
      ):  # One encode per bucket.
        group = [item for item in decoded if item[1].shape == shape]
        stacked = np.concatenate([variants for _, variants, _, _ in group])
        encoded = np.asarray(self.tokenizer.encode(tokenizers.uint8_to_unit(stacked)), np.float32)
        for (index, _, caption, fixes), variants in zip(group, np.split(encoded, len(group))):
          by_index[index] = (variants, caption, fixes)
      for index in indices:
        if index in markers:
          meta = {'kind': 'skipped', 'reason': markers[index], 'source_index': index}
          yield records.encode_record(b'', b'', meta), [markers[index]]
        else:
          variants, caption, fixes = by_index[index]
          meta = {
            'kind': 'latents',
            'shape': list(variants.shape),
            'dtype': 'float32',
            'source_index': index,
            'fixes': fixes,
          }
          yield (
            records.encode_record(np.ascontiguousarray(variants).tobytes(), caption, meta),
            fixes,
          )


def build_latent_cache(config, out_prefix: str, num_shards: int = 0, batch_size: int = 64) -> dict:
  """Encodes the config's raw source into `<out_prefix>-SSSSS-of-NNNNN.array_record`; returns and
  writes `<out_prefix>.summary.json` (skipped records are counted and kept as markers)."""
  source = grain_pipeline.open_raw_source(config)
  out_prefix = os.path.abspath(out_prefix)
  num_shards = num_shards or max(1, math.ceil(len(source) / builder.RECORDS_PER_SHARD))
  start = time.monotonic()
  jobs = builder.shard_jobs(out_prefix, len(source), num_shards)
  work = _LatentShard(config, source, tokenizers.get_tokenizer(config), batch_size)
  summaries, reused = builder.run_jobs(jobs, work, lambda job: job, 1, 'cache-latents')
  summary = builder.total_summary(
    summaries,
    {},
    reused,
    time.monotonic() - start,
    f'{config.data.source} -> {config.image.tokenizer} latents',
    [job.path for job in jobs],
  )
  records.write_json_atomically(out_prefix + records.SUMMARY_SUFFIX, summary)
  print(
    f'cache-latents: {summary["records"]} records ({config.data.cache_variants} variant(s) each) in '
    f'{num_shards} shards; {bad_records.describe({**summary["skipped"], **summary["fixed"]})}',
    flush=True,
  )
  return summary
