"""Config-driven scaling sweeps: a grid of overrides -> runs -> losses, FLOPs -> a power-law fit.

Grid specs: `model.hidden_size=64,128,256` varies one field; `model.hidden_size,model.intermediate_size
=64:176,128:352` varies fields together (one run per `:`-joined tuple). The runs are the Cartesian
product of the specs, each with the fixed overrides applied first.

Per run: final train loss (last metrics.jsonl record), held-out eval loss (`heldout_loss`, fixed
batch and noise), parameter counts and training FLOPs (`training_flops`, the planner's model). The fit is
L(C) = a * C^-b on the eval losses, and L(C) = E + a * C^-b when that fits better.
"""

import csv
import dataclasses
import itertools
import json
import math
import re
import textwrap
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.data import training_data
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.planning import costs
from nextstep_jax.training import step as step_lib

EMBEDDING_PARAMS = ('embed_tokens',)  # Lookups, not matmuls: excluded from the FLOPs.
HEAD_PARAMS = ('image_head',)  # Run per image token x loss.fm_head_batch_mul, not per position.
CSV_FIELDS = (
  'name',
  'overrides',
  'params',
  'non_embedding_params',
  'head_params',
  'seq_len',
  'steps',
  'batch_size',
  'train_flops',
  'train_loss',
  'eval_loss',
  'eval_im_loss',
  'eval_lm_loss',
)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # e.g. 'hidden_size=64-num_layers=2' (leaf field names).
  overrides: tuple[str, ...]  # 'field.sub=value' strings of this grid point.


def parse_grid_spec(spec: str) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
  """'a.b=1,2' -> (('a.b',), [('1',), ('2',)]); 'a,b=1:2,3:4' -> (('a', 'b'), [('1','2'), ('3','4')])."""
  fields_text, sep, values_text = spec.partition('=')
  fields = tuple(f.strip().removeprefix('config.') for f in fields_text.split(','))
  if not sep or not all(fields) or not values_text.strip():
    raise ValueError(f'grid spec {spec!r} must look like field=v1,v2 or field1,field2=a1:b1,a2:b2')
  values = [tuple(v.strip() for v in item.split(':')) for item in values_text.split(',')]
  for value in values:
    if len(value) != len(fields) or not all(value):
      raise ValueError(
        f'grid spec {spec!r}: value {":".join(value)!r} needs {len(fields)} `:`-separated '
        f'parts, one per field {fields}'
      )
  return fields, values


def expand_grid(specs: Sequence[str]) -> list[Run]:
  """The Cartesian product of the grid specs, in order (the last spec varies fastest)."""
  if not specs:
    raise ValueError('a sweep needs at least one --grid spec')
  parsed = [parse_grid_spec(spec) for spec in specs]
  seen = [field for fields, _ in parsed for field in fields]
  repeated = sorted({field for field in seen if seen.count(field) > 1})
  if repeated:
    raise ValueError(f'fields {repeated} appear in more than one grid spec; give each field once')
  grid = []
  for combo in itertools.product(*[values for _, values in parsed]):
    overrides = tuple(
      f'{field}={value}'
      for (fields, _), values in zip(parsed, combo)
      for field, value in zip(fields, values)
    )
    name = '-'.join(o.rpartition('.')[2] for o in overrides)
    grid.append(Run(name, overrides))
  return grid


def run_config(base: str, fixed: Sequence[str], run: Run):
  """The locked, validated config of `run`: base file, then fixed overrides, then the grid point."""
  config = configlib.load_config(base, [*fixed, *run.overrides])
  configlib.validate(config)
  return config


def param_counts(config) -> dict[str, int]:
  """{'params', 'non_embedding_params', 'head_params'} of the model `config` describes."""
  counts = {'params': 0, 'non_embedding_params': 0, 'head_params': 0}
  for path, variable in nnx.to_flat_state(nnx.state(nextstep.abstract_model(config), nnx.Param)):
    size = math.prod(variable.get_value().shape)
    counts['params'] += size
    if path[0] not in EMBEDDING_PARAMS:
      counts['non_embedding_params'] += size
    if path[0] in HEAD_PARAMS:
      counts['head_params'] += size
  return counts


def training_flops(config, seq_len: int, steps: int | None = None) -> float:
  """Training FLOPs of `steps` (default train.steps) steps of sequences of length `seq_len`: the
  planner's model (`planning.costs.train_model_flops`, forward + backward = 3x forward)."""
  return costs.train_model_flops(config, seq_len) * (config.train.steps if steps is None else steps)


def heldout_loss(workdir: str, num_sequences: int = 256) -> dict[str, float]:
  """Loss pieces {loss, lm_loss, im_loss} of a run's latest checkpoint on its fixed held-out batch
  (fixed FM noise), and that checkpoint's `step`."""
  config = runs.load_config(workdir)
  tok = text_tokenizer.TextTokenizer.load(
    runs.local_copy(epath.Path(workdir) / runs.TOKENIZER_FILE)
  )
  mesh = mesh_lib.make_mesh(config.mesh)
  restored = runs.restore_run(workdir, params_only=True, mesh=mesh, config=config)
  params, extra = restored.state, restored.extra
  params_shardings = jax.tree.map(lambda x: x.sharding, params)
  batch = training_data.heldout_batch(config, tok, num_sequences)
  eval_step = step_lib.build_eval_step(
    config, restored.graphdef, params_shardings, mesh, tok.image_placeholder_id, batch
  )
  metrics = eval_step(params, rules_lib.shard_batch(batch, mesh, config.mesh.rules))
  return {**{k: float(v) for k, v in jax.device_get(metrics).items()}, 'step': extra['step']}


def final_train_loss(workdir: str) -> float:
  """The loss of the last record in a run's metrics.jsonl."""
  lines = (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return float(json.loads(lines[-1])['loss'])


def run_record(
  base: str, fixed: Sequence[str], run: Run, workdir: str, eval_sequences: int
) -> dict:
  """One CSV row for a run's latest checkpoint (see CSV_FIELDS); `steps` and the FLOPs count the
  steps actually trained (fewer than train.steps when a run was stopped early)."""
  config = run_config(base, fixed, run)
  counts = param_counts(config)
  tok = text_tokenizer.TextTokenizer.load(
    runs.local_copy(epath.Path(workdir) / runs.TOKENIZER_FILE)
  )
  grid_h, grid_w = configlib.image_grid(config)
  seq_len = sequences.training_sequence_length(tok, grid_h, grid_w, config.text.max_caption_tokens)
  evaluation = heldout_loss(workdir, eval_sequences)
  return {
    'name': run.name,
    'overrides': ' '.join(run.overrides),
    **counts,
    'seq_len': seq_len,
    'steps': evaluation['step'],
    'batch_size': config.train.batch_size,
    'train_flops': training_flops(config, seq_len, evaluation['step']),
    'train_loss': final_train_loss(workdir),
    'eval_loss': evaluation['loss'],
    'eval_im_loss': evaluation['im_loss'],
    'eval_lm_loss': evaluation['lm_loss'],
  }


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict:
  """Fits L = a * C^-b (least squares in log-log space) and L = E + a * C^-b.

  Returns a dict: `pure` {a, b, b_std, log_rmse} from the linear regression log L = log a - b log C
  (b_std: the standard error of the slope); `with_floor` {E, a, b, b_std, log_rmse} or None when
  the fit fails or E is not in [0, min L); `chosen`: 'with_floor' when its residual standard
  error in log space (with its extra parameter counted) is lower and its exponent is identified
  (b_std < b / 2; over a narrow compute range E and b trade off freely), else 'pure';
  `exponent` and `exponent_std` of the chosen form.
  """
  c, l = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
  if len(c) < 3 or np.any(c <= 0) or np.any(l <= 0):
    raise ValueError(
      f'a power-law fit needs >= 3 points with positive compute and loss, got {len(c)}'
    )
  x, y = np.log(c), np.log(l)
  slope, intercept = np.polyfit(x, y, 1)
  resid = y - (intercept + slope * x)
  sxx = np.sum((x - x.mean()) ** 2)
  dof = max(len(x) - 2, 1)
  pure = {
    'a': float(np.exp(intercept)),
    'b': float(-slope),
    'b_std': float(math.sqrt(np.sum(resid**2) / dof / sxx)),
    'log_rmse': float(math.sqrt(np.sum(resid**2) / dof)),
  }
  with_floor = _fit_with_floor(c, l, pure) if len(c) >= 4 else None
  chosen = (
    'with_floor'
    if with_floor
    and with_floor['log_rmse'] < pure['log_rmse']
    and with_floor['b_std'] < with_floor['b'] / 2
    else 'pure'
  )
  best = with_floor if chosen == 'with_floor' else pure
  return {
    'pure': pure,
    'with_floor': with_floor,
    'chosen': chosen,
    'exponent': best['b'],
    'exponent_std': best['b_std'],
  }


def _fit_with_floor(c: np.ndarray, l: np.ndarray, start: dict) -> dict | None:
  """L = E + a * C^-b by scipy curve_fit in log space (C scaled by its geometric mean)."""
  from scipy import optimize

  scale = math.exp(np.mean(np.log(c)))

  def model(cs, floor, log_a, b):
    return np.log(floor + np.exp(log_a) * cs**-b)

  p0 = (0.5 * l.min(), math.log(start['a'] * scale ** -start['b']), start['b'])
  try:
    params, cov = optimize.curve_fit(
      model,
      c / scale,
      np.log(l),
      p0=p0,
      bounds=([0.0, -50.0, 0.0], [l.min(), 50.0, 10.0]),
      maxfev=20000,
    )
  except (RuntimeError, ValueError):
    return None
  floor, log_a, b = params
  resid = np.log(l) - model(c / scale, *params)
  dof = len(c) - 3
  if dof < 1 or not np.all(np.isfinite(cov)):
    return None
  return {
    'E': float(floor),
    'a': float(math.exp(log_a) * scale**b),
    'b': float(b),
    'b_std': float(math.sqrt(cov[2, 2])),
    'log_rmse': float(math.sqrt(np.sum(resid**2) / dof)),
  }


def write_csv(path: epath.Path, records: Sequence[dict]) -> None:
  with path.open('w') as f:
    out = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    out.writeheader()
    out.writerows(records)


def plot(path: epath.Path, records: Sequence[dict], fit: dict, title: str) -> None:
  """Eval (and train) loss against training FLOPs, log-log, with the fitted curve."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from matplotlib import ticker

  c = np.array([r['train_flops'] for r in records])
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ax.scatter(c, [r['eval_loss'] for r in records], label='held-out loss', zorder=3)
  ax.scatter(
    c, [r['train_loss'] for r in records], marker='x', color='gray', label='final train loss'
  )
  for r in records:
    ax.annotate(
      _short_name(r['name']),
      (r['train_flops'], r['eval_loss']),
      fontsize=6,
      xytext=(3, 3),
      textcoords='offset points',
    )
  grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
  pure = fit['pure']
  ax.plot(
    grid,
    pure['a'] * grid ** -pure['b'],
    label=f'{pure["a"]:.3g} C^-{pure["b"]:.3f} (±{pure["b_std"]:.3f})',
  )
  if fit['chosen'] == 'with_floor':
    w = fit['with_floor']
    ax.plot(
      grid,
      w['E'] + w['a'] * grid ** -w['b'],
      linestyle='--',
      label=f'{w["E"]:.3g} + {w["a"]:.3g} C^-{w["b"]:.3f} (±{w["b_std"]:.3f})',
    )
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.yaxis.set_major_formatter(
    ticker.FormatStrFormatter('%.3g')
  )  # Narrow loss ranges: plain numbers.
  ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter('%.3g'))
  ax.tick_params(axis='y', which='minor', labelsize=6)
  ax.set_xlabel('training FLOPs C')
  ax.set_ylabel('loss')
  ax.set_title(textwrap.fill(title, 80), fontsize=7)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=130)
  plt.close(fig)


def _short_name(name: str) -> str:
  """'hidden_size=64-num_layers=2' -> 'hs64-nl2' (initials of each field, then its value)."""
  parts = [part.partition('=') for part in name.split('-')]
  return '-'.join(''.join(w[0] for w in field.split('_')) + value for field, _, value in parts)


def launch_command(launcher: str, base: str, fixed: Sequence[str], run: Run, workdir: str) -> str:
  """`launcher --config BASE --workdir DIR --config.x=v ...` for one run; `{name}` in `launcher`
  becomes the run name in lower-case letters, digits and hyphens (a valid TPU VM name)."""
  overrides = ' '.join(f'--config.{o}' for o in [*fixed, *run.overrides])
  slug = re.sub(r'[^a-z0-9]+', '-', run.name.lower()).strip('-')
  return (
    f'{launcher.replace("{name}", slug)} --config {base} --workdir {workdir} {overrides}'.strip()
  )


def run_sweep(
  base: str,
  specs: Sequence[str],
  fixed: Sequence[str],
  out_dir: str,
  runs_dir: str | None = None,
  stem: str = 'sweep',
  train: bool = True,
  eval_sequences: int = 256,
  stop_at: int | None = None,
  extra: dict | None = None,
) -> dict:
  """Trains (unless `train` is False: collect only) every grid run one after another, evaluates them,
  fits the power law and writes <out_dir>/<stem>.csv, .png and .json. Returns the summary.

  stop_at: end every run after this step (its learning-rate schedule stays that of train.steps).
  A run whose workdir (<runs_dir or out_dir/runs>/<name>) already holds a checkpoint at or past its
  last step is not retrained, so an interrupted sweep resumes. `extra` is merged into the summary.
  """
  from nextstep_jax.training import loop
  from nextstep_jax.utils import logging as log_utils

  grid_runs = expand_grid(specs)
  configs = [
    run_config(base, fixed, run) for run in grid_runs
  ]  # Every config is valid before any training.
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  runs_root = epath.Path(runs_dir) if runs_dir else out / 'runs'
  progress = log_utils.ProgressLogger(len(grid_runs), 1)
  records = []
  for index, (run, config) in enumerate(zip(grid_runs, configs)):
    workdir = str(runs_root / run.name)
    print(
      f'[{index + 1}/{len(grid_runs)}] {run.name}: {" ".join(run.overrides)} -> {workdir}',
      flush=True,
    )
    last_step = min(stop_at or config.train.steps, config.train.steps)
    if train and max(runs.checkpoint_steps(workdir), default=0) < last_step:
      loop.train(config, workdir, stop_at=stop_at)
    records.append(run_record(base, fixed, run, workdir, eval_sequences))
    progress.update(
      index + 1, {'eval_loss': records[-1]['eval_loss'], 'flops': records[-1]['train_flops']}
    )
  fit = fit_power_law([r['train_flops'] for r in records], [r['eval_loss'] for r in records])
  summary = {
    'base': base,
    'grid': list(specs),
    'fixed': list(fixed),
    'stop_at': stop_at,
    'runs': records,
    'fitted_exponent': fit['exponent'],
    'fitted_exponent_std': fit['exponent_std'],
    'fit': fit,
    'fit_target': 'eval_loss vs train_flops, every run',
    **(extra or {}),
  }
  write_csv(out / f'{stem}.csv', records)
  title = f'{base} {" ".join(specs)}' + (f'; runs end after step {stop_at}' if stop_at else '')
  plot(out / f'{stem}.png', records, fit, title)
  (out / f'{stem}.json').write_text(json.dumps(summary, indent=2) + '\n')
  return summary
