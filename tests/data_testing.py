"""Shared helpers of the data tests: tiny configs, image files of every odd kind, record shards."""

import io

import numpy as np
from PIL import Image

from nextstep_jax import configlib
from nextstep_jax.data import records
from nextstep_jax.data import text_tokenizer

SIZE = 16  # Image side of the tiny configs (pixels tokenizer, 8-px patches -> 2 x 2 tokens).
shapes = configlib.config_module('configs/shapes.py')
CAPTIONS = [
  'a red circle',
  'a blue square',
  'a green triangle above a cyan circle',
  'a yellow square to the left of a red triangle',
]


def tiny_config(tmp_path, **data_fields):
  """A shapes config at 16 px with a per-process batch of 4 and the given data.* fields."""
  c = shapes.get_config()
  c.image.size = SIZE
  c.text.max_caption_tokens = 14
  c.data.num_train = 24
  c.data.cache_dir = str(tmp_path / 'cache')
  c.train.batch_size = 4
  c.data.read_threads = 1
  for key, value in data_fields.items():
    c.data[key] = value
  return c


def tokenizer(tmp_path) -> text_tokenizer.TextTokenizer:
  path = str(tmp_path / 'tok')
  return text_tokenizer.TextTokenizer.load(
    text_tokenizer.train_sentencepiece(CAPTIONS * 3, path, 300)
  )


def image_bytes(array: np.ndarray, mode: str | None = None, fmt: str = 'PNG') -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode=mode).save(buffer, format=fmt)
  return buffer.getvalue()


def random_rgb(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_record(data: bytes, caption: bytes | str) -> bytes:
  return records.encode_record(data, caption, {'kind': 'image'})


def write_shards(prefix: str, all_records: list[bytes], num_shards: int = 1) -> list[str]:
  bounds = np.linspace(0, len(all_records), num_shards + 1).round().astype(int)
  paths = []
  for s in range(num_shards):
    path = records.shard_path(prefix, s, num_shards)
    records.write_shard_atomically(path, all_records[bounds[s] : bounds[s + 1]])
    paths.append(path)
  return paths
