"""Sweep tool: grid expansion, override parsing, parameter/FLOP counts, the power-law fit, launch lines."""

import json
import math

import jax
import numpy as np
import pytest

from nextstep_jax import configlib
from nextstep_jax.cli import sweep as sweep_cli
from nextstep_jax.experiments import sweep
from nextstep_jax.planning import costs
from nextstep_jax.training import state as state_lib

# Synthetic losses carry 0.5% multiplicative noise; the exponent is recovered within this.
EXPONENT_TOL = 0.02


def test_grid_expands_to_the_cartesian_product_in_order():
  runs = sweep.expand_grid(['model.hidden_size=64,128', 'model.num_layers=2,4,6'])
  assert [r.overrides for r in runs[:4]] == [
    ('model.hidden_size=64', 'model.num_layers=2'),
    ('model.hidden_size=64', 'model.num_layers=4'),
    ('model.hidden_size=64', 'model.num_layers=6'),
    ('model.hidden_size=128', 'model.num_layers=2'),
  ]
  assert len(runs) == 6 and len({r.name for r in runs}) == 6
  assert runs[0].name == 'hidden_size=64-num_layers=2'


def test_tied_fields_vary_together():
  runs = sweep.expand_grid(['config.model.hidden_size,model.intermediate_size=64:176,128:352'])
  assert [r.overrides for r in runs] == [
    ('model.hidden_size=64', 'model.intermediate_size=176'),
    ('model.hidden_size=128', 'model.intermediate_size=352'),
  ]


@pytest.mark.parametrize(
  'spec, match',
  [
    ('model.hidden_size', 'field=v1,v2'),
    ('model.hidden_size=', 'field=v1,v2'),
    ('model.hidden_size,model.num_layers=64:2,128', '2 `:`-separated parts'),
  ],
)
def test_bad_grid_specs_name_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    sweep.expand_grid([spec])


def test_repeated_field_is_refused():
  with pytest.raises(ValueError, match='more than one grid spec'):
    sweep.expand_grid(['model.num_layers=2,4', 'model.hidden_size,model.num_layers=64:2'])


def test_run_config_applies_fixed_then_grid_overrides_and_validates():
  run = sweep.expand_grid(['model.num_layers=3'])[0]
  config = sweep.run_config('configs/tiny.py', ['train.steps=7', 'model.num_layers=9'], run)
  assert config.train.steps == 7 and config.model.num_layers == 3
  with pytest.raises(configlib.ConfigError, match='num_kv_heads'):
    sweep.run_config('configs/tiny.py', [], sweep.expand_grid(['model.num_kv_heads=3'])[0])
  with pytest.raises(configlib.ConfigError, match='Unknown config field'):
    sweep.run_config('configs/tiny.py', [], sweep.expand_grid(['model.width=3'])[0])


def test_param_counts_and_flops():
  config = configlib.load_config('configs/tiny.py')
  counts = sweep.param_counts(config)
  state = jax.eval_shape(
    lambda: state_lib.init_state(config, state_lib.make_optimizer(config.train))
  )
  assert counts['params'] == sum(math.prod(x.shape) for x in jax.tree.leaves(state['params']))
  m = config.model
  assert counts['params'] - counts['non_embedding_params'] == m.vocab_size * m.hidden_size
  per_step = costs.train_model_flops(config, 30)
  p = costs.decoder_matmul_params(config)
  tokens, b = 16, config.train.batch_size  # tiny: 4x4 image tokens.
  assert p['head'] < counts['head_params']  # Matmul weights only: no biases or norm scales.
  linear = 2 * (
    p['decoder'] * b * 30
    + p['lm_head'] * b * 29
    + (p['image_in'] + p['image_out']) * b * tokens
    + p['head'] * b * tokens * config.loss.fm_head_batch_mul
  )
  attention = 4 * m.num_layers * m.num_heads * m.head_dim * 30 * 31 / 2 * b
  assert per_step == pytest.approx(3 * (linear + attention), rel=1e-12)
  assert sweep.training_flops(config, 30) == per_step * config.train.steps
  assert sweep.training_flops(config, 30, steps=3) == per_step * 3


def test_fit_recovers_a_pure_power_law():
  rng = np.random.default_rng(0)
  c = np.geomspace(1e12, 1e16, 8)
  loss = 30.0 * c**-0.08 * np.exp(0.005 * rng.standard_normal(8))
  fit = sweep.fit_power_law(c, loss)
  assert abs(fit['pure']['b'] - 0.08) < EXPONENT_TOL
  assert 0 < fit['pure']['b_std'] < EXPONENT_TOL


def test_fit_prefers_the_floor_when_there_is_one():
  rng = np.random.default_rng(1)
  c = np.geomspace(1e12, 1e17, 10)
  loss = (0.4 + 2e3 * c**-0.3) * np.exp(0.005 * rng.standard_normal(10))
  fit = sweep.fit_power_law(c, loss)
  assert fit['chosen'] == 'with_floor'
  assert abs(fit['exponent'] - 0.3) < 0.1 and abs(fit['with_floor']['E'] - 0.4) < 0.05
  assert fit['exponent_std'] == fit['with_floor']['b_std']


def test_fit_needs_three_points():
  with pytest.raises(ValueError, match='>= 3 points'):
    sweep.fit_power_law([1.0, 2.0], [1.0, 0.9])


def test_launch_cmd_only_prints_one_command_per_run(capsys, tmp_path):
  assert (
    sweep_cli.main(
      [
        '--base',
        'configs/tiny.py',
        '--grid',
        'model.num_layers=1,2',
        '--set',
        'train.steps=5',
        '--out',
        str(tmp_path),
        '--launch-cmd-only',
        '--launcher',
        'launch/tpu_pod.sh --name s-{name}',
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
    f'launch/tpu_pod.sh --name s-num-layers-{n} --config configs/tiny.py --workdir {tmp_path}/runs/num_layers={n} '
    f'--config.train.steps=5 --config.model.num_layers={n}'
    for n in (1, 2)
  ]


@pytest.mark.slow
def test_sweep_end_to_end_on_tiny_runs(tmp_path):
  out = tmp_path / 'sweep'
  assert (
    sweep_cli.main(
      [
        '--base',
        'configs/tiny.py',
        '--grid',
        'model.num_layers=1,2,3',
        '--set',
        'train.steps=10',
        '--set',
        f'data.cache_dir={tmp_path / "cache"}',
        '--out',
        str(out),
        '--eval-sequences',
        '8',
        '--stop-at',
        '1',
      ]
    )
    == 0
  )
  summary = json.loads((out / 'sweep.json').read_text())
  assert [r['steps'] for r in summary['runs']] == [
    1
  ] * 3  # Stopped after step 1 of a 10-step schedule.
  flops = [r['train_flops'] for r in summary['runs']]
  assert flops == sorted(flops) and flops[0] < flops[-1]
  assert all(
    math.isfinite(r['eval_loss']) and math.isfinite(r['train_loss']) for r in summary['runs']
  )
  assert math.isfinite(summary['fitted_exponent']) and summary['fitted_exponent_std'] >= 0
  assert (
    len((out / 'sweep.csv').read_text().splitlines()) == 4
    and (out / 'sweep.png').stat().st_size > 0
  )
