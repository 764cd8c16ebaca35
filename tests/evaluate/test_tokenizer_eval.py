"""PSNR/SSIM against direct formulas; the robustness curve on the identity (pixels) tokenizer."""

import math

import numpy as np

from nextstep_jax.evaluate import tokenizer_eval
from nextstep_jax.image import tokenizers


def test_psnr_of_a_constant_offset():
  a = np.full((2, 8, 8, 3), 100, np.uint8)
  b = a + np.uint8(5)
  np.testing.assert_allclose(tokenizer_eval.psnr(a, b), 10 * math.log10(255**2 / 25), rtol=1e-12)
  assert np.isinf(tokenizer_eval.psnr(a, a)).all()


def test_ssim_interior_matches_an_explicit_window():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (1, 20, 20, 1), dtype=np.uint8)
  y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
  ours = tokenizer_eval.ssim_map(x, y)
  offsets = np.arange(-5, 6)
  window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
  window /= window.sum()
  fx, fy = x[0, ..., 0] / 255.0, y[0, ..., 0] / 255.0
  for i, j in [(5, 5), (9, 12), (14, 14)]:  # Windows fully inside the image.
    px, py = fx[i - 5 : i + 6, j - 5 : j + 6], fy[i - 5 : i + 6, j - 5 : j + 6]
    mx, my = (window * px).sum(), (window * py).sum()
    vx, vy = (window * px * px).sum() - mx**2, (window * py * py).sum() - my**2
    cxy = (window * px * py).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    np.testing.assert_allclose(ours[0, i, j, 0], ref, rtol=1e-9)
  assert tokenizer_eval.ssim(x, x)[0] == 1.0 and tokenizer_eval.ssim(x, y)[0] < 0.99


def test_robustness_curve_of_the_identity_tokenizer():
  images = np.full((4, 32, 32, 3), 128, np.uint8)  # Mid-grey: sigma 0.1 never clips.
  curve = tokenizer_eval.robustness(tokenizers.PixelsTokenizer(), images, [0.05, 0.1, 0.2])
  # Noise sigma in [-1, 1] is sigma/2 in [0, 1]: PSNR = -20 log10(sigma/2) (+ uint8 rounding).
  np.testing.assert_allclose(curve['0.1'], -20 * math.log10(0.05), atol=0.1)
  assert curve['0.05'] > curve['0.1'] > curve['0.2']
