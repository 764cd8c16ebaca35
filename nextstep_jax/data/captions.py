"""Caption cleaning shared by the dataset builder and the Grain pipeline.

decode_caption: stored bytes/str -> str (non-UTF-8 bytes replaced and counted, whitespace stripped,
empty captions skipped). fit_caption: a caption within `text.max_caption_tokens` tokens, truncated
(counted, with a logged warning upstream) or skipped per `data.overlong_captions`.
"""

from nextstep_jax.data import bad_records
from nextstep_jax.data import text_tokenizer


def decode_caption(raw: bytes | str) -> tuple[str, list[str]]:
  """Text of a stored caption and the fixes applied. Raises BadRecordError(empty_caption)."""
  fixes = []
  if isinstance(raw, (bytes, bytearray, memoryview)):
    try:
      text = bytes(raw).decode('utf-8')
    except UnicodeDecodeError:
      text = bytes(raw).decode('utf-8', errors='replace')
      fixes.append(bad_records.CAPTION_NOT_UTF8)
  else:
    text = str(raw)
  text = text.strip()
  if not text:
    raise bad_records.BadRecordError(bad_records.EMPTY_CAPTION)
  return text, fixes


def fit_caption(
  text: str, tok: text_tokenizer.Tokenizer, max_tokens: int, overlong: str
) -> tuple[str, list[str]]:
  """`text` if it has <= max_tokens tokens, else (overlong='truncate') its longest token prefix
  that re-encodes within budget, or (overlong='skip') BadRecordError(caption_too_long).

  Special-token strings (e.g. '<|image_placeholder|>') in a caption would corrupt the row layout:
  they are removed (counted as a truncation)."""
  fixes = []
  for special in text_tokenizer.SPECIAL_TOKENS:
    if special in text:
      text = text.replace(special, '')
      fixes.append(bad_records.CAPTION_TRUNCATED)
  ids = tok.encode(text)
  if len(ids) <= max_tokens and text.strip():
    return text, fixes
  if not text.strip():
    raise bad_records.BadRecordError(bad_records.EMPTY_CAPTION)
  if overlong == 'skip':
    raise bad_records.BadRecordError(
      bad_records.CAPTION_TOO_LONG, f'{len(ids)} tokens > text.max_caption_tokens={max_tokens}'
    )
  keep = max_tokens
  while keep > 0:
    cut = tok.decode(ids[:keep])
    if len(tok.encode(cut)) <= max_tokens and cut.strip():
      return cut, fixes + [bad_records.CAPTION_TRUNCATED]
    keep -= 1
  raise bad_records.BadRecordError(
    bad_records.CAPTION_TOO_LONG,
    f'no prefix of {len(ids)} tokens fits max_caption_tokens={max_tokens}',
  )
