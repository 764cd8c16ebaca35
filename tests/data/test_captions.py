"""Tests of caption decoding and fitting to the token budget."""

import pytest

import data_testing
from nextstep_jax.data import bad_records
from nextstep_jax.data import captions


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return data_testing.tokenizer(tmp_path_factory.mktemp('tok'))


def test_decode_caption():
  assert captions.decode_caption(b' a red circle\n') == ('a red circle', [])
  assert captions.decode_caption(b'a \xffred') == ('a \ufffdred', [bad_records.CAPTION_NOT_UTF8])
  with pytest.raises(bad_records.BadRecordError, match=bad_records.EMPTY_CAPTION):
    captions.decode_caption(' \t')


def test_fit_caption_truncates_to_the_longest_fitting_prefix(tok):
  text = 'a red circle ' * 10
  fitted, fixes = captions.fit_caption(text, tok, 8, 'truncate')
  assert fixes == [bad_records.CAPTION_TRUNCATED]
  assert len(tok.encode(fitted)) <= 8 and text.startswith(fitted)
  assert len(tok.encode(text[: len(fitted) + 1])) > 8 or fitted == text
  assert captions.fit_caption('a red circle', tok, 20, 'truncate') == ('a red circle', [])
  with pytest.raises(bad_records.BadRecordError, match=bad_records.CAPTION_TOO_LONG):
    captions.fit_caption(text, tok, 8, 'skip')


def test_special_tokens_are_removed_from_captions(tok):
  fitted, fixes = captions.fit_caption('a <|begin_of_image|>red circle', tok, 14, 'truncate')
  assert fitted == 'a red circle' and fixes == [bad_records.CAPTION_TRUNCATED]
