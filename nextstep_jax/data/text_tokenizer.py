"""Text tokenizer: a sentencepiece model trained deterministically from captions.

The official model uses the Qwen2.5 tokenizer plus added special tokens (docs/model.md §4). This
stand-in keeps the same contract: the special tokens are single pieces, digits are one token
each, no BOS/EOS is added by `encode`, and any text encodes (byte fallback). `Tokenizer` is
the minimal interface the sequence builders need, so a tokenizer.json loader can replace it.
"""

import io
import os
import tempfile
from collections.abc import Sequence
from typing import Protocol

import sentencepiece as spm

EOS_TOKEN = '<|endoftext|>'
PAD_TOKEN = '[PAD]'
IMAGE_AREA_TOKEN = '<|image_area|>'
BOI_TOKEN = '<|begin_of_image|>'
EOI_TOKEN = '<|end_of_image|>'
IMAGE_PLACEHOLDER_TOKEN = '<|image_placeholder|>'

# Official special tokens in the official (id) order.
SPECIAL_TOKENS = (
  EOS_TOKEN,
  PAD_TOKEN,
  IMAGE_AREA_TOKEN,
  BOI_TOKEN,
  EOI_TOKEN,
  IMAGE_PLACEHOLDER_TOKEN,
  '<|begin_of_prompt_refinement|>',
  '<|end_of_prompt_refinement|>',
  '<|begin_of_thinking|>',
  '<|end_of_thinking|>',
)

# '*' separates the area string "h*w" and must be one piece.
_AREA_SEPARATOR = '*'
_MODEL_SUFFIX = '.model'


class Tokenizer(Protocol):
  """What the sequence builders need from a text tokenizer."""

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def image_area_id(self) -> int: ...

  @property
  def boi_id(self) -> int: ...

  @property
  def eoi_id(self) -> int: ...

  @property
  def image_placeholder_id(self) -> int: ...


def train_sentencepiece(captions: Sequence[str], model_prefix: str, vocab_size: int) -> str:
  """Trains a BPE sentencepiece model on `captions`; returns the path `<model_prefix>.model`.

  Deterministic (same captions and vocab_size give a byte-identical file): one thread, every
  sentence used in order, fixed options. The file is written atomically (temp file + rename).
  `vocab_size` is an upper bound (`hard_vocab_limit=False`); it must cover the 256 byte-fallback
  pieces, the special tokens, `*`, the digits and every character of the captions.
  """
  if not captions:
    raise ValueError('train_sentencepiece needs at least one caption.')
  model_path = model_prefix + _MODEL_SUFFIX
  model_bytes = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions),
      model_writer=model_bytes,
      model_type='bpe',
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      user_defined_symbols=list(SPECIAL_TOKENS) + [_AREA_SEPARATOR],
      required_chars='0123456789',
      split_digits=True,
      byte_fallback=True,
      unk_id=0,
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      normalization_rule_name='identity',
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
    )
  except RuntimeError as error:
    raise ValueError(
      f'Could not train a sentencepiece model with vocab_size={vocab_size} (config field '
      f'text.vocab_size): it must hold 256 byte pieces, {len(SPECIAL_TOKENS) + 1} special '
      f'pieces, the digits and every caption character. sentencepiece says: {error}'
    ) from error
  model_dir = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(model_dir, exist_ok=True)
  fd, temp_path = tempfile.mkstemp(dir=model_dir, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as temp_file:
      temp_file.write(model_bytes.getvalue())
    os.replace(temp_path, model_path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise
  return model_path


def add_words(model_path: str, words: Sequence[str], out_path: str) -> str:
  """Writes to `out_path` the model of `model_path` with each word of `words` added as one
  user-defined piece '▁word' (ids vocab_size, vocab_size + 1, ... in order), so a fine-tune can
  give new words one token each, like the trained words ('a orange diamond' -> 'a', '▁orange',
  '▁diamond'). Text without the words tokenises exactly as before. Returns `out_path`."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  existing = {piece.piece for piece in proto.pieces}
  for word in words:
    if not word or not word.isalpha():
      raise ValueError(f'text.extra_words: {word!r} must be one alphabetic word.')
    if '\u2581' + word in existing:
      raise ValueError(f'text.extra_words: {word!r} is already a piece of {model_path}; drop it.')
    piece = proto.pieces.add()
    piece.piece = '\u2581' + word
    piece.score = 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  fd, temp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out_path)), suffix='.tmp')
  with os.fdopen(fd, 'wb') as temp_file:
    temp_file.write(proto.SerializeToString())
  os.replace(temp_path, out_path)
  return out_path


class TextTokenizer:
  """A sentencepiece text tokenizer with the NextStep special tokens as single pieces."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self.path = path
    self._processor = processor
    self._special_ids = {token: self._single_piece_id(token, path) for token in SPECIAL_TOKENS}

  @classmethod
  def load(cls, path: str) -> 'TextTokenizer':
    """Loads a model written by `train_sentencepiece`."""
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f'Text tokenizer model {path!r} does not exist. Create it with '
        'TextTokenizer.load_or_train(path, captions, vocab_size) or '
        'train_sentencepiece(captions, model_prefix, vocab_size).'
      )
    processor = spm.SentencePieceProcessor()
    processor.Load(path)
    return cls(processor, path)

  @classmethod
  def load_or_train(cls, path: str, captions: Sequence[str], vocab_size: int) -> 'TextTokenizer':
    """Loads `path` (ending in .model), training it from `captions` first if it is missing.

    An existing file is used as is, whatever captions and vocab_size it was trained with.
    """
    if not path.endswith(_MODEL_SUFFIX):
      raise ValueError(f'Text tokenizer path {path!r} must end with {_MODEL_SUFFIX!r}.')
    if not os.path.isfile(path):
      train_sentencepiece(captions, path[: -len(_MODEL_SUFFIX)], vocab_size)
    return cls.load(path)

  def _single_piece_id(self, token: str, path: str) -> int:
    ids = self._processor.encode(token, out_type=int)
    if len(ids) != 1 or self._processor.id_to_piece(ids[0]) != token:
      raise ValueError(
        f'Special token {token!r} is not a single piece in {path!r} (encodes to {ids}); '
        'retrain the model with train_sentencepiece.'
      )
    return ids[0]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS added."""
    return self._processor.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens appear literally)."""
    return self._processor.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    """Number of ids; every id is in [0, vocab_size)."""
    return self._processor.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._special_ids[EOS_TOKEN]

  @property
  def pad_id(self) -> int:
    return self._special_ids[PAD_TOKEN]

  @property
  def image_area_id(self) -> int:
    return self._special_ids[IMAGE_AREA_TOKEN]

  @property
  def boi_id(self) -> int:
    return self._special_ids[BOI_TOKEN]

  @property
  def eoi_id(self) -> int:
    return self._special_ids[EOI_TOKEN]

  @property
  def image_placeholder_id(self) -> int:
    return self._special_ids[IMAGE_PLACEHOLDER_TOKEN]
