"""Official aspect-ratio buckets (docs/model.md §4): image sizes whose "h*w" area string the model saw.

At 256 px the buckets hold ~256 tokens of 16x16 pixels: (8,32), (9,28), (10,25), (11,23), (12,21),
(13,19), (14,18), (15,17), (16,16) and transposes, as (rows, cols) of 16-pixel units; for another
image size each side is scaled by image_size / 256.
"""

import math
import re

PIXELS_PER_UNIT = 16
BASE_SIZE = 256
_BASE_BUCKETS = (
  (8, 32),
  (9, 28),
  (10, 25),
  (11, 23),
  (12, 21),
  (13, 19),
  (14, 18),
  (15, 17),
  (16, 16),
)
_AREA = re.compile(r'^\s*(\d+)\s*\*\s*(\d+)\s*$')


def buckets(image_size: int) -> list[tuple[int, int]]:
  """(height, width) in pixels of every bucket at `image_size` (square side), portrait first."""
  scale = image_size / BASE_SIZE
  pairs = sorted(set(_BASE_BUCKETS) | {(w, h) for h, w in _BASE_BUCKETS}, key=lambda p: p[1] / p[0])
  return [
    (round(h * scale) * PIXELS_PER_UNIT, round(w * scale) * PIXELS_PER_UNIT) for h, w in pairs
  ]


def parse_ratio(text: str) -> float:
  """'16:9' or '1.5' -> width / height."""
  try:
    if ':' in text:
      w, h = (float(part) for part in text.split(':'))
      ratio = w / h
    else:
      ratio = float(text)
  except (ValueError, ZeroDivisionError) as error:
    raise ValueError(
      f'aspect ratio {text!r}: write W:H (e.g. 16:9) or a number width/height'
    ) from error
  if not ratio > 0:
    raise ValueError(f'aspect ratio {text!r} must be positive')
  return ratio


def size_for_ratio(ratio: float, image_size: int) -> tuple[int, int]:
  """The bucket (height, width) in pixels closest to width/height = `ratio` (in log ratio)."""
  return min(buckets(image_size), key=lambda hw: abs(math.log(hw[1] / hw[0]) - math.log(ratio)))


def parse_area(text: str) -> tuple[int, int]:
  """An area string 'h*w' (image tokens per column * per row, as in the sequence) -> (h, w)."""
  match = _AREA.match(str(text))
  if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
    raise ValueError(
      f'aspect bucket {text!r} is not "h*w" with positive integers (image tokens '
      'per column and per row, as the official area string, e.g. "16*16" or "12*21")'
    )
  return int(match.group(1)), int(match.group(2))
