"""Console progress lines and TensorBoard event files (via tensorboardX, no TensorFlow)."""

import datetime
import pathlib
import struct
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tensorboardX
from tensorboardX.proto import event_pb2


class ProgressLogger:
  """Prints one line per `every` steps: step/total, items per second and ETA.

  Rates count only the steps this process ran (from `start_step`, e.g. the restored checkpoint
  step), over the last period, so a restart neither inflates the rate nor skews the ETA.
  Prints on JAX process 0 only.
  """

  def __init__(
    self,
    total_steps: int,
    every: int,
    start_step: int = 0,
    items_per_step: int = 1,
    clock: Callable[[], float] = time.monotonic,
  ):
    """`items_per_step`: e.g. the global batch size, so the rate reads in examples per second."""
    self.total_steps = total_steps
    self.every = every
    self.items_per_step = items_per_step
    self._clock = clock
    self._last_step = start_step
    self._last_time = clock()

  def update(self, step: int, metrics: Mapping[str, float] | None = None) -> str | None:
    """Call after finishing `step`; returns (and prints) a line at period ends and the last step.

    `metrics`: scalars appended to the line, e.g. {'loss': 0.12}.
    """
    if step // self.every <= self._last_step // self.every and step != self.total_steps:
      return None
    now = self._clock()
    steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
    remaining = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else 0.0
    parts = [
      f'step {step}/{self.total_steps}',
      f'{steps_per_second * self.items_per_step:.1f} items/s',
      f'eta {datetime.timedelta(seconds=round(remaining))}',
    ]
    parts += [f'{name} {float(value):.4g}' for name, value in (metrics or {}).items()]
    self._last_step, self._last_time = step, now
    line = ' | '.join(parts)
    if jax.process_index() == 0:
      print(line, flush=True)
    return line


class MetricWriter:
  """TensorBoard scalars and images under `logdir`; a no-op on JAX processes other than 0."""

  def __init__(self, logdir: str | pathlib.Path):
    self._writer = tensorboardX.SummaryWriter(str(logdir)) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes each scalar (python/numpy/jax number) under its name as tag."""
    if self._writer:
      for tag, value in values.items():
        self._writer.add_scalar(tag, float(value), step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Writes one uint8 image (H, W, 3)."""
    if self._writer:
      self._writer.add_image(tag, np.asarray(image), step, dataformats='HWC')

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def read_scalars(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar in the event files under `logdir`: {tag: [(step, value), ...]}."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(pathlib.Path(logdir).rglob('events.out.tfevents.*')):
    for record in _records(path.read_bytes()):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _records(data: bytes):
  """TFRecord framing: u64 length, u32 length crc, payload, u32 payload crc (crcs unchecked)."""
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[offset : offset + 8])
    start = offset + 12
    if start + length + 4 > len(data):
      return  # A record still being written.
    yield data[start : start + length]
    offset = start + length + 4
