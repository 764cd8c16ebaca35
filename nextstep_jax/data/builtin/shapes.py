"""Procedural shapes world: 1-3 flat-coloured shapes on a black background.

Images are uint8 RGB arrays (S, S, 3) with S >= 16 (32 and 64 are the tested sizes). Object
geometry is in pixels of the canvas a scene was sampled for: (cx, cy) is the centre of the object's
square bounding box (x to the right, y downwards) and `size` is its side. Circles are inscribed in
the box, squares fill it, triangles point up with their base on the bottom edge of the box. Sides
are drawn from [5S/16, 7S/16] for 1 object, [5S/16, 3S/8] for 2 and [5S/16, 11S/32] for 3 (10-14,
10-12 and 10-11 px at S=32; below ~10 px a rasterised circle can pass for a square). Boxes keep
S/32 px from the border and S/16 px from each other. The objects of a scene have distinct
(colour, shape) pairs; colours or shapes alone may repeat.

Caption grammar (`caption` writes it; `parse_caption` also accepts upper case, extra whitespace
and a final period):

  object    := "a " COLOUR " " SHAPE                e.g. "a red circle"
  1 object  := object                               e.g. "a red circle"
  2 objects := object " " RELATION " " object       e.g. "a red circle to the left of a blue square"
  3 objects := object ", " object " and " object    e.g. "a red circle, a blue square and a cyan
                                                          circle"

COLOUR in COLORS, SHAPE in SHAPES, RELATION in RELATIONS. A 2-object caption reads
"objects[0] RELATION objects[1]" (y grows downwards, so "above" means a smaller cy). Renders make
the relation unambiguous: along the relation axis the box centres are at least the two half sides
plus S/16 apart, and across it they are offset by at most 0.4 times that distance. A 3-object
caption lists the objects and says nothing about their placement.

Held-out split: HELDOUT_PAIRS = {(red, triangle), (yellow, square), (blue, circle)}, 3 of the 18
(colour, shape) pairs (1/6). Every colour and every shape still appears in training with its other
partners. A 'train' scene never contains a held-out pair; a 'heldout' scene contains exactly one
held-out pair at a random position, its other objects drawn from the training pairs.

New concepts (fine-tuning, concepts='extended'): NEW_COLORS (orange) and NEW_SHAPES (diamond: a
square rotated 45 degrees, its corners at the midpoints of the box sides) never occur in the base
world's data. Functions taking `concepts` accept them only with concepts='extended' ('base', the
default, keeps the base vocabulary and every base result unchanged). NEW_CONCEPT_PAIRS are the 10
pairs with a new colour or a new shape; `make_new_concept_dataset` mixes one-object scenes of them
with base training scenes (replay), and eval_prompts(split='new') asks for one of them.
"""

import dataclasses
import functools
import re

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
  'red': (255, 0, 0),
  'green': (0, 255, 0),
  'blue': (0, 0, 255),
  'yellow': (255, 255, 0),
  'magenta': (255, 0, 255),
  'cyan': (0, 255, 255),
}
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle')
NEW_COLORS: dict[str, tuple[int, int, int]] = {'orange': (255, 128, 0)}
NEW_SHAPES: tuple[str, ...] = ('diamond',)
CONCEPT_SETS = ('base', 'extended')
RELATIONS: tuple[str, ...] = ('to the left of', 'to the right of', 'above', 'below')
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
  {('red', 'triangle'), ('yellow', 'square'), ('blue', 'circle')}
)

SPLITS = ('train', 'heldout')
EVAL_SPLITS = ('seen', 'heldout', 'new')
MIN_IMAGE_SIZE = 16
# Box side range per object count, as fractions of the image side S.
SIDE_FRACTIONS = {1: (0.3125, 0.4375), 2: (0.3125, 0.375), 3: (0.3125, 0.34375)}
# Across-axis offset of a 2-object scene, at most this fraction of the along-axis distance.
MAX_ACROSS_RATIO = 0.4
_PLACEMENT_TRIES = 50

_TRAIN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
_HELDOUT_LIST = tuple(sorted(HELDOUT_PAIRS))
NEW_CONCEPT_PAIRS: tuple[tuple[str, str], ...] = tuple(
  (c, s)
  for c in (*COLORS, *NEW_COLORS)
  for s in (*SHAPES, *NEW_SHAPES)
  if c in NEW_COLORS or s in NEW_SHAPES
)


def vocabulary(concepts: str = 'base') -> tuple[dict[str, tuple[int, int, int]], tuple[str, ...]]:
  """(colour name -> RGB, shape names) of a concept set: 'base' or 'extended' (base + new)."""
  if concepts == 'base':
    return COLORS, SHAPES
  if concepts == 'extended':
    return {**COLORS, **NEW_COLORS}, SHAPES + NEW_SHAPES
  raise ValueError(f'Unknown concept set {concepts!r}; expected one of {CONCEPT_SETS}.')


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object: colour and shape names, box centre (cx, cy) and box side `size`, in pixels."""

  color: str
  shape: str
  cx: float
  cy: float
  size: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects in caption order; `relation` links objects[0] to objects[1] (2 objects only)."""

  objects: tuple[ShapeObject, ...]
  relation: str | None


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What a caption asks for: (colour, shape) per object in order, and the relation or None."""

  objects: tuple[tuple[str, str], ...]
  relation: str | None


def relation_holds(
  first_xy: tuple[float, float], second_xy: tuple[float, float], relation: str
) -> bool:
  """Whether `first RELATION second` holds for two (x, y) positions (y grows downwards).

  The displacement along the relation's axis must have the right sign and exceed the one across it.
  """
  dx = second_xy[0] - first_xy[0]
  dy = second_xy[1] - first_xy[1]
  if relation == 'to the left of':
    return dx > abs(dy)
  if relation == 'to the right of':
    return -dx > abs(dy)
  if relation == 'above':
    return dy > abs(dx)
  if relation == 'below':
    return -dy > abs(dx)
  raise ValueError(f'Unknown relation {relation!r}; expected one of {RELATIONS}.')


def _check_image_size(size: int) -> None:
  if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
    raise ValueError(f'Image size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}.')


def _check_pair(color: str, shape: str, concepts: str = 'base') -> None:
  colors, shape_names = vocabulary(concepts)
  hint = '' if concepts == 'extended' else " (new concepts need concepts='extended')"
  if color not in colors:
    raise ValueError(f'Unknown colour {color!r}; expected one of {tuple(colors)}{hint}.')
  if shape not in shape_names:
    raise ValueError(f'Unknown shape {shape!r}; expected one of {shape_names}{hint}.')


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
  """(xs, ys) float64 (size, size): coordinates of the pixel centres."""
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  return xs, ys


def _object_mask(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """bool (S, S): pixels whose centre lies inside the object."""
  half = obj.size / 2
  if obj.shape == 'circle':
    return (xs - obj.cx) ** 2 + (ys - obj.cy) ** 2 <= half**2
  if obj.shape == 'square':
    return (np.abs(xs - obj.cx) <= half) & (np.abs(ys - obj.cy) <= half)
  if obj.shape == 'diamond':
    return np.abs(xs - obj.cx) + np.abs(ys - obj.cy) <= half
  # Triangle: apex at the top centre of the box, base on its bottom edge.
  return (ys <= obj.cy + half) & (np.abs(xs - obj.cx) <= (ys - (obj.cy - half)) / 2)


def render(scene: Scene, size: int, concepts: str = 'base') -> np.ndarray:
  """Draws `scene` on a black canvas; returns uint8 (size, size, 3)."""
  _check_image_size(size)
  xs, ys = _pixel_centres(size)
  image = np.zeros((size, size, 3), np.uint8)
  colors, _ = vocabulary(concepts)
  for obj in scene.objects:
    _check_pair(obj.color, obj.shape, concepts)
    half = obj.size / 2
    if min(obj.cx, obj.cy) - half < 0 or max(obj.cx, obj.cy) + half > size:
      raise ValueError(f'{obj} does not fit in a {size}x{size} image.')
    image[_object_mask(obj, xs, ys)] = colors[obj.color]
  return image


def format_prompt(spec: PromptSpec, concepts: str = 'base') -> str:
  """The caption of a prompt spec (see the grammar in the module docstring)."""
  for color, shape in spec.objects:
    _check_pair(color, shape, concepts)
  phrases = [f'a {color} {shape}' for color, shape in spec.objects]
  if len(phrases) == 1 and spec.relation is None:
    return phrases[0]
  if len(phrases) == 2 and spec.relation in RELATIONS:
    return f'{phrases[0]} {spec.relation} {phrases[1]}'
  if len(phrases) == 3 and spec.relation is None:
    return f'{phrases[0]}, {phrases[1]} and {phrases[2]}'
  raise ValueError(
    f'No caption for {len(phrases)} objects with relation {spec.relation!r}: 1 and 3 objects '
    f'take no relation, 2 objects need one of {RELATIONS}.'
  )


def caption(scene: Scene, concepts: str = 'base') -> str:
  """The caption of a scene, e.g. 'a red circle to the left of a blue square'."""
  return format_prompt(
    PromptSpec(tuple((o.color, o.shape) for o in scene.objects), scene.relation), concepts
  )


_OBJECT_PATTERN = r'a (\w+) (\w+)'
_RELATION_PATTERN = '(' + '|'.join(re.escape(r) for r in RELATIONS) + ')'
_ONE = re.compile(_OBJECT_PATTERN)
_TWO = re.compile(f'{_OBJECT_PATTERN} {_RELATION_PATTERN} {_OBJECT_PATTERN}')
_THREE = re.compile(f'{_OBJECT_PATTERN}, {_OBJECT_PATTERN} and {_OBJECT_PATTERN}')


def parse_caption(text: str, concepts: str = 'base') -> PromptSpec:
  """Inverse of `caption`: the objects' (colour, shape) in order and the relation."""
  normalised = ' '.join(text.strip().lower().removesuffix('.').split())
  if match := _ONE.fullmatch(normalised):
    words, relation = match.groups(), None
  elif match := _TWO.fullmatch(normalised):
    color0, shape0, relation, color1, shape1 = match.groups()
    words = (color0, shape0, color1, shape1)
  elif match := _THREE.fullmatch(normalised):
    words, relation = match.groups(), None
  else:
    raise ValueError(
      f'Cannot parse caption {text!r}: expected "a COLOUR SHAPE", '
      f'"a COLOUR SHAPE RELATION a COLOUR SHAPE" or "a COLOUR SHAPE, a COLOUR SHAPE and a '
      f'COLOUR SHAPE" with RELATION in {RELATIONS}.'
    )
  pairs = tuple(zip(words[0::2], words[1::2]))
  for color, shape in pairs:
    try:
      _check_pair(color, shape, concepts)
    except ValueError as e:
      raise ValueError(f'Cannot parse caption {text!r}: {e}') from None
  return PromptSpec(pairs, relation)


def _sample_pairs(rng: np.random.Generator, num_objects: int, split: str) -> list[tuple[str, str]]:
  """Distinct (colour, shape) pairs for one scene of the split."""
  if split == 'train':
    picks = rng.choice(len(_TRAIN_PAIRS), size=num_objects, replace=False)
    return [_TRAIN_PAIRS[i] for i in picks]
  heldout = _HELDOUT_LIST[rng.integers(len(_HELDOUT_LIST))]
  picks = rng.choice(len(_TRAIN_PAIRS), size=num_objects - 1, replace=False)
  pairs = [_TRAIN_PAIRS[i] for i in picks]
  pairs.insert(int(rng.integers(num_objects)), heldout)
  return pairs


def _place_related_pair(
  rng: np.random.Generator, relation: str, image_size: int
) -> list[tuple[float, float, float]]:
  """(cx, cy, side) of objects[0] and objects[1] such that `relation` clearly holds."""
  border, margin = image_size / 32, image_size / 16
  low, high = SIDE_FRACTIONS[2]
  sides = rng.uniform(low * image_size, high * image_size, size=2)
  # Along the relation axis: the first box has the smaller coordinate.
  gap = sides.sum() / 2 + margin
  start = border + sides[0] / 2
  slack = image_size - border - sides[1] / 2 - start - gap  # >= S/8 by SIDE_FRACTIONS[2].
  offsets = np.sort(rng.uniform(0, slack, size=2))
  along = (start + offsets[0], start + gap + offsets[1])
  distance = along[1] - along[0]
  # Across it: within the canvas and at most MAX_ACROSS_RATIO * distance apart (always feasible).
  across0 = rng.uniform(border + sides[0] / 2, image_size - border - sides[0] / 2)
  across1 = rng.uniform(
    max(border + sides[1] / 2, across0 - MAX_ACROSS_RATIO * distance),
    min(image_size - border - sides[1] / 2, across0 + MAX_ACROSS_RATIO * distance),
  )
  if relation in ('to the left of', 'to the right of'):
    placed = [(along[0], across0, sides[0]), (along[1], across1, sides[1])]
  else:
    placed = [(across0, along[0], sides[0]), (across1, along[1], sides[1])]
  return placed if relation in ('to the left of', 'above') else placed[::-1]


def _place_free(
  rng: np.random.Generator, num_objects: int, image_size: int
) -> list[tuple[float, float, float]]:
  """(cx, cy, side) per object: inside the canvas, boxes S/16 apart (rejection sampling)."""
  border, margin = image_size / 32, image_size / 16
  low, high = SIDE_FRACTIONS[num_objects]
  while True:  # Restart when an early placement leaves no room for a later object.
    placed = []
    for side in rng.uniform(low * image_size, high * image_size, size=num_objects):
      for _ in range(_PLACEMENT_TRIES):
        cx, cy = rng.uniform(border + side / 2, image_size - border - side / 2, size=2)
        if all(max(abs(cx - x), abs(cy - y)) >= (side + s) / 2 + margin for x, y, s in placed):
          placed.append((cx, cy, side))
          break
      else:
        break
    if len(placed) == num_objects:
      return placed


def sample_scene(
  rng: np.random.Generator, num_objects: int, split: str = 'train', size: int = 32
) -> Scene:
  """A random scene of `num_objects` (1-3) objects for an image of side `size`.

  split 'train' avoids HELDOUT_PAIRS; 'heldout' contains exactly one held-out pair, so each
  held-out prompt probes one novel binding.
  """
  _check_image_size(size)
  if num_objects not in SIDE_FRACTIONS:
    raise ValueError(f'num_objects must be one of {tuple(SIDE_FRACTIONS)}, got {num_objects!r}.')
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
  pairs = _sample_pairs(rng, num_objects, split)
  if num_objects == 2:
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    boxes = _place_related_pair(rng, relation, size)
  else:
    relation = None
    boxes = _place_free(rng, num_objects, size)
  objects = tuple(
    ShapeObject(color, shape, float(cx), float(cy), float(side))
    for (color, shape), (cx, cy, side) in zip(pairs, boxes)
  )
  return Scene(objects, relation)


def make_dataset(
  num: int,
  seed: int,
  size: int = 32,
  split: str = 'train',
  num_objects: tuple[int, ...] = (1, 2),
  probs: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, list[str]]:
  """`num` scenes with object counts drawn from `num_objects` (weights `probs`, default uniform).

  Returns images uint8 (num, size, size, 3) and their captions; deterministic in `seed`.
  """
  _check_image_size(size)
  if num < 0:
    raise ValueError(f'num must be >= 0, got {num}.')
  if not num_objects or any(k not in SIDE_FRACTIONS for k in num_objects):
    raise ValueError(
      f'num_objects must be a non-empty tuple of values in '
      f'{tuple(SIDE_FRACTIONS)}, got {num_objects!r}.'
    )
  if probs is not None and (
    len(probs) != len(num_objects) or min(probs) < 0 or not np.isclose(sum(probs), 1.0)
  ):
    raise ValueError(
      f'probs must be {len(num_objects)} non-negative weights summing to 1, got {probs!r}.'
    )
  rng = np.random.default_rng(seed)
  counts = rng.choice(np.asarray(num_objects), size=num, p=probs)
  images = np.zeros((num, size, size, 3), np.uint8)
  captions = []
  for i, count in enumerate(counts):
    scene = sample_scene(rng, int(count), split, size)
    images[i] = render(scene, size)
    captions.append(caption(scene))
  return images, captions


def eval_prompts(num: int, num_objects: int, split: str, seed: int) -> list[str]:
  """`num` prompts of `num_objects` objects; split 'seen' (training pairs), 'heldout' or 'new'
  (one object of NEW_CONCEPT_PAIRS, cycling through them in a seeded random order)."""
  if split not in EVAL_SPLITS:
    raise ValueError(f'Unknown evaluation split {split!r}; expected one of {EVAL_SPLITS}.')
  rng = np.random.default_rng(seed)
  if split == 'new':
    if num_objects != 1:
      raise ValueError(f"split 'new' has one-object prompts only, got num_objects={num_objects}.")
    order = np.concatenate(
      [rng.permutation(len(NEW_CONCEPT_PAIRS)) for _ in range(-(-num // len(NEW_CONCEPT_PAIRS)))]
    )
    return [
      format_prompt(PromptSpec((NEW_CONCEPT_PAIRS[i],), None), 'extended') for i in order[:num]
    ]
  scene_split = 'train' if split == 'seen' else 'heldout'
  return [caption(sample_scene(rng, num_objects, scene_split)) for _ in range(num)]


def make_new_concept_dataset(
  num: int, seed: int, size: int = 32, new_fraction: float = 0.5
) -> tuple[np.ndarray, list[str]]:
  """`num` fine-tuning scenes: a share `new_fraction` are one-object scenes of NEW_CONCEPT_PAIRS
  (drawn uniformly), the rest base training scenes of 1 or 2 objects (replay against forgetting).

  Returns images uint8 (num, size, size, 3) and captions; deterministic in `seed`.
  """
  _check_image_size(size)
  if not 0 <= new_fraction <= 1:
    raise ValueError(f'new_fraction must be in [0, 1], got {new_fraction}.')
  rng = np.random.default_rng([seed, 0x0E1D])
  images = np.zeros((num, size, size, 3), np.uint8)
  captions = []
  for i in range(num):
    if rng.random() < new_fraction:
      color, shape = NEW_CONCEPT_PAIRS[rng.integers(len(NEW_CONCEPT_PAIRS))]
      ((cx, cy, side),) = _place_free(rng, 1, size)
      scene = Scene((ShapeObject(color, shape, float(cx), float(cy), float(side)),), None)
    else:
      scene = sample_scene(rng, int(rng.integers(1, 3)), 'train', size)
    images[i] = render(scene, size, 'extended')
    captions.append(caption(scene, 'extended'))
  return images, captions
