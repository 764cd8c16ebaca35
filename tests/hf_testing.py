"""A tiny HF `tokenizer.json` with the NextStep special tokens (tokenizers library only)."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nextstep_jax.data import text_tokenizer

CAPTIONS = ('a red circle to the left of a blue square', 'a photo of a cat on a sofa, 4k',
            'make the sky green', 'masterpiece, film grained, best quality.', 'Copy original image.')


def build_tokenizer(path: str) -> Tokenizer:
  """Byte-level BPE (digits split one per token, like Qwen2.5) trained on CAPTIONS, with the
  official special tokens added after the vocabulary in the official order; saved to `path`."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(CAPTIONS) * 4, trainer)
  tok.add_special_tokens(list(text_tokenizer.SPECIAL_TOKENS))
  tok.save(path)
  return tok
