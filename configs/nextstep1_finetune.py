"""Fine-tuning NextStep-1-Large (14B) on your images: released weights, tokenizer.json and VAE.

Variant string: `SIZE[,CONVERTED_DIR]`, SIZE one of 256 (default), 512, tiny. CONVERTED_DIR (the
output of `nextstep-convert --hf-dir stepfun-ai/NextStep-1-Large-Pretrain --out DIR`) sets
train.init_from, the official tokenizer.json (text.tokenizer='hf') and the release's f8ch16 VAE
(image.vae.checkpoint = DIR/vae), and takes the model shape, the VAE architecture and the loss
weights from the release (its config.json, as converted). Training reads the latent cache built with that VAE over the
official aspect buckets of the size:

  nextstep-data build --images IMGS --captions captions.jsonl --out gs://b/data/mine
  nextstep-data cache-latents --config configs/nextstep1_finetune.py:512,DIR \\
      --config.data.paths='gs://b/data/mine-*.array_record' --out gs://b/data/mine-latents
  nextstep-train --config configs/nextstep1_finetune.py:512,DIR \\
      --config.data.latent_cache_paths='gs://b/data/mine-latents-*.array_record' --workdir gs://b/runs/ft
  nextstep-convert --export-run gs://b/runs/ft --out DIR_FT && nextstep-sample --converted DIR_FT ...

Optimiser defaults follow the official 1.1 512-px stage (AdamW (0.9, 0.95), wd 0.1, clip 1,
lr 1e-5, warm-up 1000, cosine) with fewer steps; the objective is the release's (lm 0.01, image
1.0, 4 head copies per token). `tiny` mirrors the tiny official-layout release of the tests
(tests/torch_reference.TINY_RELEASE with the f2 test VAE): seconds on one CPU core.
"""

import pathlib

from nextstep_jax import configlib
from nextstep_jax.image import aspect

base = configlib.config_module('base.py', __file__)
nextstep1_large = configlib.config_module('nextstep1_large.py', __file__)


def get_config(arg=None):
  size, _, converted = (arg or '256').partition(',')
  if size not in ('256', '512', 'tiny'):
    raise ValueError(
      f'configs/nextstep1_finetune.py:{arg}: the size must be 256, 512 or tiny (then ,DIR).'
    )
  c = tiny_release() if size == 'tiny' else nextstep1_large.get_config(size)
  c.name = f'nextstep1_finetune_{size}'
  c.text.tokenizer = 'hf'
  c.data.source = 'arrayrecord'
  c.data.use_latent_cache = True
  c.data.aspect_buckets = tuple(f'{h // unit(c)}*{w // unit(c)}' for h, w in buckets(c))
  if size != 'tiny':
    c.train.lr, c.train.warmup_steps, c.train.steps = 1e-5, 1000, 10000
    c.train.lr_schedule, c.train.min_lr_ratio = 'cosine', 0.1
    c.train.checkpoint_every, c.train.sample_every, c.train.log_every = 500, 1000, 10
  if converted:
    adopt_release(c, converted)
  return c


# Model fields kept from the size variant (how it runs), not taken from the release (what it is).
RUN_FIELDS = ('dtype', 'param_dtype', 'remat_policy', 'attention', 'scan_unroll', 'max_seq_len')


def adopt_release(c, converted: str) -> None:
  """Starts from the converted release in `converted`: its model shape, its training objective
  (loss weights and head copies, read from the release's config.json by the converter), its VAE
  architecture and weights and its tokenizer.json."""
  path = pathlib.Path(converted) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(
      f'{path} is missing: {converted} is not a converted release '
      '(make one with nextstep-convert --hf-dir RELEASE --out DIR).'
    )
  release = configlib.config_from_json(path.read_text())
  c.model.update({k: v for k, v in release.model.items() if k not in RUN_FIELDS and k in c.model})
  for field in ('lm_loss_weight', 'im_loss_weight', 'fm_head_batch_mul'):
    c.loss[field] = release.loss[field]
  c.image.vae.update(
    {k: v for k, v in release.image.vae.items() if k not in ('checkpoint', 'dtype', 'param_dtype')}
  )
  c.image.use_norm = release.image.use_norm
  c.train.init_from = converted
  c.image.vae.checkpoint = str(pathlib.Path(converted) / 'vae')


def unit(c) -> int:
  """Pixels per image token side (VAE downsample x latent patch)."""
  return 2 ** (len(c.image.vae.ch_mult) - 1) * c.model.latent_patch_size


def buckets(c) -> list[tuple[int, int]]:
  """The official aspect buckets in pixels at image.size (tiny: three, so tests stay small)."""
  if c.image.size < aspect.BASE_SIZE:
    s = c.image.size
    return [
      (s, s),
      (s * 3 // 4, s * 5 // 4 // unit(c) * unit(c)),
      (s * 5 // 4 // unit(c) * unit(c), s * 3 // 4),
    ]
  return aspect.buckets(c.image.size)


def tiny_release():
  """The tiny official-layout model (tests/torch_reference.TINY_RELEASE, the f2 test VAE)."""
  c = base.get_base_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = (
    352,
    64,
    2,
    4,
    2,
    16,
  )
  m.intermediate_size, m.rope_theta, m.rms_norm_eps = 96, 1e6, 1e-5
  m.attention_bias, m.o_attention_bias, m.tie_word_embeddings = True, False, False
  m.latent_channels, m.latent_patch_size, m.fm_head_dim, m.fm_head_layers = 16, 2, 32, 2
  m.base_image_grid_size, m.max_seq_len = 32, 4096
  c.image.tokenizer, c.image.size, c.image.use_norm = 'vae', 16, True
  v = c.image.vae
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.norm_groups = 8, (1, 2), 1, 16, 4
  c.text.max_caption_tokens = 24
  c.sample.num_steps, c.sample.batch_size, c.sample.cfg = 4, 4, 3.0
  c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 30, 8, 3e-3, 2
  c.train.log_every, c.train.checkpoint_every, c.train.sample_every = 5, 15, 0
  c.train.num_grid_samples = 4
  c.train.grid_prompts = ('a red square', 'a blue square')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c
