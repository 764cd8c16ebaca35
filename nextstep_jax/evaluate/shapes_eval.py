"""Rule-based detector and prompt scorer for shapes-world images.

Detection, for an image uint8 (S, S, 3):
  1. Pixel colour: a pixel whose brightest channel is below BACKGROUND_MAX_CHANNEL is background;
     any other pixel is scaled so its brightest channel is 255 and takes the nearest of the named
     COLORS or 'other' (white-ish / washed-out pixels), so dim anti-aliased edges keep their hue.
  2. Objects: 4-connected components per colour class; components smaller than
     NOISE_AREA_FRACTION of the smallest object the generator draws (a triangle of side 5S/16) are
     noise fragments. 'other' components that survive count as (wrongly coloured) objects.
  3. Shape, from the component inside its bounding box, in box-normalised coordinates u, v in
     [-1, 1]: a triangle (apex up) has its centroid at 2/3 of the box height (circle and square:
     1/2); otherwise a square fills the box corners |u| + |v| > 1.55, which a circle leaves empty
     (its diagonal reaches sqrt(2) times its radius, at most ~1.05 in box units after pixelation).
     Blur rounds square corners, so a quarter of them filled is enough.
  4. Position: the component's centroid; relations are judged by `shapes.relation_holds`.

Scoring a prompt (see `evaluate_image`): `count` (as many objects as prompted, and noise fragments
that add up to less than STRAY_AREA_FRACTION of the smallest object), `color` / `shape`
(each prompted colour / shape is carried by its own detected object), `relation` (2-object prompts:
detected objects matching the two prompted (colour, shape) pairs satisfy the relation) and
`correct` (`count` holds, the detected objects are exactly the prompted pairs and the relation
holds).

New concepts (concepts='extended'; every function defaults to 'base', the unchanged detector):
the colour classes gain NEW_COLORS (orange sits between red and yellow, so a pixel is only called
orange in this mode), and a component that is neither triangle nor square is a diamond when it
leaves the band DIAMOND_BAND of |u| + |v| (just outside a diamond's edges |u| + |v| = 1, inside a
circle along its diagonals) nearly empty: filled below DIAMOND_MAX_BAND_FILL (renders, sharp or
blurred: diamonds 0.0, circles >= 0.2).
"""

import collections
import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from nextstep_jax.data.builtin import shapes

BACKGROUND_MAX_CHANNEL = 128  # Half brightness: blurred edges keep the object's true outline.
NOISE_AREA_FRACTION = 0.25  # Of the smallest object's area: smaller components are noise.
STRAY_AREA_FRACTION = 0.5  # Of the smallest object's area: more noise in total fails `count`.
OTHER_COLOR = 'other'
TRIANGLE_MIN_CENTROID_HEIGHT = 0.57  # Box-relative centroid height: triangle 2/3, others 1/2.
SQUARE_CORNER_SUM = 1.55  # Box corners |u| + |v| > this: full for squares, empty for circles.
SQUARE_MIN_CORNER_FILL = 0.25
DIAMOND_BAND = (1.2, 1.55)  # Box-normalised |u| + |v| range probed to tell diamonds from circles.
DIAMOND_MAX_BAND_FILL = 0.1


def _color_classes(concepts: str) -> tuple[tuple[str, ...], np.ndarray]:
  """(class names, their RGB (C, 3) float32): the concept set's colours, then 'other'."""
  colors, _ = shapes.vocabulary(concepts)
  return tuple(colors) + (OTHER_COLOR,), np.array([*colors.values(), (255, 255, 255)], np.float32)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """A detected object: colour name (or 'other'), shape name, centroid (x, y) and area in pixels."""

  color: str
  shape: str
  cx: float
  cy: float
  area: int


def _check_image(image: np.ndarray) -> None:
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f'Expected a square RGB image (S, S, 3), got shape {image.shape}.')
  if image.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 image, got {image.dtype}.')


def classify_pixels(image: np.ndarray, concepts: str = 'base') -> np.ndarray:
  """int (S, S): -1 for background, else an index into the concept set's colour names followed
  by 'other'."""
  _check_image(image)
  _, class_rgb = _color_classes(concepts)
  pixels = image.astype(np.float32)
  brightest = pixels.max(axis=-1, keepdims=True)
  normalised = pixels * (255.0 / np.maximum(brightest, 1.0))
  distances = np.linalg.norm(normalised[:, :, None, :] - class_rgb, axis=-1)
  classes = distances.argmin(axis=-1)
  return np.where(brightest[..., 0] < BACKGROUND_MAX_CHANNEL, -1, classes)


def _classify_shape(mask: np.ndarray, concepts: str = 'base') -> str:
  """Shape name of a component given as bool (h, w) cropped to its bounding box."""
  height, width = mask.shape
  rows = np.nonzero(mask)[0]
  if (rows.mean() + 0.5) / height > TRIANGLE_MIN_CENTROID_HEIGHT:
    return 'triangle'
  u = (np.arange(width) + 0.5) / width * 2 - 1
  v = (np.arange(height) + 0.5) / height * 2 - 1
  l1 = np.abs(v)[:, None] + np.abs(u)[None, :]
  corners = l1 > SQUARE_CORNER_SUM
  if corners.any() and mask[corners].mean() > SQUARE_MIN_CORNER_FILL:
    return 'square'
  band = (l1 > DIAMOND_BAND[0]) & (l1 <= DIAMOND_BAND[1])
  if concepts == 'extended' and band.any() and mask[band].mean() < DIAMOND_MAX_BAND_FILL:
    return 'diamond'
  return 'circle'


def _smallest_object_area(image_size: int) -> float:
  """Pixel area of the smallest object the generator draws: a triangle of the smallest side."""
  smallest_side = min(low for low, _ in shapes.SIDE_FRACTIONS.values()) * image_size
  return 0.5 * smallest_side**2


def _detect(image: np.ndarray, concepts: str = 'base') -> tuple[list[DetectedObject], int]:
  """Objects in an image uint8 (S, S, 3), grouped by colour, and the pixel count of noise."""
  class_names, _ = _color_classes(concepts)
  classes = classify_pixels(image, concepts)
  min_area = NOISE_AREA_FRACTION * _smallest_object_area(image.shape[0])
  objects = []
  noise_area = 0
  for class_index, color in enumerate(class_names):
    labels, count = ndimage.label(classes == class_index)
    for label, box in zip(range(1, count + 1), ndimage.find_objects(labels)):
      mask = labels[box] == label
      area = int(mask.sum())
      if area < min_area:
        noise_area += area
        continue
      rows, cols = np.nonzero(mask)
      objects.append(
        DetectedObject(
          color=color,
          shape=_classify_shape(mask, concepts),
          cx=float(cols.mean() + 0.5 + box[1].start),
          cy=float(rows.mean() + 0.5 + box[0].start),
          area=area,
        )
      )
  return objects, noise_area


def detect_objects(image: np.ndarray, concepts: str = 'base') -> list[DetectedObject]:
  """Objects in an image uint8 (S, S, 3), grouped by colour (see the module docstring)."""
  return _detect(image, concepts)[0]


def _has_distinct_matches(wanted: list, found: list) -> bool:
  """Whether every wanted item is matched by its own item of `found` (multiset inclusion)."""
  return not collections.Counter(wanted) - collections.Counter(found)


def evaluate_image(image: np.ndarray, caption: str, concepts: str = 'base') -> dict[str, bool]:
  """Scores one image uint8 (S, S, 3) against its caption.

  Returns `count`, `color`, `shape`, `correct` and, for prompts with a relation, `relation`.
  """
  spec = shapes.parse_caption(caption, concepts)
  found, noise_area = _detect(image, concepts)
  found_pairs = [(o.color, o.shape) for o in found]
  max_noise = STRAY_AREA_FRACTION * _smallest_object_area(image.shape[0])
  result = {
    'count': len(found) == len(spec.objects) and noise_area < max_noise,
    'color': _has_distinct_matches([c for c, _ in spec.objects], [o.color for o in found]),
    'shape': _has_distinct_matches([s for _, s in spec.objects], [o.shape for o in found]),
  }
  exact = result['count'] and sorted(found_pairs) == sorted(spec.objects)
  if spec.relation is None:
    result['correct'] = exact
    return result
  result['relation'] = any(
    (first.color, first.shape) == spec.objects[0]
    and (second.color, second.shape) == spec.objects[1]
    and shapes.relation_holds((first.cx, first.cy), (second.cx, second.cy), spec.relation)
    for first, second in itertools.permutations(found, 2)
  )
  result['correct'] = exact and result['relation']
  return result


def score(images: np.ndarray, captions: list[str], concepts: str = 'base') -> dict[str, float]:
  """Mean scores over images uint8 (n, S, S, 3) and their captions.

  Keys: `accuracy` (whole prompt correct), `color`, `shape`, `count`, `relation` (over prompts
  with a relation; NaN if none has one) and `n`.
  """
  if len(images) != len(captions):
    raise ValueError(f'Got {len(images)} images but {len(captions)} captions.')
  if not captions:
    raise ValueError('Cannot score an empty set of images.')
  results = [evaluate_image(image, text, concepts) for image, text in zip(images, captions)]
  relations = [r['relation'] for r in results if 'relation' in r]
  return {
    'accuracy': float(np.mean([r['correct'] for r in results])),
    'color': float(np.mean([r['color'] for r in results])),
    'shape': float(np.mean([r['shape'] for r in results])),
    'relation': float(np.mean(relations)) if relations else float('nan'),
    'count': float(np.mean([r['count'] for r in results])),
    'n': float(len(results)),
  }
