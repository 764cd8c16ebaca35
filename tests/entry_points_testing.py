"""Fixed inputs of the entry-point regression test (sampling/test_entry_points.py) and the function that
computed its stored expectations (sampling/testdata/entry_points.npz) with the sampler as it was before
the single sharded sampling program: `PYTHONPATH=.:tests python tests/entry_points_testing.py` rewrites
them (run it only from a commit whose outputs are the reference)."""

import pathlib

import numpy as np

import hf_testing
import torch_reference as tr

EXPECTATIONS = pathlib.Path(__file__).parent / 'sampling' / 'testdata' / 'entry_points.npz'
CAPTIONS = ['a red circle', 'a cat on a sofa', 'make the sky green']
SEEDS = [0, 1, 2]
GRID = (2, 3)
EDIT_INSTRUCTIONS = ['make the sky green', 'a cat <image> on a sofa']
EDIT_SEEDS = [7, 8]
SETTINGS = dict(num_steps=3, batch_size=2, cfg=3.0)


def build_release(root: pathlib.Path) -> pathlib.Path:
  """A random tiny official-layout release (3 latent channels: the pixels tokenizer decodes it),
  converted; returns the converted directory."""
  from nextstep_jax.convert import official

  hf_testing.build_tokenizer(str(root / 'tokenizer.json'))
  release = dict(tr.TINY_RELEASE, latent_channels=3)
  model = tr.NextStepTorch(release).randomize(seed=3)
  tr.write_release(model, release, str(root / 'tokenizer.json'), root / 'hf')
  official.convert(
    root / 'hf',
    root / 'converted',
    compute_dtype='float32',
    image_tokenizer='pixels',
    image_size=8,
    max_caption_tokens=16,
  )
  return root / 'converted'


def edit_source() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)


def outputs(sampler) -> dict:
  """T2I tokens and images, edit tokens, of `sampler` (a TextToImage on the tiny release)."""
  tokens = sampler.tokens(CAPTIONS, SEEDS, grid=GRID)
  return {
    't2i_tokens': tokens,
    't2i_images': sampler.decode(tokens, GRID),
    'edit_tokens': sampler.edit_tokens(
      edit_source(),
      EDIT_INSTRUCTIONS,
      EDIT_SEEDS,
      cfg_img=2.0,
      negative_prompt='Copy original image.',
    ),
  }


if __name__ == '__main__':
  import os
  import sys
  import tempfile

  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax

  jax.config.update('jax_default_matmul_precision', 'highest')
  from nextstep_jax import runs
  from nextstep_jax.parallel import mesh as mesh_lib
  from nextstep_jax.sampling import pipeline

  with tempfile.TemporaryDirectory() as tmp:
    converted = build_release(pathlib.Path(tmp))
    mesh = mesh_lib.make_mesh(runs.load_config(converted).mesh, jax.devices()[:1])
    result = outputs(pipeline.TextToImage.from_converted(str(converted), mesh=mesh, **SETTINGS))
  EXPECTATIONS.parent.mkdir(exist_ok=True)
  np.savez_compressed(EXPECTATIONS, **result)
  print(
    f'wrote {EXPECTATIONS}: ' + ', '.join(f'{k} {v.shape}' for k, v in result.items()),
    file=sys.stderr,
  )
