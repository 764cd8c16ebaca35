"""The NextStep model: parameter counts and layout (docs/model.md §1, §8), sharding metadata,
embeddings, tied embeddings and gen_pos_embed (§7)."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.model import nextstep as ns

PROJ_RTOL = 1e-5  # float32 Dense (12 -> 64) vs float64 numpy.
PROJ_ATOL = 1e-6  # Same, entries near 0.
TABLE_ATOL = 1e-6  # float32 table vs float64 sin/cos of arguments <= 32.
LOGITS_RTOL = 1e-4  # float32 (64-term dot products, |logit| ~ 1) vs float64 numpy.
LOGITS_ATOL = 1e-5  # Same, entries near 0.
ATTEND_TOL = 1e-6  # lm_logits vs embed_tokens.attend: the same float32 matmul.

LARGE_TOTAL = 14_953_814_080
LARGE_HEAD = 157_228_096
LARGE_SIZES = dict(
  vocab_size=152064,
  hidden_size=5120,
  num_layers=48,
  num_heads=40,
  num_kv_heads=8,
  head_dim=128,
  intermediate_size=13824,
  rms_norm_eps=1e-5,
  rope_theta=1e6,
  attention_bias=True,
  o_attention_bias=False,
  tie_word_embeddings=False,
  latent_channels=16,
  latent_patch_size=2,
  fm_head_dim=1536,
  fm_head_layers=12,
)

# Small config: D hidden, H heads, K kv heads, E head_dim, F mlp, V vocab, NL layers, T token dim,
# W head width, NB head blocks.
D, H, K, E, F, V, NL, T, W, NB = 64, 4, 2, 16, 96, 512, 2, 12, 32, 2
SMALL_SIZES = dict(
  vocab_size=V,
  hidden_size=D,
  num_layers=NL,
  num_heads=H,
  num_kv_heads=K,
  head_dim=E,
  intermediate_size=F,
  latent_channels=3,
  latent_patch_size=2,
  fm_head_dim=W,
  fm_head_layers=NB,
)


def model_config(**overrides):
  m = get_base_config().model
  m.update(overrides)
  return ns.ModelConfig.from_config(m)


def flat_params(model_or_state):
  state = (
    model_or_state
    if isinstance(model_or_state, nnx.State)
    else nnx.state(model_or_state, nnx.Param)
  )
  return {'.'.join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope='module')
def small():
  return ns.NextStep(model_config(**SMALL_SIZES), rngs=nnx.Rngs(0))


# ----- parameter counts of NextStep-1-Large -----


def _large_configs():
  configs = [('base_with_doc_sizes', model_config(**LARGE_SIZES))]
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'nextstep1_large.py')
  if os.path.exists(path):
    spec = importlib.util.spec_from_file_location('nextstep1_large_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs.append(('nextstep1_large_py', ns.ModelConfig.from_config(module.get_config().model)))
  return configs


@pytest.mark.parametrize(
  'name, cfg', _large_configs(), ids=lambda x: x if isinstance(x, str) else ''
)
def test_large_parameter_count(name, cfg):
  abstract = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert ns.count_params(params) == LARGE_TOTAL, name
  assert ns.count_params(nnx.state(abstract.image_head, nnx.Param)) == LARGE_HEAD
  flat = flat_params(params)
  count = lambda prefix: sum(
    int(np.prod(v.get_value().shape)) for k, v in flat.items() if k.startswith(prefix)
  )
  assert count('embed_tokens') == count('lm_head') == 778_567_680
  assert count('decoder.layers') == 48 * 275_268_608
  assert (
    count('decoder') == 14_770_033_664 - 2 * 778_567_680
  )  # Backbone = embeddings + layers + norm.
  assert count('image_in_projector') == 332_800
  assert count('image_out_projector') == 26_219_520
  assert count('image_head.time_embed') == 2_755_584
  assert count('image_head.cond_embed') == 7_865_856
  assert count('image_head.input_proj') == 99_840
  assert count('image_head.res_blocks') == 12 * 11_807_232
  assert count('image_head.final_layer') == 4_820_032


# ----- layout: one-to-one with the official names of §8 -----


def official_table(nl=NL, nb=NB):
  """official torch name -> (our param path, torch shape, our -> torch shape transform)."""
  t = lambda s: tuple(reversed(s))  # Linear: kernel (in, out) = W.T.
  table = {
    'embed_tokens.weight': ('embed_tokens.embedding', (V, D), lambda s: s),
    'lm_head.weight': ('lm_head.kernel', (V, D), t),
    'norm.weight': ('decoder.norm.weight', (D,), lambda s: s),
    'image_in_projector.weight': ('image_in_projector.kernel', (D, T), t),
    'image_in_projector.bias': ('image_in_projector.bias', (D,), lambda s: s),
    'image_out_projector.weight': ('image_out_projector.kernel', (D, D), t),
    'image_out_projector.bias': ('image_out_projector.bias', (D,), lambda s: s),
    'image_head.net.time_embed.mlp.0.weight': ('image_head.time_embed.mlp_0.kernel', (W, 256), t),
    'image_head.net.time_embed.mlp.0.bias': ('image_head.time_embed.mlp_0.bias', (W,), lambda s: s),
    'image_head.net.time_embed.mlp.2.weight': ('image_head.time_embed.mlp_2.kernel', (W, W), t),
    'image_head.net.time_embed.mlp.2.bias': ('image_head.time_embed.mlp_2.bias', (W,), lambda s: s),
    'image_head.net.cond_embed.weight': ('image_head.cond_embed.kernel', (W, D), t),
    'image_head.net.cond_embed.bias': ('image_head.cond_embed.bias', (W,), lambda s: s),
    'image_head.net.input_proj.weight': ('image_head.input_proj.kernel', (W, T), t),
    'image_head.net.input_proj.bias': ('image_head.input_proj.bias', (W,), lambda s: s),
    'image_head.net.final_layer.adaLN_modulation.1.weight': (
      'image_head.final_layer.adaLN_modulation_1.kernel',
      (2 * W, W),
      t,
    ),
    'image_head.net.final_layer.adaLN_modulation.1.bias': (
      'image_head.final_layer.adaLN_modulation_1.bias',
      (2 * W,),
      lambda s: s,
    ),
    'image_head.net.final_layer.linear.weight': ('image_head.final_layer.linear.kernel', (T, W), t),
    'image_head.net.final_layer.linear.bias': (
      'image_head.final_layer.linear.bias',
      (T,),
      lambda s: s,
    ),
  }
  # Stacked decoder layers: (layers, ...) leading axis; q/k/v kernels (D, heads, E) -> (heads*E, D).
  qkv = lambda s: (s[1] * s[2], s[0])
  per_layer = {
    'input_layernorm.weight': ('input_layernorm.weight', (D,), lambda s: s),
    'post_attention_layernorm.weight': ('post_attention_layernorm.weight', (D,), lambda s: s),
    'self_attn.q_proj.weight': ('self_attn.q_proj.kernel', (H * E, D), qkv),
    'self_attn.q_proj.bias': ('self_attn.q_proj.bias', (H * E,), lambda s: (s[0] * s[1],)),
    'self_attn.k_proj.weight': ('self_attn.k_proj.kernel', (K * E, D), qkv),
    'self_attn.k_proj.bias': ('self_attn.k_proj.bias', (K * E,), lambda s: (s[0] * s[1],)),
    'self_attn.v_proj.weight': ('self_attn.v_proj.kernel', (K * E, D), qkv),
    'self_attn.v_proj.bias': ('self_attn.v_proj.bias', (K * E,), lambda s: (s[0] * s[1],)),
    'self_attn.o_proj.weight': ('self_attn.o_proj.kernel', (D, H * E), t),
    'mlp.gate_proj.weight': ('mlp.gate_proj.kernel', (F, D), t),
    'mlp.up_proj.weight': ('mlp.up_proj.kernel', (F, D), t),
    'mlp.down_proj.weight': ('mlp.down_proj.kernel', (D, F), t),
  }
  for n in range(nl):
    for name, (ours, shape, fn) in per_layer.items():
      table[f'layers.{n}.{name}'] = ('decoder.layers.' + ours, shape, fn, n)
  per_block = {
    'in_ln.weight': ('in_ln.weight', (W,), lambda s: s),
    'in_ln.bias': ('in_ln.bias', (W,), lambda s: s),
    'mlp.0.weight': ('mlp_0.kernel', (W, W), t),
    'mlp.0.bias': ('mlp_0.bias', (W,), lambda s: s),
    'mlp.2.weight': ('mlp_2.kernel', (W, W), t),
    'mlp.2.bias': ('mlp_2.bias', (W,), lambda s: s),
    'adaLN_modulation.1.weight': ('adaLN_modulation_1.kernel', (3 * W, W), t),
    'adaLN_modulation.1.bias': ('adaLN_modulation_1.bias', (3 * W,), lambda s: s),
  }
  for n in range(nb):
    for name, (ours, shape, fn) in per_block.items():
      table[f'image_head.net.res_blocks.{n}.{name}'] = (
        'image_head.res_blocks.' + ours,
        shape,
        fn,
        n,
      )
  return table


# Our stacked shapes, written out for the small config.
EXPECTED_OURS = {
  'embed_tokens.embedding': (V, D),
  'lm_head.kernel': (D, V),
  'decoder.norm.weight': (D,),
  'decoder.layers.input_layernorm.weight': (NL, D),
  'decoder.layers.post_attention_layernorm.weight': (NL, D),
  'decoder.layers.self_attn.q_proj.kernel': (NL, D, H, E),
  'decoder.layers.self_attn.q_proj.bias': (NL, H, E),
  'decoder.layers.self_attn.k_proj.kernel': (NL, D, K, E),
  'decoder.layers.self_attn.k_proj.bias': (NL, K, E),
  'decoder.layers.self_attn.v_proj.kernel': (NL, D, K, E),
  'decoder.layers.self_attn.v_proj.bias': (NL, K, E),
  'decoder.layers.self_attn.o_proj.kernel': (NL, H * E, D),
  'decoder.layers.mlp.gate_proj.kernel': (NL, D, F),
  'decoder.layers.mlp.up_proj.kernel': (NL, D, F),
  'decoder.layers.mlp.down_proj.kernel': (NL, F, D),
  'image_in_projector.kernel': (T, D),
  'image_in_projector.bias': (D,),
  'image_out_projector.kernel': (D, D),
  'image_out_projector.bias': (D,),
  'image_head.time_embed.mlp_0.kernel': (256, W),
  'image_head.time_embed.mlp_0.bias': (W,),
  'image_head.time_embed.mlp_2.kernel': (W, W),
  'image_head.time_embed.mlp_2.bias': (W,),
  'image_head.cond_embed.kernel': (D, W),
  'image_head.cond_embed.bias': (W,),
  'image_head.input_proj.kernel': (T, W),
  'image_head.input_proj.bias': (W,),
  'image_head.res_blocks.in_ln.weight': (NB, W),
  'image_head.res_blocks.in_ln.bias': (NB, W),
  'image_head.res_blocks.mlp_0.kernel': (NB, W, W),
  'image_head.res_blocks.mlp_0.bias': (NB, W),
  'image_head.res_blocks.mlp_2.kernel': (NB, W, W),
  'image_head.res_blocks.mlp_2.bias': (NB, W),
  'image_head.res_blocks.adaLN_modulation_1.kernel': (NB, W, 3 * W),
  'image_head.res_blocks.adaLN_modulation_1.bias': (NB, 3 * W),
  'image_head.final_layer.adaLN_modulation_1.kernel': (W, 2 * W),
  'image_head.final_layer.adaLN_modulation_1.bias': (2 * W,),
  'image_head.final_layer.linear.kernel': (W, T),
  'image_head.final_layer.linear.bias': (T,),
}


def test_param_shapes_small(small):
  ours = {k: tuple(v.get_value().shape) for k, v in flat_params(small).items()}
  assert ours == EXPECTED_OURS


def test_params_map_one_to_one_onto_official_names(small):
  ours = {k: tuple(v.get_value().shape) for k, v in flat_params(small).items()}
  table = official_table()
  used = set()
  official_total = 0
  for name, entry in table.items():
    path, torch_shape, fn = entry[:3]
    assert path in ours, (name, path)
    shape = ours[path]
    if len(entry) == 4:  # Stacked: slice the leading axis.
      assert shape[0] == (NL if path.startswith('decoder.') else NB), path
      shape = shape[1:]
    assert tuple(fn(shape)) == torch_shape, (name, path, shape, torch_shape)
    used.add(path)
    official_total += int(np.prod(torch_shape))
  assert used == set(ours)  # No param of ours without an official counterpart.
  assert official_total == ns.count_params(nnx.state(small, nnx.Param))
  # No o_proj bias, no rotary inv_freq, no norm_final params.
  assert not any('o_proj.bias' in k or 'inv_freq' in k or 'norm_final' in k for k in ours)


def test_every_param_has_logical_axes(small):
  rules = {name for name, _ in get_base_config().mesh.rules}
  for path, var in flat_params(small).items():
    axes = var.get_metadata().get('out_sharding')
    shape = var.get_value().shape
    assert axes is not None, path
    assert len(axes) == len(shape), (path, axes, shape)
    assert all(a in rules for a in axes), (path, axes)
    stacked = path.startswith(('decoder.layers.', 'image_head.res_blocks.'))
    assert (axes[0] == 'layers') == stacked, (path, axes)


def test_large_params_have_logical_axes():
  """The rank check also holds for the abstract Large model (no arrays materialised)."""
  abstract = nnx.eval_shape(lambda: ns.NextStep(model_config(**LARGE_SIZES), rngs=nnx.Rngs(0)))
  for path, var in flat_params(nnx.state(abstract, nnx.Param)).items():
    assert len(var.get_metadata()['out_sharding']) == len(var.get_value().shape), path


# ----- embeddings -----


def test_embed_places_image_tokens_in_row_major_order(small):
  b, l, n = 2, 10, 3
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, (b, l)).astype(np.int32)
  mask = np.zeros((b, l), bool)
  mask[0, [1, 4, 5]] = True
  mask[1, [0, 7, 9]] = True
  ids[mask] = 7  # The placeholder id's own embedding must not leak.
  tokens = rng.standard_normal((b, n, T)).astype(np.float32)
  out = np.asarray(small.embed(jnp.asarray(ids), jnp.asarray(tokens), jnp.asarray(mask)))
  p = {k: np.asarray(v.get_value(), np.float64) for k, v in flat_params(small).items()}
  proj = tokens @ p['image_in_projector.kernel'] + p['image_in_projector.bias']
  for r in range(b):
    for k, pos in enumerate(np.nonzero(mask[r])[0]):
      np.testing.assert_allclose(out[r, pos], proj[r, k], rtol=PROJ_RTOL, atol=PROJ_ATOL)
  np.testing.assert_array_equal(
    out[~mask], p['embed_tokens.embedding'][ids[~mask]].astype(np.float32)
  )
  # Without image tokens: plain embedding lookup.
  np.testing.assert_array_equal(
    np.asarray(small.embed(jnp.asarray(ids), None, None)),
    p['embed_tokens.embedding'][ids].astype(np.float32),
  )
  # The sampler's entry point is the same projection.
  np.testing.assert_allclose(
    np.asarray(small.embed_image_tokens(jnp.asarray(tokens))), proj, rtol=PROJ_RTOL, atol=PROJ_ATOL
  )


def test_untied_lm_head(small):
  hidden = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32)
  p = {k: np.asarray(v.get_value(), np.float64) for k, v in flat_params(small).items()}
  logits = np.asarray(small.lm_logits(jnp.asarray(hidden)))
  assert logits.dtype == np.float32 and logits.shape == (2, 3, V)
  np.testing.assert_allclose(
    logits, hidden @ p['lm_head.kernel'], rtol=LOGITS_RTOL, atol=LOGITS_ATOL
  )


def test_tied_embeddings():
  model = ns.NextStep(model_config(**SMALL_SIZES, tie_word_embeddings=True), rngs=nnx.Rngs(0))
  assert model.lm_head is None
  flat = flat_params(model)
  assert not any(k.startswith('lm_head') for k in flat)
  untied = ns.count_params(
    nnx.state(ns.NextStep(model_config(**SMALL_SIZES), rngs=nnx.Rngs(0)), nnx.Param)
  )
  assert ns.count_params(nnx.state(model, nnx.Param)) == untied - V * D
  hidden = np.random.default_rng(2).standard_normal((2, 3, D)).astype(np.float32)
  emb = np.asarray(flat['embed_tokens.embedding'].get_value(), np.float64)
  logits = np.asarray(model.lm_logits(jnp.asarray(hidden)))
  np.testing.assert_allclose(logits, hidden @ emb.T, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
  np.testing.assert_allclose(
    logits,
    np.asarray(model.embed_tokens.attend(jnp.asarray(hidden))),
    rtol=ATTEND_TOL,
    atol=ATTEND_TOL,
  )


# ----- gen_pos_embed -----


def mae_2d_sincos(embed_dim, grid_size):
  """MAE's get_2d_sincos_pos_embed, transcribed: meshgrid(w, h) so grid[0] is the column; the
  first half of the channels encodes grid[0], the second grid[1]; each half [sin, cos]."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize('dim, grid', [(64, 4), (32, 6)])
def test_gen_pos_embed_table(dim, grid):
  table = ns.sincos_pos_embed_2d(dim, grid)
  assert table.shape == (grid * grid, dim) and table.dtype == np.float32
  np.testing.assert_allclose(table, mae_2d_sincos(dim, grid), atol=TABLE_ATOL)
  # Flat index k = row * G + col: the first half depends on the column only.
  k = 1 * grid + 2
  np.testing.assert_allclose(table[k, : dim // 2], table[2, : dim // 2], atol=TABLE_ATOL)
  np.testing.assert_allclose(table[k, dim // 2 :], table[grid, dim // 2 :], atol=TABLE_ATOL)
  with pytest.raises(ValueError):
    ns.sincos_pos_embed_2d(30, grid)


def test_head_condition_with_gen_pos_embed():
  cfg = model_config(**SMALL_SIZES, use_gen_pos_embed=True, base_image_grid_size=3)
  model = ns.NextStep(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  hidden = rng.standard_normal((2, 4, D)).astype(np.float32)
  index = np.array([[0, 1, 5, 8], [2, 3, 4, 7]])
  out = np.asarray(model.head_condition(jnp.asarray(hidden), jnp.asarray(index)))
  table = mae_2d_sincos(D, 3)
  p = {k: np.asarray(v.get_value(), np.float64) for k, v in flat_params(model).items()}
  ref = (hidden + table[index]) @ p['image_out_projector.kernel'] + p['image_out_projector.bias']
  np.testing.assert_allclose(out, ref, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
  # Off (the official default): the plain projector.
  off = ns.NextStep(model_config(**SMALL_SIZES), rngs=nnx.Rngs(0))
  ref_off = hidden @ p['image_out_projector.kernel'] + p['image_out_projector.bias']
  np.testing.assert_allclose(
    np.asarray(off.head_condition(jnp.asarray(hidden), jnp.asarray(index))),
    ref_off,
    rtol=LOGITS_RTOL,
    atol=LOGITS_ATOL,
  )
