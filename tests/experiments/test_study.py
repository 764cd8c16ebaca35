"""Study orchestration: planner FLOPs, plans per stage, launch lines, resuming and collecting from records."""

import json
import math

import pytest

from nextstep_jax import configlib
from nextstep_jax.experiments import scaling
from nextstep_jax.experiments import study
from nextstep_jax.planning import costs

FIXED = ('train.batch_size=8',)


def small_spec(**changes) -> study.StudySpec:
  fields = {
    'base': 'configs/shapes.py',
    'fixed': FIXED,
    'widths': (16, 32, 48, 64),
    'budgets': (2e9, 4e9, 8e9),
    'sizes_per_budget': 3,
    'min_steps': 4,
    'max_steps': 60,
    'predict_factor': 4.0,
    'heads': ((16, 1), (32, 2)),
    'min_head_dim': 32,  # Small heads keep these plans cheap; the default is the token width.
  }
  return study.StudySpec(**(fields | changes))


def test_family_heads_are_at_least_the_token_width_by_default():
  config = configlib.load_config('configs/shapes.py', list(FIXED))
  token = configlib.token_dim(config)
  assert token == 192
  default = study.family(small_spec(min_head_dim=None, widths=(16, 256, 512)))
  assert [s.head_dim for s in default] == [token, token, 256]
  assert [s.head_dim for s in study.family(small_spec())] == [32, 32, 32, 32]


def test_flops_per_step_is_the_planners_model():
  spec = small_spec()
  shape = scaling.family_shape(48)
  config = configlib.load_config('configs/shapes.py', [*FIXED, *shape.overrides()])
  assert study.Costs(spec).flops_per_step(shape) == costs.train_model_flops(config)


def test_spec_refuses_too_few_budgets_and_shrinking_predictions():
  with pytest.raises(ValueError, match='>= 3 isoFLOP budgets'):
    small_spec(budgets=(1e9, 2e9))
  with pytest.raises(ValueError, match='predict_factor'):
    small_spec(predict_factor=0.5)


def test_schedule_follows_the_run_length():
  spec = small_spec()
  config = study.shape_config(spec, scaling.family_shape(32), steps=400)
  assert (config.train.steps, config.train.warmup_steps, config.train.checkpoint_every) == (
    400,
    20,
    100,
  )
  assert config.train.batch_size == 8 and config.model.hidden_size == 32


def test_plans_and_launch_lines(capsys, tmp_path):
  spec = small_spec()
  cost = study.Costs(spec)
  isoflop = study.plan_isoflop(spec, cost)
  assert sorted({r.budget for r in isoflop}) == [2e9, 4e9, 8e9] and len(isoflop) == 9
  for run in isoflop:
    assert run.steps == round(run.budget / cost.flops_per_step(run.shape))
  heads = study.plan_heads(spec, cost, isoflop)
  assert [(r.shape.head_dim, r.shape.head_layers) for r in heads] == [(16, 1), (32, 2)]
  assert all(r.budget == 8e9 for r in heads)
  laws = {
    'n_opt_law': {'coefficient': 1.0, 'exponent': 0.5},
    'loss_law': {'coefficient': 1.0, 'exponent': 0.1},
  }
  run, n_opt = study.plan_prediction(spec, cost, laws)
  assert run.budget == 3.2e10 and n_opt == pytest.approx(3.2e10**0.5)
  assert run.shape == scaling.nearest_shape(study.family(spec), n_opt, cost.non_embedding)
  runs_dir = str(tmp_path / 'runs')
  assert (
    study.run_study(spec, str(tmp_path / 'out'), runs_dir, launch_only='train --name {name}')
    is None
  )
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('train')]
  assert len(lines) == len({study.run_key(r) for r in isoflop + heads})  # The shared head run once.
  first = isoflop[0]
  assert lines[0].startswith(
    f'train --name {study.run_key(first).replace(".", "-")} --config configs/shapes.py '
    f'--workdir {runs_dir}/{study.run_key(first)} --config.train.batch_size=8'
  )
  assert f'--config.train.steps={first.steps}' in lines[0]


def test_finished_runs_are_read_back_not_retrained(tmp_path, monkeypatch):
  spec = small_spec()
  cost = study.Costs(spec)
  run = study.plan_isoflop(spec, cost)[0]
  workdir = tmp_path / study.run_key(run)
  workdir.mkdir()
  record = {'name': study.run_key(run), 'steps': run.steps, 'eval_loss': 1.25}
  (workdir / study.RECORD_FILE).write_text(json.dumps(record))
  from nextstep_jax.training import loop

  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail('a finished run was retrained'))
  assert study.execute(spec, cost, run, str(tmp_path), train=True, label='') == record
  # A record of another step count (the run was replanned) is not this run's result.
  (workdir / study.RECORD_FILE).write_text(json.dumps(record | {'steps': run.steps + 1}))
  assert study.read_record(str(workdir), run) is None
  # Collecting without training: an unfinished run gives no record.
  assert study.execute(spec, cost, run, str(tmp_path), train=False, label='') is None


def test_study_fits_predicts_and_plots_from_run_records(tmp_path, monkeypatch):
  """Every run's record is synthetic (loss a known function of N and C): the summary must carry
  the recovered laws, the prediction against the 'measured' prediction run, the head table, PNGs."""
  spec = small_spec(bootstrap_samples=100, sizes_per_budget=4, max_steps=120)

  def fake_loss(budget, n):  # Vertex at N* = 1.5 C^0.5 (among each budget's sizes), L* = 20 C^-0.1.
    return 20.0 * budget**-0.1 + 0.05 * (math.log(n) - math.log(1.5 * budget**0.5)) ** 2

  def fake_execute(spec_, cost_, run, runs_dir, train, label, scorer):
    del spec_, runs_dir, train, label, scorer
    n = cost_.non_embedding(run.shape)
    counts = cost_.counts(run.shape)
    return {
      'name': study.run_key(run),
      'budget': run.budget,
      'width': run.shape.width,
      'depth': run.shape.depth,
      'fm_head_dim': run.shape.head_dim,
      'fm_head_layers': run.shape.head_layers,
      'steps': run.steps,
      **counts,
      'backbone_params': counts['non_embedding_params'] - counts['head_params'],
      'train_flops': run.steps * cost_.flops_per_step(run.shape),
      'eval_loss': fake_loss(run.budget, n),
      'eval_im_loss': 0.0,
      'shapes_seen_accuracy_one': 0.5,
      'shapes_seen_accuracy_two': 0.25,
      'shapes_heldout_accuracy': 0.1,
      'train_seconds_this_invocation': 1.0,
    }

  monkeypatch.setattr(study, 'execute', fake_execute)
  summary = study.run_study(spec, str(tmp_path), str(tmp_path / 'runs'), stem='s')
  isoflop = [
    r
    for r in summary['runs']
    if r['name'] in {n for b in summary['isoflop_budgets'] for n in b['runs']}
  ]
  assert len(summary['isoflop_budgets']) == 3 and len(isoflop) == 12
  for budget in summary['isoflop_budgets']:
    curve = [r for r in isoflop if r['name'] in budget['runs']]
    assert budget['best_run']['eval_loss'] == min(r['eval_loss'] for r in curve)
    assert budget['best_run']['shapes_seen_accuracy_two'] == 0.25
  # The parabola cannot represent the synthetic curve exactly only where sizes are sparse: loose check.
  assert summary['exponent_loss']['value'] == pytest.approx(0.1, abs=0.02)
  assert summary['exponent_n_opt']['value'] == pytest.approx(0.5, abs=0.05)
  lo, hi = summary['exponent_n_opt']['interval']
  assert lo <= summary['exponent_n_opt']['value'] <= hi
  p = summary['prediction']
  assert p['budget'] == pytest.approx(4 * 8e9)
  assert p['predicted_eval_loss'] == pytest.approx(20.0 * p['budget'] ** -0.1, rel=0.02)
  assert p['relative_error'] == pytest.approx(
    abs(p['predicted_eval_loss'] - p['measured_eval_loss']) / p['measured_eval_loss']
  )
  table = summary['head_allocation']  # The head runs and the family's own head on the middle shape.
  middle = summary['isoflop_budgets'][-1]['runs'][len(summary['isoflop_budgets'][-1]['runs']) // 2]
  assert middle in [r['name'] for r in table] and len({r['name'] for r in table}) == len(table)
  assert {(r['fm_head_dim'], r['fm_head_layers']) for r in table} >= {(16, 1), (32, 2)}
  assert table[0]['fm_head_dim'] == 16
  shares = [r['head_share'] for r in table]
  assert shares == sorted(shares) and all(r['budget'] == 8e9 for r in table)
  written = json.loads((tmp_path / 's.json').read_text())
  assert written['num_runs'] == len(summary['runs']) == len({r['name'] for r in summary['runs']})
  for name in ('isoflop', 'laws', 'head_allocation'):
    assert (tmp_path / f's_{name}.png').stat().st_size > 10_000


def test_cli_compute_optimal_launch_lines(capsys, tmp_path):
  from nextstep_jax.cli import sweep as sweep_cli

  assert (
    sweep_cli.main(
      [
        '--base',
        'configs/shapes.py',
        '--budgets',
        '2e9,4e9,8e9',
        '--widths',
        '16,32,48,64',
        '--sizes-per-budget',
        '3',
        '--min-steps',
        '4',
        '--max-steps',
        '60',
        '--set',
        'train.batch_size=8',
        '--min-head-dim',
        '32',
        '--heads',
        '16x1,32x2',
        '--out',
        str(tmp_path),
        '--launch-cmd-only',
        '--launcher',
        'go',
      ]
    )
    == 0
  )
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('go ')]
  assert len(lines) >= 9 and all(f'--workdir {tmp_path}/runs/c' in l for l in lines)
  assert (
    sweep_cli.main(
      [
        '--base',
        'configs/shapes.py',
        '--budgets',
        '1e12',
        '--grid',
        'model.num_layers=1,2',
        '--out',
        str(tmp_path),
      ]
    )
    == 2
  )  # Usage error: one mode at a time.
  assert 'either --grid' in capsys.readouterr().err
  bad_heads = ['--base', 'configs/shapes.py', '--budgets', '1e12,2e12,4e12', '--heads', '64-2']
  for heads in ('64-2', '64x2x3'):
    bad_heads[-1] = heads
    assert sweep_cli.main([*bad_heads, '--out', str(tmp_path)]) == 2
    assert 'WIDTHxLAYERS' in capsys.readouterr().err


def test_a_preempted_run_stops_the_study_with_a_resume_hint(tmp_path, monkeypatch):
  spec = small_spec()
  cost = study.Costs(spec)
  run = study.plan_isoflop(spec, cost)[0]
  from nextstep_jax.training import loop

  monkeypatch.setattr(
    loop, 'train', lambda config, workdir: loop.TrainResult(workdir, 3, {}, 0.1, preempted=True)
  )
  with pytest.raises(study.StudyInterrupted, match=f'step 3 of {run.steps}.*rerun'):
    study.execute(spec, cost, run, str(tmp_path), train=True, label='')


def test_curves_without_a_minimum_keep_their_runs_and_say_why(tmp_path, monkeypatch):
  spec = small_spec(sizes_per_budget=4, max_steps=120, max_extensions=0)

  def falling_execute(
    spec_, cost_, run, runs_dir, train, label, scorer
  ):  # Bigger is always better.
    del spec_, runs_dir, train, label, scorer
    counts = cost_.counts(run.shape)
    return {
      'name': study.run_key(run),
      'budget': run.budget,
      'width': run.shape.width,
      'depth': run.shape.depth,
      'fm_head_dim': run.shape.head_dim,
      'fm_head_layers': run.shape.head_layers,
      'steps': run.steps,
      **counts,
      'backbone_params': counts['non_embedding_params'] - counts['head_params'],
      'train_flops': run.budget,
      'eval_loss': 10.0 / math.log(counts['non_embedding_params']),
      'eval_im_loss': 0.0,
      'train_seconds_this_invocation': 1.0,
    }

  monkeypatch.setattr(study, 'execute', falling_execute)
  summary = study.run_study(spec, str(tmp_path), str(tmp_path / 'runs'), stem='s')
  assert 'no loss minimum' in summary['fit_error'] and 'prediction' not in summary
  assert len(summary['runs']) == len(json.loads((tmp_path / 's.json').read_text())['runs']) >= 12
