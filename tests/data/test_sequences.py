"""Tests of the training and sampling sequence layouts."""

import numpy as np
import pytest

from nextstep_jax.data import sequences
from nextstep_jax.data.sequences import IGNORE_ID
from nextstep_jax.data.sequences import PromptTooLongError
from nextstep_jax.data.text_tokenizer import TextTokenizer
from nextstep_jax.data.text_tokenizer import train_sentencepiece

CAPTIONS = [
  'a red circle to the left of a blue square',
  'a handwritten digit seven',
  'a green triangle above a yellow square',
]
H, W = 2, 3  # N = 6; h != w so the area string order is checked.
N = H * W
MAX_CAPTION_TOKENS = 12
X = IGNORE_ID


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  model_path = train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp('spm') / 'tok'), 400)
  return TextTokenizer.load(model_path)


@pytest.fixture(scope='module')
def ids(tok):
  """Ids used to write the expected layouts by hand."""
  (two,), (star,), (three,) = tok.encode('2'), tok.encode('*'), tok.encode('3')
  return dict(
    area=tok.image_area_id,
    two=two,
    star=star,
    three=three,
    boi=tok.boi_id,
    ph=tok.image_placeholder_id,
    eoi=tok.eoi_id,
    eos=tok.eos_id,
    pad=tok.pad_id,
  )


def test_prefix_and_image_block(tok, ids):
  prefix = [ids['area'], ids['two'], ids['star'], ids['three'], ids['boi']]
  assert sequences.prompt_prefix_ids(tok, H, W) == prefix
  assert sequences.image_block_ids(tok, H, W) == prefix + [ids['ph']] * N + [ids['eoi']]
  assert sequences.training_sequence_length(tok, H, W, MAX_CAPTION_TOKENS) == (
    MAX_CAPTION_TOKENS + 5 + N + 1 + 1
  )
  assert sequences.prompt_prefix_ids(tok, 16, 16) == (
    [ids['area']] + tok.encode('16') + [ids['star']] + tok.encode('16') + [ids['boi']]
  )


def test_training_rows_layout_and_labels(tok, ids):
  caption = tok.encode('a blue square')
  c = len(caption)
  area, two, star, three, boi, ph, eoi, eos, pad = (
    ids[k] for k in ('area', 'two', 'star', 'three', 'boi', 'ph', 'eoi', 'eos', 'pad')
  )
  length = MAX_CAPTION_TOKENS + 13
  batch = sequences.build_training_batch(
    tok,
    ['a blue square', 'a blue square'],
    H,
    W,
    MAX_CAPTION_TOKENS,
    drop_text=np.array([False, True]),
  )

  normal = caption + [area, two, star, three, boi] + [ph] * 6 + [eoi, eos]
  normal += [pad] * (length - len(normal))
  normal_labels = caption + [area, two, star, three, X] + [X] * 6 + [eoi, X]
  normal_labels += [X] * (length - len(normal_labels))
  dropped = [area, two, star, three, boi] + [ph] * 6 + [eoi] + caption + [eos]
  dropped += [pad] * (length - len(dropped))
  dropped_labels = [area, two, star, three, X] + [X] * 6 + [eoi] + caption + [eos]
  dropped_labels += [X] * (length - len(dropped_labels))

  assert batch['input_ids'].tolist() == [normal, dropped]
  assert batch['labels'].tolist() == [normal_labels, dropped_labels]
  real = c + 13
  assert batch['attention_mask'].tolist() == [[True] * real + [False] * (length - real)] * 2
  assert batch['positions'].tolist() == [list(range(length))] * 2
  for name, dtype in [
    ('input_ids', np.int32),
    ('labels', np.int32),
    ('attention_mask', bool),
    ('positions', np.int32),
  ]:
    assert batch[name].dtype == dtype and batch[name].shape == (2, length)


def test_every_row_has_n_placeholders(tok):
  captions = CAPTIONS + ['', 'a']
  drop_text = np.array([False, True, False, True, False])
  batch = sequences.build_training_batch(tok, captions, H, W, MAX_CAPTION_TOKENS, drop_text)
  np.testing.assert_array_equal(sequences.placeholder_mask(batch['input_ids'], tok).sum(1), N)
  assert batch['input_ids'].shape == (
    5,
    sequences.training_sequence_length(tok, H, W, MAX_CAPTION_TOKENS),
  )


def test_lm_target_mask_matches_the_routing_rule(tok, ids):
  drop_text = np.array([False, True, True])
  batch = sequences.build_training_batch(tok, ['a', 'a', ''], H, W, MAX_CAPTION_TOKENS, drop_text)
  input_ids, labels = batch['input_ids'], batch['labels']
  mask = sequences.lm_target_mask(input_ids, labels, tok)
  assert mask.shape == (3, input_ids.shape[1] - 1) and mask.dtype == bool
  for row in range(3):
    for i in range(input_ids.shape[1] - 1):
      to_flow_head = input_ids[row, i + 1] == ids['ph']
      assert mask[row, i] == (not to_flow_head and labels[row, i + 1] != IGNORE_ID)
  # Normal row 'a' + block + EOS: 'a' predicts area, boi predicts image token 0 (flow head),
  # the last placeholder predicts eoi, eoi does not predict EOS.
  boi = 5
  assert mask[0, 0] and not mask[0, boi]
  assert mask[0, boi + N] and not mask[0, boi + N + 1]
  # Drop-text row block + 'a' + EOS: eoi predicts the caption, the caption predicts EOS.
  assert mask[1, 4 + N + 1] and mask[1, 4 + N + 2]
  # Drop-text row with an empty caption: the EOS right after eoi is not a target.
  assert not mask[2, 4 + N + 1]


def test_prompt_rows_are_left_padded_and_branch_major(tok, ids):
  area, two, star, three, boi, pad = (
    ids[k] for k in ('area', 'two', 'star', 'three', 'boi', 'pad')
  )
  prefix = [area, two, star, three, boi]
  width = MAX_CAPTION_TOKENS + 5
  cond_a = tok.encode('a blue square square')
  cond_b = tok.encode('a red circle square')
  uncond = tok.encode('square')
  batch = sequences.build_prompt_batch(
    tok,
    ['a blue square', 'a red circle'],
    H,
    W,
    MAX_CAPTION_TOKENS,
    positive_prompt='square',
    negative_prompt='square',
  )

  def left_padded(caption):
    return [pad] * (MAX_CAPTION_TOKENS - len(caption)) + caption + prefix

  assert batch['input_ids'].tolist() == [
    left_padded(cond_a),
    left_padded(cond_b),
    left_padded(uncond),
    left_padded(uncond),
  ]
  assert batch['attention_mask'].tolist() == [
    [False] * (MAX_CAPTION_TOKENS - len(c)) + [True] * (len(c) + 5)
    for c in (cond_a, cond_b, uncond, uncond)
  ]
  assert batch['positions'].tolist() == [list(range(width))] * 4
  assert batch['input_ids'].dtype == np.int32 and batch['positions'].dtype == np.int32
  assert batch['attention_mask'].dtype == bool


def test_prompt_rows_default_uncond_is_empty_and_one_branch_has_no_uncond(tok, ids):
  prefix = sequences.prompt_prefix_ids(tok, H, W)
  two = sequences.build_prompt_batch(tok, ['a blue square'], H, W, MAX_CAPTION_TOKENS)
  caption = tok.encode('a blue square')
  assert two['input_ids'].tolist() == [
    [ids['pad']] * (MAX_CAPTION_TOKENS - len(caption)) + caption + prefix,
    [ids['pad']] * MAX_CAPTION_TOKENS + prefix,
  ]
  one = sequences.build_prompt_batch(
    tok, ['a blue square'], H, W, MAX_CAPTION_TOKENS, num_branches=1
  )
  np.testing.assert_array_equal(one['input_ids'], two['input_ids'][:1])


def test_too_long_caption_names_caption_count_and_config_field(tok):
  caption = CAPTIONS[0]
  count = len(tok.encode(caption))
  limit = count - 1
  for build in (
    lambda: sequences.build_training_batch(tok, [caption], H, W, limit, np.array([False])),
    lambda: sequences.build_prompt_batch(tok, [caption], H, W, limit),
  ):
    with pytest.raises(PromptTooLongError) as error:
      build()
    message = str(error.value)
    assert caption in message and str(count) in message and str(limit) in message
    assert 'text.max_caption_tokens' in message
    assert isinstance(error.value, ValueError)
  # The positive prompt counts towards the limit.
  with pytest.raises(PromptTooLongError):
    sequences.build_prompt_batch(tok, [caption], H, W, count, positive_prompt='square')


def test_drop_text_must_have_one_flag_per_caption(tok):
  with pytest.raises(ValueError, match='drop_text'):
    sequences.build_training_batch(tok, CAPTIONS, H, W, MAX_CAPTION_TOKENS, np.array([False]))
