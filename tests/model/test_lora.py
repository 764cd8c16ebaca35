"""LoRA through qwix (model/lora.py): zero-initialised adapters leave the model unchanged, merged
adapters equal the adapter model, the adapter term is W + (alpha / r) a @ b per an independent numpy
reference, and LoRA training updates only the adapters (plus the flow head with train_head)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_testing
from nextstep_jax import configlib
from nextstep_jax.data import builtin_source
from nextstep_jax.model import lora
from nextstep_jax.model import nextstep
from nextstep_jax.model import quant
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

jax.config.update('jax_default_matmul_precision', 'highest')

# Merging changes float32 summation order only (x @ (W + s a b) vs x @ W + s (x a) b); seen on
# CPU: 3e-7 on hidden states of magnitude ~1.
MERGE_ATOL = 2e-5
CFG = lora.LoraConfig(rank=4, alpha=8.0)


def forward(model, seed=0):
  """Decoder hidden states and the head condition on random embeddings: (hidden, condition)."""
  d = model.cfg.backbone.hidden_size
  x = jax.random.normal(jax.random.key(seed), (2, 7, d))
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  valid = jnp.ones((2, 7), bool).at[0, :2].set(False)
  hidden, _ = model(x, positions, valid)
  return hidden, model.head_condition(hidden)


def randomize_adapters(model, seed):
  """Every adapter <- normal(0, 0.1): the b factors become nonzero. Returns the model."""
  rng = np.random.default_rng(seed)
  adapters = nnx.state(model, nnx.LoRAParam)
  for _, var in nnx.to_flat_state(adapters):
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.get_value().shape), jnp.float32))
  nnx.update(model, adapters)
  return model


@pytest.mark.slow
def test_adapters_are_stacked_lora_params_of_every_target():
  model = lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  assert len(flat) == 2 * len(lora.DENSE_PATHS)
  a = flat[('decoder', 'layers', 'self_attn', 'q_proj', 'kernel_lora_a')].get_value()
  b = flat[('decoder', 'layers', 'self_attn', 'q_proj', 'kernel_lora_b')].get_value()
  assert a.shape == (2, 64, 4) and b.shape == (2, 4, 4 * 16)  # (layers, D, r), (layers, r, H*E).
  assert not np.any(b) and np.std(a) > 0
  assert not np.allclose(a[0], a[1])  # Independent init per layer.
  meta = flat[('decoder', 'layers', 'mlp', 'down_proj', 'kernel_lora_a')].get_metadata()
  assert meta['out_sharding'] == ('layers', 'mlp', None)


@pytest.mark.slow
def test_zero_initialised_adapters_equal_the_base_model():
  base = model_testing.tiny_model()
  want = forward(base)
  adapted = lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0))
  for got, ref in zip(forward(adapted), want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.slow
def test_nonzero_adapters_change_the_output_and_merge_to_the_same_model():
  adapted = randomize_adapters(lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0)), 3)
  base_out = forward(model_testing.tiny_model())
  adapter_out = forward(adapted)
  assert float(jnp.abs(adapter_out[0] - base_out[0]).max()) > 0.1
  params = nnx.state(adapted, nnx.Param)
  merged = lora.merge_adapters(params, CFG)
  assert not lora.has_adapters(merged) and lora.has_adapters(params)
  base_graph = nnx.graphdef(model_testing.tiny_model())
  merged_model = nnx.merge(base_graph, merged)
  for got, want in zip(forward(merged_model), adapter_out):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=MERGE_ATOL, rtol=0)


def test_merged_kernel_matches_a_numpy_reference():
  adapted = randomize_adapters(lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0)), 4)
  flat = {
    path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(adapted, nnx.Param))
  }
  merged = {
    path: np.asarray(v.get_value())
    for path, v in nnx.to_flat_state(lora.merge_adapters(nnx.state(adapted, nnx.Param), CFG))
  }
  prefix = ('decoder', 'layers', 'self_attn', 'k_proj')
  w, a, b = (flat[prefix + (n,)] for n in ('kernel', 'kernel_lora_a', 'kernel_lora_b'))
  want = w.astype(np.float64) + 2.0 * np.einsum('lir,lro->lio', a, b).reshape(w.shape)
  np.testing.assert_allclose(merged[prefix + ('kernel',)], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
    merged[('image_head', 'input_proj', 'kernel')], flat[('image_head', 'input_proj', 'kernel')]
  )


def test_targets_select_layers_and_bad_patterns_are_refused():
  cfg = lora.LoraConfig(rank=2, alpha=2.0, targets=('self_attn/(q|v)_proj',))
  model = lora.add_adapters(model_testing.tiny_model(), cfg, nnx.Rngs(0))
  names = {path[-2] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert names == {'q_proj', 'v_proj'}
  with pytest.raises(ValueError, match=r"'attn/q_proj' matches no linear layer"):
    lora.lora_provider(lora.LoraConfig(rank=2, alpha=2.0, targets=('attn/q_proj',)))


def lora_config(cache_dir, *extra):
  return configlib.load_config(
    'configs/tiny.py',
    [
      f'data.cache_dir={cache_dir}',
      'train.batch_size=4',
      'train.warmup_steps=0',
      'train.lora.rank=4',
      'train.lora.alpha=8.0',
      *extra,
    ],
  )


def train_two_steps(config):
  """(initial params, params after 2 steps, opt_state) as flat dicts of numpy arrays."""
  configlib.validate(config)
  tok = builtin_source.load_text_tokenizer(config)
  source = builtin_source.BuiltinSource(config, tok)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = state_lib.make_optimizer(config.train)
  graphdef, state, shardings = state_lib.create_sharded_state(config, tx, mesh)
  flat = lambda s: {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(s)}
  before = flat(state['params'])
  batch = source.batch(0)
  train_step = step_lib.build_train_step(
    config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, batch
  )
  for step in range(2):
    state, metrics = train_step(
      state, rules_lib.shard_batch(source.batch(step), mesh, config.mesh.rules)
    )
    assert np.isfinite(float(metrics['loss']))
  return before, flat(state['params']), state['opt_state']


@pytest.mark.slow
@pytest.mark.parametrize('train_head', [False, True])
def test_lora_training_updates_only_the_adapters(tmp_path, train_head):
  config = lora_config(tmp_path / 'cache', f'train.lora.train_head={train_head}')
  before, after, opt_state = train_two_steps(config)
  assert before.keys() == after.keys()
  changed = {path for path in before if not np.array_equal(before[path], after[path])}
  adapters = {path for path in before if str(path[-1]).endswith(lora.ADAPTER_SUFFIXES)}
  head = {path for path in before if path[0] == lora.HEAD_PATH}
  # b starts at zero so a gets no gradient on step 1; after two steps every adapter moved.
  assert adapters <= changed
  if train_head:  # The head's zero-initialised output layers keep some head grads zero early on.
    assert changed - adapters <= head and changed & head
  else:
    assert changed == adapters
  # Optimizer moments exist only for the trained params.
  trained = len(adapters) + (len(head) if train_head else 0)
  moments = [leaf for leaf in jax.tree.leaves(opt_state) if getattr(leaf, 'ndim', 0) > 0]
  assert len(moments) == 2 * trained


def test_lora_fraction_counts_only_the_adapters(tmp_path):
  config = lora_config(tmp_path / 'cache')
  params = nnx.state(nextstep.abstract_model(config), nnx.Param)
  trained, total = lora.count_trainable(params, lora.LoraConfig.from_config(config))
  # Per layer: q, k, v, o, gate, up, down adapters of rank 4 (tiny: D 64, H*E 64, KV*E 32, F 128).
  per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
  assert trained == 2 * per_layer
  assert 0 < trained / total < 0.1


INT8 = quant.QuantConfig(mode='int8', head=False)


@pytest.mark.slow
def test_qlora_zero_adapters_equal_the_quantized_base_and_add_the_lora_term():
  want = forward(quant.quantize_model(model_testing.tiny_model(), INT8))
  qlora = quant.quantize_model(
    lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0), True), INT8
  )
  # Zero adapters add exactly 0; the extra low-rank dot only regroups XLA's fusions (f32 rounding).
  for got, ref in zip(forward(qlora), want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Nonzero adapters add the float LoRA model's change up to int8 rounding of the base kernels.
  adapted = lambda for_q: randomize_adapters(
    lora.add_adapters(model_testing.tiny_model(), CFG, nnx.Rngs(0), for_q), 3
  )
  qlora_change = forward(quant.quantize_model(adapted(True), INT8))[0] - want[0]
  float_change = forward(adapted(False))[0] - forward(model_testing.tiny_model())[0]
  mismatch = float(jnp.abs(qlora_change - float_change).max())
  assert mismatch < 0.1 * float(jnp.abs(float_change).max()), mismatch


@pytest.mark.slow
def test_qlora_training_updates_only_the_adapters(tmp_path):
  config = lora_config(tmp_path / 'cache', 'model.quant.mode=int8', 'model.quant.head=False')
  before, after, opt_state = train_two_steps(config)
  changed = {path for path in before if not np.array_equal(before[path], after[path])}
  adapters = {path for path in before if str(path[-1]).endswith(lora.ADAPTER_SUFFIXES)}
  assert changed == adapters
  assert before[('decoder', 'layers', 'mlp', 'up_proj', 'kernel', 'qvalue')].dtype == np.int8
  moments = [leaf for leaf in jax.tree.leaves(opt_state) if getattr(leaf, 'ndim', 0) > 0]
  assert len(moments) == 2 * len(adapters)
