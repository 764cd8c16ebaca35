"""The official text tokenizer: a HuggingFace `tokenizer.json` (Qwen2.5 + NextStep special tokens).

`HFTokenizer.load(path)` satisfies the `text_tokenizer.Tokenizer` protocol, so the sequence
builders and samplers use it exactly like the sentencepiece stand-in: `encode` adds no BOS/EOS
(Qwen2.5 has no BOS), the special tokens of docs/model.md §4 are single added tokens, and ids come
from the file itself (checked against the model's config.json by the converter).
"""

import os
from collections.abc import Sequence

import tokenizers

from nextstep_jax.data import text_tokenizer as tt

# The special tokens the sequence layouts need (the self-CoT tokens are optional).
REQUIRED_SPECIAL_TOKENS = (
  tt.EOS_TOKEN,
  tt.PAD_TOKEN,
  tt.IMAGE_AREA_TOKEN,
  tt.BOI_TOKEN,
  tt.EOI_TOKEN,
  tt.IMAGE_PLACEHOLDER_TOKEN,
)


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the `Tokenizer` protocol of `data/text_tokenizer.py`."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, path: str):
    self.path = path
    self._tokenizer = tokenizer
    missing = [token for token in REQUIRED_SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
      raise ValueError(
        f'{path} lacks the special tokens {missing}; use the tokenizer.json shipped '
        'with the NextStep-1 release (it adds them to Qwen2.5).'
      )
    self._special_ids = {token: tokenizer.token_to_id(token) for token in REQUIRED_SPECIAL_TOKENS}
    for token, token_id in self._special_ids.items():
      if tokenizer.encode(token, add_special_tokens=False).ids != [token_id]:
        raise ValueError(
          f'{path}: special token {token!r} does not encode to the single id {token_id}; '
          'it must be an added token.'
        )

  @classmethod
  def load(cls, path: str) -> 'HFTokenizer':
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f'Tokenizer file {path!r} does not exist (expected the tokenizer.json '
        'of a NextStep-1 release or of a converted checkpoint).'
      )
    return cls(tokenizers.Tokenizer.from_file(path), path)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens written literally become their ids; no BOS/EOS."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    """Number of ids including the added tokens; every id is in [0, vocab_size)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int | None:
    """The id of `token` (a piece or an added token), or None."""
    return self._tokenizer.token_to_id(token)

  @property
  def eos_id(self) -> int:
    return self._special_ids[tt.EOS_TOKEN]

  @property
  def pad_id(self) -> int:
    return self._special_ids[tt.PAD_TOKEN]

  @property
  def image_area_id(self) -> int:
    return self._special_ids[tt.IMAGE_AREA_TOKEN]

  @property
  def boi_id(self) -> int:
    return self._special_ids[tt.BOI_TOKEN]

  @property
  def eoi_id(self) -> int:
    return self._special_ids[tt.EOI_TOKEN]

  @property
  def image_placeholder_id(self) -> int:
    return self._special_ids[tt.IMAGE_PLACEHOLDER_TOKEN]
