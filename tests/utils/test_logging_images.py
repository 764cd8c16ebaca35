"""Progress lines, TensorBoard event files, image grids and PNG conversion."""

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.utils import images
from nextstep_jax.utils import logging as logging_lib


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_logger_prints_once_per_period(capsys):
  clock = FakeClock()
  progress = logging_lib.ProgressLogger(total_steps=100, every=10, items_per_step=32, clock=clock)
  lines = []
  for step in range(1, 101):
    clock.now += 0.5  # 2 steps/s = 64 items/s.
    lines.append(progress.update(step, {'loss': 1.0 / step}))
  printed = [line for line in lines if line]
  assert len(printed) == 10
  assert printed[0] == 'step 10/100 | 64.0 items/s | eta 0:00:45 | loss 0.1'
  assert printed[-1].startswith('step 100/100 | 64.0 items/s | eta 0:00:00')
  assert capsys.readouterr().out.splitlines() == printed


def test_progress_logger_after_restart():
  clock = FakeClock()
  progress = logging_lib.ProgressLogger(total_steps=1000, every=100, start_step=950, clock=clock)
  assert progress.update(960) is None
  clock.now = 50.0
  # 50 steps since the restart in 50 s: 1 step/s, 0 left.
  assert progress.update(1000) == 'step 1000/1000 | 1.0 items/s | eta 0:00:00'


def test_progress_logger_uneven_steps():
  clock = FakeClock()
  progress = logging_lib.ProgressLogger(total_steps=100, every=10, clock=clock)
  clock.now = 4.0
  assert progress.update(8) is None
  clock.now = 6.0
  assert progress.update(12) == 'step 12/100 | 2.0 items/s | eta 0:00:44'


def test_metric_writer_round_trip(tmp_workdir):
  writer = logging_lib.MetricWriter(tmp_workdir / 'tb')
  writer.scalars(1, {'train/loss': 2.5, 'train/lr': np.float32(1e-3)})
  writer.scalars(2, {'train/loss': 1.5})
  writer.image(2, 'samples', np.zeros((8, 12, 3), np.uint8))
  writer.flush()
  writer.close()
  assert list((tmp_workdir / 'tb').glob('events.out.tfevents.*'))
  scalars = logging_lib.read_scalars(tmp_workdir / 'tb')
  assert scalars['train/loss'] == [(1, 2.5), (2, 1.5)]
  assert scalars['train/lr'] == [(1, pytest.approx(1e-3))]


def test_to_uint8():
  values = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
  np.testing.assert_array_equal(images.to_uint8(values), [0, 0, 128, 191, 255, 255])
  assert images.to_uint8(values).dtype == np.uint8


def test_make_grid_layout():
  tiles = np.stack([np.full((4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])
  grid = images.make_grid(tiles, ncols=3, pad=2)
  assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3) and grid.dtype == np.uint8
  assert (grid[2:6, 2:7] == 10).all()  # Row 0, column 0.
  assert (grid[2:6, 16:21] == 30).all()  # Row 0, column 2.
  assert (grid[8:12, 9:14] == 50).all()  # Row 1, column 1.
  assert (grid[8:12, 16:21] == 0).all()  # Unused cell.
  assert (grid[0:2] == 0).all()


def test_make_grid_fewer_images_than_columns():
  grid = images.make_grid(np.ones((2, 3, 3, 3), np.uint8), ncols=8, pad=1)
  assert grid.shape == (5, 9, 3)


def test_make_grid_rejects_floats():
  with pytest.raises(ValueError, match='uint8'):
    images.make_grid(np.zeros((2, 4, 4, 3), np.float32), ncols=2)


def test_save_png_round_trip(tmp_workdir):
  image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
  path = tmp_workdir / 'samples' / 'grid.png'
  images.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
