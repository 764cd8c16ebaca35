"""Compute-optimal study math: family shapes, isoFLOP selection, parabola and law fits, bootstrap, prediction."""

import math

import numpy as np
import pytest

from nextstep_jax import configlib
from nextstep_jax.experiments import scaling

# Synthetic study: N*(C) = 2e-3 C^0.5, L*(C) = 40 C^-0.1, loss = L* + 0.05 (ln N - ln N*)^2.
TRUE_A, TRUE_B = 0.5, 0.1


def optimum(c):
  return 2e-3 * c**TRUE_A, 40.0 * c**-TRUE_B


def synthetic_runs(budgets, noise, seed=0, sizes=7):
  """Rows (budget, ln N, loss) with sizes spread 1/8x..8x around each budget's optimum."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in budgets:
    n_opt, l_opt = optimum(c)
    for offset in np.linspace(-math.log(8), math.log(8), sizes):
      loss = (l_opt + 0.05 * offset**2) * (1 + noise * rng.standard_normal())
      rows.append((c, math.log(n_opt) + offset, loss))
  return [np.array(col) for col in zip(*rows)]


def test_family_scales_width_and_depth_together_and_is_a_valid_config():
  assert [scaling.family_shape(w).depth for w in (16, 32, 64, 96, 256)] == [1, 1, 2, 3, 8]
  assert scaling.family_shape(256).head_dim == 128 and scaling.family_shape(32).head_dim == 32
  assert scaling.family_shape(32, min_head_dim=192).head_dim == 192
  assert scaling.family_shape(512, min_head_dim=192).head_dim == 256
  shape = scaling.family_shape(96, head_dim=16, head_layers=1)
  config = configlib.load_config('configs/shapes.py', list(shape.overrides()))
  configlib.validate(config)
  m = config.model
  got = (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.fm_head_dim, m.fm_head_layers)
  assert got == (96, 3, 6, 3, 16, 1)
  assert m.intermediate_size == 264 and shape.name == 'w96-d3-h16x1'
  with pytest.raises(ValueError, match='multiple of 16'):
    scaling.family_shape(40)


def test_isoflop_runs_split_the_budget_and_centre_on_the_prior():
  shapes = [scaling.family_shape(w) for w in (16, 32, 48, 64, 96, 128, 160, 192, 256)]
  count = lambda s: 12.0 * s.depth * s.width**2
  flops = lambda s: 6.0 * count(s) * 1000
  budget = 6.0 * 20 * scaling.chinchilla_prior(1e13, 20.0) ** 2  # == 1e13.
  picked = scaling.isoflop_runs(
    budget, shapes, flops, count, sizes=5, min_steps=10, max_steps=10**7
  )
  assert len(picked) == 5 and all(r.budget == budget for r in picked)
  assert [r.steps for r in picked] == [round(budget / flops(r.shape)) for r in picked]
  prior = scaling.chinchilla_prior(budget, 20.0)  # ~2.9e5: between w64 (98k) and w128 (786k).
  middle = count(picked[2].shape)
  assert all(
    abs(math.log(middle) - math.log(prior)) <= abs(math.log(count(s)) - math.log(prior))
    for s in shapes[2:-2]
  )
  assert [r.shape.width for r in picked] == [48, 64, 96, 128, 160]
  # A step window narrower than the family leaves too few feasible shapes.
  with pytest.raises(ValueError, match='only 2 family shapes'):
    scaling.isoflop_runs(budget, shapes, flops, count, sizes=5, min_steps=5000, max_steps=20000)


def test_parabola_finds_the_vertex_and_refuses_curves_without_a_minimum():
  log_n = np.log([1e5, 2e5, 4e5, 8e5, 1.6e6])
  loss = 2.0 + 0.3 * (log_n - math.log(3e5)) ** 2
  vertex = scaling.fit_parabola(log_n, loss)
  assert vertex['n_opt'] == pytest.approx(3e5, rel=1e-9) and vertex['loss_opt'] == pytest.approx(
    2.0, rel=1e-9
  )
  assert vertex['interior'] and vertex['curvature'] == pytest.approx(0.3)
  assert not scaling.fit_parabola(log_n, 2.0 + 0.3 * (log_n - math.log(3e6)) ** 2)['interior']
  assert (
    scaling.fit_parabola(log_n, 2.0 + 0.3 * (log_n - math.log(1e9)) ** 2) is None
  )  # Far outside.
  assert scaling.fit_parabola(log_n, 2.0 - 0.1 * (log_n - 12) ** 2) is None  # A maximum.
  assert scaling.fit_parabola(log_n[[0, 0, 1, 1]], loss[[0, 0, 1, 1]]) is None  # 2 distinct sizes.


def test_laws_recover_the_exponents():
  budgets, log_n, loss = synthetic_runs([1e12, 3e12, 1e13, 3e13], noise=0.0)
  laws = scaling.fit_laws(budgets, log_n, loss)
  assert laws['n_opt_law']['exponent'] == pytest.approx(TRUE_A, abs=1e-6)
  assert laws['loss_law']['exponent'] == pytest.approx(TRUE_B, abs=1e-6)
  assert scaling.law_value(laws['loss_law'], 1e15, falling=True) == pytest.approx(
    optimum(1e15)[1], rel=1e-6
  )
  assert scaling.law_value(laws['n_opt_law'], 1e15, falling=False) == pytest.approx(
    optimum(1e15)[0], rel=1e-5
  )


def test_bootstrap_intervals_cover_the_truth_and_shrink_with_less_noise():
  budgets = [1e12, 3e12, 1e13]
  widths = []
  for noise in (0.01, 0.002):
    b, n, l = synthetic_runs(budgets, noise=noise, seed=3)
    boot = scaling.bootstrap_laws(b, n, l, predict_at=[4e13], samples=300, seed=1)
    assert boot['samples'] + boot['dropped'] == 300
    lo, hi = boot['exponent_loss']
    assert lo < TRUE_B < hi
    assert boot['exponent_n_opt'][0] < TRUE_A < boot['exponent_n_opt'][1]
    assert boot['loss_opt_at'][0][0] < optimum(4e13)[1] < boot['loss_opt_at'][0][1]
    widths.append(hi - lo)
  assert widths[1] < widths[0] / 2


def test_bootstrap_refuses_curves_that_never_turn():
  budgets = np.repeat([1e12, 3e12, 1e13], 4)
  log_n = np.tile(np.log([1e5, 2e5, 4e5, 8e5]), 3)
  loss = 3.0 - 0.1 * log_n  # Monotone in N: no optimum anywhere.
  assert scaling.fit_laws(budgets, log_n, loss) is None
  with pytest.raises(ValueError, match='without a minimum'):
    scaling.bootstrap_laws(budgets, log_n, loss, samples=20)


def test_prediction_helpers():
  shapes = [scaling.family_shape(w) for w in (32, 64, 128)]
  count = lambda s: float(s.width**3)
  assert scaling.nearest_shape(shapes, 90**3, count).width == 64
  assert scaling.nearest_shape(shapes, 100**3, count).width == 128  # Nearest in log space.
  assert scaling.relative_error(2.1, 2.0) == pytest.approx(0.05)
  assert scaling.relative_error(1.9, 2.0) == pytest.approx(0.05)


def test_head_allocations_keep_the_total_while_the_head_grows():
  count = lambda s: float(10 * s.depth * s.width**2 + 5 * s.head_layers * s.head_dim**2)
  widths = tuple(range(16, 257, 16))
  target = count(scaling.family_shape(128))
  shapes = scaling.head_allocations(target, [(16, 1), (64, 2), (128, 4)], widths, count)
  assert [(s.head_dim, s.head_layers) for s in shapes] == [(16, 1), (64, 2), (128, 4)]
  heads = [5 * s.head_layers * s.head_dim**2 for s in shapes]
  assert heads == sorted(heads)
  assert [s.width for s in shapes] == sorted((s.width for s in shapes), reverse=True)
  for s in shapes:  # Each backbone is the best available match of the target total.
    others = [count(scaling.family_shape(w, s.head_dim, s.head_layers)) for w in widths]
    assert abs(math.log(count(s) / target)) == pytest.approx(
      min(abs(math.log(o / target)) for o in others)
    )


def test_curves_are_extended_past_an_edge_minimum():
  shapes = [scaling.family_shape(w) for w in (16, 32, 48, 64, 96, 128)]
  flops = lambda s: 1e6 * s.width
  on_curve = [scaling.PlannedRun('isoflop', 1e10, s, round(1e10 / flops(s))) for s in shapes[1:4]]
  nxt = scaling.edge_extension(
    on_curve, [3.0, 2.0, 1.0], shapes, flops, 10, 10**6
  )  # Falls to the largest.
  assert nxt.shape.width == 96 and nxt.steps == round(1e10 / 96e6) and nxt.budget == 1e10
  assert (
    scaling.edge_extension(on_curve, [1.0, 2.0, 3.0], shapes, flops, 10, 10**6).shape.width == 16
  )
  assert (
    scaling.edge_extension(on_curve, [2.0, 1.0, 3.0], shapes, flops, 10, 10**6) is None
  )  # Bracketed.
  assert (
    scaling.edge_extension(on_curve, [3.0, 2.0, 1.0], shapes, flops, 150, 10**6) is None
  )  # 104 steps: too few.
  assert (
    scaling.edge_extension(on_curve[::-1], [1.0, 2.0, 3.0], shapes, flops, 10, 10**6).shape.width
    == 96
  )
