"""Edit prompt rows: source block where `<image>` stands, target prefix last, 3 branch groups."""

import numpy as np
import pytest

import hf_testing
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import sequences


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  hf_testing.build_tokenizer(str(path))
  return hf_tokenizer.HFTokenizer.load(str(path))


def unpadded(row_ids, row_mask):
  return list(row_ids[row_mask])


def test_three_branch_rows(tok):
  captions = ['<image>make the sky green', 'a cat <image> on a sofa']
  batch = edit_sequences.build_edit_prompt_batch(
    tok, captions, 2, 3, 3, 2, 12, negative_prompt='Copy original image.'
  )
  ids, mask, image_mask = batch['input_ids'], batch['attention_mask'], batch['image_token_mask']
  block = sequences.image_block_ids(tok, 2, 3)
  prefix = sequences.prompt_prefix_ids(tok, 3, 2)
  assert ids.shape == (6, 12 + len(block) + len(prefix))
  negative = tok.encode('Copy original image.')
  expected = [
    block + tok.encode('make the sky green') + prefix,
    tok.encode('a cat ') + block + tok.encode(' on a sofa') + prefix,
    block + negative + prefix,
    block + negative + prefix,
    negative + prefix,
    negative + prefix,
  ]
  for row, want in enumerate(expected):
    assert unpadded(ids[row], mask[row]) == want
    assert np.all(ids[row][~mask[row]] == tok.pad_id) and mask[row][-1]  # Left padded.
  np.testing.assert_array_equal(image_mask.sum(axis=1), [6, 6, 6, 6, 0, 0])
  np.testing.assert_array_equal(batch['positions'][3], np.arange(ids.shape[1]))
  tokens = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
  rows = edit_sequences.edit_source_tokens(tokens)
  np.testing.assert_array_equal(rows[:4], np.concatenate([tokens, tokens]))
  assert not rows[4:].any()


def test_image_tag_required_once(tok):
  assert edit_sequences.with_image_tag('make it red') == '<image>make it red'
  assert edit_sequences.with_image_tag('a <image> b') == 'a <image> b'
  with pytest.raises(ValueError, match='exactly one'):
    edit_sequences.build_edit_prompt_batch(tok, ['<image> and <image>'], 2, 2, 2, 2, 12)
  with pytest.raises(sequences.PromptTooLongError):
    edit_sequences.build_edit_prompt_batch(
      tok, ['<image>' + 'make the sky green ' * 4], 2, 2, 2, 2, 12
    )
