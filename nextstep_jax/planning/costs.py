"""The FLOPs and bytes model of training and sampling, shared by the AOT planner and the sweeps.

Model FLOPs count 2 per multiply-add of the weights used as matrices (`decoder_matmul_params`)
and attention's QK^T and PV (`attention_flops`); a train step is 3x its forward (forward +
backward). Head evaluations per image token come from the integrator
(`IntegratorConfig.velocity_calls`), the one count of them.
"""

import jax.numpy as jnp

from nextstep_jax import configlib
from nextstep_jax.sampling import generate


def sample_shapes(config) -> tuple[int, int, int, generate.SamplerConfig]:
  """(images B, prompt rows R, prompt width P, sampler config) of one sampling batch."""
  h, w = configlib.image_grid(config)
  cfg = generate.SamplerConfig.from_config(config, h, w)
  width = configlib.required_seq_len(config) - h * w - 2  # Caption + prefix; no eoi / eos.
  images = config.sample.batch_size
  return images, cfg.num_branches * images, width, cfg


def decoder_matmul_params(config) -> dict:
  """Weights used as matrices per token: decoder layers, lm_head, image projectors, flow head."""
  m = config.model
  attn = (
    m.hidden_size * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    + m.num_heads * m.head_dim * m.hidden_size
  )
  mlp = 3 * m.hidden_size * m.intermediate_size
  w, t = m.fm_head_dim, configlib.token_dim(config)
  head = (
    256 * w
    + w * w
    + m.hidden_size * w
    + t * w  # time (2 dense), cond, input_proj
    + m.fm_head_layers * (2 * w * w + 3 * w * w)
    + 2 * w * w
    + w * t
  )
  return {
    'decoder': m.num_layers * (attn + mlp),
    'lm_head': m.hidden_size * m.vocab_size,
    'image_in': t * m.hidden_size,
    'image_out': m.hidden_size * m.hidden_size,
    'head': head,
  }


def attention_flops(config, batch: int, queries: int, keys: int, causal: bool) -> float:
  """Forward QK^T + PV FLOPs over all layers: 4 * H * E per (query, attended key)."""
  m = config.model
  pairs = queries * (keys + 1) / 2 if causal else queries * keys
  return 4.0 * m.num_layers * m.num_heads * m.head_dim * pairs * batch


def train_model_flops(config, seq_len: int | None = None) -> float:
  """One train step: 6 * weights * tokens (forward + backward) per component, plus causal
  attention (x3). seq_len: the sequence length L (default `configlib.required_seq_len`)."""
  b, l = config.train.batch_size, seq_len or configlib.required_seq_len(config)
  h, w = configlib.image_grid(config)
  n = h * w
  p = decoder_matmul_params(config)
  head_rows = b * n * config.loss.fm_head_batch_mul
  forward = (
    2 * p['decoder'] * b * l
    + 2 * p['lm_head'] * b * (l - 1)
    + 2 * p['image_in'] * b * n
    + 2 * p['image_out'] * b * n
    + 2 * p['head'] * head_rows
  )
  return 3 * (forward + attention_flops(config, b, l, l, causal=True))


def sample_model_flops(config) -> float:
  """One batch of images: prefill, N decoder steps (attention over the filled cache), and per
  token the condition (image_out_projector, cond_embed) once plus the head's velocity evaluations
  on every branch row; the time embedding MLP runs once per evaluation on the step's scalar time."""
  images, rows, width, cfg = sample_shapes(config)
  n = cfg.num_tokens
  p = decoder_matmul_params(config)
  prefill = 2 * p['decoder'] * rows * width + attention_flops(config, rows, width, width, True)
  decode = (
    n * (2 * (p['decoder'] + p['image_in']) * rows)
    + attention_flops(config, rows, n, n, True)
    + attention_flops(config, rows, n, width, False)
  )
  w, calls = config.model.fm_head_dim, cfg.integrator.velocity_calls
  cond_embed = config.model.hidden_size * w  # Once per token, as image_out.
  time_mlp = 256 * w + w * w  # One row per evaluation.
  per_row = p['image_out'] + cond_embed + (p['head'] - cond_embed - time_mlp) * calls
  head = n * 2 * (rows * per_row + time_mlp * calls)
  return prefill + decode + head


def splash_compiler_flops(config, batch_per_device: float, seq_len: int) -> float:
  """Per-device FLOPs inside the splash kernels (invisible to the cost analysis) for a train step."""
  forward = attention_flops(config, batch_per_device, seq_len, seq_len, causal=True)
  recompute = forward if config.model.remat_policy != 'none' else 0.0
  return forward + recompute + 2.5 * forward


def collective_bytes(config, mesh, params: int) -> float:
  """Per-device ICI bytes of FSDP per train step: params all-gathered (compute dtype) for the
  forward and again for the backward, gradients reduce-scattered (f32), and data-parallel
  gradient all-reduce of the local shard."""
  fsdp, data = mesh.shape['fsdp'], mesh.shape['data']
  compute = jnp.dtype(config.model.dtype).itemsize
  gathered = params * (fsdp - 1) / fsdp
  traffic = 2 * gathered * compute + gathered * 4
  if data > 1:
    traffic += 2 * params / fsdp * (data - 1) / data * 4
  return traffic
