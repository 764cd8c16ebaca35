"""In-memory training batches from the built-in datasets (shapes world, sklearn digits).

The batch of step s is a pure function of (config.seed, s): epoch e = s * B // num_train uses the
permutation default_rng([seed, e]); the drop-text coin flips use default_rng([seed, s, 1]). The
data-iterator state is therefore just the step, and a resumed run sees exactly the batches an
uninterrupted run would.

Batch arrays (numpy, leading global batch B): input_ids, labels, positions (B, L) int32;
attention_mask (B, L) bool; image_tokens (B, N, T) float32; image_valid (B,) bool.
"""

import os
import pathlib

import numpy as np

from nextstep_jax import configlib
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.data.builtin import shapes
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers


def cache_dir(config) -> pathlib.Path:
  """Where generated data and tokenizer models are cached."""
  root = config.data.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'nextstep_jax')
  return pathlib.Path(root)


def load_images_and_captions(config) -> tuple[np.ndarray, list[str]]:
  """Training images uint8 (n, S, S, 3) and captions of `config.data.dataset`."""
  name, size, num, seed = config.data.dataset, config.image.size, config.data.num_train, config.seed
  if name == 'shapes':
    return shapes.make_dataset(num, seed, size=size, split='train')
  if name == 'shapes_new':
    return shapes.make_new_concept_dataset(
      num, seed, size=size, new_fraction=config.data.new_concept_fraction
    )
  if name == 'digits':
    from nextstep_jax.data.builtin import digits  # sklearn is slow to import

    return digits.make_dataset(num, seed, size=size)
  raise ValueError(f'data.dataset={name!r} is unknown; use "shapes" or "digits"')


def tokenizer_corpus(config) -> list[str]:
  """Captions the sentencepiece model is trained on: the dataset's training captions plus its
  evaluation prompts (so held-out combinations tokenise the same way)."""
  name = config.data.dataset
  if name in ('shapes', 'shapes_new'):  # shapes_new: new words come from text.extra_words.
    _, captions = shapes.make_dataset(4000, 12345, size=config.image.size, split='train')
    extra = shapes.eval_prompts(500, 2, 'heldout', 0) + shapes.eval_prompts(200, 1, 'heldout', 0)
    return list(captions) + extra
  if name == 'digits':
    from nextstep_jax.data.builtin import digits

    return [digits.caption_for(d) for d in range(10)]
  raise ValueError(f'data.dataset={name!r} is unknown; use "shapes" or "digits"')


HF_TOKENIZER_FILE = 'tokenizer.json'  # In converted releases and in runs trained with it.


def hf_tokenizer_path(config) -> str:
  """text.tokenizer_json, else the tokenizer.json of train.init_from's directory."""
  if config.text.tokenizer_json:
    return config.text.tokenizer_json
  source = config.train.init_from
  directory = source.rpartition('@')[0] if '@' in source.rsplit('/', 1)[-1] else source
  return str(pathlib.Path(directory) / HF_TOKENIZER_FILE)


def load_text_tokenizer(config) -> text_tokenizer.Tokenizer:
  """text.tokenizer='hf': the official tokenizer.json (`hf_tokenizer_path`). Otherwise loads
  `text.spm_path`, or trains (first use, deterministic) the dataset's model in the cache."""
  if config.text.get('tokenizer', 'spm') == 'hf':
    return hf_tokenizer.HFTokenizer.load(hf_tokenizer_path(config))
  if config.text.spm_path:
    tok = text_tokenizer.TextTokenizer.load(config.text.spm_path)
  else:
    path = cache_dir(config) / f'{config.data.dataset}_v{config.text.vocab_size}_spm.model'
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = text_tokenizer.TextTokenizer.load_or_train(
      str(path), tokenizer_corpus(config), config.text.vocab_size
    )
  words = tuple(config.text.get('extra_words', ()))
  if not words:
    return tok
  extended = cache_dir(config) / f'{pathlib.Path(tok.path).stem}+{"+".join(words)}.model'
  extended.parent.mkdir(parents=True, exist_ok=True)
  return text_tokenizer.TextTokenizer.load(text_tokenizer.add_words(tok.path, words, str(extended)))


class BuiltinSource:
  """Deterministic, resumable batches of a built-in dataset (see module docstring)."""

  def __init__(self, config, tok: text_tokenizer.TextTokenizer):
    self.config = config
    self.tok = tok
    self.image_tokenizer = tokenizers.get_tokenizer(config)
    self.grid_h, self.grid_w = configlib.image_grid(config)
    self.patch = config.model.latent_patch_size
    self.images, self.captions = load_images_and_captions(config)
    if tok.vocab_size > config.model.vocab_size:
      raise ValueError(
        f'text tokenizer has {tok.vocab_size} ids but model.vocab_size='
        f'{config.model.vocab_size}; raise model.vocab_size or lower text.vocab_size'
      )
    self.max_caption_tokens = config.text.max_caption_tokens
    self.sequence_length = sequences.training_sequence_length(
      tok, self.grid_h, self.grid_w, self.max_caption_tokens
    )
    if self.sequence_length > config.model.max_seq_len:
      raise ValueError(
        f'training sequences have {self.sequence_length} tokens but model.max_seq_len='
        f'{config.model.max_seq_len}; raise model.max_seq_len'
      )
    # Tokenise every caption once, in both layouts (caption first / image block first).
    every = np.arange(len(self.captions))
    self._normal = sequences.build_training_batch(
      tok,
      self.captions,
      self.grid_h,
      self.grid_w,
      self.max_caption_tokens,
      np.zeros(len(every), bool),
    )
    self._dropped = sequences.build_training_batch(
      tok,
      self.captions,
      self.grid_h,
      self.grid_w,
      self.max_caption_tokens,
      np.ones(len(every), bool),
    )

  def __len__(self) -> int:
    return len(self.captions)

  def indices(self, step: int, batch_size: int) -> np.ndarray:
    """Example indices of `step`'s batch (epoch-wise permutations, wrapping across epochs)."""
    n = len(self)
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = flat // n
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
      perm = np.random.default_rng([self.config.seed, int(epoch)]).permutation(n)
      sel = epochs == epoch
      out[sel] = perm[flat[sel] % n]
    return out

  def image_tokens(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> tokens (B, N, T) float32."""
    latents = self.image_tokenizer.encode(tokenizers.uint8_to_unit(images_uint8))
    return np.asarray(patchify.patchify(np.asarray(latents, np.float32), self.patch), np.float32)

  def batch(self, step: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """The global batch of `step` (see module docstring)."""
    batch_size = batch_size or self.config.train.batch_size
    idx = self.indices(step, batch_size)
    drop = (
      np.random.default_rng([self.config.seed, step, 1]).random(batch_size)
      < self.config.data.drop_text_prob
    )
    out = {}
    for key in ('input_ids', 'labels', 'attention_mask', 'positions'):
      out[key] = np.where(drop[:, None], self._dropped[key][idx], self._normal[key][idx])
    out['image_tokens'] = self.image_tokens(self.images[idx])
    out['image_valid'] = np.ones(batch_size, bool)
    return out
