"""Captions in, uint8 images out: prompt building, batching, the jitted generation, decoding.

`TextToImage(config, graphdef, params, text_tokenizer)(captions, seeds)` -> uint8 (B, S, S, 3).
Batches are padded to `sample.batch_size` so one compiled function serves every call; image b
depends only on (caption b, seed b, settings), not on its batch. `TextToImage.from_workdir(RUN)`
rebuilds a trained run from its stored config, tokenizer and latest checkpoint.
"""
import pathlib

import jax
import numpy as np

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers
from nextstep_jax.sampling import generate
from nextstep_jax.training import state as state_lib
from nextstep_jax.utils import images as image_utils

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINT_DIR = 'checkpoints'


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a training run, oldest first."""
  ckpt = checkpoints.Checkpointer(pathlib.Path(workdir) / CHECKPOINT_DIR, keep=1_000_000)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


class TextToImage:
  """A text-to-image sampler bound to one model's params and one config's sample settings."""

  def __init__(self, config, graphdef, params, tok: text_tokenizer.TextTokenizer, **overrides):
    """overrides: sample.* fields for this sampler (e.g. cfg=2.0, num_steps=20)."""
    self.config = config
    sample_cfg = config.sample.to_dict()
    unknown = set(overrides) - set(sample_cfg)
    if unknown:
      raise ValueError(f'unknown sample settings {sorted(unknown)}; known: {sorted(sample_cfg)}')
    sample_cfg.update(overrides)
    self.settings = sample_cfg
    self.graphdef, self.params, self.tok = graphdef, params, tok
    self.grid_h, self.grid_w = configlib.image_grid(config)
    self.image_tokenizer = tokenizers.get_tokenizer(config)
    wrapped = config.copy_and_resolve_references()
    with wrapped.unlocked():
      wrapped.sample.update(sample_cfg)
    self.sampler_cfg = generate.SamplerConfig.from_config(wrapped, self.grid_h, self.grid_w)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **overrides) -> 'TextToImage':
    """Loads a training run: its config.json, tokenizer.model and checkpoint `step` (latest)."""
    root = pathlib.Path(workdir)
    if not (root / CONFIG_FILE).exists():
      raise FileNotFoundError(f'{root} is not a training run: {CONFIG_FILE} is missing '
                              '(train one with nextstep-train --workdir DIR)')
    config = configlib.with_base_defaults(configlib.config_from_json((root / CONFIG_FILE).read_text()))
    tok = text_tokenizer.TextTokenizer.load(str(root / TOKENIZER_FILE))
    tx = state_lib.make_optimizer(config.train)
    graphdef, abstract_state = state_lib.abstract_train_state(config, tx)
    ckpt = checkpoints.Checkpointer(root / CHECKPOINT_DIR, keep=config.train.keep_checkpoints)
    try:
      replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            abstract_state)
      state, _ = ckpt.restore(step, target)
    finally:
      ckpt.close()
    return cls(config, graphdef, state['params'], tok, **overrides)

  def prompts(self, captions) -> dict:
    s = self.settings
    return sequences.build_prompt_batch(
        self.tok, captions, self.grid_h, self.grid_w, self.config.text.max_caption_tokens,
        positive_prompt=s['positive_prompt'], negative_prompt=s['negative_prompt'],
        num_branches=self.sampler_cfg.num_branches)

  def tokens(self, captions, seeds) -> np.ndarray:
    """Image tokens (B, N, T) float32 for `captions` with per-image `seeds`."""
    if len(captions) != len(seeds):
      raise ValueError(f'{len(captions)} captions but {len(seeds)} seeds')
    batch = self.settings['batch_size']
    out = []
    for start in range(0, len(captions), batch):
      chunk, chunk_seeds = list(captions[start:start + batch]), list(seeds[start:start + batch])
      real = len(chunk)
      chunk += [chunk[-1]] * (batch - real)
      chunk_seeds += [chunk_seeds[-1]] * (batch - real)
      prompt = {k: jax.numpy.asarray(v) for k, v in self.prompts(chunk).items()}
      keys = generate.image_keys_from_seeds(chunk_seeds)
      toks = generate.generate_tokens(self.graphdef, self.params, prompt, keys, self.sampler_cfg)
      out.append(np.asarray(toks)[:real])
    return np.concatenate(out, axis=0)

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """Tokens (B, N, T) -> uint8 images (B, S, S, 3)."""
    latents = patchify.unpatchify(tokens, self.grid_h, self.grid_w, self.config.model.latent_patch_size)
    return image_utils.to_uint8(self.image_tokenizer.decode(latents))

  def __call__(self, captions, seeds) -> np.ndarray:
    return self.decode(self.tokens(captions, seeds))

