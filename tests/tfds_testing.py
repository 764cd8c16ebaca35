"""A tiny prepared TFDS data set (array_record format) written without TensorFlow.

TFDS needs TensorFlow to encode `tfds.features.Image`; its serialised form is just the encoded image
file, so while preparing, `Image.encode_example` is replaced by the identity on PNG bytes. Reading
(`tfds.data_source`) is TFDS's own, TensorFlow-free path that decodes with PIL.
"""

import pathlib
from unittest import mock

import tensorflow_datasets as tfds

import data_testing


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """NUM random RGB images of assorted sizes with shapes-style captions."""

  VERSION = tfds.core.Version('1.0.0')
  NUM = 8

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(None, None, 3)), 'caption': tfds.features.Text()}
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(self.NUM):
      image = data_testing.random_rgb(i, height=16 + 2 * i, width=24 - i)
      yield i, {'image': data_testing.image_bytes(image), 'caption': data_testing.CAPTIONS[i % 4]}


def prepare_tiny_captions(data_dir: pathlib.Path) -> pathlib.Path:
  """Prepares `tiny_captions` (split 'train', NUM examples) under data_dir; returns data_dir."""
  with mock.patch.object(tfds.features.Image, 'encode_example', lambda self, data: data):
    TinyCaptions(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return data_dir
