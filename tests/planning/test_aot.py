"""AOT planner: a tiny config compiled for a v5e:2x2 TPU slice (libtpu, no TPU): train and sample
reports, the layer calibration of the cost analysis, and the not-fitting error naming its knobs."""

import json

import pytest

pytest.importorskip('libtpu', reason='the AOT planner needs the libtpu package (extra tpu-aot)')

from nextstep_jax import configlib
from nextstep_jax.cli import aot as aot_cli
from nextstep_jax.planning import aot
from nextstep_jax.planning import costs

pytestmark = pytest.mark.tpu_aot

TOPOLOGY = 'v5e:2x2'
TRAIN = [
  'model.num_layers=3',
  'model.attention=splash',
  'model.remat_policy=dots_saveable',
  'mesh.data=2',
  'mesh.fsdp=-1',
]


def tiny(*overrides):
  return configlib.load_config('configs/tiny.py', list(overrides))


@pytest.fixture(scope='module')
def devices():
  return aot.topology_devices(TOPOLOGY)


def test_topologies_and_chip_table(devices):
  assert len(devices) == 4 and devices[0].platform == 'tpu'
  assert len(aot.topology_devices('v4:2x2x1')) == 4  # Megacore: one device per chip.
  assert len(aot.topology_devices('v5p:1x1x1')) == 1  # Smaller than one host.
  assert aot.chip_for('v5p:4x4x4').hbm_bytes == 95 * aot.GIB
  with pytest.raises(ValueError, match='unknown TPU generation'):
    aot.chip_for('v9:2x2')


def test_train_plan_reports_fields(devices):
  del devices
  config = tiny(*TRAIN)
  lines = []
  plan = aot.plan(config, TOPOLOGY, 'train', log=lines.append)
  assert plan.fits and plan.chips == 4 and plan.mesh == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert plan.seq_len == configlib.required_seq_len(config) and plan.global_batch == 8
  assert plan.attention == 'splash' and plan.remat == 'dots_saveable'
  assert plan.hbm_bytes == 16 * aot.GIB
  assert plan.total_bytes >= plan.argument_bytes + plan.temp_bytes - plan.alias_bytes > 0
  assert plan.flops_per_step == costs.train_model_flops(config)
  assert plan.compiler_flops_per_device > plan.flops_per_step / plan.devices / 2
  assert plan.estimated_step_s > 0 and 0 < plan.mfu_estimate < 1
  assert plan.compiler_to_model_flops >= 1 and 'x model FLOPs' in plan.notes
  assert 'splash FLOPs added by formula' in plan.notes
  assert any('fits' in line for line in lines)


def test_layer_calibration_matches_an_unrolled_deep_compile(devices):
  """C(1) + 3 (C(2) - C(1)) predicts a 4-layer unrolled compile; the scanned compile counts the
  layer body once and so reports far less."""
  config = tiny('model.num_layers=4', 'mesh.data=-1')
  mesh = aot.make_mesh(config, devices)
  compile_train = lambda c, options=None: aot.compile_train(c, mesh, options)
  calibrated = aot.calibrated_cost(config, compile_train, {'model__num_layers': 4})
  unrolled_compiled = compile_train(
    aot.with_overrides(config, model__scan_unroll=True), aot.CALIBRATION_OPTIONS
  )
  assert aot.while_loops(unrolled_compiled) == 0
  unrolled = aot.cost(unrolled_compiled)
  scanned = aot.cost(compile_train(config))
  assert abs(calibrated[0] / unrolled[0] - 1) < 0.01  # FLOPs: exactly linear in layers.
  assert abs(calibrated[1] / unrolled[1] - 1) < 0.1  # Bytes: fusion differs a little per depth.
  assert scanned[0] < 0.8 * unrolled[0]
  # Full remat recomputes the forward in the backward: unrolled layers keep that recomputation
  # (prevent_cse), so the calibrated cost grows by about a third of the layers' 3x forward.
  remat = aot.calibrated_cost(
    aot.with_overrides(config, model__remat_policy='full'), compile_train, {'model__num_layers': 4}
  )
  assert remat[0] > 1.1 * calibrated[0]
  # All devices together: the model's 6ND plus the forward again (4/3) plus elementwise work.
  assert 1.2 < remat[0] * len(devices) / costs.train_model_flops(config) < 1.5


def test_step_calibration_from_base_two_matches_an_unrolled_compile(devices):
  """The sampling token step calibrated over layers and integration steps from a base of 2 steps
  (TABLE_STEPS_BASE) predicts the loop-free compile at 3 layers x 6 steps (integration steps
  unrolled by model.scan_unroll)."""
  config = tiny(
    'model.num_layers=3',
    'sample.num_steps=6',
    'sample.solver=euler',
    'sample.batch_size=4',
    'mesh.data=-1',
  )
  mesh = aot.make_mesh(config, devices)
  compile_token = lambda c, options: aot.compile_sample(c, mesh, options, ('token_step',))[
    'token_step'
  ]
  calibrated = aot.calibrated_cost(
    config,
    compile_token,
    {'model__num_layers': 3, 'sample__num_steps': 6},
    bases={'sample__num_steps': aot.TABLE_STEPS_BASE},
  )
  unrolled_compiled = compile_token(
    aot.with_overrides(config, model__scan_unroll=True), aot.CALIBRATION_OPTIONS
  )
  assert aot.while_loops(unrolled_compiled) == 0
  unrolled = aot.cost(unrolled_compiled)
  # Per-step FLOPs vary by ~1.5% with the fusion of the step's elementwise work (seen: 1.1% off).
  assert abs(calibrated[0] / unrolled[0] - 1) < 0.03
  assert abs(calibrated[1] / unrolled[1] - 1) < 0.1
  # The scanned integration loop is costed once per token, far below the unrolled count.
  assert aot.cost(compile_token(config, None))[0] < 0.8 * unrolled[0]


def test_calibration_at_the_real_depth_compiles_no_extrapolated_layers():
  """A base equal to the real count (the sampling token step's layers) compiles that count
  itself; only the other axes extrapolate: C = C(48, 2) + 48 (C(48, 3) - C(48, 2))."""
  import ml_collections

  config = ml_collections.ConfigDict(
    {'model': {'num_layers': 48, 'scan_unroll': False}, 'sample': {'num_steps': 50}}
  )
  compiled_at = []

  class Compiled:
    def __init__(self, layers, steps):
      self.layers, self.steps = layers, steps

    def as_text(self):
      return 'HloModule m'

    def cost_analysis(self):
      return {'flops': 1.0, 'bytes accessed': 10.0 * self.layers + 3.0 * self.steps + 0.5}

  def compile_fn(c, options):
    assert c.model.scan_unroll and options == aot.CALIBRATION_OPTIONS
    compiled_at.append((c.model.num_layers, c.sample.num_steps))
    return Compiled(c.model.num_layers, c.sample.num_steps)

  total = aot.calibrated_cost(
    config,
    compile_fn,
    {'model__num_layers': 48, 'sample__num_steps': 50},
    bases={'model__num_layers': 48, 'sample__num_steps': aot.TABLE_STEPS_BASE},
  )
  assert compiled_at == [(48, 2), (48, 3)]
  assert total[1] == 10.0 * 48 + 3.0 * 50 + 0.5


def test_calibration_rejects_compiles_with_loops(devices):
  """Collective matmuls (here forced with the post-SPMD mode) are while loops over the FSDP shards,
  costed once: a calibration compile that holds any loop is refused, not extrapolated."""
  config = tiny('model.num_layers=2', 'mesh.data=1', 'mesh.fsdp=-1')
  mesh = aot.make_mesh(config, devices)
  collective_matmuls = {
    'xla_tpu_all_gather_collective_matmul_mode': 'post_spmd',
    'xla_tpu_reduce_scatter_collective_matmul_mode': 'post_spmd',
  }
  compile_with_loops = lambda c, options: aot.compile_train(c, mesh, options | collective_matmuls)
  with pytest.raises(aot.CalibrationError, match='while loops'):
    aot.calibrated_cost(config, compile_with_loops, {'model__num_layers': 2})


def test_step_estimate_never_claims_more_than_the_model_flops():
  chip = aot.CHIPS['v5p']
  model = 4 * 3.0e12  # Four devices; full remat makes the compiler count ~4/3 of it.
  step, bound, mfu, note = aot.step_estimate(chip, 4, model, 4.0e12, 1e9, 0.0, calibrated=True)
  assert bound == 'compute' and step == pytest.approx(4.0e12 / chip.peak_flops)
  assert mfu == pytest.approx(0.75) and '1.333x model FLOPs' in note
  assert aot.step_estimate(chip, 4, model, 4.0e12, 1e15, 0.0, calibrated=True)[1] == 'memory'
  step, bound, mfu, note = aot.step_estimate(chip, 4, model, 2.9e12, 1e9, 0.0, calibrated=True)
  assert step is None and bound is None and mfu is None
  assert 'INVALID calibration: compiler FLOPs are 0.97x the model FLOPs' in note
  assert aot.step_estimate(chip, 4, model, 4.0e12, 1e9, 0.0, calibrated=False)[2] is None


def test_sample_plan_reports_fields(devices):
  del devices
  config = tiny('model.attention=splash', 'sample.batch_size=4')
  plan = aot.plan(config, TOPOLOGY, 'sample', log=lambda line: None)
  h, w = configlib.image_grid(config)
  assert plan.fits and plan.task == 'sample' and plan.global_batch == 4
  assert plan.seq_len == configlib.required_seq_len(config) - 2
  assert plan.flops_per_step == costs.sample_model_flops(config) > 0
  assert plan.compiler_to_model_flops >= 1 and plan.mfu_estimate is not None
  assert f'step = prefill + {h * w} token steps' in plan.notes
  with pytest.raises(ValueError, match='sample.batch_size=2 images must be divisible by the 4'):
    aot.plan(
      tiny('sample.batch_size=2'), TOPOLOGY, 'sample', calibrate=False, log=lambda line: None
    )


def test_not_fitting_names_the_knobs(tmp_path, capsys):
  out = tmp_path / 'plan.json'
  code = aot_cli.main(
    [
      '--config',
      'configs/tiny.py',
      '--topology',
      TOPOLOGY,
      '--hbm-gib',
      '0.0001',
      '--no-calibrate',
      '--json',
      str(out),
      '--config.mesh.data=4',
    ]
  )
  err = capsys.readouterr().err
  assert code == 1
  assert 'does not fit v5e:2x2' in err
  for knob in (
    '--config.mesh.fsdp=-1',
    '--config.train.batch_size',
    '--config.model.remat_policy=full',
  ):
    assert knob in err
  record = json.loads(out.read_text())
  assert record['fits'] is False and record['total_bytes'] > record['hbm_bytes']


def test_cli_rejects_bad_config():
  assert (
    aot_cli.main(
      ['--config', 'configs/tiny.py', '--topology', TOPOLOGY, '--config.model.attention=flash']
    )
    == 2
  )


def test_not_fitting_suggests_gradient_accumulation():
  mesh = {'data': 1, 'fsdp': 4, 'tensor': 1}
  message = aot.knobs_message(tiny('train.batch_size=16'), mesh, 'train', 'train does not fit.')
  assert (
    '--config.train.microbatches=2 (now 1; activations of 2 of the 4 rows per data/fsdp device'
    in message
  )
  message = aot.knobs_message(
    tiny('train.batch_size=24', 'train.microbatches=2'), mesh, 'train', ''
  )
  assert '--config.train.microbatches=6 (now 2; activations of 1 of the 6 rows' in message
  # One row per device and microbatch already: only the other knobs remain.
  message = aot.knobs_message(
    tiny('train.batch_size=16', 'train.microbatches=4'), mesh, 'train', ''
  )
  assert 'microbatches' not in message and '--config.train.batch_size' in message


def test_finetune_tasks_need_the_matching_lora_setting():
  with pytest.raises(ValueError, match='finetune_lora needs LoRA'):
    aot.plan(tiny(), 'v5e:2x4', 'finetune_lora')
  with pytest.raises(ValueError, match='use task=finetune_lora'):
    aot.plan(tiny('train.lora.rank=4'), 'v5e:2x4', 'finetune_full')


def test_finetune_lora_plan_counts_no_weight_gradients():
  config = tiny('train.lora.rank=4', 'train.batch_size=8')
  result = aot.plan(config, 'v5e:2x4', 'finetune_lora', calibrate=False, log=lambda _: None)
  assert result.task == 'finetune_lora' and result.fits
  assert result.flops_per_step == pytest.approx(costs.train_model_flops(config) * 2 / 3)
  assert 'no weight gradients' in result.notes
