"""Image-editing prompt rows (docs/model.md §4, "Editing inference"), host side.

An edit caption holds one literal `<image>`; it is replaced by the source image's block
`<|image_area|>` "hs*ws" boi placeholder x (hs*ws) eoi, the source tokens go into the
placeholders, and the target's prefix `<|image_area|>` "h*w" boi follows (official order:
"<image>" + instruction). Three branch-major row groups for 3-way guidance:
  [full: "<image>" + instruction (+ " " + positive); source image: "<image>" + negative;
   negative text only: negative],
the first two carrying the source tokens (the official pipeline duplicates the image list for them).

Training rows (`build_edit_training_batch`, right-padded like T2I rows): the edit caption with the
source block at `<image>`, then the target block and EOS; labels by the T2I rule (boi, placeholders
and the EOS after the target's eoi ignored), so the instruction text is an LM target and only the
target image's tokens get the flow-matching loss. Drop modes train the unconditional branches of
3-way guidance: DROP_TEXT keeps the source image with an empty instruction (the "source image +
negative text" branch), DROP_BOTH keeps neither (the "negative text only" branch), DROP_IMAGE keeps
the instruction without the source.
"""

from collections.abc import Sequence

import numpy as np

from nextstep_jax.data import sequences
from nextstep_jax.data.text_tokenizer import Tokenizer

IMAGE_TAG = '<image>'


def with_image_tag(instruction: str) -> str:
  """`instruction` as an edit caption: unchanged if it holds `<image>`, else "<image>" + instruction."""
  return instruction if IMAGE_TAG in instruction else IMAGE_TAG + instruction


def _edit_text_ids(
  tok: Tokenizer, text: str, block: list[int], max_caption_tokens: int
) -> list[int]:
  if text.count(IMAGE_TAG) != 1:
    raise ValueError(
      f'Edit caption {text!r} must hold exactly one {IMAGE_TAG!r} where the source image goes.'
    )
  before, after = text.split(IMAGE_TAG)
  before_ids, after_ids = tok.encode(before) if before else [], tok.encode(after) if after else []
  if len(before_ids) + len(after_ids) > max_caption_tokens:
    raise sequences.PromptTooLongError(text, len(before_ids) + len(after_ids), max_caption_tokens)
  return before_ids + block + after_ids


def build_edit_prompt_batch(
  tok: Tokenizer,
  captions: Sequence[str],
  source_h: int,
  source_w: int,
  h: int,
  w: int,
  max_caption_tokens: int,
  positive_prompt: str = '',
  negative_prompt: str = '',
) -> dict[str, np.ndarray]:
  """Left-padded 3-way edit prompts for B captions, each holding one `<image>`.

  Width P = max_caption_tokens + len(source block) + len(target prefix); positions are the raw
  slots 0..P-1 (as T2I prompts).

  Returns:
    input_ids (3B, P) int32, attention_mask (3B, P) bool, positions (3B, P) int32,
    image_token_mask (3B, P) bool (the source placeholders: rows 0..2B-1 hold hs*ws each, rows
    2B..3B-1 none).
  """
  block = sequences.image_block_ids(tok, source_h, source_w)
  prefix = sequences.prompt_prefix_ids(tok, h, w)
  conditional = [f'{c} {positive_prompt}' if positive_prompt else c for c in captions]
  with_image = [
    _edit_text_ids(tok, text, block, max_caption_tokens)
    for text in conditional + [IMAGE_TAG + negative_prompt] * len(captions)
  ]
  text_only = [sequences._caption_ids(tok, negative_prompt, max_caption_tokens)] * len(captions)
  rows = [ids + prefix for ids in with_image + text_only]
  width = max_caption_tokens + len(block) + len(prefix)
  input_ids = np.full((len(rows), width), tok.pad_id, np.int32)
  attention_mask = np.zeros((len(rows), width), bool)
  for row, ids in enumerate(rows):
    input_ids[row, width - len(ids) :] = ids
    attention_mask[row, width - len(ids) :] = True
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), input_ids.shape).copy()
  return dict(
    input_ids=input_ids,
    attention_mask=attention_mask,
    positions=positions,
    image_token_mask=sequences.placeholder_mask(input_ids, tok),
  )


def edit_source_tokens(source_tokens: np.ndarray) -> np.ndarray:
  """Source tokens (B, Ns, T) -> the prompt's (3B, Ns, T): rows of branches 0 and 1 get them,
  branch 2 (text only, no placeholders) zeros."""
  source_tokens = np.asarray(source_tokens, np.float32)
  return np.concatenate([source_tokens, source_tokens, np.zeros_like(source_tokens)], axis=0)


FULL, DROP_TEXT, DROP_IMAGE, DROP_BOTH = 0, 1, 2, 3  # Edit training row modes.


def edit_training_length(
  tok: Tokenizer, source_h: int, source_w: int, h: int, w: int, max_caption_tokens: int
) -> int:
  """Static length L of an edit training row: caption budget + source block + target block + EOS."""
  return (
    max_caption_tokens
    + len(sequences.image_block_ids(tok, source_h, source_w))
    + len(sequences.image_block_ids(tok, h, w))
    + 1
  )


def edit_drop_modes(
  rng, count: int, drop_text_prob: float, drop_image_prob: float, drop_both_prob: float
) -> np.ndarray:
  """(count,) int modes drawn with the given probabilities (the rest FULL)."""
  probs = np.array([drop_text_prob, drop_image_prob, drop_both_prob], np.float64)
  if probs.min() < 0 or probs.sum() > 1:
    raise ValueError(f'edit drop probabilities {probs.tolist()} must be >= 0 and sum to <= 1.')
  return rng.choice(4, size=count, p=[1 - probs.sum(), *probs]).astype(np.int32)


def build_edit_training_batch(
  tok: Tokenizer,
  instructions: Sequence[str],
  source_h: int,
  source_w: int,
  h: int,
  w: int,
  max_caption_tokens: int,
  modes: np.ndarray,
  source_tokens: np.ndarray,
  target_tokens: np.ndarray,
) -> dict[str, np.ndarray]:
  """Edit training rows for B (source, instruction, target) triplets (see module docstring).

  Args:
    instructions: B edit captions (`with_image_tag` adds "<image>" in front when absent).
    modes: (B,) int, FULL / DROP_TEXT / DROP_IMAGE / DROP_BOTH.
    source_tokens: (B, Ns, T), Ns = source_h * source_w; target_tokens: (B, Nt, T), Nt = h * w.

  Returns:
    The T2I batch keys (input_ids, labels, attention_mask, positions (B, L); image_tokens
    (B, Ns + Nt, T) in placeholder order; image_valid (B,)) plus image_token_loss (B, Ns + Nt)
    bool, True on the target's tokens. Rows without the source hold the target tokens first and
    Ns unused zero tokens after them.
  """
  modes = np.asarray(modes)
  source_tokens, target_tokens = (
    np.asarray(source_tokens, np.float32),
    np.asarray(target_tokens, np.float32),
  )
  ns, nt = source_h * source_w, h * w
  if source_tokens.shape[:2] != (len(instructions), ns) or target_tokens.shape[:2] != (
    len(instructions),
    nt,
  ):
    raise ValueError(
      f'source tokens {source_tokens.shape} / target tokens {target_tokens.shape} do not match '
      f'{len(instructions)} rows of {source_h}x{source_w} and {h}x{w} grids.'
    )
  source_block = sequences.image_block_ids(tok, source_h, source_w)
  target_block = sequences.image_block_ids(tok, h, w)
  rows, tokens, loss = [], [], []
  for instruction, mode, src, tgt in zip(instructions, modes, source_tokens, target_tokens):
    text = with_image_tag(instruction) if mode == FULL or mode == DROP_IMAGE else IMAGE_TAG
    if mode == DROP_BOTH:
      ids = []
    elif mode == DROP_IMAGE:
      ids = sequences._caption_ids(tok, text.replace(IMAGE_TAG, '', 1), max_caption_tokens)
    else:
      ids = _edit_text_ids(tok, text, source_block, max_caption_tokens)
    rows.append(ids + target_block + [tok.eos_id])
    with_source = mode in (FULL, DROP_TEXT)
    tokens.append(
      np.concatenate([src, tgt]) if with_source else np.concatenate([tgt, np.zeros_like(src)])
    )
    loss.append(
      np.r_[np.zeros(ns, bool), np.ones(nt, bool)]
      if with_source
      else np.r_[np.ones(nt, bool), np.zeros(ns, bool)]
    )
  batch = sequences.training_rows(
    tok, rows, edit_training_length(tok, source_h, source_w, h, w, max_caption_tokens)
  )
  batch.update(
    image_tokens=np.stack(tokens),
    image_valid=np.ones(len(rows), bool),
    image_token_loss=np.stack(loss),
  )
  return batch
