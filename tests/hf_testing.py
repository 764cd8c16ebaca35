"""Pieces of tiny releases: an HF `tokenizer.json` with the NextStep special tokens (tokenizers
library only) and a random image tokenizer in the official `vae/` layout."""

from flax import nnx
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from nextstep_jax.data import text_tokenizer
from nextstep_jax.image import vae
from nextstep_jax.image import vae_tokenizer

CAPTIONS = (
  'a red circle to the left of a blue square',
  'a photo of a cat on a sofa, 4k',
  'make the sky green',
  'masterpiece, film grained, best quality.',
  'Copy original image.',
)


def build_tokenizer(path: str) -> Tokenizer:
  """Byte-level BPE (digits split one per token, like Qwen2.5) trained on CAPTIONS, with the
  official special tokens added after the vocabulary in the official order; saved to `path`."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  tok.train_from_iterator(list(CAPTIONS) * 4, trainer)
  tok.add_special_tokens(list(text_tokenizer.SPECIAL_TOKENS))
  tok.save(path)
  return tok


def write_vae_release(directory, z_channels: int = 16, seed: int = 5) -> vae.AutoEncoder:
  """A random tiny f2 VAE (non-default factors) written as a release's vae/: config.json + safetensors."""
  cfg = vae.AutoEncoderConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    z_channels=z_channels,
    norm_groups=4,
    scaling_factor=0.8,
    shift_factor=0.1,
  )
  model = vae.AutoEncoder(cfg, nnx.Rngs(seed))
  vae_tokenizer.export_release(directory, cfg, nnx.state(model, nnx.Param))
  return model
