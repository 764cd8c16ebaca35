"""Bad-record classes and their counters, shared by the dataset builder and the Grain pipeline.

A record problem is either fixed (the record is converted and kept) or fatal for that record (it is
skipped). Nothing here raises past the record: builders and pipelines catch `BadRecordError`, count
its reason and move on. Counts are plain {reason: int} dicts, JSON-serialisable and additive.
"""

import logging
import math
from collections.abc import Mapping

# Fixed and kept.
GRAYSCALE_CONVERTED = 'grayscale_converted'  # L / 1-bit / (H, W) or (H, W, 1) arrays -> RGB.
ALPHA_DROPPED = 'alpha_dropped'  # RGBA / LA / palette with transparency: composited over white.
HIGH_BIT_DEPTH_CONVERTED = 'high_bit_depth_converted'  # 16-bit / 32-bit / float images -> 8-bit.
OTHER_MODE_CONVERTED = 'other_mode_converted'  # Palette, CMYK, YCbCr ... -> RGB.
CAPTION_NOT_UTF8 = 'caption_not_utf8'  # Undecodable bytes replaced by U+FFFD.
CAPTION_TRUNCATED = (
  'caption_truncated'  # Over text.max_caption_tokens, cut (data.overlong_captions).
)

# Skipped.
UNDECODABLE_IMAGE = 'undecodable_image'  # Not an image format PIL reads, or garbage bytes.
TRUNCATED_IMAGE = 'truncated_image'  # Image data ends early.
UNREADABLE_FILE = 'unreadable_file'  # Missing file, permission denied, a directory ...
EMPTY_CAPTION = 'empty_caption'  # Caption empty or whitespace only.
CAPTION_TOO_LONG = 'caption_too_long'  # Over the token budget with data.overlong_captions='skip'.
MALFORMED_RECORD = 'malformed_record'  # Record bytes that are not in the records.py layout.
CORRUPT_IMAGE = 'corrupt_image'  # Decodes, but its compressed data is garbled (jpeg_check.py).
MISSING_CAPTION = 'missing_caption'  # Caption null / not text in the captions file.
PATH_COLLISION = (
  'path_collision'  # Same image path (normalised: ./x.png = x.png) and caption again.
)

FIXED = (
  GRAYSCALE_CONVERTED,
  ALPHA_DROPPED,
  HIGH_BIT_DEPTH_CONVERTED,
  OTHER_MODE_CONVERTED,
  CAPTION_NOT_UTF8,
  CAPTION_TRUNCATED,
)
SKIPPED = (
  UNDECODABLE_IMAGE,
  TRUNCATED_IMAGE,
  UNREADABLE_FILE,
  EMPTY_CAPTION,
  CAPTION_TOO_LONG,
  MALFORMED_RECORD,
  CORRUPT_IMAGE,
  MISSING_CAPTION,
  PATH_COLLISION,
)
REASONS = FIXED + SKIPPED

logger = logging.getLogger('nextstep_jax.data')


class BadRecordError(ValueError):
  """A record that must be skipped; `reason` is one of SKIPPED."""

  def __init__(self, reason: str, detail: str = ''):
    if reason not in SKIPPED:
      raise ValueError(f'unknown skip reason {reason!r}; use one of {SKIPPED}')
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


def add(counts: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
  """Adds `more` into `counts` in place (and returns it); zero entries are dropped."""
  for reason, value in more.items():
    if value:
      counts[reason] = counts.get(reason, 0) + int(value)
  return counts


def split(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
  """(skipped, fixed) parts of `counts`."""
  return (
    {k: v for k, v in counts.items() if k in SKIPPED},
    {k: v for k, v in counts.items() if k not in SKIPPED},
  )


def describe(counts: Mapping[str, int]) -> str:
  """'skipped 3 (undecodable_image 2, empty_caption 1); fixed 1 (caption_truncated 1)'."""
  parts = []
  for label, part in zip(('skipped', 'fixed'), split(counts)):
    if part:
      detail = ', '.join(f'{k} {v}' for k, v in sorted(part.items()))
      parts.append(f'{label} {sum(part.values())} ({detail})')
  return '; '.join(parts) or 'no bad records'


def crossed_power_of_two(before: Mapping[str, int], after: Mapping[str, int]) -> bool:
  """True when some count reached a new power of two (1, 2, 4, ...): a log-line budget that
  reports the first problem at once and then ever more rarely."""
  for reason, new in after.items():
    old = before.get(reason, 0)
    if new > old and (old == 0 or math.floor(math.log2(new)) > math.floor(math.log2(old))):
      return True
  return False


def warn_if_new(before: Mapping[str, int], after: Mapping[str, int], where: str) -> None:
  """Logs a warning with all counts when `crossed_power_of_two`."""
  if crossed_power_of_two(before, after):
    logger.warning('%s: bad records so far: %s', where, describe(after))
