"""Tokenizer measurements: PSNR, SSIM, and robustness of the decoder to latent noise.

Images are compared as uint8 -> [0, 1] floats. PSNR = 10 log10(1 / MSE) per image, averaged.
SSIM (Wang et al. 2004): Gaussian window sigma 1.5 (11 taps), C1 = 0.01^2, C2 = 0.03^2, mean over
pixels and channels, per image, averaged. Robustness: PSNR(decode(latents + sigma * eps), x) with
latents the tokenizer's normalised latents and eps ~ N(0, I) from a fixed seed.
"""

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from nextstep_jax import configlib
from nextstep_jax.image import tokenizers
from nextstep_jax.utils import images as image_utils

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 11-tap window at sigma 1.5.
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def _unit(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
      f'expected uint8 images, got {images.dtype}; convert with utils.images.to_uint8.'
    )
  return images.astype(np.float64) / 255.0


def psnr(reference, images) -> np.ndarray:
  """Per-image PSNR in dB of uint8 (B, H, W, C) images against `reference` (inf when equal)."""
  mse = np.mean(np.square(_unit(reference) - _unit(images)), axis=(1, 2, 3))
  with np.errstate(divide='ignore'):
    return 10 * np.log10(1.0 / mse)


def ssim(reference, images) -> np.ndarray:
  """Per-image SSIM of uint8 (B, H, W, C) images against `reference`: mean of `ssim_map`."""
  return ssim_map(reference, images).mean(axis=(1, 2, 3))


def ssim_map(reference, images) -> np.ndarray:
  """Local SSIM (B, H, W, C) with Gaussian-weighted statistics (borders reflected)."""
  x, y = _unit(reference), _unit(images)
  blur = lambda a: ndimage.gaussian_filter(
    a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode='reflect'
  )
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  return ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / (
    (mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2)
  )


def seam_ratio(images, reference, seams_y: Sequence[int], seams_x: Sequence[int]) -> float:
  """How visible tile seams are: the mean |step| of the error images - reference (float
  (B, H, W, C)) across the worst seam row/column (between pixels s - 1 and s), over the median
  |step| of the error between any two neighbouring rows/columns. About 1 when tiling leaves no
  discontinuity; a hard cut between tiles gives about 2 or more."""
  err = np.asarray(images, np.float64) - np.asarray(reference, np.float64)
  step_y = np.abs(np.diff(err, axis=1)).mean(axis=(0, 2, 3))
  step_x = np.abs(np.diff(err, axis=2)).mean(axis=(0, 1, 3))
  at_seams = np.concatenate([step_y[[s - 1 for s in seams_y]], step_x[[s - 1 for s in seams_x]]])
  return float(at_seams.max() / np.median(np.concatenate([step_y, step_x])))


def reconstruction_scores(tokenizer, images_uint8: np.ndarray) -> dict:
  """Mean PSNR/SSIM of decode(encode(x)) on uint8 images (B, S, S, 3)."""
  recon = image_utils.to_uint8(
    tokenizer.decode(tokenizer.encode(tokenizers.uint8_to_unit(images_uint8)))
  )
  return {
    'psnr': float(np.mean(psnr(images_uint8, recon))),
    'ssim': float(np.mean(ssim(images_uint8, recon))),
    'n': len(images_uint8),
  }


def robustness(tokenizer, images_uint8: np.ndarray, sigmas: Sequence[float], seed: int = 0) -> dict:
  """{sigma: mean PSNR of decode(latents + sigma * eps)} (string keys, JSON-ready)."""
  latents = tokenizer.encode(tokenizers.uint8_to_unit(images_uint8))
  eps = np.random.default_rng(seed).standard_normal(latents.shape).astype(np.float32)
  out = {}
  for sigma in sigmas:
    decoded = image_utils.to_uint8(tokenizer.decode(latents + sigma * eps))
    out[f'{sigma:g}'] = float(np.mean(psnr(images_uint8, decoded)))
  return out


def evaluate_run(workdir: str, num: int, sigmas: Sequence[float]) -> dict:
  """Scores a nextstep-train-tokenizer run (its release/) on `num` held-out images; writes and
  returns {'psnr', 'ssim', 'n', 'robustness': {sigma: psnr}, 'noise_max', ...}."""
  from nextstep_jax.training import tokenizer_train  # jax model

  root = pathlib.Path(workdir)
  config = configlib.with_base_defaults(
    configlib.config_from_json((root / tokenizer_train.CONFIG_FILE).read_text())
  )
  config.image.vae.checkpoint = str(root)
  tokenizer = tokenizers.get_tokenizer(config)
  images = tokenizer_train.heldout_images(config, num)
  result = reconstruction_scores(tokenizer, images)
  result['robustness'] = robustness(tokenizer, images, sigmas)
  result.update(
    noise_max=config.vae_train.noise_max,
    steps=config.vae_train.steps,
    dataset=config.data.dataset,
    image_size=config.image.size,
    latent_shape=list(tokenizer.latent_shape(config.image.size)),
  )
  (root / 'eval.json').write_text(json.dumps(result, indent=2))
  return result


def plot_robustness(results: dict[str, dict], path: str) -> None:
  """PSNR vs latent noise sigma, one line per labelled run, as a PNG."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  for label, result in results.items():
    curve = result['robustness']
    ax.plot([float(s) for s in curve], list(curve.values()), marker='o', label=label)
  ax.set_xlabel('latent noise sigma')
  ax.set_ylabel('PSNR of decode(z + sigma eps) [dB]')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
