"""PyTorch reference of the official NextStep-1 model and sampler, and a writer of tiny releases.

Written from the model document (docs/model.md), independent of our JAX code: the
backbone is transformers' Qwen2Model (eager attention), the flow head / projectors are rebuilt
from §5, the sampler is §7's loop (KV-cache decoding, per-token Euler–Maruyama on grid A with
CFG in the head). `write_release` saves a model as a release does (sharded safetensors + index,
config.json, tokenizer.json). Used by tests/convert and benchmarks/sampling_vs_official.py.
"""

import inspect
import json
import math
import os
import pathlib

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config
from transformers import Qwen2Model

# A tiny release: Qwen2 shape fields of §1 plus the NextStep fields of §8.
TINY_RELEASE = dict(
  vocab_size=352,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  intermediate_size=96,
  rope_theta=1e6,
  rms_norm_eps=1e-5,
  max_position_embeddings=4096,
  latent_channels=16,
  latent_patch_size=2,
  fm_head_dim=32,
  fm_head_layers=2,
)


class TimestepEmbedder(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first.
    return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.in_ln = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

  def forward(self, x, y):
    shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
    return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
  def __init__(self, width, token_dim):
    super().__init__()
    self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(width, token_dim)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

  def forward(self, x, y):
    shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class HeadNet(nn.Module):
  """`image_head.net`: velocity(x_t (M, T), t (M,), c (M, D)) -> (M, T)."""

  def __init__(self, token_dim, cond_dim, width, depth):
    super().__init__()
    self.time_embed = TimestepEmbedder(width)
    self.cond_embed = nn.Linear(cond_dim, width)
    self.input_proj = nn.Linear(token_dim, width)
    self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
    self.final_layer = FinalLayer(width, token_dim)

  def forward(self, x, t, c):
    y = self.time_embed(t) + self.cond_embed(c)
    x = self.input_proj(x)
    for block in self.res_blocks:
      x = block(x, y)
    return self.final_layer(x, y)


class ImageHead(nn.Module):
  def __init__(self, *args):
    super().__init__()
    self.net = HeadNet(*args)


class NextStepTorch(nn.Module):
  """Qwen2 backbone (bare names in the release) + lm_head + projectors + flow head."""

  def __init__(self, release: dict, attn_implementation: str = 'eager'):
    super().__init__()
    r = release
    qwen = Qwen2Config(
      vocab_size=r['vocab_size'],
      hidden_size=r['hidden_size'],
      num_hidden_layers=r['num_hidden_layers'],
      num_attention_heads=r['num_attention_heads'],
      num_key_value_heads=r['num_key_value_heads'],
      head_dim=r['head_dim'],
      intermediate_size=r['intermediate_size'],
      rope_theta=r['rope_theta'],
      rms_norm_eps=r['rms_norm_eps'],
      max_position_embeddings=r['max_position_embeddings'],
      tie_word_embeddings=False,
      attn_implementation=attn_implementation,
    )
    d = r['hidden_size']
    token_dim = r['latent_channels'] * r['latent_patch_size'] ** 2
    self.backbone = Qwen2Model(qwen)
    self.lm_head = nn.Linear(d, r['vocab_size'], bias=False)
    self.image_in_projector = nn.Linear(token_dim, d)
    self.image_out_projector = nn.Linear(d, d)
    self.image_head = ImageHead(token_dim, d, r['fm_head_dim'], r['fm_head_layers'])

  def randomize(self, seed: int, std: float = 0.15):
    """Every weight ~ N(0, std) (norm weights 1 + N(0, std)): no zero-initialised outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        p.copy_(noise + (1.0 if name.endswith('norm.weight') or 'in_ln.weight' in name else 0.0))
    return self

  def release_state_dict(self) -> dict:
    """Official names: backbone keys bare (`layers.N.*`, `embed_tokens`, `norm`)."""
    return {
      k.removeprefix('backbone.'): v.detach().contiguous() for k, v in self.state_dict().items()
    }


def write_release(
  model: NextStepTorch,
  release: dict,
  tokenizer_path: str,
  out: str | pathlib.Path,
  num_shards: int = 3,
  dtype=torch.float32,
  extra_tensors=None,
) -> pathlib.Path:
  """Writes `out/{model-0000k-of-0000n.safetensors, model.safetensors.index.json, config.json,
  tokenizer.json}` as a release does. Returns `out`."""
  from tokenizers import Tokenizer

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {k: v.to(dtype) for k, v in model.release_state_dict().items()}
  tensors.update(extra_tensors or {})
  names = sorted(tensors)
  weight_map, total = {}, 0
  for shard in range(num_shards):
    file = f'model-{shard + 1:05d}-of-{num_shards:05d}.safetensors'
    part = {name: tensors[name] for name in names[shard::num_shards]}
    save_file(part, str(out / file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(part, file))
    total += sum(t.numel() * t.element_size() for t in part.values())
  (out / 'model.safetensors.index.json').write_text(
    json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2)
  )
  tok = Tokenizer.from_file(tokenizer_path)
  config = dict(
    model_type='nextstep',
    architectures=['LlamaForCausalLM'],
    auto_map={'AutoModel': 'models/nextstep_model.NextStep'},
    attention_bias=True,
    o_attention_bias=False,
    mlp_bias=False,
    rope_scaling=None,
    tie_word_embeddings=False,
    boi=tok.token_to_id('<|begin_of_image|>'),
    eoi=tok.token_to_id('<|end_of_image|>'),
    image_placeholder_id=tok.token_to_id('<|image_placeholder|>'),
    pad_token_id=tok.token_to_id('[PAD]'),
    eos_token_id=tok.token_to_id('<|endoftext|>'),
    bos_token_id=tok.token_to_id('<|endoftext|>'),
    fm_head_batch_mul=4,
    lm_loss_weight=0.01,
    im_loss_weight=1.0,
    use_gen_pos_embed=False,
    base_image_grid_size=32,
    vae_name_or_path='vae',
  )
  config.update(
    release
  )  # The release's own fields (shape, and overrides such as use_gen_pos_embed).
  (out / 'config.json').write_text(json.dumps(config, indent=2))
  (out / 'tokenizer.json').write_text(pathlib.Path(tokenizer_path).read_text())
  return out


# ----------------------------------------------------------------------------- official sampler


def patchify_official(latents_nchw: torch.Tensor, patch: int = 2) -> torch.Tensor:
  """(B, C, H, W) -> (B, h*w, C*p*p): reshape (B,C,h,p,w,p), permute (B,h,w,C,p,p) (§3)."""
  b, c, height, width = latents_nchw.shape
  h, w = height // patch, width // patch
  x = latents_nchw.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5)
  return x.reshape(b, h * w, c * patch * patch)


def time_grid_a(num_steps: int, shift: float, last_step_size: float) -> torch.Tensor:
  u = torch.linspace(0, 1 - last_step_size, num_steps, dtype=torch.float32)
  return u / (shift - (shift - 1) * u)


def cfg_combine(v: torch.Tensor, cfg: float, cfg_img: float, branches: int) -> torch.Tensor:
  """[gh] head guidance on branch-major rows."""
  if branches == 1:
    return v
  if branches == 2:
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)
  v_full, v_img, v_none = v.chunk(3)
  return v_none + cfg_img * (v_img - v_none) + cfg * (v_full - v_img)


def sample_token(net, cond, x0, step_noise, grid, last_step_size, cfg, cfg_img, branches):
  """Per-token Euler–Maruyama (§7 grid A): x0 (B, T); step_noise (N-1, B, T); cond (R, D); grid
  (N,) tensor. Traceable by torch.compile(fullgraph=True) (no host syncs)."""
  x = x0.float()

  def velocity(x, t):
    rows = x.repeat(branches, 1)
    v = net(rows.to(cond.dtype), t.reshape(1).expand(rows.shape[0]), cond).float()
    return cfg_combine(v, cfg, cfg_img, branches)

  for i in range(len(grid) - 1):
    t, dt = grid[i], grid[i + 1] - grid[i]
    v = velocity(x, t)
    score = (t * v - x) / (1 - t)
    drift = v + (1 - t) * score
    x = x + drift * dt + torch.sqrt(2 * (1 - t)) * torch.sqrt(dt) * step_noise[i]
  return x + last_step_size * velocity(x, grid[-1])


@torch.no_grad()
def generate(
  model: NextStepTorch,
  input_ids,
  attention_mask,
  num_tokens,
  x0,
  step_noise,
  *,
  cfg,
  cfg_img=1.0,
  branches=2,
  num_steps=4,
  shift=1.0,
  last_step_size=0.04,
  use_norm=False,
  prompt_embeds=None,
  token_sampler=None,
  backbone=None,
):
  """The official loop: prefill with a KV cache, then per image token k: c = out_proj(last hidden),
  token = sampler(c), [LayerNorm], feed in_proj(token) to every row for one cached step.
  input_ids/attention_mask (R, P) left padded; positions = raw slots. x0 (N, B, T), step_noise
  (N, num_steps - 1, B, T). Returns tokens (B, N, T) float32."""
  from transformers import DynamicCache

  backbone = model.backbone if backbone is None else backbone
  cache_arg = cache_kwarg(backbone)
  token_sampler = sample_token if token_sampler is None else token_sampler
  rows, width = input_ids.shape
  grid = time_grid_a(num_steps, shift, last_step_size)
  embeds = model.backbone.embed_tokens(input_ids) if prompt_embeds is None else prompt_embeds
  cache = DynamicCache()
  out = backbone(
    inputs_embeds=embeds,
    attention_mask=attention_mask,
    position_ids=torch.arange(width)[None].expand(rows, width),
    use_cache=True,
    **{cache_arg: cache},
  )
  last = out.last_hidden_state[:, -1]
  mask = attention_mask
  tokens = []
  for k in range(num_tokens):
    cond = model.image_out_projector(last)
    token = token_sampler(
      model.image_head.net, cond, x0[k], step_noise[k], grid, last_step_size, cfg, cfg_img, branches
    )
    if use_norm:
      token = torch.nn.functional.layer_norm(token, (token.shape[-1],), eps=1e-6)
    tokens.append(token)
    if k == num_tokens - 1:
      break
    mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
    x = model.image_in_projector(
      token.to(model.image_in_projector.weight.dtype).repeat(branches, 1)
    )[:, None]
    out = backbone(
      inputs_embeds=x,
      attention_mask=mask,
      position_ids=torch.full((rows, 1), width + k),
      use_cache=True,
      **{cache_arg: cache},
    )
    last = out.last_hidden_state[:, -1]
  return torch.stack(tokens, dim=1)


def cache_kwarg(backbone) -> str:
  """The KV-cache keyword of Qwen2Model.forward: `cache` from transformers 5.2x (`past_key_values`
  deprecated), `past_key_values` before."""
  forward = getattr(backbone, '_orig_mod', backbone).forward
  return 'cache' if 'cache' in inspect.signature(forward).parameters else 'past_key_values'


def to_torch(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x))
