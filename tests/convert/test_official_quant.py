"""nextstep-convert --quantize: tensor-by-tensor quantization of a tiny official-layout release
equals quantizing the float conversion at load time, and restores sharded onto another mesh."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import hf_testing
import torch_reference as tr
from nextstep_jax import runs
from nextstep_jax.cli import convert as convert_cli
from nextstep_jax.convert import official
from nextstep_jax.model import quant
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.sampling import pipeline

RELEASE = dict(tr.TINY_RELEASE, latent_channels=3)  # Pixel tokens: sampling needs no VAE weights.
PIXELS = {'image_tokenizer': 'pixels', 'image_size': 8, 'max_caption_tokens': 16}


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp('quant_release')
  hf_testing.build_tokenizer(str(root / 'tokenizer.json'))
  torch_model = tr.NextStepTorch(RELEASE).randomize(seed=0, std=0.05).eval()
  return tr.write_release(torch_model, RELEASE, str(root / 'tokenizer.json'), root / 'hf'), root


def one_device_mesh(config):
  return mesh_lib.make_mesh(config.mesh, jax.devices()[:1])


def leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(
      np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32)
    )


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_convert_quantize_equals_load_time_quantization(release, mode):
  hf_dir, root = release
  float_dir, quant_dir = root / f'float_{mode}', root / f'quant_{mode}'
  common = [
    '--hf-dir',
    str(hf_dir),
    '--dtype',
    'float32',
    '--compute-dtype',
    'float32',
    '--image-tokenizer',
    'pixels',
    '--image-size',
    '8',
    '--max-caption-tokens',
    '16',
  ]
  assert convert_cli.main([*common, '--out', str(float_dir)]) == 0
  assert (
    convert_cli.main([*common, '--out', str(quant_dir), '--quantize', mode, '--group-size', '32'])
    == 0
  )

  stored = runs.load_config(quant_dir)
  assert (stored.model.quant.mode, stored.model.quant.group_size) == (mode, 32)
  assert stored.model.quant.embedding  # Vocab tables too by default: the v5e-1 int8 fit needs it.
  mesh = one_device_mesh(stored)
  graphdef_q, converted = official.load_params(quant_dir, mesh)
  graphdef_l, loaded = official.load_params(
    float_dir, mesh, stored_with(runs.load_config(float_dir), mode)
  )
  assert graphdef_q == graphdef_l
  leaves_equal(converted, loaded)
  flat = {'/'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(converted)}
  assert any('embed_tokens' in k and k.endswith('qvalue') for k in flat), sorted(flat)
  # q/k/v kernels are stored (layers, D, heads * head_dim) (quant.flat_shape).
  r = tr.TINY_RELEASE
  assert flat['decoder/layers/self_attn/q_proj/kernel/qvalue'].shape == (
    2,
    r['hidden_size'],
    r['num_attention_heads'] * r['head_dim'],
  )
  gate = converted['decoder']['layers']['mlp']['gate_proj']['kernel']
  assert gate['qvalue'].get_value().dtype == quant.QTYPES[mode]
  assert gate['scale'].get_value().shape == (
    2,
    64 // 32 if mode == 'int4' else 1,
    tr.TINY_RELEASE['intermediate_size'],
  )

  # Restored onto 8 devices (fsdp 4 x tensor 2): same values, same velocities as on one device.
  cube = mesh_lib.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 4, 'tensor': 2}))
  _, sharded = official.load_params(quant_dir, cube)
  leaves_equal(converted, sharded)
  assert (
    sharded['decoder']['layers']['mlp']['gate_proj']['kernel']['qvalue']
    .get_value()
    .sharding.mesh.shape
    == cube.shape
  )
  x, t, c = (
    np.full((3, 12), 0.3, np.float32),
    np.full((3,), 0.4, np.float32),
    np.ones((3, 64), np.float32),
  )
  velocity = lambda params: jax.jit(lambda p: nnx.merge(graphdef_q, p).image_head(x, t, c))(params)
  np.testing.assert_allclose(velocity(sharded), velocity(converted), rtol=1e-5, atol=1e-6)


def stored_with(config, mode):
  config.model.quant.mode, config.model.quant.group_size = mode, 32
  config.model.quant.embedding = True
  return config


@pytest.mark.slow
def test_quantized_conversion_cannot_be_requantized_and_samples_near_float(release):
  hf_dir, root = release
  float_dir, int8_dir = root / 'float_sampler', root / 'int8_sampler'
  official.convert(hf_dir, float_dir, compute_dtype='float32', **PIXELS)
  official.convert(hf_dir, int8_dir, compute_dtype='float32', quantize='int8', **PIXELS)
  config = stored_with(runs.load_config(int8_dir), 'int4')
  with pytest.raises(ValueError, match='convert the release again'):
    official.load_params(int8_dir, one_device_mesh(config), config)

  settings = {'num_steps': 3, 'batch_size': 2, 'cfg': 3.0}
  captions, seeds = ['a red circle', 'a cat on a sofa'], [0, 1]
  reference = pipeline.TextToImage.from_converted(
    str(float_dir), mesh=one_device_mesh(config), **settings
  )
  # Load-time int8 on the default sampling mesh (all 8 devices) and the int8 conversion.
  at_load = pipeline.TextToImage.from_converted(str(float_dir), quantize='int8', **settings)
  converted = pipeline.TextToImage.from_converted(str(int8_dir), **settings)
  assert at_load.config.model.quant.mode == 'int8' == converted.config.model.quant.mode
  kernel = converted.params['decoder']['layers']['mlp']['up_proj']['kernel']['qvalue'][...]
  assert kernel.dtype == np.int8 and dict(kernel.sharding.mesh.shape)['tensor'] == 2
  expected = reference(captions, seeds, grid=(2, 3)).astype(int)
  for sampler in (at_load, converted):
    images = sampler(captions, seeds, grid=(2, 3)).astype(int)
    # int8 weights move the sampled pixels by a few levels on average (sharded float32 sums alone
    # move them by at most 2); another seed moves them by tens.
    assert np.abs(images - expected).mean() < 6, np.abs(images - expected).mean()
  np.testing.assert_allclose(
    at_load(captions, seeds, grid=(2, 3)).astype(int),
    converted(captions, seeds, grid=(2, 3)).astype(int),
    atol=2,
    rtol=0,
  )
