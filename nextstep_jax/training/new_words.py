"""Embedding rows for words a fine-tune adds to the text tokenizer (`text.extra_words`).

A word added after training has an embedding row (and lm_head column) that no step ever updated:
its random init, shrunk by weight decay. `train.init_word_rows` entries 'new=old1+old2+...' set
the new word's row and column to the mean of the old words' ones right after `train.init_from`,
so the new word starts as "some word of this kind" (e.g. orange = the mean of the trained colours)
and the caption keeps the structure the model learned ('a', colour, shape). Every word must be
one token of the run's tokenizer.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def parse_rules(rules) -> list[tuple[str, tuple[str, ...]]]:
  """('new=old1+old2', ...) -> [('new', ('old1', 'old2')), ...]; a clear error on bad entries."""
  parsed = []
  for rule in rules:
    new, sep, olds = str(rule).partition('=')
    sources = tuple(w.strip() for w in olds.split('+') if w.strip())
    if not sep or not new.strip() or not sources:
      raise ValueError(
        f'train.init_word_rows entry {rule!r} must read "new=old1+old2+...", e.g. '
        '"orange=red+green+blue".'
      )
    parsed.append((new.strip(), sources))
  return parsed


def word_id(tok, word: str) -> int:
  """The single token id of `word` after a space ('▁word'); an error naming the fix otherwise."""
  ids = tok.encode(' ' + word)
  if len(ids) != 1:
    raise ValueError(
      f"train.init_word_rows: {word!r} is {len(ids)} tokens ({ids}) in the run's text "
      'tokenizer; add it with text.extra_words or use words that are one token.'
    )
  return ids[0]


def init_word_rows(params: nnx.State, tok, rules) -> nnx.State:
  """params with each rule's new-word row of embed_tokens.embedding (V, D) (and column of
  lm_head.kernel (D, V) when untied) set to the mean of the old words' rows (columns)."""
  flat = dict(nnx.to_flat_state(params))
  for new, olds in parse_rules(rules):
    new_id, old_ids = word_id(tok, new), jnp.asarray([word_id(tok, w) for w in olds])
    for path, axis in ((('embed_tokens', 'embedding'), 0), (('lm_head', 'kernel'), 1)):
      if path not in flat:
        continue
      table = flat[path].get_value()
      mean = jnp.take(table, old_ids, axis=axis).astype(jnp.float32).mean(axis=axis)
      table = (
        table.at[new_id].set(mean.astype(table.dtype))
        if axis == 0
        else (table.at[:, new_id].set(mean.astype(table.dtype)))
      )
      flat[path].set_value(jax.device_put(table, flat[path].get_value().sharding))
  return nnx.from_flat_state(flat)
