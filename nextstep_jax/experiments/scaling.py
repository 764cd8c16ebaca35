"""Compute-optimal scaling: a model family, isoFLOP plans, parabola and power-law fits, bootstrap.

Pure functions over numbers (no training here; `study.py` runs and collects). Conventions:
- N is the non-embedding parameter count, C the training FLOPs of a run (the planner's model,
  `planning.costs.train_model_flops` per step x steps), L the held-out eval loss.
- A `Shape` is one model of the family: backbone width and depth scaled together, a flow head
  (`head_dim`, `head_layers`) that follows the width unless a head allocation overrides it.
- On one isoFLOP curve (fixed C) L is fitted as a parabola in log N; its vertex is the
  loss-optimal size N*(C) and its value L*(C). Across budgets N*(C) = k C^a and L*(C) = A C^-b are
  straight lines in log-log space. Intervals come from a bootstrap that resamples the runs of each
  budget with replacement and refits everything.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

HEAD_DIM = 16  # Attention head width of every family member.
MLP_RATIO = 2.75  # intermediate_size / hidden_size, rounded up to a multiple of 8.
WIDTH_PER_LAYER = 32  # Depth = round(width / 32): width and depth grow together.
BOOTSTRAP_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Shape:
  """One family member: backbone `width` (hidden size) and `depth`, flow head width and depth."""

  width: int
  depth: int
  head_dim: int
  head_layers: int

  @property
  def name(self) -> str:
    return f'w{self.width}-d{self.depth}-h{self.head_dim}x{self.head_layers}'

  def overrides(self) -> tuple[str, ...]:
    """Config overrides of this shape (attention heads of width HEAD_DIM, KV heads half of them)."""
    heads = self.width // HEAD_DIM
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    intermediate = 8 * math.ceil(MLP_RATIO * self.width / 8)
    return (
      f'model.hidden_size={self.width}',
      f'model.num_layers={self.depth}',
      f'model.num_heads={heads}',
      f'model.num_kv_heads={kv_heads}',
      f'model.head_dim={HEAD_DIM}',
      f'model.intermediate_size={intermediate}',
      f'model.fm_head_dim={self.head_dim}',
      f'model.fm_head_layers={self.head_layers}',
    )


def family_shape(
  width: int, head_dim: int | None = None, head_layers: int = 2, min_head_dim: int = 32
) -> Shape:
  """The family member of `width` (a multiple of HEAD_DIM): depth round(width / 32) (at least 1),
  flow head width max(min_head_dim, width / 2) unless `head_dim` is given.

  Studies pass the image token's dimension as `min_head_dim`: the head maps its width back to the
  token, so a narrower head caps the rank of the predicted velocity below the token's and the
  flow loss stalls near the noise floor however long it trains."""
  if width <= 0 or width % HEAD_DIM:
    raise ValueError(f'family width {width} must be a positive multiple of {HEAD_DIM}')
  depth = max(1, round(width / WIDTH_PER_LAYER))
  return Shape(width, depth, head_dim or max(min_head_dim, width // 2), head_layers)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """A run of the study: its shape, step count and the budget (FLOPs) it belongs to."""

  group: str  # 'isoflop', 'head' or 'prediction'.
  budget: float
  shape: Shape
  steps: int

  @property
  def name(self) -> str:
    return f'{self.group}-c{self.budget:.2e}-{self.shape.name}'.replace('+', '')


def chinchilla_prior(budget: float, tokens_per_param: float) -> float:
  """The size N0 with C = 6 N D and D = tokens_per_param x N: sqrt(C / (6 tokens_per_param)). Only
  a centre for the sampled sizes; the fitted vertex decides the optimum."""
  return math.sqrt(budget / (6.0 * tokens_per_param))


def isoflop_runs(
  budget: float,
  shapes: Sequence[Shape],
  flops_per_step: Callable[[Shape], float],
  count: Callable[[Shape], float],
  sizes: int,
  min_steps: int,
  max_steps: int,
  tokens_per_param: float = 20.0,
) -> list[PlannedRun]:
  """`sizes` runs on the isoFLOP curve of `budget`: every shape trains for
  round(budget / flops_per_step) steps; shapes whose step count falls outside
  [min_steps, max_steps] are left out; of the rest (`shapes` ordered by size), the `sizes`
  consecutive ones whose middle is nearest, in log N (`count`), to `chinchilla_prior`."""
  feasible = []
  for shape in shapes:
    steps = round(budget / flops_per_step(shape))
    if min_steps <= steps <= max_steps:
      feasible.append(PlannedRun('isoflop', budget, shape, steps))
  if len(feasible) < max(3, sizes):
    raise ValueError(
      f'budget {budget:.3g} FLOPs: only {len(feasible)} family shapes train for '
      f'{min_steps}-{max_steps} steps, {max(3, sizes)} needed. Widen the step range or the family.'
    )
  target = math.log(chinchilla_prior(budget, tokens_per_param))
  windows = [feasible[i : i + sizes] for i in range(len(feasible) - sizes + 1)]
  return min(windows, key=lambda w: abs(math.log(count(w[len(w) // 2].shape)) - target))


def edge_extension(
  on_curve: Sequence[PlannedRun],
  losses: Sequence[float],
  shapes: Sequence[Shape],
  flops_per_step: Callable[[Shape], float],
  min_steps: int,
  max_steps: int,
) -> PlannedRun | None:
  """The next run for an isoFLOP curve whose lowest loss is at its smallest or largest sampled
  size: the family shape just beyond that edge (`shapes` ordered by size) at the same budget, if
  its step count is within [min_steps, max_steps]; None when the minimum is inside (bracketed)."""
  order = sorted(range(len(on_curve)), key=lambda i: shapes.index(on_curve[i].shape))
  best = min(range(len(order)), key=lambda i: losses[order[i]])
  if 0 < best < len(order) - 1:
    return None
  edge = shapes.index(on_curve[order[best]].shape)
  beyond = edge + (1 if best == len(order) - 1 else -1)
  if not 0 <= beyond < len(shapes):
    return None
  budget = on_curve[0].budget
  steps = round(budget / flops_per_step(shapes[beyond]))
  return (
    PlannedRun('isoflop', budget, shapes[beyond], steps)
    if min_steps <= steps <= max_steps
    else None
  )


def fit_parabola(log_n: np.ndarray, loss: np.ndarray) -> dict | None:
  """L = c2 (log N)^2 + c1 log N + c0 by least squares; returns {n_opt, loss_opt, curvature,
  interior} or None when it has no minimum near the sampled sizes (fewer than 3 distinct sizes,
  curvature <= 0, or a vertex more than one sampled span (in log N) outside them: an almost
  straight curve). `interior`: the vertex lies within the sampled sizes."""
  log_n, loss = np.asarray(log_n, np.float64), np.asarray(loss, np.float64)
  if len(np.unique(log_n)) < 3:
    return None
  center = log_n.mean()
  c2, c1, c0 = np.polyfit(log_n - center, loss, 2)
  if c2 <= 0:
    return None
  vertex = center - c1 / (2 * c2)
  span = log_n.max() - log_n.min()
  if not log_n.min() - span <= vertex <= log_n.max() + span:
    return None
  return {
    'n_opt': float(math.exp(vertex)),
    'loss_opt': float(c0 - c1 * c1 / (4 * c2)),
    'curvature': float(c2),
    'interior': bool(log_n.min() <= vertex <= log_n.max()),
  }


def fit_log_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
  """(slope, intercept) of log y = slope * log x + intercept (least squares)."""
  slope, intercept = np.polyfit(
    np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64)), 1
  )
  return float(slope), float(intercept)


def fit_laws(
  budgets: Sequence[float], log_n: Sequence[float], loss: Sequence[float]
) -> dict | None:
  """Per-budget parabolas, then N*(C) = k C^a and L*(C) = A C^-b over the budgets.

  Rows are runs: their budget, log N and loss. Returns {'optima': [{budget, n_opt, loss_opt,
  curvature, interior}], 'n_opt_law': {exponent, coefficient}, 'loss_law': {exponent,
  coefficient}} (loss exponent b > 0 for a falling loss), or None when a budget's parabola has no
  minimum or fewer than 2 budgets remain."""
  budgets, log_n, loss = (np.asarray(v, np.float64) for v in (budgets, log_n, loss))
  optima = []
  for budget in np.unique(budgets):
    rows = budgets == budget
    vertex = fit_parabola(log_n[rows], loss[rows])
    if vertex is None:
      return None
    optima.append({'budget': float(budget), **vertex})
  if len(optima) < 2:
    return None
  c = [o['budget'] for o in optima]
  a, log_k = fit_log_line(c, [o['n_opt'] for o in optima])
  slope, log_l = fit_log_line(c, [o['loss_opt'] for o in optima])
  return {
    'optima': optima,
    'n_opt_law': {'exponent': a, 'coefficient': math.exp(log_k)},
    'loss_law': {'exponent': -slope, 'coefficient': math.exp(log_l)},
  }


def law_value(law: dict, budget: float, falling: bool) -> float:
  """k C^a (`falling` False) or A C^-b (`falling` True) at `budget`."""
  sign = -1.0 if falling else 1.0
  return law['coefficient'] * budget ** (sign * law['exponent'])


def bootstrap_laws(
  budgets: Sequence[float],
  log_n: Sequence[float],
  loss: Sequence[float],
  predict_at: Sequence[float] = (),
  samples: int = 1000,
  seed: int = 0,
) -> dict:
  """Bootstrap over runs: each sample redraws every budget's runs with replacement (as many as it
  has; redrawn until it holds >= 3 distinct sizes, the fewest a parabola needs) and refits
  `fit_laws`. Samples without a minimum on some curve are dropped and counted.

  Returns {'samples', 'dropped', 'exponent_n_opt': [lo, hi], 'exponent_loss': [lo, hi],
  'n_opt_at': [[lo, hi] per predict_at], 'loss_opt_at': [...], 'draws': {name: array}} with
  central BOOTSTRAP_LEVEL percentile intervals; 'draws' keeps the raw values for plotting bands.
  """
  budgets, log_n, loss = (np.asarray(v, np.float64) for v in (budgets, log_n, loss))
  rng = np.random.default_rng(seed)
  groups = [np.flatnonzero(budgets == b) for b in np.unique(budgets)]
  draws = {'exponent_n_opt': [], 'exponent_loss': [], 'n_opt_law': [], 'loss_law': []}
  dropped = 0
  for _ in range(samples):
    rows = np.concatenate([_resample(rng, g, log_n) for g in groups])
    laws = fit_laws(budgets[rows], log_n[rows], loss[rows])
    if laws is None:
      dropped += 1
      continue
    draws['exponent_n_opt'].append(laws['n_opt_law']['exponent'])
    draws['exponent_loss'].append(laws['loss_law']['exponent'])
    draws['n_opt_law'].append(laws['n_opt_law'])
    draws['loss_law'].append(laws['loss_law'])
  kept = samples - dropped
  if kept < samples // 2:
    raise ValueError(
      f'bootstrap: {dropped} of {samples} resamples have an isoFLOP curve without a '
      'minimum; sample more sizes per budget or sizes on both sides of the optimum'
    )
  lo, hi = 100 * (1 - BOOTSTRAP_LEVEL) / 2, 100 * (1 + BOOTSTRAP_LEVEL) / 2

  def interval(values):
    return [float(np.percentile(values, lo)), float(np.percentile(values, hi))]

  return {
    'samples': kept,
    'dropped': dropped,
    'level': BOOTSTRAP_LEVEL,
    'exponent_n_opt': interval(draws['exponent_n_opt']),
    'exponent_loss': interval(draws['exponent_loss']),
    'n_opt_at': [
      interval([law_value(l, c, False) for l in draws['n_opt_law']]) for c in predict_at
    ],
    'loss_opt_at': [
      interval([law_value(l, c, True) for l in draws['loss_law']]) for c in predict_at
    ],
    'draws': draws,
  }


def _resample(rng: np.random.Generator, rows: np.ndarray, log_n: np.ndarray) -> np.ndarray:
  """`rows` drawn with replacement until the draw covers >= 3 distinct sizes."""
  if len(np.unique(log_n[rows])) < 3:
    raise ValueError(
      f'an isoFLOP budget has {len(np.unique(log_n[rows]))} distinct sizes; a parabola needs 3'
    )
  while True:
    draw = rng.choice(rows, size=len(rows), replace=True)
    if len(np.unique(log_n[draw])) >= 3:
      return draw


def nearest_shape(
  shapes: Sequence[Shape], target_n: float, count: Callable[[Shape], float]
) -> Shape:
  """The shape whose parameter count `count(shape)` is closest to `target_n` in log space."""
  return min(shapes, key=lambda s: abs(math.log(count(s)) - math.log(target_n)))


def relative_error(predicted: float, measured: float) -> float:
  """|predicted - measured| / measured."""
  return abs(predicted - measured) / abs(measured)


def head_allocations(
  total_n: float,
  heads: Sequence[tuple[int, int]],
  widths: Sequence[int],
  count: Callable[[Shape], float],
) -> list[Shape]:
  """For each flow head (head_dim, head_layers): the family backbone (over `widths`) that, with
  that head, brings the non-embedding count closest to `total_n`, so parameters move between
  head and backbone at a roughly fixed total."""
  shapes = []
  for head_dim, head_layers in heads:
    candidates = [family_shape(w, head_dim, head_layers) for w in widths]
    shapes.append(nearest_shape(candidates, total_n, count))
  return shapes
