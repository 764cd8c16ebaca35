"""Grain input pipeline: random-access records -> this process's training batches, resumable.

  source (ArrayRecord image shards | TFDS data source | built-in arrays | ArrayRecord latent cache)
  -> global shuffle (seed, reshuffled every epoch) -> repeat forever
  -> per-record preprocessing with a per-index rng (decode + convert, resize/centre-crop or augment,
     caption clean-up, drop-text coin; latent cache: pick a stored variant)
  -> shard by JAX process: global positions p, p + P, p + 2P, ... (disjoint, complete per epoch)
  -> skip bad records (counted) and batch this process's rows; build the token rows
  -> prefetch in `data.worker_count` worker processes (grain mp_prefetch; 0 = in process threads)

With `data.aspect_buckets` the stream is instead a function of the global step
(data/aspect_buckets.py): step -> its bucket and this process's source indices -> preprocess each
at the bucket's size (latent cache: records stored at their bucket's size) with rng
(seed, step, global row) -> rows of the bucket's token grid. A bad record there becomes an ignored
row (labels IGNORE_ID, image_valid False), counted, so shapes and the schedule stay the same in
every process.

Every random choice is a function of (seed, global position), so the stream is deterministic;
the iterator state (grain's, JSON) resumes it exactly, for the same worker count. Images are
turned into tokens in `GrainTrainingData.next_batch` with the image tokenizer (on the host /
accelerator of the training process), or read from the latent cache.

Batch (numpy, R = train.batch_size / process_count rows): input_ids, labels, positions (R, L)
int32; attention_mask (R, L) bool; image_tokens (R, N, T) float32; image_valid (R,) bool; the
same keys as builtin_source.BuiltinSource.batch (with buckets, L and N are the step's bucket's).
"""

import json
from typing import Any

import grain
import numpy as np
from absl import flags

from nextstep_jax import configlib
from nextstep_jax.data import aspect_buckets
from nextstep_jax.data import bad_records
from nextstep_jax.data import builtin_source
from nextstep_jax.data import captions as captions_lib
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import records
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers
from nextstep_jax.utils import logging as log_utils

COUNTS_KEY = (
  'bad_record_counts'  # (len(bad_records.REASONS),) int64 per batch, stripped by next_batch.
)
INDEX_KEY = 'record_index'  # (R,) int64 source index of each row, stripped by next_batch.
VALID_KEY = 'row_valid'  # (R,) bool, False for a bad record's ignored row; becomes image_valid.
BUCKET_KEY = (
  'bucket'  # () int32 aspect bucket of the batch (data.aspect_buckets), stripped by next_batch.
)


def uses_grain(config) -> bool:
  """Whether training reads through this pipeline (any non-builtin source, data.grain_builtin,
  or the latent cache, whatever source it was built from)."""
  d = config.data
  return d.source != 'builtin' or bool(d.grain_builtin) or bool(d.use_latent_cache)


def augment_ops(config) -> tuple[str, ...]:
  ops = tuple(op.strip() for op in config.data.augment.split(',') if op.strip())
  unknown = [op for op in ops if op not in configlib.AUGMENT_OPS]
  if unknown:
    raise ValueError(
      f'data.augment has unknown ops {unknown}; use a comma list of {configlib.AUGMENT_OPS}'
    )
  return ops


class BuiltinRecords:
  """The built-in data set (data.dataset) as a random-access source of {'image', 'caption'}."""

  def __init__(self, config):
    self.images, self.captions = builtin_source.load_images_and_captions(config)

  def __len__(self) -> int:
    return len(self.captions)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'caption': self.captions[index]}


class TfdsRecords:
  """A prepared TFDS data set (array_record format, nothing downloaded) as {'image', 'caption'}.

  `image_key` may hold a decoded array (tfds Image feature) or encoded bytes; `caption_key` str
  or bytes."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, caption_key: str):
    import tensorflow_datasets as tfds  # optional, slow

    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    self.image_key, self.caption_key = image_key, caption_key
    features = set(self.source.dataset_info.features.keys())
    missing = {image_key, caption_key} - features
    if missing:
      raise ValueError(
        f'TFDS {name}:{split} has features {sorted(features)}, not {sorted(missing)}; '
        'set data.tfds_image_key / data.tfds_caption_key'
      )

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[index]
    return {'image': example[self.image_key], 'caption': example[self.caption_key]}


def open_source(config) -> Any:
  """The random-access source the config names (raw records or the latent cache)."""
  d = config.data
  if d.use_latent_cache:
    return grain.sources.ArrayRecordDataSource(
      records.resolve_paths(d.latent_cache_paths, 'data.latent_cache_paths')
    )
  return open_raw_source(config)


def open_raw_source(config) -> Any:
  d = config.data
  if d.source == 'arrayrecord':
    return grain.sources.ArrayRecordDataSource(records.resolve_paths(d.paths))
  if d.source == 'tfds':
    return TfdsRecords(
      d.tfds_name, d.tfds_split, d.tfds_data_dir, d.tfds_image_key, d.tfds_caption_key
    )
  if d.source == 'builtin':
    return BuiltinRecords(config)
  raise ValueError(f'data.source={d.source!r} is unknown; use one of {configlib.DATA_SOURCES}')


def read_raw(element) -> tuple[Any, Any]:
  """A raw source element (image-record bytes or a {'image', 'caption'} dict) -> (image bytes or
  array, caption bytes or str). Raises BadRecordError(malformed_record) for anything else."""
  if isinstance(element, dict):
    return element['image'], element['caption']
  record = records.decode_record(element)
  kind = record.metadata.get('kind')
  if kind == 'image':
    return record.payload, record.caption
  raise bad_records.BadRecordError(
    bad_records.MALFORMED_RECORD, f'record kind {kind!r} where an image record was expected'
  )


def read_latents(element) -> tuple[np.ndarray, bytes, list[str]]:
  """A latent-cache record -> (latents (V, h, w, C) float32, caption bytes, image fixes)."""
  record = records.decode_latent_record(element)
  meta = record.metadata
  latents = np.frombuffer(record.payload, np.dtype(meta['dtype'])).reshape(meta['shape'])
  return latents.astype(np.float32), record.caption, list(meta.get('fixes', ()))


class Preprocess(grain.transforms.RandomMap):
  """One record -> a training example dict, or {'skip': reason} (never raises for bad data).

  Example: 'image' (S, S, 3) uint8 or 'latents' (h, w, C) float32; 'caption' str; 'drop_text'
  bool; 'fixes' list of reasons; 'index' int (the source index). Draw order of the rng: drop-text
  coin, then augmentation (raw) or the cache variant (latents).
  """

  def __init__(self, config, tok: text_tokenizer.Tokenizer):
    self.tok = tok
    self.size = config.image.size
    self.max_caption_tokens = config.text.max_caption_tokens
    self.overlong = config.data.overlong_captions
    self.drop_text_prob = config.data.drop_text_prob
    self.ops = augment_ops(config)
    self.crop_scale = config.data.random_crop_scale
    self.use_latent_cache = bool(config.data.use_latent_cache)

  def random_map(self, element, rng: np.random.Generator) -> dict:
    index, record = element
    return self.example(index, record, rng, self.size, self.size)

  def example(self, index: int, record, rng: np.random.Generator, height: int, width: int) -> dict:
    """The example of source record `index` with a (height, width) image (module docstring)."""
    fixes: list[str] = []
    try:
      drop_text = bool(rng.random() < self.drop_text_prob)
      if self.use_latent_cache:
        variants, caption_raw, fixes = read_latents(record)
        pick = int(rng.integers(len(variants))) if len(variants) > 1 else 0
        picture = {'latents': variants[pick]}
      else:
        data, caption_raw = read_raw(record)
        image, fixes = image_preprocess.decode_image(data)
        if self.ops:
          image = image_preprocess.augment(image, height, width, self.ops, self.crop_scale, rng)
        else:
          image = image_preprocess.to_training_image(image, height, width)
        picture = {'image': image}
      caption, caption_fixes = captions_lib.decode_caption(caption_raw)
      caption, fit_fixes = captions_lib.fit_caption(
        caption, self.tok, self.max_caption_tokens, self.overlong
      )
    except bad_records.BadRecordError as error:
      return {'skip': error.reason, 'fixes': fixes}
    return {
      **picture,
      'caption': caption,
      'drop_text': drop_text,
      'index': index,
      'fixes': fixes + caption_fixes + fit_fixes,
    }


def stack_rows(rows: list[dict], tok, grid: tuple[int, int], max_caption_tokens: int) -> dict:
  """Examples -> the token rows of a (grid_h, grid_w) image each, 'image' or 'latents', INDEX_KEY."""
  batch = sequences.build_training_batch(
    tok,
    [r['caption'] for r in rows],
    *grid,
    max_caption_tokens,
    np.array([r['drop_text'] for r in rows]),
  )
  picture_key = 'latents' if 'latents' in rows[0] else 'image'
  batch[picture_key] = np.stack([r[picture_key] for r in rows])
  batch[INDEX_KEY] = np.array([r['index'] for r in rows], np.int64)
  return batch


class _SkipAndBatchIterator(grain.DatasetIterator):
  """Pulls examples, counts and drops bad ones, stacks `batch_size` good ones into token rows.

  More than `max_skips_in_a_row` bad records in a row (a whole epoch's worth) means the data
  is unusable, not noisy: that raises instead of looping forever."""

  def __init__(
    self,
    parent,
    batch_size: int,
    tok,
    grid: tuple[int, int],
    max_caption_tokens: int,
    max_skips_in_a_row: int,
  ):
    super().__init__(parent)
    self._batch_size = batch_size
    self._max_skips_in_a_row = max_skips_in_a_row
    self._tok = tok
    self._grid = grid
    self._max_caption_tokens = max_caption_tokens

  def __next__(self) -> dict:
    counts = np.zeros(len(bad_records.REASONS), np.int64)
    rows = []
    skips_in_a_row = 0
    while len(rows) < self._batch_size:
      example = next(self._parent)
      for reason in example['fixes']:
        counts[bad_records.REASONS.index(reason)] += 1
      if 'skip' in example:
        counts[bad_records.REASONS.index(example['skip'])] += 1
        skips_in_a_row += 1
        if skips_in_a_row > self._max_skips_in_a_row:
          raise ValueError(
            f'{skips_in_a_row} bad records in a row, the last for {example["skip"]}: '
            f'{bad_records.describe(dict(zip(bad_records.REASONS, counts.tolist())))}. The data '
            'set has no usable records; check it with `nextstep-data build` summaries.'
          )
      else:
        rows.append(example)
        skips_in_a_row = 0
    batch = stack_rows(rows, self._tok, self._grid, self._max_caption_tokens)
    batch[VALID_KEY] = np.ones(len(rows), bool)
    batch[COUNTS_KEY] = counts
    return batch

  def get_state(self):
    return self._parent.get_state()  # Batches end on whole examples: the parent state suffices.

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipAndBatch(grain.IterDataset):
  def __init__(
    self,
    parent,
    batch_size: int,
    tok,
    grid: tuple[int, int],
    max_caption_tokens: int,
    max_skips_in_a_row: int,
  ):
    super().__init__(parent)
    self._args = (batch_size, tok, grid, max_caption_tokens, max_skips_in_a_row)

  def __iter__(self):
    return _SkipAndBatchIterator(self._parent.__iter__(), *self._args)


def process_batch_size(config, process_count: int) -> int:
  if config.train.batch_size % process_count:
    raise ValueError(
      f'train.batch_size={config.train.batch_size} is not divisible by the '
      f'{process_count} JAX processes; make it a multiple'
    )
  return config.train.batch_size // process_count


def make_dataset(
  config, tok: text_tokenizer.Tokenizer, process_index: int, process_count: int
) -> grain.IterDataset:
  """The batch stream of one JAX process (module docstring); batches carry INDEX_KEY and
  COUNTS_KEY besides the token rows and 'image' (R, S, S, 3) uint8 or 'latents' (R, h, w, C)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, {process_count})')
  if config.data.get('aspect_buckets'):
    return make_bucketed_dataset(config, tok, process_index, process_count)
  d = config.data
  source = open_source(config)
  num_records = len(source)
  if num_records == 0:
    raise ValueError('the data source has no records; check data.paths / the TFDS split')
  seed = config.seed if d.shuffle_seed < 0 else d.shuffle_seed
  ds = grain.MapDataset.range(num_records).seed(seed).shuffle().repeat(None)
  ds = ds.map(_Fetch(source)).random_map(Preprocess(config, tok))
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=d.read_threads, prefetch_buffer_size=d.prefetch * config.train.batch_size
    )
  )
  ds = _SkipAndBatch(
    ds,
    process_batch_size(config, process_count),
    tok,
    configlib.image_grid(config),
    config.text.max_caption_tokens,
    max_skips_in_a_row=num_records,
  )
  return _prefetch_in_workers(ds, d)


def _prefetch_in_workers(ds: grain.IterDataset, d) -> grain.IterDataset:
  if not d.worker_count:
    return ds
  if not flags.FLAGS.is_parsed():  # Grain's worker pool reads absl flags; use their defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=d.worker_count, per_worker_buffer_size=d.prefetch)
  )


MAX_STEPS = 2**62  # Length of the bucketed step stream (endless in practice).
BUCKET_PROGRESS_EVERY = 50_000  # Records between progress lines of the bucket assignment.


def bucket_schedule(config, source, process_count: int) -> aspect_buckets.BucketSchedule:
  """The bucket of every record of `source` (raw: nearest to its image's aspect; latent cache: its
  stored grid; records without either are left out, with a warning) and the step schedule over
  them; the same in every process."""
  process_batch_size(config, process_count)  # Checks divisibility.
  grids = aspect_buckets.grids(config)
  if config.data.use_latent_cache:
    patch = config.model.latent_patch_size
    bucket_of = lambda element: aspect_buckets.cached_bucket(element, grids, patch)
  else:
    bucket_of = lambda element: aspect_buckets.nearest_bucket(
      *aspect_buckets.record_size(element), grids
    )
  print(f'aspect buckets: reading the size of {len(source)} records', flush=True)
  progress = log_utils.ProgressLogger(len(source), every=BUCKET_PROGRESS_EVERY)
  assignment, left_out = aspect_buckets.assign_buckets(source, bucket_of, progress.update)
  if left_out:
    print(f'aspect buckets: left out {bad_records.describe(left_out)} (no usable size)', flush=True)
  seed = config.seed if config.data.shuffle_seed < 0 else config.data.shuffle_seed
  return aspect_buckets.BucketSchedule(assignment, len(grids), config.train.batch_size, seed)


class _BucketBatch(grain.transforms.Map):
  """Global step -> this process's batch of the step's bucket (module docstring)."""

  def __init__(
    self,
    config,
    tok,
    source,
    schedule: aspect_buckets.BucketSchedule,
    process_index: int,
    process_count: int,
  ):
    self.preprocess = Preprocess(config, tok)
    self.tok, self.source, self.schedule = tok, source, schedule
    self.process_index, self.process_count = process_index, process_count
    self.grids = aspect_buckets.grids(config)
    self.unit = aspect_buckets.pixel_unit(config)
    self.max_caption_tokens = config.text.max_caption_tokens
    self.latent_patch, self.latent_channels = (
      config.model.latent_patch_size,
      config.model.latent_channels,
    )
    self.use_latent_cache = bool(config.data.use_latent_cache)

  def map(self, step: int) -> dict:
    bucket, indices = self.schedule.rows(step, self.process_index, self.process_count)
    grid = self.grids[bucket]
    height, width = grid[0] * self.unit, grid[1] * self.unit
    counts = np.zeros(len(bad_records.REASONS), np.int64)
    rows, valid = [], []
    first_row = self.process_index * len(indices)
    for row, index in enumerate(indices):
      rng = np.random.default_rng([self.schedule.seed, step, first_row + row])
      example = self.preprocess.example(int(index), self.source[int(index)], rng, height, width)
      for reason in example['fixes'] + ([example['skip']] if 'skip' in example else []):
        counts[bad_records.REASONS.index(reason)] += 1
      valid.append('skip' not in example)
      if 'skip' in example:  # An ignored row keeps the batch's shape.
        example = {'caption': '', 'drop_text': False, 'index': int(index), **self._blank(grid)}
      rows.append(example)
    batch = stack_rows(rows, self.tok, grid, self.max_caption_tokens)
    valid = np.array(valid)
    batch['labels'][~valid] = sequences.IGNORE_ID
    batch[VALID_KEY] = valid
    batch[COUNTS_KEY] = counts
    batch[BUCKET_KEY] = np.int32(bucket)
    return batch

  def _blank(self, grid: tuple[int, int]) -> dict:
    """The zero picture of an ignored row of a `grid` bucket."""
    if self.use_latent_cache:
      shape = (grid[0] * self.latent_patch, grid[1] * self.latent_patch, self.latent_channels)
      return {'latents': np.zeros(shape, np.float32)}
    return {'image': np.zeros((grid[0] * self.unit, grid[1] * self.unit, 3), np.uint8)}


def make_bucketed_dataset(
  config, tok: text_tokenizer.Tokenizer, process_index: int, process_count: int
) -> grain.IterDataset:
  """The aspect-bucketed batch stream of one process (module docstring); batches also carry
  VALID_KEY and BUCKET_KEY."""
  source = open_source(config)
  if len(source) == 0:
    raise ValueError('the data source has no records; check data.paths / the TFDS split')
  schedule = bucket_schedule(config, source, process_count)
  d = config.data
  ds = grain.MapDataset.range(MAX_STEPS).map(
    _BucketBatch(config, tok, source, schedule, process_index, process_count)
  )
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch)
  )
  return _prefetch_in_workers(ds, d)


class _Fetch(grain.transforms.Map):
  """Global shuffled index -> (index, source record)."""

  def __init__(self, source):
    self.source = source

  def map(self, index: int):
    return index, self.source[index]


class GrainTrainingData:
  """Training batches of one JAX process from the Grain pipeline; the training-data protocol
  (data/training_data.py): next_batch(), get_state() (JSON-serialisable), set_state(state).

  `bad_record_counts` holds this process's running counts {reason: n} (restored with the state).
  """

  kind = 'grain'

  def __init__(self, config, tok: text_tokenizer.Tokenizer, process_index: int, process_count: int):
    self.config = config
    self.tok = tok
    self.image_tokenizer = tokenizers.get_tokenizer(config)
    self.patch = config.model.latent_patch_size
    if tok.vocab_size > config.model.vocab_size:
      raise ValueError(
        f'text tokenizer has {tok.vocab_size} ids but model.vocab_size='
        f'{config.model.vocab_size}; raise model.vocab_size or lower text.vocab_size'
      )
    length = max(
      sequences.training_sequence_length(tok, h, w, config.text.max_caption_tokens)
      for h, w in configlib.training_grids(config)
    )
    if length > config.model.max_seq_len:
      raise ValueError(
        f'training sequences have {length} tokens but model.max_seq_len='
        f'{config.model.max_seq_len}; raise model.max_seq_len'
      )
    self.where = f'data (process {process_index}/{process_count})'
    self.dataset = make_dataset(config, tok, process_index, process_count)
    self._iterator = iter(self.dataset)
    self.bad_record_counts: dict[str, int] = {}

  def next_raw_batch(self) -> dict[str, np.ndarray]:
    """The next batch as the pipeline yields it (with 'image' or 'latents', INDEX_KEY), after
    adding its bad-record counts to `bad_record_counts` (warning as they grow)."""
    batch = next(self._iterator)
    counts = batch.pop(COUNTS_KEY)
    before = dict(self.bad_record_counts)
    bad_records.add(self.bad_record_counts, dict(zip(bad_records.REASONS, counts.tolist())))
    bad_records.warn_if_new(before, self.bad_record_counts, self.where)
    return batch

  def next_batch(self) -> dict[str, np.ndarray]:
    """This process's rows of the next training batch (module docstring)."""
    batch = self.next_raw_batch()
    batch.pop(INDEX_KEY)
    batch.pop(BUCKET_KEY, None)
    valid = batch.pop(VALID_KEY)
    if 'latents' in batch:
      latents = batch.pop('latents')
    else:
      latents = self.image_tokenizer.encode(tokenizers.uint8_to_unit(batch.pop('image')))
    batch['image_tokens'] = np.asarray(
      patchify.patchify(np.asarray(latents, np.float32), self.patch), np.float32
    )
    batch['image_valid'] = valid
    return batch

  def get_state(self) -> dict:
    """{'kind': 'grain', 'iterator': grain's iterator state, 'bad_record_counts': {...}}, JSON-safe."""
    return {
      'kind': self.kind,
      'iterator': _jsonable(self._iterator.get_state()),
      'bad_record_counts': dict(self.bad_record_counts),
    }

  def set_state(self, state: dict) -> None:
    """Continues exactly after the batch at which `state` was taken (same data config and
    data.worker_count)."""
    if not isinstance(state, dict) or state.get('kind') != self.kind or 'iterator' not in state:
      raise ValueError(
        f'{str(state)[:200]} is not a Grain data state (want {{"kind": "grain", '
        '"iterator": ...}); resume with the data config that wrote the checkpoint'
      )
    self._iterator.set_state(_from_jsonable(state['iterator']))
    self.bad_record_counts = dict(state.get('bad_record_counts', {}))

  def close(self) -> None:
    """Stops worker processes (also done at garbage collection)."""
    close = getattr(self._iterator, 'close', None)
    if close:
      close()


def _jsonable(state):
  """Grain states are dicts of ints/strings, or bytes (older iterators): made JSON-safe."""
  if isinstance(state, bytes):
    return {'__bytes__': state.decode('utf-8')}
  json.dumps(state)  # Fails loudly if grain ever returns something else.
  return state


def _from_jsonable(state):
  if isinstance(state, dict) and set(state) == {'__bytes__'}:
    return state['__bytes__'].encode('utf-8')
  return state


def make_grain_training_data(
  config, tok: text_tokenizer.Tokenizer, process_index: int, process_count: int
) -> GrainTrainingData:
  """Factory the training loop calls when `uses_grain(config)`."""
  return GrainTrainingData(config, tok, process_index, process_count)
