"""Training batches of image edits (data.source='edit': shards of `nextstep-data build --from edit-folder`).

Record i of data.paths is (source image, instruction, target image). The batch of step s is a
pure function of (seed, s), like the built-in data: epoch e of the global order is the permutation
default_rng([seed, e]) of the records, the drop modes (edit_sequences FULL / DROP_TEXT /
DROP_IMAGE / DROP_BOTH with data.edit_drop_{text,image,both}_prob, training the unconditional
branches of 3-way guidance) come from default_rng([seed, s, 2]); the iterator state is the next
step. Each process decodes only its own rows (the contiguous share of `distributed.process_rows`).
Both images are resized to cover image.size and centre-cropped (square; one grid per step),
encoded with the image tokenizer and patchified; rows are `edit_sequences.build_edit_training_batch`
(source tokens at `<image>`, flow-matching loss on the target, LM loss on the text). A record that
fails to decode becomes an ignored row (image_valid False, no targets) and is counted.
"""

import grain
import numpy as np

from nextstep_jax import configlib
from nextstep_jax.data import bad_records
from nextstep_jax.data import captions as captions_lib
from nextstep_jax.data import edit_builder
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import image_preprocess
from nextstep_jax.data import records
from nextstep_jax.data import sequences
from nextstep_jax.data import text_tokenizer
from nextstep_jax.image import patchify
from nextstep_jax.image import tokenizers


class EditTrainingData:
  """This process's rows of each global batch of edits; the state is the next step."""

  kind = 'edit'

  def __init__(self, config, tok: text_tokenizer.Tokenizer, process_index: int, process_count: int):
    self.config, self.tok = config, tok
    self.process_index, self.process_count = process_index, process_count
    self.source = grain.sources.ArrayRecordDataSource(records.resolve_paths(config.data.paths))
    self.image_tokenizer = tokenizers.get_tokenizer(config)
    self.grid = configlib.image_grid(config)
    self.length = edit_sequences.edit_training_length(
      tok, *self.grid, *self.grid, config.text.max_caption_tokens
    )
    if self.length > config.model.max_seq_len:
      raise ValueError(
        f'edit training rows have {self.length} tokens but model.max_seq_len='
        f'{config.model.max_seq_len}; raise model.max_seq_len'
      )
    if tok.vocab_size > config.model.vocab_size:
      raise ValueError(
        f'text tokenizer has {tok.vocab_size} ids but model.vocab_size={config.model.vocab_size}'
      )
    self.counts: dict[str, int] = {}
    self._step = 0

  def __len__(self) -> int:
    return len(self.source)

  def indices(self, step: int, batch_size: int) -> np.ndarray:
    """Record indices of `step`'s global batch (epoch-wise permutations, wrapping across epochs)."""
    n = len(self)
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = flat // n
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
      perm = np.random.default_rng([self.config.seed, int(epoch)]).permutation(n)
      out[epochs == epoch] = perm[flat[epochs == epoch] % n]
    return out

  def _example(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
    source_bytes, target_bytes, instruction = edit_builder.split_edit_record(
      self.source[int(index)]
    )
    size = self.config.image.size
    images = []
    for data in (source_bytes, target_bytes):
      image, fixes = image_preprocess.decode_image(data)
      bad_records.add(self.counts, dict.fromkeys(fixes, 1))
      images.append(image_preprocess.to_training_image(image, size, size))
    text, fixes = captions_lib.decode_caption(instruction)
    text, more = captions_lib.fit_caption(
      text, self.tok, self.config.text.max_caption_tokens, self.config.data.overlong_captions
    )
    bad_records.add(self.counts, dict.fromkeys(fixes + more, 1))
    return images[0], images[1], text

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step` (see module docstring)."""
    d, batch_size = self.config.data, self.config.train.batch_size
    if batch_size % self.process_count:
      raise ValueError(
        f'train.batch_size={batch_size} is not divisible by {self.process_count} processes'
      )
    per = batch_size // self.process_count
    rows = slice(self.process_index * per, (self.process_index + 1) * per)
    idx = self.indices(step, batch_size)[rows]
    modes = edit_sequences.edit_drop_modes(
      np.random.default_rng([self.config.seed, step, 2]),
      batch_size,
      d.edit_drop_text_prob,
      d.edit_drop_image_prob,
      d.edit_drop_both_prob,
    )[rows]
    size = self.config.image.size
    sources, targets, texts, valid = [], [], [], []
    for index in idx:
      try:
        source, target, text = self._example(index)
      except bad_records.BadRecordError as error:  # An ignored row keeps the batch's shape.
        bad_records.add(self.counts, {error.reason: 1})
        source, target, text = (
          np.zeros((size, size, 3), np.uint8),
          np.zeros((size, size, 3), np.uint8),
          '',
        )
      valid.append(bool(text))
      sources.append(source)
      targets.append(target)
      texts.append(text)
    tokens = self._tokens(np.stack(sources + targets))
    batch = edit_sequences.build_edit_training_batch(
      self.tok,
      texts,
      *self.grid,
      *self.grid,
      self.config.text.max_caption_tokens,
      modes,
      tokens[:per],
      tokens[per:],
    )
    valid = np.asarray(valid)
    batch['image_valid'] = valid
    batch['image_token_loss'] &= valid[:, None]
    batch['labels'] = np.where(valid[:, None], batch['labels'], sequences.IGNORE_ID).astype(
      np.int32
    )
    return batch

  def _tokens(self, images_uint8: np.ndarray) -> np.ndarray:
    latents = self.image_tokenizer.encode(tokenizers.uint8_to_unit(images_uint8))
    return np.asarray(
      patchify.patchify(np.asarray(latents, np.float32), self.config.model.latent_patch_size),
      np.float32,
    )

  def next_batch(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {'kind': self.kind, 'step': self._step}

  def set_state(self, state: dict) -> None:
    if state.get('kind') != self.kind or not isinstance(state.get('step'), int):
      raise ValueError(
        f'{state!r} is not an {self.kind} data state (want {{"kind": "{self.kind}", "step": int}}); '
        'resume with the data config that wrote the checkpoint'
      )
    self._step = state['step']
