"""Conversion of an official-layout release and parity with the PyTorch reference (float32).

A tiny random release is built in PyTorch (tests/torch_reference.py: transformers' Qwen2Model +
the head and projectors rebuilt from docs/model.md), saved as a release is (3 safetensors shards +
index, config.json, tokenizer.json), converted, restored, and compared piece by piece and over a
whole generation with identical noise on both sides.
"""

import pytest

pytest.importorskip('torch', reason='the PyTorch references need the parity extra')
pytest.importorskip('transformers', reason='the PyTorch references need the parity extra')

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import hf_testing
import torch_reference as tr
from nextstep_jax.convert import official
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import sequences
from nextstep_jax.image import patchify
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.sampling import generate
from nextstep_jax.sampling import guidance
from nextstep_jax.sampling import integrators

pytestmark = pytest.mark.torch

# float32 on both sides; differences are summation order in matmuls/softmax (~1e-6 relative) grown
# through 2 layers and the RMSNorm/LayerNorm rescaling.
FORWARD_ATOL = 2e-5
# A whole generation feeds each sampled token back through the decoder: 6 tokens x 4 SDE steps
# with cfg 3 amplify per-step float32 rounding; observed max |diff| is printed by the test.
GENERATION_ATOL = 1e-3


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(torch model, release dir, converted dir, config, model, tokenizer)."""
  root = tmp_path_factory.mktemp('release')
  hf_testing.build_tokenizer(str(root / 'tokenizer_src.json'))
  torch_model = tr.NextStepTorch(tr.TINY_RELEASE).randomize(seed=0).eval()
  release_dir = tr.write_release(
    torch_model, tr.TINY_RELEASE, str(root / 'tokenizer_src.json'), root / 'hf'
  )
  config = official.convert(release_dir, root / 'converted', compute_dtype='float32')
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, params = official.load_params(root / 'converted', mesh)
  tok = hf_tokenizer.HFTokenizer.load(str(root / 'converted' / 'tokenizer.json'))
  return torch_model, release_dir, root / 'converted', config, nnx.merge(graphdef, params), tok


def test_config_and_tokenizer(release):
  _, release_dir, converted, config, _, tok = release
  hf = json.loads((release_dir / 'config.json').read_text())
  m = config.model
  assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (
    352,
    64,
    2,
    4,
    2,
    16,
  )
  assert (m.rope_theta, m.attention_bias, m.o_attention_bias, m.tie_word_embeddings) == (
    1e6,
    True,
    False,
    False,
  )
  assert (m.latent_channels, m.latent_patch_size, m.fm_head_dim, m.fm_head_layers) == (16, 2, 32, 2)
  assert (tok.boi_id, tok.eoi_id, tok.image_placeholder_id, tok.pad_id) == (
    hf['boi'],
    hf['eoi'],
    hf['image_placeholder_id'],
    hf['pad_token_id'],
  )
  assert tok.encode('[PAD]<|image_area|>') == [tok.pad_id, tok.image_area_id]
  prefix = sequences.prompt_prefix_ids(tok, 32, 16)
  assert tok.decode(prefix) == '<|image_area|>32*16<|begin_of_image|>'
  assert len(prefix) == 7  # area, 3, 2, *, 1, 6, boi: digits one token each, no BOS.
  assert json.loads((converted / 'config.json').read_text())['image']['use_norm'] is True


def test_backbone_embeddings_hidden_and_logits(release):
  torch_model, _, _, _, model, _ = release
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 352, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), bool)
  mask[1, :4] = False  # Left padding, as sampling prompts.
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  with torch.no_grad():
    embeds_t = torch_model.backbone.embed_tokens(tr.to_torch(ids).long())
    hidden_t = torch_model.backbone(
      input_ids=tr.to_torch(ids).long(),
      attention_mask=tr.to_torch(mask).long(),
      position_ids=tr.to_torch(positions).long(),
    ).last_hidden_state
    logits_t = torch_model.lm_head(hidden_t)
  embeds = model.embed(jnp.asarray(ids), None, None)
  hidden, _ = model(embeds, jnp.asarray(positions), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(embeds), embeds_t.numpy(), atol=1e-7)
  np.testing.assert_allclose(np.asarray(hidden)[mask], hidden_t.numpy()[mask], atol=FORWARD_ATOL)
  np.testing.assert_allclose(
    np.asarray(model.lm_logits(hidden))[mask], logits_t.numpy()[mask], atol=FORWARD_ATOL
  )


def test_projectors_and_head_velocity(release):
  torch_model, _, _, _, model, _ = release
  rng = np.random.default_rng(1)
  tokens = rng.standard_normal((5, 64)).astype(np.float32)
  hidden = rng.standard_normal((5, 64)).astype(np.float32)
  t = rng.uniform(0, 1, 5).astype(np.float32)
  with torch.no_grad():
    in_t = torch_model.image_in_projector(tr.to_torch(tokens))
    cond_t = torch_model.image_out_projector(tr.to_torch(hidden))
    v_t = torch_model.image_head.net(tr.to_torch(tokens), tr.to_torch(t), cond_t)
  np.testing.assert_allclose(
    np.asarray(model.embed_image_tokens(jnp.asarray(tokens))), in_t.numpy(), atol=FORWARD_ATOL
  )
  cond = model.head_condition(jnp.asarray(hidden))
  np.testing.assert_allclose(np.asarray(cond), cond_t.numpy(), atol=FORWARD_ATOL)
  v = model.image_head(jnp.asarray(tokens), jnp.asarray(t), cond)
  np.testing.assert_allclose(np.asarray(v), v_t.numpy(), atol=FORWARD_ATOL)


def test_patchify_order_matches_official():
  c, y, x = np.meshgrid(np.arange(16), np.arange(4), np.arange(6), indexing='ij')
  latent = (1000 * c + 10 * y + x).astype(np.float32)  # (16, 4, 6) CHW
  theirs = tr.patchify_official(torch.from_numpy(latent[None])).numpy()
  ours = patchify.patchify(latent.transpose(1, 2, 0)[None], 2)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(ours[0, 0, :8], [0, 1, 10, 11, 1000, 1001, 1010, 1011])


@pytest.mark.parametrize('shift,steps', [(1.0, 50), (3.2, 50), (1.0, 4)])
def test_time_grid_matches_official(shift, steps):
  ours = integrators.time_grid(integrators.IntegratorConfig(num_steps=steps, timestep_shift=shift))
  np.testing.assert_allclose(
    np.asarray(ours), tr.time_grid_a(steps, shift, 0.04).numpy(), atol=1e-7
  )


def test_cfg_combinations_match_official():
  v = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(guidance.combine_two_way(jnp.asarray(v), 7.5)),
    tr.cfg_combine(tr.to_torch(v), 7.5, 1.0, 2).numpy(),
    atol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(guidance.combine_three_way(jnp.asarray(v), 7.5, 2.0)),
    tr.cfg_combine(tr.to_torch(v), 7.5, 2.0, 3).numpy(),
    atol=1e-5,
  )


def injected_noise(seeds, num_tokens, num_steps, token_dim):
  """The noise our generator draws, per token: x0 (N, B, T) and SDE steps (N, S-1, B, T)."""
  keys = generate.image_keys_from_seeds(seeds)
  x0, steps = [], []
  for k in range(num_tokens):
    token_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k)
    x0.append(integrators.row_normal(token_keys, 0, (token_dim,)))
    steps.append(
      jnp.stack(
        [integrators.row_normal(token_keys, i + 1, (token_dim,)) for i in range(num_steps - 1)]
      )
    )
  return tr.to_torch(jnp.stack(x0)), tr.to_torch(jnp.stack(steps))


def test_whole_generation_matches_official_loop(release):
  """2 captions, 2x3 tokens, 4 SDE steps, cfg 3, use_norm: identical noise in both samplers."""
  torch_model, _, _, _, model, tok = release
  grid_h, grid_w, steps, seeds = 2, 3, 4, [5, 9]
  prompt = sequences.build_prompt_batch(
    tok,
    ['a red circle', 'a cat on a sofa'],
    grid_h,
    grid_w,
    16,
    negative_prompt='Copy original image.',
  )
  cfg = generate.SamplerConfig(
    grid_h=grid_h,
    grid_w=grid_w,
    integrator=integrators.IntegratorConfig(num_steps=steps),
    num_branches=2,
    cfg=3.0,
    use_norm=True,
  )
  graphdef, params = nnx.split(model)
  ours = generate.generate_tokens(
    graphdef,
    params,
    {k: jnp.asarray(v) for k, v in prompt.items()},
    generate.image_keys_from_seeds(seeds),
    cfg,
  )
  x0, noise = injected_noise(seeds, grid_h * grid_w, steps, 64)
  theirs = tr.generate(
    torch_model,
    tr.to_torch(prompt['input_ids']).long(),
    tr.to_torch(prompt['attention_mask']).long(),
    grid_h * grid_w,
    x0,
    noise,
    cfg=3.0,
    num_steps=steps,
    use_norm=True,
  )
  deviation = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
  per_token = np.abs(np.asarray(ours) - theirs.numpy()).max(axis=(0, 2))
  print(
    f'whole-generation max |jax - torch| = {deviation:.2e}; per token {np.array2string(per_token, precision=1)}'
  )
  assert deviation < GENERATION_ATOL


def test_restores_sharded_onto_a_2x2x2_mesh(release):
  _, _, converted, config, model, _ = release
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = mesh_lib.make_mesh(config.mesh)
  _, params = official.load_params(converted, mesh, config)
  kernel = params['decoder']['layers']['mlp']['gate_proj']['kernel'][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  expected = nnx.state(model, nnx.Param)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected
  )


def test_bfloat16_conversion(release, tmp_path):
  _, release_dir, _, _, model, _ = release
  config = official.convert(
    release_dir, tmp_path / 'bf16', param_dtype='bfloat16', compute_dtype='float32'
  )
  _, params = official.load_params(
    tmp_path / 'bf16', mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  )
  kernel = params['image_head']['res_blocks']['mlp_0']['kernel'][...]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(kernel),
    np.asarray(model.image_head.res_blocks.mlp_0.kernel[...].astype(jnp.bfloat16)),
  )


def test_mismatches_are_listed(release):
  _, release_dir, _, config, _, _ = release
  shapes = official.tensor_shapes(official.tensor_files(release_dir))
  broken = dict(shapes)
  del broken['layers.1.mlp.up_proj.weight'], broken['image_head.net.final_layer.linear.bias']
  broken['layers.2.mlp.up_proj.weight'] = (96, 64)
  broken['layers.0.self_attn.k_proj.weight'] = (64, 64)
  with pytest.raises(official.ConversionError) as error:
    official.plan(config, broken)
  message = str(error.value)
  for text in (
    '2 missing tensors',
    'layers.1.mlp.up_proj.weight',
    'image_head.net.final_layer.linear.bias',
    '1 unexpected tensors',
    'layers.2.mlp.up_proj.weight',
    '1 tensors with the wrong shape',
    'layers.0.self_attn.k_proj.weight (64, 64) (expected (32, 64)',
  ):
    assert text in message


def test_config_contradictions_are_errors(release):
  _, release_dir, _, _, _, tok = release
  hf = json.loads((release_dir / 'config.json').read_text())
  names = set(official.tensor_shapes(official.tensor_files(release_dir)))
  _, problems = official.model_fields({**hf, 'o_attention_bias': True}, names)
  assert any('o_attention_bias=True but the checkpoint has no o_proj bias' in p for p in problems)
  problems = official._tokenizer_problems({**hf, 'boi': 3}, tok, hf['vocab_size'])
  assert problems == [f'config.json boi=3 but tokenizer.json gives id {tok.boi_id}']
  with pytest.raises(official.ConversionError, match='neither model.safetensors.index.json'):
    official.tensor_files(pathlib.Path(release_dir).parent)


def test_whole_edit_generation_matches_official_loop(release):
  """3-way guidance (cfg 3, cfg_img 2), source tokens at the placeholders of rows 0..2B-1."""
  torch_model, _, _, _, model, tok = release
  grid, steps, seeds = (2, 2), 3, [1, 2]
  batch = edit_sequences.build_edit_prompt_batch(
    tok,
    ['<image>make the sky green', 'a cat <image>'],
    *grid,
    *grid,
    12,
    negative_prompt='Copy original image.',
  )
  source = np.random.default_rng(3).standard_normal((2, 4, 64)).astype(np.float32)
  batch['image_tokens'] = edit_sequences.edit_source_tokens(source)
  cfg = generate.SamplerConfig(
    grid_h=2,
    grid_w=2,
    integrator=integrators.IntegratorConfig(num_steps=steps),
    num_branches=3,
    cfg=3.0,
    cfg_img=2.0,
    use_norm=True,
  )
  graphdef, params = nnx.split(model)
  ours = generate.generate_tokens(
    graphdef,
    params,
    {k: jnp.asarray(v) for k, v in batch.items()},
    generate.image_keys_from_seeds(seeds),
    cfg,
  )
  ids = tr.to_torch(batch['input_ids']).long()
  with torch.no_grad():  # Official embedding: placeholders take in_proj(source), row-major order.
    embeds = torch_model.backbone.embed_tokens(ids)
    embeds[tr.to_torch(batch['image_token_mask'])] = torch_model.image_in_projector(
      tr.to_torch(source[[0, 1, 0, 1]]).reshape(-1, 64)
    )
  x0, noise = injected_noise(seeds, 4, steps, 64)
  theirs = tr.generate(
    torch_model,
    ids,
    tr.to_torch(batch['attention_mask']).long(),
    4,
    x0,
    noise,
    cfg=3.0,
    cfg_img=2.0,
    branches=3,
    num_steps=steps,
    use_norm=True,
    prompt_embeds=embeds,
  )
  deviation = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
  print(f'whole edit generation max |jax - torch| = {deviation:.2e}')
  assert deviation < GENERATION_ATOL


def test_gen_pos_embed_buffer_is_checked(tmp_path):
  hf_testing.build_tokenizer(str(tmp_path / 'tokenizer.json'))
  release = dict(tr.TINY_RELEASE, use_gen_pos_embed=True, base_image_grid_size=4)
  torch_model = tr.NextStepTorch(release).randomize(seed=1)
  table = torch.from_numpy(nextstep.sincos_pos_embed_2d(64, 4))[None]
  tr.write_release(
    torch_model,
    release,
    str(tmp_path / 'tokenizer.json'),
    tmp_path / 'good',
    extra_tensors={'gen_pos_embed': table},
  )
  config = official.convert(tmp_path / 'good', tmp_path / 'good_out', compute_dtype='float32')
  assert config.model.use_gen_pos_embed and config.model.base_image_grid_size == 4
  tr.write_release(
    torch_model,
    release,
    str(tmp_path / 'tokenizer.json'),
    tmp_path / 'bad',
    extra_tensors={'gen_pos_embed': table.flip(-1)},
  )
  with pytest.raises(
    official.ConversionError, match='gen_pos_embed .* differs from the 2-D sin-cos table'
  ):
    official.convert(tmp_path / 'bad', tmp_path / 'bad_out', compute_dtype='float32')


def test_release_vae_is_converted_and_used_by_the_sampler(release, tmp_path):
  """The release's vae/ is import-checked, copied, and its architecture and factors land in the
  config; the converted sampler decodes with exactly those weights (not a random VAE)."""
  import shutil

  from nextstep_jax.image import vae_import
  from nextstep_jax.sampling import pipeline

  with_vae = tmp_path / 'hf'
  shutil.copytree(release[1], with_vae)
  hf_testing.write_vae_release(with_vae / 'vae')
  config = official.convert(with_vae, tmp_path / 'out', compute_dtype='float32', image_size=16)
  v = config.image.vae
  assert (v.ch, tuple(v.ch_mult), v.z_channels, v.scaling_factor, v.shift_factor) == (
    8,
    (1, 2),
    16,
    0.8,
    0.1,
  )
  assert sorted(p.name for p in (tmp_path / 'out' / 'vae').iterdir()) == sorted(
    p.name for p in (with_vae / 'vae').iterdir()
  )
  sampler = pipeline.TextToImage.from_converted(
    str(tmp_path / 'out'), mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1]), num_steps=2
  )
  latents = np.random.default_rng(0).standard_normal((1, 8, 8, 16)).astype(np.float32)
  expected = np.clip(
    np.asarray(vae_import.load_release(with_vae / 'vae').decode(latents)), -1, 1
  )  # As the tokenizer.
  np.testing.assert_allclose(
    np.asarray(sampler.image_tokenizer.decode(latents)), expected, atol=1e-5
  )
  assert np.abs(expected).mean() > 0.05  # Random weights decode to a non-trivial image.


def test_missing_or_mismatched_vae_is_a_clear_error(release, tmp_path):
  from nextstep_jax.sampling import pipeline

  config = official.convert(release[1], tmp_path / 'no_vae', compute_dtype='float32')
  assert config.image.tokenizer == 'vae' and config.image.vae.checkpoint == ''
  with pytest.raises(ValueError, match='--vae DIR'):
    pipeline.TextToImage.from_converted(
      str(tmp_path / 'no_vae'), mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    )
  with pytest.raises(official.ConversionError, match='config.json is missing'):
    official.convert(release[1], tmp_path / 'x', vae_dir=tmp_path / 'nowhere')
  hf_testing.write_vae_release(tmp_path / 'vae8', z_channels=8)
  with pytest.raises(official.ConversionError, match='z_channels=8'):
    official.convert(release[1], tmp_path / 'y', vae_dir=tmp_path / 'vae8')
