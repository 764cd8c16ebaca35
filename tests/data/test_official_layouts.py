"""Training rows with the official tokenizer: T2I rows agree with sampling prompts, edit rows follow
the official layout (design doc §4), written here independently as whole strings."""

import numpy as np
import pytest

import hf_testing
from nextstep_jax.data import edit_sequences
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import sequences
from nextstep_jax.training import objective

MAX_CAPTION = 40


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  hf_testing.build_tokenizer(str(path))
  return hf_tokenizer.HFTokenizer.load(str(path))


def image_block(h, w):
  return (
    f'<|image_area|>{h}*{w}<|begin_of_image|>'
    + '<|image_placeholder|>' * (h * w)
    + '<|end_of_image|>'
  )


def official_labels(ids, tok):
  """labels = ids; boi ... last placeholder of every image and the EOS right after eoi -> -100."""
  labels = list(ids)
  for i, token in enumerate(ids):
    if token in (tok.boi_id, tok.image_placeholder_id) or (
      token == tok.eos_id and i and ids[i - 1] == tok.eoi_id
    ):
      labels[i] = -100
  return labels


@pytest.mark.parametrize('caption', list(hf_testing.CAPTIONS) + ['a cat 42'])
@pytest.mark.parametrize('grid', [(2, 2), (3, 5)])
def test_training_row_up_to_boi_equals_the_sampling_prompt(tok, caption, grid):
  train = sequences.build_training_batch(tok, [caption], *grid, MAX_CAPTION, np.zeros(1, bool))
  prompt = sequences.build_prompt_batch(tok, [caption], *grid, MAX_CAPTION, num_branches=1)
  row = train['input_ids'][0][train['attention_mask'][0]].tolist()
  prompt_row = prompt['input_ids'][0][prompt['attention_mask'][0]].tolist()
  boi = row.index(tok.boi_id)
  assert row[: boi + 1] == prompt_row
  # And both are the official whole-string tokenisation (no BOS, caption then the area prefix).
  expected = tok.encode(caption + image_block(*grid)) + [tok.eos_id]
  assert row == expected
  assert train['labels'][0][: len(row)].tolist() == official_labels(expected, tok)


def test_edit_rows_follow_the_official_layout(tok):
  (hs, ws), (h, w), t = (2, 2), (2, 3), 5
  instructions = [
    'make the sky green',
    '<image> make the sky green',
    'make the sky green',
    'make the sky green',
  ]
  modes = np.array(
    [
      edit_sequences.FULL,
      edit_sequences.DROP_TEXT,
      edit_sequences.DROP_IMAGE,
      edit_sequences.DROP_BOTH,
    ]
  )
  rng = np.random.default_rng(0)
  source = rng.standard_normal((4, hs * ws, t)).astype(np.float32)
  target = rng.standard_normal((4, h * w, t)).astype(np.float32)
  batch = edit_sequences.build_edit_training_batch(
    tok, instructions, hs, ws, h, w, MAX_CAPTION, modes, source, target
  )
  texts = ['<image>make the sky green', '<image>', 'make the sky green', '']
  length = batch['input_ids'].shape[1]
  assert length == edit_sequences.edit_training_length(tok, hs, ws, h, w, MAX_CAPTION)
  for row, text in enumerate(texts):
    whole = text.replace('<image>', image_block(hs, ws)) + image_block(h, w)
    expected = tok.encode(whole) + [tok.eos_id] if whole else [tok.eos_id]
    got = batch['input_ids'][row][batch['attention_mask'][row]].tolist()
    assert got == expected, row
    assert batch['labels'][row][: len(got)].tolist() == official_labels(expected, tok)
    assert (batch['labels'][row][len(got) :] == -100).all() and (
      batch['input_ids'][row][len(got) :] == tok.pad_id
    ).all()
  # Placeholders are filled in order: source tokens first where the source is in the row.
  np.testing.assert_array_equal(batch['image_tokens'][0], np.concatenate([source[0], target[0]]))
  np.testing.assert_array_equal(batch['image_tokens'][2][: h * w], target[2])
  assert not batch['image_tokens'][2][h * w :].any()
  assert batch['image_token_loss'].tolist() == [
    [False] * 4 + [True] * 6,
    [False] * 4 + [True] * 6,
    [True] * 6 + [False] * 4,
    [True] * 6 + [False] * 4,
  ]
  # Flow-matching loss only on the target: 4 copies x 4 rows x 6 tokens head rows counted.
  counts = objective.loss_counts(
    batch, objective.LossConfig(placeholder_id=tok.image_placeholder_id)
  )
  assert float(counts['im_count']) == 4 * 4 * 6
  # The instruction is an LM target; no placeholder is.
  targets = batch['labels'][0][batch['labels'][0] != -100]
  assert tok.image_placeholder_id not in targets and set(tok.encode('make the sky green')) & set(
    targets
  )


def test_edit_drop_modes_follow_the_probabilities():
  modes = edit_sequences.edit_drop_modes(np.random.default_rng(0), 20000, 0.2, 0.1, 0.05)
  shares = np.bincount(modes, minlength=4) / modes.size
  np.testing.assert_allclose(shares, [0.65, 0.2, 0.1, 0.05], atol=0.015)
  with pytest.raises(ValueError, match='sum to <= 1'):
    edit_sequences.edit_drop_modes(np.random.default_rng(0), 4, 0.6, 0.6, 0.0)
