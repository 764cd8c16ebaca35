"""Weight-only quantization (model/quant.py): numpy references for the quantized kernels, the
quantized model against the float model it came from, and sharded save/restore across meshes.

Tolerances. The quantized kernels match a numpy quantizer (exact but for rounding ties). The
quantized model equals the float model holding the stored ints times their scales to float32
rounding (1e-4). Against the unquantized model, on the tiny model with every weight N(0, 0.05^2)
(norm weights 1 + N(0, 0.05^2)): hidden states, head velocities and logits within 2.5% relative L2
for int8 (measured 0.8-1.3%) and 35% for int4 in groups of 32 with the embedding table and the
head quantized too (measured 15-24%; random weights have no outliers for the groups to absorb, so
this is the noise floor of 4 bits, not a trained model's quality: benchmarks/quantized_quality.py
measures that). Per kernel, dequantized weights are within 0.8% (int8) and 12% (int4) relative
RMS of the float weights (Gaussian weights: ~0.7% and ~9% expected).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import qwix
from flax import nnx

import model_testing
from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import nn
from nextstep_jax.model import nextstep
from nextstep_jax.model import quant
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import state as state_lib

INT8 = quant.QuantConfig(mode='int8', head=True, embedding=True)
INT4 = quant.QuantConfig(mode='int4', group_size=32, head=True, embedding=True)
CLOSE_TO_FLOAT = {'int8': 0.025, 'int4': 0.35}
WEIGHT_RMS = {'int8': 0.008, 'int4': 0.12}
QMAX = {'int8': 127, 'int4': 7}


def numpy_quantize(w: np.ndarray, contract_axis: int, mode: str, group: int):
  """Independent reference: symmetric absmax per output channel (int8) or per group of `group`
  along the contracted axis (int4, when the group divides it), scale = absmax / (qmax + 1/2),
  round half to even, saturate; returns (q, scale broadcast to w's shape)."""
  w = np.asarray(
    w, np.float32
  )  # float32 arithmetic: the value/scale ratio at +-absmax rounds alike.
  dim = w.shape[contract_axis]
  groups = dim // group if mode == 'int4' and dim % group == 0 and dim > group else 1
  moved = np.moveaxis(w, contract_axis, 0)
  split = moved.reshape(groups, dim // groups, *moved.shape[1:])
  absmax = np.abs(split).max(axis=1, keepdims=True)
  scale = absmax / np.float32(
    QMAX[mode] + 0.5
  )  # The top bucket is [qmax - 0.5, qmax + 0.5), as in qwix.
  scale = np.where(scale == 0, np.float32(1), scale)
  q = np.clip(np.round(split / scale), -QMAX[mode] - 1, QMAX[mode])
  scale_full = np.broadcast_to(scale, split.shape).reshape(moved.shape)
  return np.moveaxis(q.reshape(moved.shape), 0, contract_axis), np.moveaxis(
    scale_full, 0, contract_axis
  )


def forward(model, ids, tokens, t):
  """Decoder hidden states on text ids, the head's velocity at the last position, LM logits."""
  b, l = ids.shape
  hidden, _ = model(
    model.embed(ids, None, None), jnp.broadcast_to(jnp.arange(l), (b, l)), jnp.ones((b, l), bool)
  )
  velocity = model.image_head(tokens, t, model.head_condition(hidden[:, -1]))
  return {'hidden': hidden, 'velocity': velocity, 'logits': model.lm_logits(hidden)}


def inputs(token_dim=12):
  rng = np.random.default_rng(0)
  return (
    jnp.asarray(rng.integers(0, 512, (2, 12))),
    jnp.asarray(rng.standard_normal((2, token_dim)), jnp.float32),
    jnp.asarray([0.3, 0.8], jnp.float32),
  )


def tiny_model():
  """model_testing.TINY_MODEL with weights N(0, 0.05^2) (norm weights 1 + N(0, 0.05^2))."""
  return model_testing.randomize(model_testing.tiny_model(), seed=1, std=0.05)


def quantized_tiny(qcfg):
  return quant.quantize_model(tiny_model(), qcfg)


def jit_forward(model):
  graphdef, state = nnx.split(model)
  ids, tokens, t = inputs()
  return jax.jit(lambda s: forward(nnx.merge(graphdef, s), ids, tokens, t))(state)


def relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.slow
@pytest.mark.parametrize('qcfg', [INT8, INT4], ids=['int8', 'int4'])
def test_kernels_match_numpy_reference(qcfg):
  float_model, model = tiny_model(), quantized_tiny(qcfg)
  float_params = dict(nnx.to_flat_state(nnx.state(float_model, nnx.Param)))
  paths = quant.quantized_paths(model)
  assert (
    len(paths) == 7 + 2 + 9 + 2
  )  # Decoder q/k/v/o/gate/up/down, projectors, head, vocab tables.
  for path, axis in paths.items():
    value = nnx.state(model, nnx.Param)
    for key in path:
      value = value[key]
    # Stored with the output axes merged (q/k/v: heads * head_dim), the layout TPU matmuls want.
    w = np.asarray(float_params[path].get_value())
    w = w.reshape(quant.flat_shape(w.shape, axis))
    assert value['qvalue'].get_value().shape == w.shape, path
    stacked = path[1] in ('layers', 'res_blocks')
    q_ref, scale_ref = zip(
      *[
        numpy_quantize(x, axis - stacked, qcfg.mode, qcfg.group_size)
        for x in (w if stacked else [w])
      ]
    )
    q_ref, scale_ref = (
      (np.stack(q_ref), np.stack(scale_ref)) if stacked else (q_ref[0], scale_ref[0])
    )
    qvalue = np.asarray(value['qvalue'].get_value()).astype(np.int32)
    assert value['qvalue'].get_value().dtype == quant.QTYPES[qcfg.mode]
    # Exact except at rounding ties (value/scale within 1e-3 of k + 1/2, e.g. -absmax itself),
    # where XLA's division may land on either side.
    w_stacked = np.asarray(w, np.float32)
    ratio = w_stacked / scale_ref
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-3
    np.testing.assert_array_equal(
      np.where(tie, 0, qvalue), np.where(tie, 0, q_ref), err_msg=str(path)
    )
    assert np.abs(qvalue - q_ref).max() <= 1, path
    dequantized = np.asarray(qwix_dequantize(value))
    np.testing.assert_allclose(
      dequantized, qvalue * scale_ref, rtol=1e-6, atol=0, err_msg=str(path)
    )
    rms = np.sqrt(np.mean((dequantized - w) ** 2) / np.mean(w**2))
    assert rms < WEIGHT_RMS[qcfg.mode], (path, rms)


def qwix_dequantize(value):
  return qwix.dequantize(
    qwix.QArray(
      value['qvalue'].get_value(),
      value['scale'].get_value(),
      None,
      value['qvalue'].get_value().dtype,
    )
  )


@pytest.mark.slow
@pytest.mark.parametrize('qcfg', [INT8, INT4], ids=['int8', 'int4'])
def test_quantized_model_runs_dequantized_weights_and_stays_close(qcfg):
  model = quantized_tiny(qcfg)
  quantized = jit_forward(model)
  # Reference: the float model holding the stored int values times their scales (broadcast in
  # numpy), run without qwix (the quantizer itself is checked against numpy above).
  reference_model = tiny_model()
  flat = dict(nnx.to_flat_state(nnx.state(reference_model, nnx.Param)))
  stored = nnx.state(model, nnx.Param)
  for path in quant.quantized_paths(model):
    value = stored
    for key in path:
      value = value[key]
    qvalue = np.asarray(value['qvalue'].get_value()).astype(np.float32)
    scale = np.asarray(value['scale'].get_value())
    for axis, (n, s) in enumerate(zip(qvalue.shape, scale.shape)):
      scale = np.repeat(scale, n // s, axis=axis)
    flat[path].set_value(jnp.asarray((qvalue * scale).reshape(flat[path].get_value().shape)))
  nnx.update(reference_model, nnx.from_flat_state(list(flat.items())))
  dequantized = jit_forward(reference_model)
  unquantized = jit_forward(tiny_model())
  for name in ('hidden', 'velocity', 'logits'):
    np.testing.assert_allclose(
      quantized[name], dequantized[name], rtol=1e-4, atol=1e-4, err_msg=name
    )
    error = relative_error(quantized[name], unquantized[name])
    assert 1e-4 < error < CLOSE_TO_FLOAT[qcfg.mode], (name, error)


@pytest.mark.slow
def test_options_choose_layers_and_scales_carry_channel_axes():
  base = set(quant.quantized_paths(quantized_tiny(quant.QuantConfig(mode='int8', head=False))))
  assert (
    all(p[0] in ('decoder', 'image_in_projector', 'image_out_projector') for p in base)
    and len(base) == 9
  )
  model = quantized_tiny(INT4)
  down = model.decoder.layers.mlp.down_proj.kernel
  assert down.qvalue.get_metadata()['out_sharding'] == ('layers', 'mlp', 'embed')
  assert down.scale.get_metadata()['out_sharding'] == ('layers', None, 'embed')
  assert down.scale.get_value().shape == (2, 96 // 32, 64)
  # The 12-wide token projection is not divisible into groups of 32: one scale per channel.
  assert model.image_head.input_proj.kernel.scale.get_value().shape == (1, 32)
  table = model.embed_tokens.embedding
  assert table.scale.get_value().shape == (512, 2)
  assert table.scale.get_metadata()['out_sharding'] == ('vocab', None)
  # Biases and norms stay float.
  assert model.decoder.layers.self_attn.q_proj.bias.get_value().dtype == jnp.float32


def test_quantize_params_equals_quantize_model():
  float_model = tiny_model()
  direct = nnx.state(quant.quantize_model(tiny_model(), INT4), nnx.Param)
  abstract = nnx.eval_shape(lambda: quant.quantize_model(tiny_model(), INT4))
  streamed = quant.quantize_params(nnx.state(float_model, nnx.Param), abstract, INT4)
  assert jax.tree.structure(direct) == jax.tree.structure(streamed)
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(streamed)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(
      np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)
    )


SIZES = [
  'model.hidden_size=64',
  'model.num_heads=4',
  'model.num_kv_heads=4',
  'model.intermediate_size=128',
  'model.fm_head_dim=64',
  'model.quant.mode=int4',
  'model.quant.group_size=32',
  'model.quant.embedding=True',
]


@pytest.mark.slow
def test_quantized_checkpoint_restores_onto_another_mesh(tmp_path):
  """Quantize on one device, save; restore onto 8 devices as (fsdp 2, tensor 4) and (fsdp 8):
  the same values, really re-laid out, and the same forward outputs."""
  config = configlib.load_config('configs/tiny.py', SIZES)
  float_config = configlib.load_config('configs/tiny.py', [*SIZES[:-3]])
  graphdef, abstract = nnx.split(nextstep.abstract_model(config), nnx.Param)
  float_params = nnx.state(quant_free_model(float_config), nnx.Param)
  params = quant.quantize_params(
    float_params, nextstep.abstract_model(config), quant.QuantConfig.from_config(config.model)
  )
  ckpt = checkpoints.Checkpointer(tmp_path / 'params', keep=1, async_save=False)
  ckpt.save(0, params)
  ckpt.wait()
  ids, tokens, t = inputs(token_dim=configlib.token_dim(config))
  run = lambda p: jax.jit(lambda s: forward(nnx.merge(graphdef, s), ids, tokens, t))(p)
  expected = run(params)
  for fsdp, tensor in ((2, 4), (8, 1)):
    mesh = mesh_lib.make_mesh(
      ml_collections.ConfigDict({'data': 1, 'fsdp': fsdp, 'tensor': tensor})
    )
    restored, _ = ckpt.restore(
      0, rules_lib.abstract_with_shardings(abstract, mesh, config.mesh.rules)
    )
    gate = restored['decoder']['layers']['mlp']['gate_proj']['kernel']
    assert gate['qvalue'].get_value().sharding.mesh.shape == mesh.shape
    shard = gate['qvalue'].get_value().addressable_shards[0].data.shape
    assert shard == (2, 64 // fsdp, 128 // tensor), shard
    assert gate['scale'].get_value().addressable_shards[0].data.shape == (2, 2, 128 // tensor)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(
        np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)
      )
    got = run(restored)
    for name in expected:
      np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
  ckpt.close()


def quant_free_model(config):
  return nextstep.NextStep(nextstep.model_config(config), rngs=nnx.Rngs(3))


def test_config_validation_and_training_refusal():
  for override, message in (
    ('model.quant.mode=int3', 'model.quant.mode'),
    ('model.quant.group_size=0', 'model.quant.group_size'),
  ):
    with pytest.raises(configlib.ConfigError, match=message):
      configlib.validate(configlib.load_config('configs/tiny.py', [override]))
  config = configlib.load_config('configs/tiny.py', ['model.quant.mode=int8'])
  with pytest.raises(ValueError, match="train with model.quant.mode='none'"):
    state_lib.init_state(config, state_lib.make_optimizer(config.train))
  with pytest.raises(configlib.ConfigError, match='must be one of none, int8, int4'):
    configlib.validate(configlib.load_config('configs/tiny.py', ['model.quant.mode=fp8']))


@pytest.mark.parametrize(
  'rows',
  # The layer has 4 groups: 2 rows mask into 8 rows; 33 x 4 = 132 masked rows would be too many.
  [2, nn.MASKED_MATMUL_MAX_ROWS // 4 + 1, 3 * nn.GROUPED_MATMUL_MAX_ROWS],
  ids=['masked', 'grouped', 'dequantized'],
)
def test_int4_dense_matches_numpy_on_every_matmul_path(rows):
  """An int4 Dense with merged output axes: a few rows go through the per-group masked matmul,
  more contract group by group (both decode paths), many go through qwix's dequantized matmul;
  each equals x @ (q * s) + b computed in numpy from the stored int4 values and group scales
  (float32, 1e-5), and stays near the float layer."""
  dense = nn.Dense(
    128,
    (4, 24),
    ('embed', 'heads', 'head_dim'),
    use_bias=True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(0),
  )
  dense.bias.set_value(jax.random.normal(jax.random.key(2), (4, 24)))
  float_kernel = np.asarray(dense.kernel.get_value()).reshape(128, 96)
  dense.kernel = quant._quantized_variable(
    dense.kernel, 0, quant.QuantConfig(mode='int4', group_size=32), jnp.float32
  )
  q = np.asarray(dense.kernel.qvalue.get_value()).astype(np.float32)
  scale = np.asarray(dense.kernel.scale.get_value())
  assert q.shape == (128, 96) and scale.shape == (4, 96)  # 128 inputs in groups of 32.
  x = np.asarray(jax.random.normal(jax.random.key(1), (rows, 128)), np.float32)
  bias = np.asarray(dense.bias.get_value()).reshape(96)
  expected = x @ (q * np.repeat(scale, 32, axis=0)) + bias
  got = np.asarray(dense(jnp.asarray(x))).reshape(rows, 96)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert relative_error(got - bias, x @ float_kernel) < CLOSE_TO_FLOAT['int4']
