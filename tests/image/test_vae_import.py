"""Official-layout PyTorch autoencoder (written here from docs/model.md §2/§8) vs our import of its
torch.save'd state_dict: posterior mean/logvar, normalised latents, decoded images; and the
restricted unpickler rejecting anything but tensor records."""

import pytest

pytest.importorskip('torch', reason='the PyTorch references need the parity extra')

import json
import math
import os
import pickle
import zipfile

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nextstep_jax.image import vae
from nextstep_jax.image import vae_import

pytestmark = pytest.mark.torch

# float32 on both sides; differences come from conv/attention summation order through ~20 layers.
ATOL = 2e-4
TINY = dict(
  resolution=16,
  in_channels=3,
  ch=32,
  out_ch=3,
  ch_mult=[1, 2, 2],
  num_res_blocks=1,
  z_channels=4,
  scaling_factor=0.7,
  shift_factor=0.1,
  deterministic=True,
  encoder_norm=True,
  psz=2,
)


def group_norm(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)
    self.skip = cin != cout

  def forward(self, x):
    h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
    return (self.nin_shortcut(x) if self.skip else x) + h


class AttnBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = group_norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    n = self.norm(x)
    q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    return x + self.proj_out((attn @ v).transpose(1, 2).reshape(b, c, h, w))


class Down(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def mid(c):
  m = nn.Module()
  m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
  return m


class TorchAutoEncoder(nn.Module):
  """The official layout: encoder.down.i.{block,downsample}, decoder.up.i.{block,upsample}."""

  def __init__(self, p):
    super().__init__()
    self.p = p
    ch, mult, nrb = p['ch'], p['ch_mult'], p['num_res_blocks']
    widths = [ch * m for m in [1] + mult]
    self.encoder = nn.Module()
    self.encoder.conv_in = nn.Conv2d(p['in_channels'], ch, 3, padding=1)
    self.encoder.down = nn.ModuleList()
    for i in range(len(mult)):
      level = nn.Module()
      level.block = nn.ModuleList(
        [ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1]) for j in range(nrb)]
      )
      if i != len(mult) - 1:
        level.downsample = Down(widths[i + 1])
      self.encoder.down.append(level)
    self.encoder.mid = mid(widths[-1])
    self.encoder.norm_out = group_norm(widths[-1])
    self.encoder.conv_out = nn.Conv2d(widths[-1], 2 * p['z_channels'], 3, padding=1)
    self.decoder = nn.Module()
    top = ch * mult[-1]
    self.decoder.conv_in = nn.Conv2d(p['z_channels'], top, 3, padding=1)
    self.decoder.mid = mid(top)
    self.decoder.up = nn.ModuleList([nn.Module() for _ in mult])
    block_in = top
    for i in reversed(range(len(mult))):
      blocks = []
      for _ in range(nrb + 1):
        blocks.append(ResnetBlock(block_in, ch * mult[i]))
        block_in = ch * mult[i]
      self.decoder.up[i].block = nn.ModuleList(blocks)
      if i != 0:
        self.decoder.up[i].upsample = Up(block_in)
    self.decoder.norm_out = group_norm(ch)
    self.decoder.conv_out = nn.Conv2d(ch, p['out_ch'], 3, padding=1)

  @staticmethod
  def _mid(m, h):
    return m.block_2(m.attn_1(m.block_1(h)))

  def posterior(self, x):
    e = self.encoder
    h = e.conv_in(x)
    for level in e.down:
      for block in level.block:
        h = block(h)
      if hasattr(level, 'downsample'):
        h = level.downsample(h)
    h = e.conv_out(F.silu(e.norm_out(self._mid(e.mid, h))))
    mean, logvar = torch.chunk(h, 2, dim=1)
    if self.p['encoder_norm']:
      b, c, hh, ww = mean.shape
      s = self.p['psz']
      t = mean.reshape(b, c, hh // s, s, ww // s, s).permute(0, 2, 4, 1, 3, 5)
      t = F.layer_norm(t.reshape(b, hh // s, ww // s, c * s * s), (c * s * s,), eps=1e-6)
      mean = t.reshape(b, hh // s, ww // s, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
    return mean, torch.clamp(logvar, -30.0, 20.0)

  def decode(self, latents):
    d = self.decoder
    z = latents / self.p['scaling_factor'] + self.p['shift_factor']
    h = self._mid(d.mid, d.conv_in(z))
    for i in reversed(range(len(d.up))):
      for block in d.up[i].block:
        h = block(h)
      if i != 0:
        h = d.up[i].upsample(h)
    return d.conv_out(F.silu(d.norm_out(h)))


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(directory with config.json + checkpoint.pt, torch model, input images NCHW)."""
  torch.manual_seed(0)
  model = TorchAutoEncoder(TINY).eval()
  with torch.no_grad():  # Non-trivial norms and biases.
    for name, param in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        param.copy_(1 + 0.2 * torch.randn_like(param))
      elif name.endswith('bias'):
        param.copy_(0.1 * torch.randn_like(param))
  root = tmp_path_factory.mktemp('release')
  (root / 'config.json').write_text(json.dumps(TINY))
  torch.save(model.state_dict(), root / 'checkpoint.pt')
  images = torch.rand(2, 3, 16, 16) * 2 - 1
  return root, model, images


def test_official_layout_has_the_documented_names(release):
  tensors = vae_import.read_torch_checkpoint(release[0] / 'checkpoint.pt')
  assert 'encoder.down.1.block.0.nin_shortcut.weight' in tensors
  assert 'decoder.up.1.upsample.conv.weight' in tensors
  assert 'decoder.up.0.block.0.nin_shortcut.weight' in tensors
  assert tensors['encoder.conv_out.weight'].shape == (8, 64, 3, 3)


def test_import_matches_torch_reference(release):
  root, model, images = release
  ours = vae_import.load_release(root)
  assert ours.cfg.scaling_factor == 0.7 and ours.cfg.psz == 2 and ours.cfg.downsample == 4
  x = images.permute(0, 2, 3, 1).numpy()
  mean, logvar = ours.posterior(x)
  with torch.no_grad():
    ref_mean, ref_logvar = model.posterior(images)
    ref_latents = (ref_mean - TINY['shift_factor']) * TINY['scaling_factor']
    ref_images = model.decode(ref_latents)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(mean, nhwc(ref_mean), atol=ATOL)
  np.testing.assert_allclose(logvar, nhwc(ref_logvar), atol=ATOL)
  latents = ours.encode(x)
  np.testing.assert_allclose(latents, nhwc(ref_latents), atol=ATOL)
  # Each 2x2 patch of the mean is LayerNormed over its 16 values.
  from nextstep_jax.image import patchify

  tokens = np.asarray(patchify.patchify(np.asarray(mean), 2))
  np.testing.assert_allclose(tokens.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(ours.decode(nhwc(ref_latents)), nhwc(ref_images), atol=ATOL)


def test_safetensors_copy_loads_identically(release, tmp_path):
  root = release[0]
  tensors = vae_import.read_torch_checkpoint(root / 'checkpoint.pt')
  (tmp_path / 'config.json').write_text((root / 'config.json').read_text())
  vae_import.write_safetensors(tmp_path / 'vae.safetensors', tensors)
  again = vae_import.read_release_tensors(tmp_path)
  assert again.keys() == tensors.keys()
  for name in tensors:
    np.testing.assert_array_equal(again[name], tensors[name])


def test_non_contiguous_and_bf16_tensors(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {'t': base.t(), 'slice': base[1:, 2:], 'half': base.to(torch.bfloat16)}
  torch.save(state, tmp_path / 'x.pt')
  loaded = vae_import.read_torch_checkpoint(tmp_path / 'x.pt')
  np.testing.assert_array_equal(loaded['t'], base.t().numpy())
  np.testing.assert_array_equal(loaded['slice'], base[1:, 2:].numpy())
  np.testing.assert_array_equal(loaded['half'].astype(np.float32), base.numpy())


def test_mismatched_checkpoint_lists_names(release, tmp_path):
  root = release[0]
  tensors = vae_import.read_torch_checkpoint(root / 'checkpoint.pt')
  tensors.pop('decoder.conv_out.bias')
  tensors['encoder.extra.weight'] = np.zeros(3, np.float32)
  tensors['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  (tmp_path / 'config.json').write_text((root / 'config.json').read_text())
  vae_import.write_safetensors(tmp_path / 'vae.safetensors', tensors)
  with pytest.raises(vae_import.CheckpointLayoutError) as error:
    vae_import.load_release(tmp_path)
  message = str(error.value)
  assert 'decoder.conv_out.bias' in message and 'encoder.extra.weight' in message
  assert (
    'encoder.conv_in.weight: checkpoint (32, 3, 5, 5), expected (torch layout) (32, 3, 3, 3)'
    in message
  )


class _Exploit:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_malicious_pickle_is_rejected(tmp_path):
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps({'x': _Exploit()}, protocol=2))
    archive.writestr('evil/byteorder', 'little')
  with pytest.raises(vae_import.UnsafeCheckpointError, match='system'):
    vae_import.read_torch_checkpoint(path)


def test_official_size_layout_matches_the_release_names():
  """docs/model.md §8: the f8ch16 key set, by shape evaluation only."""
  from flax import nnx

  model = nnx.eval_shape(lambda: vae.AutoEncoder(vae.AutoEncoderConfig(), nnx.Rngs(0)))
  shapes = {
    vae_import.official_name(path): vae_import.torch_shape(var.get_value().shape)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  assert shapes['encoder.conv_in.weight'] == (128, 3, 3, 3)
  assert shapes['encoder.conv_out.weight'] == (32, 512, 3, 3)
  assert shapes['decoder.conv_in.weight'] == (512, 16, 3, 3)
  assert shapes['decoder.conv_out.weight'] == (3, 128, 3, 3)
  assert shapes['encoder.mid.attn_1.q.weight'] == (512, 512, 1, 1)
  assert sorted(n for n in shapes if 'nin_shortcut.weight' in n) == [
    'decoder.up.0.block.0.nin_shortcut.weight',
    'decoder.up.1.block.0.nin_shortcut.weight',
    'encoder.down.1.block.0.nin_shortcut.weight',
    'encoder.down.2.block.0.nin_shortcut.weight',
  ]
  assert sorted(n for n in shapes if 'sample' in n and n.endswith('weight')) == [
    'decoder.up.1.upsample.conv.weight',
    'decoder.up.2.upsample.conv.weight',
    'decoder.up.3.upsample.conv.weight',
    'encoder.down.0.downsample.conv.weight',
    'encoder.down.1.downsample.conv.weight',
    'encoder.down.2.downsample.conv.weight',
  ]
  assert {n.split('.block.')[1][0] for n in shapes if n.startswith('decoder.up.3.block.')} == {
    '0',
    '1',
    '2',
  }
  assert not any('quant_conv' in n for n in shapes)
