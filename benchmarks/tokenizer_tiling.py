"""Tiled VAE decode: memory of the official-size 1024x1024 decode tiled vs untiled, and how far the
tiled decode is from the untiled one on a trained small tokenizer.

  python benchmarks/tokenizer_tiling.py --run runs/tokenizer_shapes [--tpu v5e:1x1] [--skip-quality]

Memory: `model.decode` of the official f8ch16 autoencoder (abstract weights, float32) for one
1024x1024 image (128x128x16 latents), jitted with explicit shardings on one device and compiled
for this CPU, and with --tpu also ahead of time for that TPU topology (libtpu, no TPU needed);
per-device bytes from `compiled.memory_analysis()`, untiled and for each of --tiles.

Quality: --num held-out shapes scenes of the trained tokenizer in --run (a nextstep-train-tokenizer
workdir, read only), laid 4x4 into 128x128 mosaics, encoded untiled to 32x32x4 latents, then decoded
by the VaeTokenizer untiled and with each of --small-tiles: PSNR of tiled vs untiled decode, of each vs
the originals, and the seam ratio (`tokenizer_eval.seam_ratio`, ~1 = no seam); a hard cut (overlap 0)
is the control. Tiled encode is scored the same way (decode untiled). Writes the key `tiled_decode`
of benchmarks/results/tokenizer.json (other keys kept; --skip-quality keeps the stored quality part)
and results/tokenizer_tiled_decode.png (original, untiled, then tiled and 4x |tiled - untiled|
per tiling, nearest-upscaled 2x).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax.evaluate import tokenizer_eval
from nextstep_jax.image import tokenizers
from nextstep_jax.image import vae
from nextstep_jax.image import vae_tiling
from nextstep_jax.image import vae_tokenizer
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.training import tokenizer_train
from nextstep_jax.utils import images as image_utils

RESULTS = pathlib.Path(__file__).parent / 'results'
GIB = 2**30
MOSAIC = 4  # Scenes per mosaic side.


def parse_tiles(text: str) -> vae_tiling.Tiling:
  size, overlap = (int(v) for v in text.split('/'))
  return vae_tiling.Tiling(size, overlap)


def tiles_label(tiling: vae_tiling.Tiling | None) -> str:
  return 'untiled' if tiling is None else f'tile {tiling.size}/overlap {tiling.overlap}'


def decode_memory(devices: list, latent_side: int, tiling: vae_tiling.Tiling | None) -> dict:
  """Compiles the official-size decode of one (latent_side^2 x 16) latent on `devices[:1]`."""
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ('batch',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  cfg = vae.AutoEncoderConfig()
  graphdef, params = nnx.split(nnx.eval_shape(lambda: vae.AutoEncoder(cfg, nnx.Rngs(0))))
  params = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params
  )
  latents = jax.ShapeDtypeStruct(
    (1, latent_side, latent_side, cfg.z_channels), jnp.float32, sharding=replicated
  )
  fn = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z, tiling), out_shardings=replicated)
  start = time.monotonic()
  stats = fn.lower(params, latents).compile().memory_analysis()
  starts = vae_tiling.tile_starts(latent_side, tiling.size, tiling.overlap) if tiling else (0,)
  side = min(tiling.size, latent_side) if tiling else latent_side
  return {
    'temp_gib': stats.temp_size_in_bytes / GIB,
    'argument_gib': stats.argument_size_in_bytes / GIB,
    'output_gib': stats.output_size_in_bytes / GIB,
    'tiles': len(starts) ** 2,
    'decoded_area_ratio': len(starts) ** 2 * side**2 / latent_side**2,
    'compile_seconds': round(time.monotonic() - start, 1),
  }


def mosaics(images: np.ndarray) -> np.ndarray:
  """uint8 (N, S, S, 3) -> (N / MOSAIC^2, MOSAIC S, MOSAIC S, 3), row-major."""
  n, s = (len(images) // MOSAIC**2) * MOSAIC**2, images.shape[1]
  grid = images[:n].reshape(-1, MOSAIC, MOSAIC, s, s, 3).transpose(0, 1, 3, 2, 4, 5)
  return grid.reshape(-1, MOSAIC * s, MOSAIC * s, 3)


def mean_psnr(reference: np.ndarray, images: np.ndarray) -> float:
  """Mean PSNR (dB, uint8 images) of float images in [-1, 1] against a float reference."""
  return float(
    np.mean(tokenizer_eval.psnr(image_utils.to_uint8(reference), image_utils.to_uint8(images)))
  )


def quality(
  run: str, num: int, tilings: list, hard_cut: vae_tiling.Tiling
) -> tuple[dict, np.ndarray]:
  """Tiled vs untiled decode/encode of the trained tokenizer in `run` (module docstring)."""
  root = pathlib.Path(run)
  config = configlib.with_base_defaults(
    configlib.config_from_json((root / tokenizer_train.CONFIG_FILE).read_text())
  )
  config.image.vae.checkpoint = str(root)
  model = vae_tokenizer.load_model(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  originals = mosaics(tokenizer_train.heldout_images(config, num))
  tokenizer = lambda tiling: vae_tokenizer.VaeTokenizer(
    model, len(originals), mesh, config.mesh.rules, tiling
  )
  images = tokenizers.uint8_to_unit(originals)
  untiled_tok = tokenizer(vae_tiling.Tiling())
  latents = untiled_tok.encode(images)
  untiled = untiled_tok.decode(latents)
  side = latents.shape[1]
  out = {
    'run': str(root),
    'mosaics': len(originals),
    'image_side': originals.shape[1],
    'latent_side': side,
    'untiled_psnr_vs_original': mean_psnr(images, untiled),
    'tilings': {},
  }
  panels = [originals[:1], image_utils.to_uint8(untiled[:1])]
  for tiling in tilings + [hard_cut]:
    tok = tokenizer(tiling)
    tiled = tok.decode(latents)
    seams = vae_tiling.seam_positions(side, tiling, model.cfg.downsample)
    row = {
      'tiles': len(vae_tiling.tile_starts(side, tiling.size, tiling.overlap)) ** 2,
      'decode_psnr_vs_untiled': mean_psnr(untiled, tiled),
      'decode_max_abs_vs_untiled': float(np.abs(tiled - untiled).max()),
      'decode_psnr_vs_original': mean_psnr(images, tiled),
      'seam_ratio': tokenizer_eval.seam_ratio(tiled, untiled, seams, seams),
    }
    if tiling is not hard_cut:
      roundtrip = untiled_tok.decode(tok.encode(images))
      row.update(
        encode_psnr_vs_untiled=mean_psnr(untiled, roundtrip),
        encode_psnr_vs_original=mean_psnr(images, roundtrip),
      )
    out['tilings'][tiles_label(tiling)] = row
    diff = np.clip(8 * np.abs(tiled[:1] - untiled[:1]) - 1, -1, 1)  # |diff| x 4 in [0, 1] units.
    panels += [image_utils.to_uint8(tiled[:1]), image_utils.to_uint8(diff)]
    print(json.dumps({tiles_label(tiling): row}), flush=True)
  panels = np.repeat(np.repeat(np.concatenate(panels), 2, axis=1), 2, axis=2)  # 2x for viewing.
  return out, image_utils.make_grid(panels, ncols=len(panels), pad=4, pad_value=255)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--run', default='runs/tokenizer_shapes', help='trained tokenizer workdir')
  parser.add_argument('--num', type=int, default=256, help='held-out scenes (16 per mosaic)')
  parser.add_argument('--image-size', type=int, default=1024, help='official-size decode side (px)')
  parser.add_argument(
    '--tiles', nargs='*', default=['64/16', '32/8'], help='official tilings size/overlap'
  )
  parser.add_argument(
    '--small-tiles',
    nargs='*',
    default=['8/2', '8/4', '16/4'],
    help='small-tokenizer tilings (the first size also gives the hard-cut control)',
  )
  parser.add_argument(
    '--tpu', default='', help='also AOT-compile for this TPU topology, e.g. v5e:1x1'
  )
  parser.add_argument('--skip-quality', action='store_true')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  command = 'python ' + ' '.join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
  latent_side = args.image_size // vae.AutoEncoderConfig().downsample
  tilings = [None] + [parse_tiles(t) for t in args.tiles]
  targets = {'cpu': jax.devices('cpu')}
  if args.tpu:
    from nextstep_jax.planning import aot  # libtpu

    targets[args.tpu] = aot.topology_devices(args.tpu)
  setup = (
    f'official f8ch16 decode (float32) of one {args.image_size}x{args.image_size} image, per '
    'device, compiled.memory_analysis()'
  )
  for target, devices in targets.items():
    memory = {}
    for tiling in tilings:  # Saved after each compile: TPU compiles take minutes.
      memory[tiles_label(tiling)] = decode_memory(devices, latent_side, tiling)
      print(json.dumps({target: {tiles_label(tiling): memory[tiles_label(tiling)]}}), flush=True)
      save({'memory_setup': setup, 'memory': {target: memory}, 'commands': {target: command}})
  if not args.skip_quality:
    small = [parse_tiles(t) for t in args.small_tiles]
    quality_result, panel = quality(args.run, args.num, small, vae_tiling.Tiling(small[0].size, 0))
    image_utils.save_png(RESULTS / 'tokenizer_tiled_decode.png', panel)
    save({'quality': quality_result, 'commands': {'quality': command}})
  return 0


def merged(old, new):
  """new over old, dicts merged recursively (so separate invocations add their rows)."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return new
  return {**old, **{key: merged(old.get(key), value) for key, value in new.items()}}


def save(updates: dict) -> None:
  """Merges `updates` into results/tokenizer.json's `tiled_decode` (a new `quality` replaces the
  stored one) with the date and machine; other keys are kept."""
  out_path = RESULTS / 'tokenizer.json'
  results = json.loads(out_path.read_text()) if out_path.exists() else {}
  entry = results.setdefault('tiled_decode', {})
  if 'quality' in updates:
    entry.pop('quality', None)
  entry = results['tiled_decode'] = merged(entry, updates)
  entry.update(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    machine=f'{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}',
  )
  out_path.write_text(json.dumps(results, indent=2) + '\n')
  print(f'wrote {out_path}', flush=True)


if __name__ == '__main__':
  sys.exit(main())
