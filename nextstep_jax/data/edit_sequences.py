"""Image-editing prompt rows (docs/model.md §4, "Editing inference"), host side.

An edit caption holds one literal `<image>`; it is replaced by the source image's block
`<|image_area|>` "hs*ws" boi placeholder x (hs*ws) eoi, the source tokens go into the
placeholders, and the target's prefix `<|image_area|>` "h*w" boi follows (official order:
"<image>" + instruction). Three branch-major row groups for 3-way guidance:
  [full: "<image>" + instruction (+ " " + positive); source image: "<image>" + negative;
   negative text only: negative],
the first two carrying the source tokens (the official pipeline duplicates the image list for them).
"""
from typing import Sequence

import numpy as np

from nextstep_jax.data import sequences
from nextstep_jax.data.text_tokenizer import Tokenizer

IMAGE_TAG = '<image>'


def with_image_tag(instruction: str) -> str:
  """`instruction` as an edit caption: unchanged if it holds `<image>`, else "<image>" + instruction."""
  return instruction if IMAGE_TAG in instruction else IMAGE_TAG + instruction


def _edit_text_ids(tok: Tokenizer, text: str, block: list[int], max_caption_tokens: int) -> list[int]:
  if text.count(IMAGE_TAG) != 1:
    raise ValueError(f'Edit caption {text!r} must hold exactly one {IMAGE_TAG!r} where the source image goes.')
  before, after = text.split(IMAGE_TAG)
  before_ids, after_ids = tok.encode(before) if before else [], tok.encode(after) if after else []
  if len(before_ids) + len(after_ids) > max_caption_tokens:
    raise sequences.PromptTooLongError(text, len(before_ids) + len(after_ids), max_caption_tokens)
  return before_ids + block + after_ids


def build_edit_prompt_batch(tok: Tokenizer, captions: Sequence[str], source_h: int, source_w: int, h: int,
                            w: int, max_caption_tokens: int, positive_prompt: str = '',
                            negative_prompt: str = '') -> dict[str, np.ndarray]:
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
  with_image = [_edit_text_ids(tok, text, block, max_caption_tokens)
                for text in conditional + [IMAGE_TAG + negative_prompt] * len(captions)]
  text_only = [sequences._caption_ids(tok, negative_prompt, max_caption_tokens)] * len(captions)  # pylint: disable=protected-access
  rows = [ids + prefix for ids in with_image + text_only]
  width = max_caption_tokens + len(block) + len(prefix)
  input_ids = np.full((len(rows), width), tok.pad_id, np.int32)
  attention_mask = np.zeros((len(rows), width), bool)
  for row, ids in enumerate(rows):
    input_ids[row, width - len(ids):] = ids
    attention_mask[row, width - len(ids):] = True
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), input_ids.shape).copy()
  return dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
              image_token_mask=sequences.placeholder_mask(input_ids, tok))


def edit_source_tokens(source_tokens: np.ndarray) -> np.ndarray:
  """Source tokens (B, Ns, T) -> the prompt's (3B, Ns, T): rows of branches 0 and 1 get them,
  branch 2 (text only, no placeholders) zeros."""
  source_tokens = np.asarray(source_tokens, np.float32)
  return np.concatenate([source_tokens, source_tokens, np.zeros_like(source_tokens)], axis=0)
