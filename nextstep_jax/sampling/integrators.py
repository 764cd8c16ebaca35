"""Per-token integrators of the head's velocity field, pure and scanned over steps.

Time convention (everywhere in this project, as the official model): t = 0 is noise, t = 1 is
data, x_t = t x1 + (1 - t) eps, velocity v = x1 - eps.

Time grids (N = num_steps, s = timestep_shift, shift(t) = t / (s - (s - 1) t)):
  A (official NextStep-1 code): u = linspace(0, 1 - delta, N), t_i = shift(u_i); N - 1 solver steps
    t_i -> t_{i+1}, then a final deterministic step x += delta * v(x, t_{N-1}). N velocity calls.
  B (NextStep-1.1 / vLLM): t = shift(linspace(0, 1, N + 1)[:-1]) + [1.0]; N solver steps to t = 1.
  `times` (any schedule): explicit increasing times 0 = t_0 < ... < t_n = 1, n solver steps (the
    step count, shift and grid letter are then ignored).
Step sizes: every velocity call receives the size d of the step it is used for (d = t_next - t;
the final grid-A step d = delta); step-conditioned few-step heads read it, others ignore it. With
such a head and 'euler' the update x <- x + d u(x, t, d) uses u as the average velocity over the
step, so one step of size 1 is the closed form x1 = x0 + u(x0, 0, 1) (with CFG: u = u_u + s (u_c - u_u)).
Solvers: 'sde' = Euler-Maruyama of the SiT SDE with diffusion w(t) = 1 - t:
  score = (t v - x) / (1 - t); drift = v + (1 - t) score = (1 + t) v - x;
  x <- x + drift dt + sqrt(2 (1 - t)) sqrt(dt) z;
'euler' / 'heun' = the deterministic ODE dx = v dt (first / second order).
Conditioned velocities: a field whose work splits into a part that depends only on the step's
(t, d) (for the flow head: the time embedding and every adaLN modulation) and a part that depends
on x can be passed as a `ConditionedVelocity`; `integrate` then evaluates the first part once for
all of the token's evaluation points, as one batched call, before the step loop, and each step
only slices its row of that table. A plain `VelocityFn` is the special case whose table is (t, d).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

SOLVERS = ('sde', 'euler', 'heun')
TIME_GRIDS = ('A', 'B')

# (x (M, T) f32, t () f32, step size d () f32) -> (M, T) f32
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ConditionedVelocity:
  """v(x, t, d) = apply(x, table[e]) with table = condition(ts (E,), ds (E,)), a pytree whose
  leaves have the leading axis E (one row per evaluation point)."""

  condition: Callable[[jax.Array, jax.Array], Any]
  apply: Callable[[jax.Array, Any], jax.Array]

  @classmethod
  def of(cls, velocity: 'VelocityFn | ConditionedVelocity') -> 'ConditionedVelocity':
    """A plain VelocityFn as a ConditionedVelocity whose table is (t, d) itself."""
    if isinstance(velocity, cls):
      return velocity
    return cls(condition=lambda t, d: (t, d), apply=lambda x, td: velocity(x, *td))


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('timestep_shift', 'temperature'),
  meta_fields=('num_steps', 'solver', 'time_grid', 'last_step_size', 'times', 'unroll'),
)
@dataclasses.dataclass(frozen=True)
class IntegratorConfig:
  """The per-token integrator. A pytree: `timestep_shift` and `temperature` are its leaves (traced
  under jit, so new values reuse the compiled program); every other field is static structure."""

  num_steps: int = 50
  solver: str = 'sde'
  time_grid: str = 'A'
  timestep_shift: float = 1.0
  last_step_size: float = 0.04
  temperature: float = 1.0
  times: tuple[float, ...] = ()  # Explicit schedule 0 = t_0 < ... < t_n = 1 (overrides the grid).
  unroll: bool = False  # Unroll the step scan (AOT cost calibration: no loop bodies counted once).

  def __post_init__(self):
    if self.solver not in SOLVERS:
      raise ValueError(f'sample.solver={self.solver!r}; choose one of {SOLVERS}')
    if self.time_grid not in TIME_GRIDS:
      raise ValueError(f'sample.time_grid={self.time_grid!r}; choose one of {TIME_GRIDS}')
    if self.num_steps < 1:
      raise ValueError(f'sample.num_steps={self.num_steps} must be >= 1')
    if self.times:
      t = self.times
      if len(t) < 2 or t[0] != 0.0 or t[-1] != 1.0 or any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError(
          f'sample.times={t} must increase strictly from 0.0 to 1.0 (at least one step)'
        )

  @property
  def velocity_calls(self) -> int:
    """Head evaluations per token (per guidance branch), as `integrate` makes them: one per step
    (two for heun) over the grid's steps, plus grid A's final delta step (grid A with N steps:
    N - 1 solver steps + 1, so 2N - 1 for heun; grid B and explicit times have no final step)."""
    final_step = self.time_grid == 'A' and not self.times
    if self.times:
      steps = len(self.times) - 1
    else:
      steps = self.num_steps - 1 if final_step else self.num_steps
    return steps * (2 if self.solver == 'heun' else 1) + (1 if final_step else 0)


def uniform_times(num_steps: int) -> tuple[float, ...]:
  """The few-step schedule: num_steps equal steps from 0 to 1."""
  return tuple(i / num_steps for i in range(num_steps + 1))


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  return t / (shift - (shift - 1.0) * t)


def time_grid(cfg: IntegratorConfig) -> jax.Array:
  """Grid A: (N,) solver times (the last one starts the final delta step). Grid B: (N + 1,).
  Explicit `times`: (n + 1,)."""
  if cfg.times:
    return jnp.asarray(cfg.times, jnp.float32)
  n = cfg.num_steps
  if cfg.time_grid == 'A':
    return shift_time(
      jnp.linspace(0.0, 1.0 - cfg.last_step_size, n, dtype=jnp.float32), cfg.timestep_shift
    )
  t = shift_time(jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.float32)[:-1], cfg.timestep_shift)
  return jnp.concatenate([t, jnp.ones((1,), jnp.float32)])


def row_normal(row_keys: jax.Array, salt, shape: tuple[int, ...]) -> jax.Array:
  """One standard-normal draw of `shape` per row from fold_in(row_keys[m], salt): (M, *shape) f32.
  Per-row keys make a row's sample independent of the batch it is generated in."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape, jnp.float32))(
    row_keys
  )


def _solver_step(velocity_at, solver: str, x, t, t_next, noise_fn, noise_scale: float):
  """One step t -> t_next of `solver` from x (M, T) f32; velocity_at(x, 'start' | 'end') is the
  field at this step's start / end time; noise_fn() draws the SDE noise (M, T)."""
  dt = t_next - t
  v = velocity_at(x, 'start')
  if solver == 'euler':
    return x + v * dt
  if solver == 'heun':
    v_next = velocity_at(x + v * dt, 'end')
    return x + 0.5 * (v + v_next) * dt
  drift = (1.0 + t) * v - x
  noise = noise_scale * noise_fn()
  return x + drift * dt + jnp.sqrt(2.0 * (1.0 - t)) * jnp.sqrt(dt) * noise


def integrate(
  velocity: 'VelocityFn | ConditionedVelocity',
  x0: jax.Array,
  row_keys: jax.Array,
  cfg: IntegratorConfig,
) -> jax.Array:
  """Integrates from noise x0 (M, T) float32 (already scaled by temperature) to a token (M, T) f32.

  velocity: a VelocityFn or a ConditionedVelocity (its table is built once for every evaluation
  point: the step starts, for heun the step ends, for grid A the final delta step).
  row_keys (M,) keys: the SDE's step i draws row m's noise from fold_in(row_keys[m], i + 1),
  scaled by `temperature` (salt 0 is left for x0).
  """
  velocity = ConditionedVelocity.of(velocity)
  times = time_grid(cfg)
  starts, ends = times[:-1], times[1:]
  sizes = ends - starts
  final_step = cfg.time_grid == 'A' and not cfg.times
  points_t, points_d = [starts], [sizes]
  if cfg.solver == 'heun':
    points_t, points_d = points_t + [ends], points_d + [sizes]
  if final_step:
    points_t.append(times[-1:])
    points_d.append(jnp.full((1,), cfg.last_step_size, jnp.float32))
  table = velocity.condition(jnp.concatenate(points_t), jnp.concatenate(points_d))
  n = starts.shape[0]
  at_start = jax.tree.map(lambda a: a[:n], table)
  at_end = jax.tree.map(lambda a: a[n : 2 * n], table) if cfg.solver == 'heun' else None

  def step(x, inputs):
    i, t, t_next, start_row, end_row = inputs
    rows = {'start': start_row, 'end': end_row}
    noise_fn = lambda: row_normal(row_keys, i + 1, x.shape[1:])
    return _solver_step(
      lambda y, where: velocity.apply(y, rows[where]),
      cfg.solver,
      x,
      t,
      t_next,
      noise_fn,
      cfg.temperature,
    ), None

  x, _ = jax.lax.scan(
    step, x0.astype(jnp.float32), (jnp.arange(n), starts, ends, at_start, at_end), unroll=cfg.unroll
  )
  if final_step:
    x = x + cfg.last_step_size * velocity.apply(x, jax.tree.map(lambda a: a[-1], table))
  return x
