"""A compute-optimal scaling study: isoFLOP curves, fitted laws, a predicted larger run, head allocation.

Stages (each run trains in its own workdir, `<runs_dir>/<run name>`, and is skipped when finished,
resumed from its last checkpoint when not; its results are cached in the workdir as
`scaling_record.json`, so collecting again, locally or from gs://, reads them back):
  1. isoFLOP runs: for every budget C, family shapes (`scaling.family_shape`) that train for
     round(C / FLOPs per step) steps, FLOPs per step from the planner's model
     (`planning.costs.train_model_flops`); each run's learning-rate schedule ends at its last step.
     A curve whose lowest loss is at its smallest or largest size gets the next family shape beyond
     that edge, up to `max_extensions` times, so its vertex is bracketed.
  2. head allocation runs at `head_budget` (default the largest budget): the flow head resized,
     the backbone chosen so the non-embedding count stays near that of the budget's middle
     isoFLOP shape.
  3. fits: a parabola in log N per isoFLOP curve, N*(C) and L*(C) power laws, bootstrap intervals.
  4. the prediction run: the family shape nearest N*(C') at C' = predict_factor x the largest
     budget, trained for C' FLOPs; its measured eval loss against L*(C').
Every run is scored by its held-out eval loss (`sweep.heldout_loss`) and, through the `scorer` the
entry points pass, by the shapes evaluator's prompt accuracy on samples (`evaluate.run_eval`).
"""

import dataclasses
import datetime
import json
import math
import time
from collections.abc import Callable, Sequence

from etils import epath

from nextstep_jax import configlib
from nextstep_jax import runs as runs_lib
from nextstep_jax.experiments import scaling
from nextstep_jax.experiments import study_plots
from nextstep_jax.experiments import sweep
from nextstep_jax.planning import costs

RECORD_FILE = 'scaling_record.json'
# Scores what users see in a run's samples, e.g. {'shapes_seen_accuracy_two': ...}; the entry
# points pass the evaluator's (`evaluate.run_eval.score_workdir`), a layer above this one.
Scorer = Callable[[str], dict]


class StudyInterrupted(RuntimeError):
  """A run stopped early (SIGTERM / preemption) with a checkpoint; rerunning resumes it."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
  """What a study trains: base config and fixed overrides, the family widths, the budgets."""

  base: str
  fixed: tuple[str, ...]
  widths: tuple[int, ...]
  budgets: tuple[float, ...]
  sizes_per_budget: int = 5
  min_steps: int = 100
  max_steps: int = 20000
  tokens_per_param: float = 20.0  # Centre of each budget's sizes (`scaling.chinchilla_prior`).
  predict_factor: float = 4.0
  head_budget: float | None = None  # Default: the largest budget.
  heads: tuple[tuple[int, int], ...] = (
    (16, 1),
    (32, 2),
    (64, 2),
    (96, 2),
    (128, 2),
  )  # (width, layers).
  warmup_fraction: float = 0.05
  checkpoints_per_run: int = 4
  eval_sequences: int = 512
  eval_prompts: int = 50
  bootstrap_samples: int = 1000
  max_extensions: int = 2  # Sizes added per curve whose lowest loss is at a sampled edge.
  min_head_dim: int | None = None  # Narrowest family flow head; default the base's token width.

  def __post_init__(self):
    if len(self.budgets) < 3:
      raise ValueError(
        f'a study needs >= 3 isoFLOP budgets to fit laws with intervals, got {self.budgets}'
      )
    if self.predict_factor < 1:
      raise ValueError(
        f'predict_factor {self.predict_factor} must be >= 1 (the prediction is an extrapolation)'
      )


def shape_config(spec: StudySpec, shape: scaling.Shape | None, steps: int | None = None):
  """The locked, validated config of `shape` (None: the base's model) trained for `steps`
  (default: the base's)."""
  overrides = [*spec.fixed, *(shape.overrides() if shape else ())]
  if steps is not None:
    overrides += schedule_overrides(spec, steps)
  config = configlib.load_config(spec.base, overrides)
  configlib.validate(config)
  return config


def schedule_overrides(spec: StudySpec, steps: int) -> list[str]:
  """train.steps and a warm-up / checkpoint period proportional to it (resumable runs)."""
  return [
    f'train.steps={steps}',
    f'train.warmup_steps={max(1, round(spec.warmup_fraction * steps))}',
    f'train.checkpoint_every={max(1, math.ceil(steps / spec.checkpoints_per_run))}',
  ]


class Costs:
  """Memoised FLOPs per train step and parameter counts of the family shapes."""

  def __init__(self, spec: StudySpec):
    self.spec = spec
    self._flops, self._counts = {}, {}

  def flops_per_step(self, shape: scaling.Shape) -> float:
    if shape not in self._flops:
      self._flops[shape] = costs.train_model_flops(shape_config(self.spec, shape))
    return self._flops[shape]

  def counts(self, shape: scaling.Shape) -> dict[str, int]:
    if shape not in self._counts:
      self._counts[shape] = sweep.param_counts(shape_config(self.spec, shape))
    return self._counts[shape]

  def non_embedding(self, shape: scaling.Shape) -> float:
    return float(self.counts(shape)['non_embedding_params'])


def family(spec: StudySpec) -> list[scaling.Shape]:
  """The family over `spec.widths`, flow heads at least `min_head_dim` (or the token) wide."""
  min_head_dim = spec.min_head_dim or configlib.token_dim(shape_config(spec, None))
  return [scaling.family_shape(w, min_head_dim=min_head_dim) for w in spec.widths]


def plan_isoflop(spec: StudySpec, cost: Costs) -> list[scaling.PlannedRun]:
  """Stage 1: the isoFLOP runs of every budget."""
  return [
    run
    for budget in spec.budgets
    for run in scaling.isoflop_runs(
      budget,
      family(spec),
      cost.flops_per_step,
      cost.non_embedding,
      spec.sizes_per_budget,
      spec.min_steps,
      spec.max_steps,
      spec.tokens_per_param,
    )
  ]


def head_budget(spec: StudySpec) -> float:
  return spec.head_budget or max(spec.budgets)


def plan_heads(
  spec: StudySpec, cost: Costs, isoflop: Sequence[scaling.PlannedRun]
) -> list[scaling.PlannedRun]:
  """Stage 2: one run per flow head at the head budget, the total near its middle isoFLOP shape."""
  budget = head_budget(spec)
  on_curve = [r for r in isoflop if r.budget == budget]
  if not on_curve:
    raise ValueError(f'head_budget {budget:.3g} is not one of the isoFLOP budgets {spec.budgets}')
  total = cost.non_embedding(on_curve[len(on_curve) // 2].shape)
  shapes = scaling.head_allocations(total, spec.heads, spec.widths, cost.non_embedding)
  return [
    scaling.PlannedRun('head', budget, s, round(budget / cost.flops_per_step(s))) for s in shapes
  ]


def plan_prediction(spec: StudySpec, cost: Costs, laws: dict) -> tuple[scaling.PlannedRun, float]:
  """Stage 4: (the family run nearest N*(C') at C' = predict_factor x max budget, N*(C'))."""
  budget = spec.predict_factor * max(spec.budgets)
  n_opt = scaling.law_value(laws['n_opt_law'], budget, falling=False)
  shape = scaling.nearest_shape(family(spec), n_opt, cost.non_embedding)
  return scaling.PlannedRun(
    'prediction', budget, shape, round(budget / cost.flops_per_step(shape))
  ), n_opt


def run_workdir(runs_dir: str, run: scaling.PlannedRun) -> str:
  return str(epath.Path(runs_dir) / run_key(run))


def run_key(run: scaling.PlannedRun) -> str:
  """The workdir name: budget, shape and steps (the same run planned by two stages is one run)."""
  return f'c{run.budget:.3e}-{run.shape.name}-s{run.steps}'.replace('+', '')


def launch_command(launcher: str, spec: StudySpec, run: scaling.PlannedRun, runs_dir: str) -> str:
  overrides = (*spec.fixed, *run.shape.overrides(), *schedule_overrides(spec, run.steps))
  return sweep.launch_command(
    launcher, spec.base, (), sweep.Run(run_key(run), overrides), run_workdir(runs_dir, run)
  )


def evaluate_run(spec: StudySpec, workdir: str, scorer: Scorer | None) -> dict:
  """Held-out eval loss pieces of a run's last checkpoint, and `scorer(workdir)`'s figures."""
  heldout = sweep.heldout_loss(workdir, spec.eval_sequences)
  return {
    'eval_loss': heldout['loss'],
    'eval_im_loss': heldout['im_loss'],
    'eval_lm_loss': heldout['lm_loss'],
    'step': heldout['step'],
    **(scorer(workdir) if scorer else {}),
  }


def read_record(workdir: str, run: scaling.PlannedRun) -> dict | None:
  """The cached record of a finished run, or None."""
  path = epath.Path(workdir) / RECORD_FILE
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  return record if record.get('steps') == run.steps else None


def execute(
  spec: StudySpec,
  cost: Costs,
  run: scaling.PlannedRun,
  runs_dir: str,
  train: bool,
  label: str,
  scorer: Scorer | None = None,
) -> dict | None:
  """Trains `run` (unless finished or `train` is False), evaluates it once and caches the record.
  Returns the record, or None when collecting and the run has not finished."""
  from nextstep_jax.training import loop

  workdir = run_workdir(runs_dir, run)
  record = read_record(workdir, run)
  if record is not None:
    print(f'{label} {run_key(run)}: done (eval loss {record["eval_loss"]:.4f})', flush=True)
    return record
  done = max(runs_lib.checkpoint_steps(workdir), default=0) if epath.Path(workdir).exists() else 0
  train_seconds = 0.0
  if done < run.steps:
    if not train:
      print(f'{label} {run_key(run)}: not finished ({done}/{run.steps} steps)', flush=True)
      return None
    print(f'{label} {run_key(run)}: training {run.steps} steps from step {done}', flush=True)
    start = time.monotonic()
    result = loop.train(shape_config(spec, run.shape, run.steps), workdir)
    train_seconds = time.monotonic() - start
    if result.preempted:
      raise StudyInterrupted(
        f'{workdir}: stopped at step {result.step} of {run.steps} (checkpointed); '
        'rerun the same command to resume'
      )
  start = time.monotonic()
  counts = cost.counts(run.shape)
  record = {
    'name': run_key(run),
    'budget': run.budget,
    'width': run.shape.width,
    'depth': run.shape.depth,
    'fm_head_dim': run.shape.head_dim,
    'fm_head_layers': run.shape.head_layers,
    'steps': run.steps,
    **counts,
    'backbone_params': counts['non_embedding_params'] - counts['head_params'],
    'flops_per_step': cost.flops_per_step(run.shape),
    'train_flops': cost.flops_per_step(run.shape) * run.steps,
    'train_loss': sweep.final_train_loss(workdir),
    **evaluate_run(spec, workdir, scorer),
    'train_seconds_this_invocation': round(train_seconds, 1),
  }
  record['eval_seconds'] = round(time.monotonic() - start, 1)
  if record['step'] != run.steps:
    raise RuntimeError(
      f'{workdir}: latest checkpoint is step {record["step"]}, expected {run.steps}'
    )
  (epath.Path(workdir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + '\n')
  print(
    f'{label} {run_key(run)}: eval loss {record["eval_loss"]:.4f}, '
    f'seen-two accuracy {record.get("shapes_seen_accuracy_two")}',
    flush=True,
  )
  return record


def fit_summary(spec: StudySpec, records: Sequence[dict]) -> tuple[dict, dict]:
  """(point fit, bootstrap) of the isoFLOP records; bootstrap intervals include the prediction budget."""
  budgets = [r['budget'] for r in records]
  log_n = [math.log(r['non_embedding_params']) for r in records]
  loss = [r['eval_loss'] for r in records]
  laws = scaling.fit_laws(budgets, log_n, loss)
  if laws is None:
    raise ValueError(
      'an isoFLOP curve has no loss minimum (the loss falls or rises over every sampled '
      'size); move the family widths so each budget brackets its optimum'
    )
  boot = scaling.bootstrap_laws(
    budgets, log_n, loss, [spec.predict_factor * max(spec.budgets)], spec.bootstrap_samples
  )
  return laws, boot


def head_rows(heads: Sequence[scaling.PlannedRun], isoflop: Sequence[scaling.PlannedRun]) -> list:
  """The head runs plus the family's own head on the budget's middle isoFLOP shape (the total the
  head runs match), each run once."""
  on_curve = [r for r in isoflop if r.budget == heads[0].budget]
  return list({run_key(r): r for r in [*heads, on_curve[len(on_curve) // 2]]}.values())


def head_table(records: Sequence[dict]) -> list[dict]:
  """Rows of the head-allocation table, smallest head share first."""
  keys = (
    'name',
    'budget',
    'width',
    'depth',
    'fm_head_dim',
    'fm_head_layers',
    'non_embedding_params',
    'head_params',
    'backbone_params',
    'steps',
    'train_flops',
    'eval_loss',
    'eval_im_loss',
    'shapes_seen_accuracy_one',
    'shapes_seen_accuracy_two',
    'shapes_heldout_accuracy',
  )
  rows = [
    {k: r.get(k) for k in keys} | {'head_share': r['head_params'] / r['non_embedding_params']}
    for r in records
  ]
  return sorted(rows, key=lambda r: r['head_share'])


def run_study(
  spec: StudySpec,
  out_dir: str,
  runs_dir: str,
  train: bool = True,
  extra: dict | None = None,
  launch_only: str | None = None,
  stem: str = 'scaling_study',
  scorer: Scorer | None = None,
) -> dict | None:
  """Runs (or with `train` False: collects) every stage; writes <out_dir>/<stem>.json and
  <stem>_isoflop.png, _laws.png, _head_allocation.png. `scorer`: evaluator figures added to
  every run's record. `launch_only`: a launcher prefix; prints one command per run of the next
  stage that is not finished (curve extensions and the prediction once the isoFLOP runs are) and
  returns None."""
  cost = Costs(spec)
  isoflop = plan_isoflop(spec, cost)
  heads = plan_heads(spec, cost, isoflop)
  first = list({run_key(r): r for r in [*isoflop, *heads]}.values())
  total_flops = sum(r.budget for r in first)
  print(
    f'study: {len(isoflop)} isoFLOP runs over {len(spec.budgets)} budgets, {len(heads)} head runs, '
    f'1 prediction run at {spec.predict_factor:g}x {max(spec.budgets):.3g} FLOPs; '
    f'{total_flops + spec.predict_factor * max(spec.budgets):.3g} FLOPs in all',
    flush=True,
  )
  done = {}

  def obtain(run: scaling.PlannedRun, label: str) -> dict | None:
    if launch_only is None:
      record = execute(spec, cost, run, runs_dir, train, label, scorer)
    else:
      record = read_record(run_workdir(runs_dir, run), run)
      if record is None:
        print(launch_command(launch_only, spec, run, runs_dir))
    if record is not None:
      done[run_key(run)] = record
    return record

  for index, run in enumerate(first):
    obtain(run, f'[{index + 1}/{len(first) + 1}]')
  if any(run_key(r) not in done for r in isoflop):
    print(
      f'{sum(run_key(r) in done for r in isoflop)}/{len(isoflop)} isoFLOP runs finished; no fit yet.',
      flush=True,
    )
    return None
  for budget in spec.budgets:  # Extend every curve whose lowest loss sits at a sampled edge.
    for _ in range(spec.max_extensions):
      on_curve = [r for r in isoflop if r.budget == budget]
      extra_run = scaling.edge_extension(
        on_curve,
        [done[run_key(r)]['eval_loss'] for r in on_curve],
        family(spec),
        cost.flops_per_step,
        spec.min_steps,
        spec.max_steps,
      )
      if extra_run is None:
        break
      isoflop.append(extra_run)
      if obtain(extra_run, f'[extension of {budget:.3g}]') is None:
        return None
  iso_records = [done[run_key(r)] for r in isoflop]
  try:
    laws, boot = fit_summary(spec, iso_records)
  except ValueError as error:  # Keep the measured runs: the JSON says why there is no law.
    print(f'no fit: {error}', flush=True)
    summary = {
      'base': spec.base,
      'fixed': list(spec.fixed),
      'spec': _spec_json(spec),
      'runs': list(done.values()),
      'fit_error': str(error),
      'head_allocation': head_table([done[run_key(r)] for r in head_rows(heads, isoflop)]),
      **(extra or {}),
    }
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(out_dir) / f'{stem}.json').write_text(json.dumps(summary, indent=2) + '\n')
    study_plots.head_allocation(epath.Path(out_dir) / f'{stem}_head_allocation.png', summary)
    return summary
  prediction_run, n_opt = plan_prediction(spec, cost, laws)
  predicted_loss = scaling.law_value(laws['loss_law'], prediction_run.budget, falling=True)
  print(
    f'fit: N* ~ C^{laws["n_opt_law"]["exponent"]:.3f}, L* ~ C^-{laws["loss_law"]["exponent"]:.3f}; '
    f'predicted at {prediction_run.budget:.3g} FLOPs: N* {n_opt:.3g}, eval loss {predicted_loss:.4f}',
    flush=True,
  )
  measured = obtain(prediction_run, f'[{len(first) + 1}/{len(first) + 1}]')
  if launch_only is not None:
    return None
  prediction = {
    'budget': prediction_run.budget,
    'budget_factor_over_largest_fitted': spec.predict_factor,
    'predicted_n_opt': n_opt,
    'predicted_n_opt_interval': boot['n_opt_at'][0],
    'predicted_eval_loss': predicted_loss,
    'predicted_eval_loss_interval': boot['loss_opt_at'][0],
    'run': run_key(prediction_run),
    'run_non_embedding_params': cost.non_embedding(prediction_run.shape),
  }
  if measured is not None:
    prediction |= {
      'measured_eval_loss': measured['eval_loss'],
      'relative_error': scaling.relative_error(predicted_loss, measured['eval_loss']),
      'within_interval': bool(
        boot['loss_opt_at'][0][0] <= measured['eval_loss'] <= boot['loss_opt_at'][0][1]
      ),
      'measured_shapes_seen_accuracy_two': measured.get('shapes_seen_accuracy_two'),
    }
    done[run_key(prediction_run)] = measured
  all_records = list(done.values())
  compute = [r['train_flops'] for r in all_records]
  summary = {
    'base': spec.base,
    'fixed': list(spec.fixed),
    'spec': _spec_json(spec),
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'flops_model': 'planning.costs.train_model_flops per step x steps (non-embedding N; 6N per token + attention)',
    'runs': all_records,
    'num_runs': len(all_records),
    'compute_span': max(compute) / min(compute),
    'isoflop_budgets': [
      {
        **o,
        'runs': [run_key(r) for r in isoflop if r.budget == o['budget']],
        'best_run': _best_run([done[run_key(r)] for r in isoflop if r.budget == o['budget']]),
      }
      for o in laws['optima']
    ],
    'n_opt_law': laws['n_opt_law'],
    'loss_law': laws['loss_law'],
    'exponent_n_opt': {'value': laws['n_opt_law']['exponent'], 'interval': boot['exponent_n_opt']},
    'exponent_loss': {'value': laws['loss_law']['exponent'], 'interval': boot['exponent_loss']},
    'bootstrap': {k: boot[k] for k in ('samples', 'dropped', 'level')},
    'prediction': prediction,
    'head_allocation': head_table(
      [done[run_key(r)] for r in head_rows(heads, isoflop) if run_key(r) in done]
    ),
    'total_train_seconds_recorded': round(
      sum(r['train_seconds_this_invocation'] for r in all_records), 1
    ),
    **(extra or {}),
  }
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f'{stem}.json').write_text(json.dumps(summary, indent=2) + '\n')
  study_plots.write_all(out, stem, summary, boot)
  return summary


def _best_run(records: Sequence[dict]) -> dict:
  """The measured lowest-loss run of a curve with its evaluator accuracies (what users see)."""
  best = min(records, key=lambda r: r['eval_loss'])
  return {
    k: v
    for k, v in best.items()
    if k in ('name', 'non_embedding_params', 'eval_loss') or 'accuracy' in k
  }


def _spec_json(spec: StudySpec) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}
