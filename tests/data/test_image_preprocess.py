"""Tests of image decoding/conversion, resize + centre crop and augmentation, against numpy."""

import numpy as np
import pytest
from PIL import Image

import data_testing
from nextstep_jax.data import bad_records
from nextstep_jax.data import image_preprocess


def test_rgb_png_and_arrays_pass_through_unchanged():
  rgb = data_testing.random_rgb(0, 9, 13)
  for data in (data_testing.image_bytes(rgb), rgb):
    image, fixes = image_preprocess.decode_image(data)
    np.testing.assert_array_equal(image, rgb)
    assert fixes == []


def test_16_bit_grayscale_is_scaled_to_8_bits():
  gray16 = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
  expected = np.repeat(np.round(gray16 / 257).astype(np.uint8)[..., None], 3, -1)
  for data in (data_testing.image_bytes(gray16), gray16):
    image, fixes = image_preprocess.decode_image(data)
    np.testing.assert_array_equal(image, expected)
    assert bad_records.HIGH_BIT_DEPTH_CONVERTED in fixes


def test_alpha_is_composited_over_white():
  rgba = np.random.default_rng(1).integers(0, 256, (6, 7, 4)).astype(np.uint8)
  alpha = rgba[..., 3:] / 255
  expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
  for data in (data_testing.image_bytes(rgba), rgba):
    image, fixes = image_preprocess.decode_image(data)
    assert np.abs(image.astype(float) - expected).max() <= 1  # PIL rounds its blend per channel.
    assert fixes == [bad_records.ALPHA_DROPPED]


def test_palette_image_is_converted():
  rgb = data_testing.random_rgb(2, 8, 8)
  palette = Image.fromarray(rgb).quantize(16)
  data = data_testing.image_bytes(np.asarray(palette), mode='P')
  image, fixes = image_preprocess.decode_image(data)
  assert image.shape == (8, 8, 3) and fixes == [bad_records.OTHER_MODE_CONVERTED]


@pytest.mark.parametrize(
  'data, reason',
  [
    (b'', bad_records.UNDECODABLE_IMAGE),
    (b'GIF89a nonsense', bad_records.UNDECODABLE_IMAGE),
    (
      data_testing.image_bytes(data_testing.random_rgb(3, 32, 32))[:120],
      bad_records.TRUNCATED_IMAGE,
    ),
    (np.zeros((4, 4, 2), np.uint8), bad_records.UNDECODABLE_IMAGE),
  ],
)
def test_undecodable_data_raises_a_bad_record_error(data, reason):
  with pytest.raises(bad_records.BadRecordError) as error:
    image_preprocess.decode_image(data)
  assert error.value.reason == reason


def test_resize_to_cover_and_centre_crop():
  image = data_testing.random_rgb(4, 16, 32)
  out = image_preprocess.to_training_image(image, 16, 16)
  np.testing.assert_array_equal(out, image[:, 8:24])  # Already covering: crop only.
  small = data_testing.random_rgb(5, 8, 12)
  out = image_preprocess.to_training_image(small, 16, 16)
  resized = np.asarray(Image.fromarray(small).resize((24, 16), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(out, resized[:, 4:20])


def test_augment_flips_and_crops_inside_the_covering_image():
  image = data_testing.random_rgb(6, 16, 16)
  rng = np.random.default_rng(0)
  flips = [image_preprocess.augment(image, 16, 16, ('hflip',), 1.125, rng) for _ in range(20)]
  assert {bool((f == image[:, ::-1]).all()) for f in flips} == {True, False}
  assert all((f == image).all() or (f == image[:, ::-1]).all() for f in flips)
  big = image_preprocess.resize_to_cover(image, 18, 18)
  crop = image_preprocess.augment(image, 16, 16, ('random_crop',), 1.125, np.random.default_rng(3))
  windows = [big[t : t + 16, l : l + 16] for t in range(3) for l in range(3)]
  assert any((crop == w).all() for w in windows)
