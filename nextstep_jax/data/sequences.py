"""Token layouts of training and sampling sequences (docs/model.md §4); pure numpy, host side.

An image is an h x w grid of continuous tokens in raster order, N = h * w. Its block is
`<|image_area|>` "h*w" `<|begin_of_image|>` `<|image_placeholder|>` x N `<|end_of_image|>`;
the placeholders are where the image tokens are fed. Routing: position i goes to the flow head
iff input_ids[i + 1] is a placeholder, else to `lm_head` with target labels[i + 1].
"""

from collections.abc import Sequence

import numpy as np

from nextstep_jax import errors
from nextstep_jax.data.text_tokenizer import Tokenizer

# Label of positions without an LM target (the HF / torch cross-entropy convention).
IGNORE_ID = -100


class PromptTooLongError(errors.UsageError, ValueError):
  """A caption has more tokens than `text.max_caption_tokens` allows."""

  def __init__(self, caption: str, num_tokens: int, max_caption_tokens: int):
    super().__init__(
      f'Caption {caption!r} has {num_tokens} tokens, more than max_caption_tokens='
      f'{max_caption_tokens}; raise the config field text.max_caption_tokens or shorten it.'
    )
    self.caption = caption
    self.num_tokens = num_tokens
    self.max_caption_tokens = max_caption_tokens


def prompt_prefix_ids(tok: Tokenizer, h: int, w: int) -> list[int]:
  """`<|image_area|>` "h*w" `<|begin_of_image|>`: the ids that start an h x w image.

  Tokenised on its own (as the official pipeline does), then checked to still start with
  `<|image_area|>` (a tokenizer adding BOS, or dropping the first token, fails here).
  """
  if h < 1 or w < 1:
    raise ValueError(f'Image grid must be at least 1 x 1 tokens, got {h} x {w}.')
  prefix = tok.encode(f'<|image_area|>{h}*{w}<|begin_of_image|>')
  if prefix[0] != tok.image_area_id or prefix[-1] != tok.boi_id:
    raise ValueError(
      f'Image prefix for {h}*{w} tokenised to {prefix}: expected it to start '
      f'with <|image_area|> ({tok.image_area_id}) and end with '
      f'<|begin_of_image|> ({tok.boi_id}).'
    )
  return prefix


def image_block_ids(tok: Tokenizer, h: int, w: int) -> list[int]:
  """The prompt prefix, h * w placeholders and `<|end_of_image|>`."""
  return prompt_prefix_ids(tok, h, w) + [tok.image_placeholder_id] * (h * w) + [tok.eoi_id]


def training_sequence_length(tok: Tokenizer, h: int, w: int, max_caption_tokens: int) -> int:
  """Static length L of a training row: caption budget + image block + EOS."""
  return max_caption_tokens + len(image_block_ids(tok, h, w)) + 1


def _caption_ids(tok: Tokenizer, caption: str, max_caption_tokens: int) -> list[int]:
  ids = tok.encode(caption)
  if len(ids) > max_caption_tokens:
    raise PromptTooLongError(caption, len(ids), max_caption_tokens)
  if tok.image_placeholder_id in ids:
    raise ValueError(f'Caption {caption!r} contains the image placeholder token.')
  return ids


def conditioned_prefix_ids(
  tok: Tokenizer, caption: str, h: int, w: int, max_caption_tokens: int
) -> list[int]:
  """caption + `<|image_area|>` "h*w" boi: the conditional prompt of an h x w image.

  The one builder of both layouts: a sampling prompt is exactly this (left-padded), and a
  caption-first training row starts with exactly this, followed by the placeholders, eoi and EOS.
  """
  return _caption_ids(tok, caption, max_caption_tokens) + prompt_prefix_ids(tok, h, w)


def build_training_batch(
  tok: Tokenizer,
  captions: Sequence[str],
  h: int,
  w: int,
  max_caption_tokens: int,
  drop_text: np.ndarray,
) -> dict[str, np.ndarray]:
  """Right-padded training rows for one image of h x w tokens per caption.

  Row b is caption + image block + EOS, or image block + caption + EOS where drop_text[b]
  (official `drop_text_prob`: trains the unconditional branch and captioning), then [PAD] up to
  L = training_sequence_length(...). Labels copy the ids with IGNORE_ID at padding, boi, the
  placeholders and an EOS right after eoi; area, "h*w", eoi, caption and other EOS are targets.
  labels[i] is the target of the logits at position i - 1.

  Args:
    drop_text: (B,) bool.

  Returns:
    input_ids (B, L) int32, labels (B, L) int32, attention_mask (B, L) bool (True = real token),
    positions (B, L) int32 (0..L-1).
  """
  drop_text = np.asarray(drop_text, dtype=bool)
  if drop_text.shape != (len(captions),):
    raise ValueError(f'drop_text has shape {drop_text.shape}, expected ({len(captions)},).')
  block = image_block_ids(tok, h, w)
  image_rest = [tok.image_placeholder_id] * (h * w) + [tok.eoi_id]
  length = max_caption_tokens + len(block) + 1
  rows = []
  for caption, caption_after_image in zip(captions, drop_text):
    if caption_after_image:
      rows.append(block + _caption_ids(tok, caption, max_caption_tokens) + [tok.eos_id])
    else:
      rows.append(
        conditioned_prefix_ids(tok, caption, h, w, max_caption_tokens) + image_rest + [tok.eos_id]
      )
  return training_rows(tok, rows, length)


def training_rows(
  tok: Tokenizer, rows: Sequence[Sequence[int]], length: int
) -> dict[str, np.ndarray]:
  """Right-pads id rows to `length` and labels them by the official rule (see
  `build_training_batch`): IGNORE_ID at padding, boi, placeholders and the EOS right after eoi."""
  input_ids = np.full((len(rows), length), tok.pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), bool)
  for row, ids in enumerate(rows):
    if len(ids) > length:
      raise ValueError(f'training row of {len(ids)} tokens exceeds the row length {length}.')
    input_ids[row, : len(ids)] = ids
    attention_mask[row, : len(ids)] = True

  eos_after_eoi = np.zeros_like(attention_mask)
  eos_after_eoi[:, 1:] = (input_ids[:, 1:] == tok.eos_id) & (input_ids[:, :-1] == tok.eoi_id)
  ignored = (
    ~attention_mask | (input_ids == tok.boi_id) | placeholder_mask(input_ids, tok) | eos_after_eoi
  )
  labels = np.where(ignored, IGNORE_ID, input_ids).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), input_ids.shape).copy()
  return dict(
    input_ids=input_ids, labels=labels, attention_mask=attention_mask, positions=positions
  )


def build_prompt_batch(
  tok: Tokenizer,
  captions: Sequence[str],
  h: int,
  w: int,
  max_caption_tokens: int,
  positive_prompt: str = '',
  negative_prompt: str = '',
  num_branches: int = 2,
) -> dict[str, np.ndarray]:
  """Left-padded sampling prompts, branch-major for classifier-free guidance.

  Rows: B conditional rows (caption, + " " + positive_prompt when non-empty), then, for
  num_branches=2, B unconditional rows (negative_prompt). Each row is [PAD] x n + caption ids +
  prompt_prefix_ids, left-padded to the static width P = max_caption_tokens + len(prefix), so
  one jitted sampler serves every batch. Positions are the raw slots 0..P-1, as the official
  KV-cache inference (left padding not subtracted).

  Returns:
    input_ids (R, P) int32, attention_mask (R, P) bool (True = real token), positions (R, P)
    int32, with R = num_branches * B.
  """
  if num_branches not in (1, 2):
    raise ValueError(f'num_branches must be 1 (no guidance) or 2 (text CFG), got {num_branches}.')
  conditional = [
    f'{caption} {positive_prompt}' if positive_prompt else caption for caption in captions
  ]
  texts = conditional + [negative_prompt] * len(captions) * (num_branches - 1)
  prefix = prompt_prefix_ids(tok, h, w)
  width = max_caption_tokens + len(prefix)
  input_ids = np.full((len(texts), width), tok.pad_id, np.int32)
  attention_mask = np.zeros((len(texts), width), bool)
  for row, text in enumerate(texts):
    ids = conditioned_prefix_ids(tok, text, h, w, max_caption_tokens)
    input_ids[row, width - len(ids) :] = ids
    attention_mask[row, width - len(ids) :] = True
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), input_ids.shape).copy()
  return dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions)


def placeholder_mask(input_ids: np.ndarray, tok: Tokenizer) -> np.ndarray:
  """Where image tokens are fed: (..., L) ids -> (..., L) bool."""
  return np.asarray(input_ids) == tok.image_placeholder_id


def lm_target_mask(input_ids: np.ndarray, labels: np.ndarray, tok: Tokenizer) -> np.ndarray:
  """Positions i whose LM target labels[i + 1] counts: (B, L) ids, labels -> (B, L - 1) bool.

  Mirrors the routing: position i is an LM position iff input_ids[i + 1] is not a placeholder.
  """
  labels = np.asarray(labels)
  return (labels[:, 1:] != IGNORE_ID) & ~placeholder_mask(np.asarray(input_ids)[:, 1:], tok)
