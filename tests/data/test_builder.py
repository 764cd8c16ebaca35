"""Tests of `nextstep-data build`'s library: folder/TFDS/built-in sources, bad inputs, resuming."""

import json
import os

import numpy as np

import data_testing
from nextstep_jax.data import bad_records
from nextstep_jax.data import builder
from nextstep_jax.data import records


def _garbled_jpeg(image):
  """A JPEG whose middle 16 bytes are random: Pillow decodes it without an error."""
  data = bytearray(data_testing.image_bytes(image, fmt='JPEG'))
  middle = len(data) // 2
  data[middle : middle + 16] = (
    np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes()
  )
  return bytes(data)


def _folder(tmp_path):
  """Images of every kind plus a JSONL captions file with bad lines; returns (dir, captions)."""
  images = tmp_path / 'images'
  images.mkdir()
  rgb = data_testing.random_rgb(1, 20, 30)
  files = {
    'rgb.png': data_testing.image_bytes(rgb),
    'photo.jpg': data_testing.image_bytes(rgb, fmt='JPEG'),
    'gray.png': data_testing.image_bytes(rgb[..., 0]),
    'corrupt.png': b'\x89PNG\r\n\x1a\n but then nothing',
    'truncated.png': data_testing.image_bytes(rgb)[:200],
    'garbled.jpg': _garbled_jpeg(data_testing.random_rgb(2, 48, 48)),
  }
  for name, data in files.items():
    (images / name).write_bytes(data)
  (images / 'a_directory.png').mkdir()
  (images / 'sub').mkdir()
  (images / 'sub' / 'rgb.png').write_bytes(files['rgb.png'])
  lines = [json.dumps({'image': name, 'caption': f'caption of {name}'}).encode() for name in files]
  lines += [
    json.dumps({'image': 'missing.png', 'caption': 'no such file'}).encode(),
    json.dumps({'image': 'a_directory.png', 'caption': 'a folder'}).encode(),
    b'{"image": "rgb.png", "caption": "bytes \xff\xfe here"}',  # not UTF-8
    json.dumps({'image': 'rgb.png', 'caption': '  '}).encode(),  # empty
    b'{"image": "rgb.png", "caption": ',  # malformed line
    json.dumps({'picture': 'rgb.png'}).encode(),  # wrong keys
    json.dumps({'image': 'rgb.png', 'caption': None}).encode(),  # null caption
    json.dumps({'image': 'sub/rgb.png', 'caption': 'caption of rgb.png'}).encode(),  # another file
    json.dumps({'image': './sub/rgb.png', 'caption': 'caption of rgb.png'}).encode(),  # collides
  ]
  captions = tmp_path / 'captions.jsonl'
  captions.write_bytes(b'\n'.join(lines) + b'\n')
  return str(images), str(captions), files


def test_folder_build_keeps_bytes_and_counts_every_bad_input(tmp_path):
  images, captions, files = _folder(tmp_path)
  items, counts = builder.folder_items(images, captions)
  summary = builder.build(
    items,
    str(tmp_path / 'out' / 'folder'),
    num_shards=2,
    workers=1,
    source='test',
    extra_counts=counts,
  )
  assert summary['records'] == 5
  assert summary['skipped'] == {
    bad_records.UNDECODABLE_IMAGE: 1,
    bad_records.TRUNCATED_IMAGE: 1,
    bad_records.UNREADABLE_FILE: 2,
    bad_records.EMPTY_CAPTION: 1,
    bad_records.MALFORMED_RECORD: 2,
    bad_records.CORRUPT_IMAGE: 1,
    bad_records.MISSING_CAPTION: 1,
    bad_records.PATH_COLLISION: 1,
  }
  assert summary['fixed'] == {bad_records.GRAYSCALE_CONVERTED: 1, bad_records.CAPTION_NOT_UTF8: 1}
  on_disk = json.loads((tmp_path / 'out' / 'folder.summary.json').read_text())
  assert on_disk == summary
  stored = [records.decode_record(r) for r in records.read_all(summary['shards'])]
  assert [r.payload for r in stored] == [
    files['rgb.png'],
    files['photo.jpg'],
    files['gray.png'],
    files['rgb.png'],
    files['rgb.png'],
  ]
  assert [r.metadata['source'] for r in stored] == [
    'rgb.png',
    'photo.jpg',
    'gray.png',
    'rgb.png',
    os.path.join('sub', 'rgb.png'),
  ]
  assert stored[0].caption == b'caption of rgb.png'
  assert stored[3].caption.decode('utf-8') == 'bytes \ufffd\ufffd here'
  assert stored[1].metadata['format'] == 'JPEG' and stored[2].metadata['mode'] == 'L'
  assert (stored[0].metadata['height'], stored[0].metadata['width']) == (20, 30)
  assert summary['bytes'] == sum(len(r) for r in records.read_all(summary['shards']))


def test_csv_captions(tmp_path):
  images, _, _ = _folder(tmp_path)
  csv_path = tmp_path / 'captions.csv'
  csv_path.write_text('image,caption\nrgb.png,"a picture, with a comma"\ngray.png,grey\n')
  items, counts = builder.folder_items(images, str(csv_path))
  summary = builder.build(items, str(tmp_path / 'csv'), source='csv', extra_counts=counts)
  stored = [records.decode_record(r).caption for r in records.read_all(summary['shards'])]
  assert stored == [b'a picture, with a comma', b'grey'] and counts == {}


def test_interrupted_build_resumes_reusing_finished_shards_only(tmp_path):
  items = builder.builtin_items('shapes', 40, seed=3, size=16)
  prefix = str(tmp_path / 'shapes')
  first = builder.build(items, prefix, num_shards=4, workers=2, source='shapes')
  reference = {path: open(path, 'rb').read() for path in first['shards']}
  # Simulate a crash: shard 1 lost its summary (rename done, summary not), shard 2 never renamed
  # (only a temp file), shard 3 was complete.
  os.remove(first['shards'][1] + records.SUMMARY_SUFFIX)
  os.rename(first['shards'][2], first['shards'][2] + '.tmp-999')
  os.remove(first['shards'][2] + records.SUMMARY_SUFFIX)
  second = builder.build(items, prefix, num_shards=4, workers=1, source='shapes')
  assert second['shards_reused'] == 2
  assert second['records'] == first['records'] == 40
  for path in second['shards']:
    assert open(path, 'rb').read() == reference[path]
  assert records.resolve_paths(prefix + '-*') == second['shards']  # Temp files are never shards.


def test_builtin_records_hold_the_generated_images(tmp_path):
  items = builder.builtin_items('shapes', 6, seed=0, size=16)
  summary = builder.build(items, str(tmp_path / 's'), source='shapes')
  stored = [records.decode_record(r) for r in records.read_all(summary['shards'])]
  from nextstep_jax.data import image_preprocess

  for item, record in zip(items, stored):
    np.testing.assert_array_equal(image_preprocess.decode_image(record.payload)[0], item.image)
    assert record.caption.decode() == item.caption


def test_tfds_build(tmp_path, tfds_testing):
  data_dir = tfds_testing.prepare_tiny_captions(tmp_path / 'tfds')
  items = builder.tfds_items('tiny_captions', 'train', str(data_dir))
  summary = builder.build(items, str(tmp_path / 'from_tfds'), num_shards=2, source='tfds')
  stored = [records.decode_record(r) for r in records.read_all(summary['shards'])]
  assert summary['records'] == tfds_testing.TinyCaptions.NUM
  shapes = sorted((r.metadata['height'], r.metadata['width']) for r in stored)
  assert shapes == sorted((16 + 2 * i, 24 - i) for i in range(tfds_testing.TinyCaptions.NUM))
  assert {r.caption.decode() for r in stored} == set(data_testing.CAPTIONS)
