"""Tests of the sentencepiece text tokenizer."""

import os

import pytest
import sentencepiece as spm

from nextstep_jax.data.text_tokenizer import SPECIAL_TOKENS
from nextstep_jax.data.text_tokenizer import TextTokenizer
from nextstep_jax.data.text_tokenizer import train_sentencepiece

CAPTIONS = [
  'a red circle to the left of a blue square',
  'a handwritten digit seven',
  'a green triangle above a yellow square',
  'a small blue circle below a large red triangle',
]
VOCAB_SIZE = 400


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  model_prefix = str(tmp_path_factory.mktemp('spm') / 'tok')
  return TextTokenizer.load(train_sentencepiece(CAPTIONS, model_prefix, VOCAB_SIZE))


def test_special_tokens_are_the_official_ones_in_order():
  assert SPECIAL_TOKENS == (
    '<|endoftext|>',
    '[PAD]',
    '<|image_area|>',
    '<|begin_of_image|>',
    '<|end_of_image|>',
    '<|image_placeholder|>',
    '<|begin_of_prompt_refinement|>',
    '<|end_of_prompt_refinement|>',
    '<|begin_of_thinking|>',
    '<|end_of_thinking|>',
  )


def test_training_is_deterministic_and_atomic(tmp_path):
  first = train_sentencepiece(CAPTIONS, str(tmp_path / 'first'), VOCAB_SIZE)
  second = train_sentencepiece(CAPTIONS, str(tmp_path / 'second'), VOCAB_SIZE)
  assert first == str(tmp_path / 'first.model')
  with open(first, 'rb') as f1, open(second, 'rb') as f2:
    assert f1.read() == f2.read()
  assert sorted(os.listdir(tmp_path)) == ['first.model', 'second.model']  # No temp files left.


def test_special_tokens_are_single_ids_that_decode_back(tok):
  special_ids = [tok.encode(token) for token in SPECIAL_TOKENS]
  assert all(len(ids) == 1 for ids in special_ids)
  assert len({ids[0] for ids in special_ids}) == len(SPECIAL_TOKENS)
  for token, (token_id,) in zip(SPECIAL_TOKENS, special_ids):
    assert tok.decode([token_id]) == token
  assert [
    tok.eos_id,
    tok.pad_id,
    tok.image_area_id,
    tok.boi_id,
    tok.eoi_id,
    tok.image_placeholder_id,
  ] == [ids[0] for ids in special_ids[:6]]


def test_special_tokens_inside_text_are_matched(tok):
  ids = tok.encode('a<|image_area|>b')
  assert ids == tok.encode('a') + [tok.image_area_id] + tok.encode('b')


def test_digits_are_one_token_each(tok):
  ids = tok.encode('2024')
  assert len(ids) == 4
  assert [tok.decode([i]) for i in ids] == ['2', '0', '2', '4']
  assert len(tok.encode('4*4')) == 3
  assert len(tok.encode('16*16')) == 5


def test_encode_adds_no_bos_or_eos_and_round_trips_any_text(tok):
  assert tok.encode('') == []
  for text in ['a red circle', '  two  spaces ', 'unseen Wörds ☃ 42!']:
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_size_is_at_most_requested(tok):
  assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= VOCAB_SIZE


def test_load_or_train_trains_once(tmp_path):
  path = str(tmp_path / 'cache' / 'captions_spm.model')
  trained = TextTokenizer.load_or_train(path, CAPTIONS, VOCAB_SIZE)
  loaded = TextTokenizer.load_or_train(path, [], VOCAB_SIZE)  # No captions: must not retrain.
  assert loaded.encode(CAPTIONS[0]) == trained.encode(CAPTIONS[0])


def test_load_missing_file_says_how_to_create_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='load_or_train'):
    TextTokenizer.load(str(tmp_path / 'missing.model'))


def test_too_small_vocab_names_the_config_field(tmp_path):
  with pytest.raises(ValueError, match='text.vocab_size'):
    train_sentencepiece(CAPTIONS, str(tmp_path / 'small'), 64)


def test_model_without_special_pieces_is_rejected(tmp_path):
  prefix = str(tmp_path / 'plain')
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CAPTIONS),
    model_prefix=prefix,
    vocab_size=40,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  with pytest.raises(ValueError, match=r'<\|endoftext\|>.*not a single piece'):
    TextTokenizer.load(prefix + '.model')
