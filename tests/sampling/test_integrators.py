"""Per-token integrators, time grids and guidance (docs/model.md §7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.sampling import guidance
from nextstep_jax.sampling import integrators as I

GRID_RTOL = 1e-6  # float32 grid vs float64 reference: a few ulps of values <= 1.
EXACT_FLOW_ATOL = 2e-5  # Euler/Heun are exact on straight paths; float32 rounding over <= 50 steps.
CLOSED_FORM_RTOL = 1e-5  # Euler/Heun products for a linear ODE: float32 rounding over 8-16 steps.
CLOSED_FORM_ATOL = 1e-7  # Same, for the x0 = 0 entry.
EM_ATOL = 1e-5  # Scanned SDE vs a Python-loop float32 Euler-Maruyama on O(1) values, 4 steps.
GUIDANCE_ATOL = 1e-6  # Elementwise float32 combinations of O(1) numbers.


def shift_np(t, s):
  return t / (s - (s - 1) * t)


def rows(x):
  return jnp.asarray(x, jnp.float32)


# ----- time grids -----


def test_grid_a_official():
  cfg = I.IntegratorConfig(num_steps=50, time_grid='A', timestep_shift=3.2, last_step_size=0.04)
  grid = np.asarray(I.time_grid(cfg))
  expected = shift_np(np.linspace(0.0, 0.96, 50), 3.2)
  assert grid.shape == (50,) and grid.dtype == np.float32
  np.testing.assert_allclose(grid, expected, rtol=GRID_RTOL, atol=GRID_RTOL)
  assert grid[0] == 0.0
  assert abs(grid[-1] - 0.882) < 1e-3  # Doc: t_{N-1} ~ 0.882 ...
  assert abs(grid[-1] + 0.04 - 0.922) < 1e-3  # ... and the final step ends at ~0.922.
  assert np.all(np.diff(grid) > 0)
  # Shift s > 1 crowds steps near noise (t = 0): the first steps are smaller than unshifted.
  assert grid[1] < np.linspace(0.0, 0.96, 50)[1]


def test_grid_a_unshifted():
  cfg = I.IntegratorConfig(num_steps=5, time_grid='A', timestep_shift=1.0, last_step_size=0.04)
  np.testing.assert_allclose(np.asarray(I.time_grid(cfg)), np.linspace(0, 0.96, 5), rtol=GRID_RTOL)


@pytest.mark.parametrize('shift', [1.0, 3.2])
def test_grid_b(shift):
  n = 7
  cfg = I.IntegratorConfig(num_steps=n, time_grid='B', timestep_shift=shift)
  grid = np.asarray(I.time_grid(cfg))
  assert grid.shape == (n + 1,)
  assert grid[-1] == 1.0  # Exactly 1.
  assert grid[0] == 0.0
  np.testing.assert_allclose(
    grid[:-1], shift_np(np.linspace(0, 1, n + 1)[:-1], shift), rtol=GRID_RTOL, atol=GRID_RTOL
  )


def test_bad_integrator_config():
  with pytest.raises(ValueError, match='solver'):
    I.IntegratorConfig(solver='rk4')
  with pytest.raises(ValueError, match='time_grid'):
    I.IntegratorConfig(time_grid='C')
  with pytest.raises(ValueError, match='num_steps'):
    I.IntegratorConfig(num_steps=0)


# ----- deterministic solvers on analytic fields -----


def straight_field(x0, x1):
  """v(x, t) = (x1 - x) / (1 - t): the flow of x_t = t x1 + (1 - t) x0 (constant velocity x1 - x0).
  Euler and Heun follow it exactly (the path is a straight line at constant speed)."""
  return lambda x, t, d: (x1 - x) / (1.0 - t)


def _keys(m, seed=0):
  return jax.random.split(jax.random.key(seed), m)


# Heun on grid B would evaluate the straight field at t = 1 (0/0), so B is checked with Euler only.
@pytest.mark.parametrize(
  'solver, grid, shift',
  [
    ('euler', 'A', 1.0),
    ('euler', 'A', 3.2),
    ('euler', 'B', 3.2),
    ('heun', 'A', 1.0),
    ('heun', 'A', 3.2),
  ],
)
def test_ode_follows_straight_path(solver, grid, shift):
  rng = np.random.default_rng(1)
  x0, x1 = rng.standard_normal((2, 3, 8)).astype(np.float32)
  cfg = I.IntegratorConfig(
    num_steps=12, solver=solver, time_grid=grid, timestep_shift=shift, last_step_size=0.04
  )
  out = np.asarray(I.integrate(straight_field(rows(x0), rows(x1)), rows(x0), _keys(3), cfg))
  if grid == 'B' or shift == 1.0:
    t_end = 1.0  # B ends at 1; A with s = 1 ends at (1 - delta) + delta.
  else:
    t_end = float(I.time_grid(cfg)[-1]) + 0.04  # A with s > 1 stops short of the data.
  np.testing.assert_allclose(out, t_end * x1 + (1 - t_end) * x0, atol=EXACT_FLOW_ATOL)
  if t_end == 1.0:
    np.testing.assert_allclose(out, x1, atol=EXACT_FLOW_ATOL)


def test_euler_grid_b_reaches_target_many_steps():
  rng = np.random.default_rng(2)
  x0, x1 = rng.standard_normal((2, 4, 12)).astype(np.float32)
  cfg = I.IntegratorConfig(num_steps=50, solver='euler', time_grid='B', timestep_shift=3.2)
  out = I.integrate(straight_field(rows(x0), rows(x1)), rows(x0), _keys(4), cfg)
  np.testing.assert_allclose(np.asarray(out), x1, atol=EXACT_FLOW_ATOL)


@pytest.mark.parametrize('n', [8, 16])
def test_linear_ode_closed_form(n):
  """dx/dt = lam x on grid B: Euler gives x0 prod(1 + lam dt), Heun x0 prod(1 + lam dt + (lam dt)^2/2);
  Heun is second order (error ratio ~4 when N doubles), Euler first order."""
  lam = -1.3
  x0 = np.linspace(-1, 1, 6, dtype=np.float32)[None]
  grid_cfg = dict(num_steps=n, time_grid='B', timestep_shift=2.0)
  dts = np.diff(np.asarray(I.time_grid(I.IntegratorConfig(**grid_cfg)), np.float64))
  field = lambda x, t, d: lam * x
  euler = np.asarray(
    I.integrate(field, rows(x0), _keys(1), I.IntegratorConfig(solver='euler', **grid_cfg))
  )
  heun = np.asarray(
    I.integrate(field, rows(x0), _keys(1), I.IntegratorConfig(solver='heun', **grid_cfg))
  )
  np.testing.assert_allclose(
    euler, x0 * np.prod(1 + lam * dts), rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL
  )
  np.testing.assert_allclose(
    heun,
    x0 * np.prod(1 + lam * dts + (lam * dts) ** 2 / 2),
    rtol=CLOSED_FORM_RTOL,
    atol=CLOSED_FORM_ATOL,
  )
  exact = x0 * np.exp(lam)
  assert np.abs(heun - exact).max() < np.abs(euler - exact).max() / 4


def test_heun_error_order():
  lam = 0.9
  x0 = np.ones((1, 4), np.float32)

  def err(solver, n):
    cfg = I.IntegratorConfig(num_steps=n, solver=solver, time_grid='B')
    return np.abs(
      np.asarray(I.integrate(lambda x, t, d: lam * x, rows(x0), _keys(1), cfg)) - np.exp(lam)
    ).max()

  assert 1.7 < err('euler', 8) / err('euler', 16) < 2.3  # First order.
  assert 3.4 < err('heun', 8) / err('heun', 16) < 4.6  # Second order.


# ----- SDE -----


def reference_em(velocity, x0, row_keys, cfg):
  """Euler-Maruyama of the doc's SDE written from §7 (score form), noise row m of step i drawn as
  normal(fold_in(row_keys[m], i + 1)) scaled by temperature, in a plain Python loop."""
  times = np.asarray(I.time_grid(cfg))
  x = np.asarray(x0, np.float32)
  steps = len(times) - 1
  for i in range(steps):
    t, t_next = np.float32(times[i]), np.float32(times[i + 1])
    dt = t_next - t
    v = np.asarray(velocity(jnp.asarray(x), jnp.float32(t), dt))
    score = (t * v - x) / (1 - t)
    drift = v + (1 - t) * score
    z = np.stack(
      [
        np.asarray(jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:], jnp.float32))
        for k in row_keys
      ]
    )
    x = x + drift * dt + np.sqrt(2 * (1 - t)) * np.sqrt(dt) * cfg.temperature * z
  if cfg.time_grid == 'A':
    x = x + cfg.last_step_size * np.asarray(
      velocity(jnp.asarray(x), jnp.float32(times[-1]), cfg.last_step_size)
    )
  return x


@pytest.mark.slow
@pytest.mark.parametrize(
  'grid, shift, temperature', [('A', 3.2, 1.0), ('A', 1.0, 0.7), ('B', 2.0, 1.0)]
)
def test_sde_equals_hand_written_euler_maruyama(grid, shift, temperature):
  rng = np.random.default_rng(3)
  a = rows(rng.standard_normal((12,)))
  velocity = lambda x, t, d: jnp.sin(x) * a + t  # Arbitrary smooth field depending on x and t.
  keys = _keys(3, seed=7)
  x0 = I.row_normal(keys, 0, (12,))
  cfg = I.IntegratorConfig(
    num_steps=4, solver='sde', time_grid=grid, timestep_shift=shift, temperature=temperature
  )
  out = np.asarray(jax.jit(lambda x, k: I.integrate(velocity, x, k, cfg))(x0, keys))
  np.testing.assert_allclose(out, reference_em(velocity, x0, keys, cfg), atol=EM_ATOL, rtol=EM_ATOL)
  # The noise matters (a different key gives a different result).
  other = np.asarray(I.integrate(velocity, x0, _keys(3, seed=8), cfg))
  assert np.abs(other - out).max() > 1e-2


def test_row_normal_is_per_row():
  keys = _keys(4, seed=5)
  full = np.asarray(I.row_normal(keys, 3, (5,)))
  assert full.shape == (4, 5)
  np.testing.assert_array_equal(np.asarray(I.row_normal(keys[2:3], 3, (5,)))[0], full[2])
  np.testing.assert_array_equal(
    full[1], np.asarray(jax.random.normal(jax.random.fold_in(keys[1], 3), (5,), jnp.float32))
  )
  assert not np.allclose(full, np.asarray(I.row_normal(keys, 4, (5,))))


# ----- guidance -----


def test_combine_two_way():
  rng = np.random.default_rng(4)
  v = rng.standard_normal((6, 5)).astype(np.float32)  # Branch-major: rows 0-2 cond, 3-5 uncond.
  v_c, v_u = v[:3], v[3:]
  for cfg in (1.0, 3.0, 7.5):
    out = np.asarray(guidance.combine_two_way(jnp.asarray(v), jnp.float32(cfg)))
    np.testing.assert_allclose(out, v_u + cfg * (v_c - v_u), atol=GUIDANCE_ATOL * cfg)
  np.testing.assert_allclose(
    np.asarray(guidance.combine_two_way(jnp.asarray(v), jnp.float32(1.0))), v_c, atol=GUIDANCE_ATOL
  )


def test_combine_three_way():
  rng = np.random.default_rng(5)
  v = rng.standard_normal((6, 5)).astype(np.float32)  # [full; image-only; none], 2 images each.
  v_full, v_img, v_none = v[:2], v[2:4], v[4:]
  cfg, cfg_img = 7.5, 2.0
  out = np.asarray(
    guidance.combine_three_way(jnp.asarray(v), jnp.float32(cfg), jnp.float32(cfg_img))
  )
  np.testing.assert_allclose(
    out, v_none + cfg_img * (v_img - v_none) + cfg * (v_full - v_img), atol=GUIDANCE_ATOL * 10
  )
  ones = np.asarray(guidance.combine_three_way(jnp.asarray(v), jnp.float32(1.0), jnp.float32(1.0)))
  np.testing.assert_allclose(ones, v_full, atol=GUIDANCE_ATOL * 10)


def test_guidance_schedules():
  n, cfg = 10, 5.0
  const = [float(guidance.guidance_scale(cfg, 'constant', jnp.int32(k), n)) for k in range(n)]
  assert const == [cfg] * n
  lin = np.array([float(guidance.guidance_scale(cfg, 'linear', jnp.int32(k), n)) for k in range(n)])
  np.testing.assert_allclose(lin, 1 + (cfg - 1) * (n - np.arange(n)) / n, rtol=GRID_RTOL)
  assert lin[0] == pytest.approx(cfg)  # Starts at cfg ...
  assert np.all(np.diff(lin) < 0)  # ... decays ...
  assert lin[-1] == pytest.approx(1 + (cfg - 1) / n)  # ... towards 1 (the [gh]/vLLM direction).
  with pytest.raises(ValueError, match='cfg_schedule'):
    guidance.guidance_scale(cfg, 'cosine', jnp.int32(0), n)


# ----- any step schedule; step sizes reach the head -----


def test_one_step_of_size_one_is_the_closed_form():
  """times (0, 1), Euler: x1 = x0 + u(x0, 0, 1), the head seeing d = 1 (module doc)."""
  x0 = rows(np.linspace(-1, 1, 6).reshape(2, 3))
  seen = []

  def head(x, t, d):
    seen.append((t, d))
    return jnp.cos(x) * (1 + t) + 2 * d

  cfg = I.IntegratorConfig(solver='euler', times=(0.0, 1.0))
  out = np.asarray(I.integrate(head, x0, _keys(x0.shape[0]), cfg))
  np.testing.assert_allclose(
    out, np.asarray(x0) + np.cos(np.asarray(x0)) + 2.0, rtol=1e-6, atol=1e-6
  )
  assert cfg.velocity_calls == 1


def test_explicit_schedule_passes_each_step_size():
  times = (0.0, 0.5, 0.75, 1.0)
  recorded = []

  def head(x, t, d):
    recorded.append(d)
    return x * 0 + d  # x moves by d * d per step.

  x0 = rows(np.zeros((1, 3)))
  out = np.asarray(
    jax.jit(lambda x, k: I.integrate(head, x, k, I.IntegratorConfig(solver='euler', times=times)))(
      x0, _keys(x0.shape[0])
    )
  )
  np.testing.assert_allclose(out, 0.5**2 + 0.25**2 + 0.25**2, rtol=1e-6)
  assert I.uniform_times(4) == (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize('times', [(0.0, 0.5), (0.1, 1.0), (0.0, 0.6, 0.6, 1.0), (1.0,)])
def test_bad_schedule_is_rejected(times):
  with pytest.raises(ValueError, match='sample.times'):
    I.IntegratorConfig(times=times)


# ----- conditioned velocities (the table of per-point work built once per token) -----


@pytest.mark.parametrize(
  'solver, grid_kw',
  [
    ('sde', dict(time_grid='A', timestep_shift=2.0)),
    ('euler', dict(time_grid='B')),
    ('heun', dict(time_grid='A')),
    ('heun', dict(times=(0.0, 0.3, 0.55, 1.0))),
  ],
)
def test_conditioned_velocity_equals_the_plain_field(solver, grid_kw):
  """A field split into a (t, d) table and an x-part integrates exactly like the same field
  given as one function, for every solver and grid (each point's (t, d) lands on its step)."""
  rng = np.random.default_rng(5)
  a, b = rows(rng.standard_normal((12,))), rows(rng.standard_normal((12,)))
  plain = lambda x, t, d: jnp.sin(x) * a + jnp.cos(3 * t) * b + d * x
  split = I.ConditionedVelocity(
    condition=lambda t, d: {'time': jnp.cos(3 * t)[:, None] * b, 'size': d},
    apply=lambda x, row: jnp.sin(x) * a + row['time'] + row['size'] * x,
  )
  cfg = I.IntegratorConfig(num_steps=5, solver=solver, **grid_kw)
  keys, x0 = _keys(3, seed=2), rows(rng.standard_normal((3, 12)))
  expected = np.asarray(I.integrate(plain, x0, keys, cfg))
  np.testing.assert_allclose(
    np.asarray(jax.jit(lambda x: I.integrate(split, x, keys, cfg))(x0)),
    expected,
    rtol=GUIDANCE_ATOL,
    atol=GUIDANCE_ATOL,
  )


@pytest.mark.parametrize('solver', ['euler', 'heun', 'sde'])
@pytest.mark.parametrize('grid', ['A', 'B'])
def test_velocity_calls_counts_the_head_evaluations_integrate_makes(solver, grid):
  """The one count of head evaluations per token (the planner and the roofline use it): grid A
  with N steps runs N - 1 solver steps and a final delta step, so heun makes 2N - 1, not 2N."""
  x0 = rows(np.linspace(-1, 1, 6).reshape(2, 3))
  calls = []

  def head(x, t, d):
    calls.append(1)
    return jnp.cos(x) * (1 + t) + d

  cfg = I.IntegratorConfig(solver=solver, time_grid=grid, num_steps=4)
  with jax.disable_jit():
    I.integrate(head, x0, _keys(x0.shape[0]), cfg)
  assert cfg.velocity_calls == len(calls)
  assert cfg.velocity_calls == {('heun', 'A'): 7, ('heun', 'B'): 8}.get((solver, grid), 4)
