"""Captions in, uint8 images out: prompt building, batching, the jitted generation, decoding.

`TextToImage(config, graphdef, params, text_tokenizer)(captions, seeds)` -> uint8 (B, S, S, 3).
Batches are padded to `sample.batch_size` so one compiled function serves every call; image b
depends only on (caption b, seed b, settings), not on its batch. `TextToImage.from_workdir(RUN)`
rebuilds a trained run (local path or gs:// URL) from its stored config, tokenizer and latest
checkpoint; `TextToImage.from_converted(DIR, mesh)` an official checkpoint converted by `nextstep-convert`
(params only, restored sharded onto the mesh). Any (h, w) token grid can be sampled (`grid=`:
the "h*w" string of the prompt sets the aspect ratio); `edit(images, instructions, seeds)` runs
image editing with 3-way guidance (data/edit_sequences.py).
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.convert import official
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers
from nextstep_jax.sampling import generate
from nextstep_jax.sampling import progress
from nextstep_jax.utils import images as image_utils


class TextToImage:
  """A text-to-image sampler bound to one model's params and one config's sample settings."""

  def __init__(
    self,
    config,
    graphdef,
    params,
    tok: text_tokenizer.Tokenizer,
    image_tokenizer=None,
    progress_every: int = 0,
    max_caption_tokens: int | None = None,
    **overrides,
  ):
    """overrides: sample.* fields for this sampler (e.g. cfg=2.0, num_steps=20).
    image_tokenizer: default `tokenizers.get_tokenizer(config)`. progress_every > 0: a console
    bar over image tokens, advanced every that many tokens (sampling/progress.py).
    max_caption_tokens: the prompt token budget (default the config's text.max_caption_tokens);
    longer prompts than the model trained with are allowed within model.max_seq_len.
    Sampling runs `generate.SamplingProgram` on the placement `params` have (their mesh and
    shardings; prompt rows over the logical `batch` axis); the LM head is left out of it."""
    if max_caption_tokens is not None:
      if max_caption_tokens < 1:
        raise configlib.ConfigError(f'max_caption_tokens={max_caption_tokens} must be >= 1')
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.text.max_caption_tokens = int(max_caption_tokens)
    self.config = config
    sample_cfg = config.sample.to_dict()
    unknown = set(overrides) - set(sample_cfg)
    if unknown:
      raise ValueError(f'unknown sample settings {sorted(unknown)}; known: {sorted(sample_cfg)}')
    sample_cfg.update(overrides)
    self.settings = sample_cfg
    self.graphdef, self.params = generate.for_sampling(graphdef, params)
    self.tok = tok
    self.program = generate.SamplingProgram.for_state(self.graphdef, self.params, config.mesh.rules)
    self.grid_h, self.grid_w = configlib.image_grid(config)
    self.image_tokenizer = image_tokenizer or tokenizers.get_tokenizer(config)
    wrapped = config.copy_and_resolve_references()
    with wrapped.unlocked():
      wrapped.sample.update(sample_cfg)
    self.sampler_cfg = dataclasses.replace(
      generate.SamplerConfig.from_config(wrapped, self.grid_h, self.grid_w),
      progress_every=progress_every,
    )

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **overrides) -> 'TextToImage':
    """Loads a training run: its config.json, text tokenizer (`runs.load_text_tokenizer`) and the
    params of checkpoint `step` (latest; no optimizer moments), onto `generate.sampling_mesh`, cast
    to the compute dtype."""
    runs.check_files(workdir)
    config = configlib.with_base_defaults(runs.load_config(workdir))
    tok = runs.load_text_tokenizer(workdir)
    restored = runs.restore_run(
      workdir,
      step,
      params_only=True,
      mesh=generate.sampling_mesh(config),
      dtype=jnp.dtype(config.model.dtype),
      config=config,
      without_lm_head=True,
    )
    graphdef, params = generate.for_sampling(restored.graphdef, restored.state)
    return cls(config, graphdef, params, tok, **overrides)

  @classmethod
  def from_converted(
    cls,
    directory: str,
    mesh: jax.sharding.Mesh | None = None,
    image_tokenizer=None,
    progress_every: int = 0,
    quantize: str | None = None,
    **overrides,
  ) -> 'TextToImage':
    """Loads a checkpoint written by `nextstep-convert`: params only (no optimizer memory),
    restored straight onto their shardings under `mesh` (default: `generate.sampling_mesh`, every
    device, tensor-parallel within a host, the rest FSDP) and cast to the compute dtype.
    quantize='int8' | 'int4' quantizes the weights of a float conversion as they load
    (model.quant; a `--quantize` conversion loads as stored, no argument needed)."""
    runs.check_files(directory, runs.CONVERTED_TOKENIZER_FILE)
    config = configlib.with_base_defaults(runs.load_config(directory))
    if quantize is not None:
      config.model.quant.mode = quantize
      configlib.validate(config)
    if (
      config.image.tokenizer == 'vae'
      and not config.image.vae.checkpoint
      and image_tokenizer is None
    ):
      raise ValueError(
        f'{directory} was converted without image tokenizer weights (the release had no vae/ '
        'folder): convert again with nextstep-convert --vae DIR (a NextStep-1-f8ch16-Tokenizer '
        'download), or pass image_tokenizer=.'
      )
    mesh = mesh or generate.sampling_mesh(config)
    graphdef, params = generate.for_sampling(
      *official.load_params(directory, mesh, config, without_lm_head=True), config.model.dtype
    )
    tok = hf_tokenizer.HFTokenizer.load(
      str(pathlib.Path(directory) / runs.CONVERTED_TOKENIZER_FILE)
    )
    return cls(
      config,
      graphdef,
      params,
      tok,
      image_tokenizer=image_tokenizer,
      progress_every=progress_every,
      **overrides,
    )

  @property
  def unit(self) -> int:
    """Pixels per image token side: tokenizer downsample x latent_patch_size."""
    return self.image_tokenizer.downsample * self.config.model.latent_patch_size

  def grid_for_size(self, height: int, width: int) -> tuple[int, int]:
    """Token grid (h, w) of a height x width image; both must be multiples of `unit`."""
    if height % self.unit or width % self.unit or height <= 0 or width <= 0:
      raise ValueError(
        f'image size {height}x{width} must be positive multiples of {self.unit} pixels '
        f'(tokenizer downsample x latent_patch_size)'
      )
    return height // self.unit, width // self.unit

  def _sampler_cfg(self, grid, **changes) -> generate.SamplerConfig:
    h, w = grid or (self.grid_h, self.grid_w)
    return dataclasses.replace(self.sampler_cfg, grid_h=h, grid_w=w, **changes)

  def prompts(self, captions, grid=None) -> dict:
    s = self.settings
    h, w = grid or (self.grid_h, self.grid_w)
    return sequences.build_prompt_batch(
      self.tok,
      captions,
      h,
      w,
      self.config.text.max_caption_tokens,
      positive_prompt=s['positive_prompt'],
      negative_prompt=s['negative_prompt'],
      num_branches=self.sampler_cfg.num_branches,
    )

  def _generate(
    self, prompt_rows, count: int, seeds, sampler_cfg: generate.SamplerConfig
  ) -> np.ndarray:
    """Runs batches of `sample.batch_size` images (the last one padded by repetition);
    prompt_rows(indices) -> the prompt dict of those images. Returns (count, N, T) float32."""
    if count != len(seeds):
      raise ValueError(f'{count} prompts but {len(seeds)} seeds')
    batch = self.settings['batch_size']
    calls = -(-count // batch)
    bar = (
      progress.TokenProgress(calls * sampler_cfg.num_tokens) if sampler_cfg.progress_every else None
    )
    out = []
    for start in range(0, count, batch):
      indices = list(range(start, min(start + batch, count)))
      real = len(indices)
      indices += [indices[-1]] * (batch - real)
      prompt = {k: jax.numpy.asarray(v) for k, v in prompt_rows(indices).items()}
      keys = generate.image_keys_from_seeds([seeds[i] for i in indices])
      if bar is None:
        toks = self.program(self.params, prompt, keys, sampler_cfg)
      else:
        with progress.reporting(bar):
          toks = jax.block_until_ready(self.program(self.params, prompt, keys, sampler_cfg))
        bar.next_call(sampler_cfg.num_tokens)
      out.append(np.asarray(toks)[:real])
    return np.concatenate(out, axis=0)

  def tokens(self, captions, seeds, grid=None) -> np.ndarray:
    """Image tokens (B, h*w, T) float32 for `captions` with per-image `seeds` on the token grid
    `grid` = (h, w) (default: the config's image size)."""
    captions = list(captions)
    return self._generate(
      lambda idx: self.prompts([captions[i] for i in idx], grid),
      len(captions),
      seeds,
      self._sampler_cfg(grid),
    )

  def edit_tokens(
    self,
    images: np.ndarray,
    instructions,
    seeds,
    cfg_img: float = 2.0,
    negative_prompt: str | None = None,
    grid=None,
  ) -> np.ndarray:
    """Edited image tokens (B, h*w, T): images uint8 (B, H, W, 3) (H, W multiples of `unit`);
    instructions hold `<image>` (prepended when absent, the official order); 3-way guidance with
    the text scale `cfg` of the settings and `cfg_img`. Target grid default: the source's."""
    images = np.asarray(images)
    source_grid = self.grid_for_size(images.shape[1], images.shape[2])
    h, w = grid or source_grid
    latents = self.image_tokenizer.encode(tokenizers.uint8_to_unit(images))
    source = patchify.patchify(np.asarray(latents, np.float32), self.config.model.latent_patch_size)
    captions = [edit_sequences.with_image_tag(text) for text in instructions]
    negative = self.settings['negative_prompt'] if negative_prompt is None else negative_prompt
    if len(captions) != len(images):
      raise ValueError(f'{len(images)} images but {len(captions)} instructions')

    def rows(idx):
      prompt = edit_sequences.build_edit_prompt_batch(
        self.tok,
        [captions[i] for i in idx],
        *source_grid,
        h,
        w,
        self.config.text.max_caption_tokens,
        positive_prompt=self.settings['positive_prompt'],
        negative_prompt=negative,
      )
      prompt['image_tokens'] = edit_sequences.edit_source_tokens(source[idx])
      return prompt

    return self._generate(
      rows, len(captions), seeds, self._sampler_cfg((h, w), num_branches=3, cfg_img=float(cfg_img))
    )

  def decode(self, tokens: np.ndarray, grid=None) -> np.ndarray:
    """Tokens (B, h*w, T) -> uint8 images (B, h*unit, w*unit, 3)."""
    h, w = grid or (self.grid_h, self.grid_w)
    latents = patchify.unpatchify(tokens, h, w, self.config.model.latent_patch_size)
    return image_utils.to_uint8(self.image_tokenizer.decode(latents))

  def __call__(self, captions, seeds, grid=None) -> np.ndarray:
    return self.decode(self.tokens(captions, seeds, grid), grid)

  def edit(
    self,
    images: np.ndarray,
    instructions,
    seeds,
    cfg_img: float = 2.0,
    negative_prompt: str | None = None,
    grid=None,
  ) -> np.ndarray:
    """Edited uint8 images; see `edit_tokens`."""
    grid = grid or self.grid_for_size(np.shape(images)[1], np.shape(images)[2])
    return self.decode(
      self.edit_tokens(images, instructions, seeds, cfg_img, negative_prompt, grid), grid
    )
