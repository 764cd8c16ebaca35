"""NextStep-1-Large (14B): the official shape, 256x256 images through the f8ch16 VAE.

Checked by shape evaluation (`jax.eval_shape`: 14,953,814,080 params) and AOT compilation, never
run on CPU. Variants: `configs/nextstep1_large.py:512` for 512x512 images.
"""

from nextstep_jax import configlib

base = configlib.config_module('base.py', __file__)


def get_config(arg=None):
  c = base.get_base_config()
  c.name = 'nextstep1_large'
  m = c.model
  m.vocab_size = 152064
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 5120, 48, 40, 8, 128
  m.intermediate_size = 13824
  m.rms_norm_eps = 1e-5
  m.rope_theta = 1e6
  m.attention_bias, m.o_attention_bias, m.tie_word_embeddings = True, False, False
  m.latent_channels, m.latent_patch_size = 16, 2
  m.fm_head_dim, m.fm_head_layers = 1536, 12
  m.use_gen_pos_embed, m.base_image_grid_size = False, 32
  m.max_seq_len = 8192
  m.dtype, m.param_dtype = 'bfloat16', 'float32'
  m.remat_policy = 'full'
  c.image.tokenizer = 'vae'
  c.image.size = 512 if arg == '512' else 256
  c.image.use_norm = True
  c.text.vocab_size = 151643
  c.text.max_caption_tokens = 512
  c.sample.cfg = 7.5
  c.train.lr = 1e-4 if arg != '512' else 1e-5
  c.train.warmup_steps = 5000 if arg != '512' else 1000
  c.train.steps = 500000 if arg != '512' else 20000
  c.train.batch_size = 256
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c
