"""Latents <-> continuous image tokens, in the official (c, py, px) channel-major order.

NHWC latents (B, H, W, C) -> tokens (B, h*w, C*p*p) with h = H/p, w = W/p; token n = row*w + col
(raster), feature f = c*p*p + py*p + px (not Flux's (py, px, c)). Works on numpy and jax arrays.
"""


def patchify(latents, patch: int):
  """(B, H, W, C) -> (B, h*w, C*patch*patch)."""
  b, height, width, c = latents.shape
  if height % patch or width % patch:
    raise ValueError(f'latent size {height}x{width} is not divisible by patch size {patch}')
  h, w = height // patch, width // patch
  x = latents.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h * w, c * patch * patch)


def unpatchify(tokens, h: int, w: int, patch: int):
  """(B, h*w, C*patch*patch) -> (B, h*patch, w*patch, C); (h, w) always explicit."""
  b, n, dim = tokens.shape
  if n != h * w or dim % (patch * patch):
    raise ValueError(f'tokens {tokens.shape} do not form a {h}x{w} grid of {patch}x{patch} patches')
  c = dim // (patch * patch)
  x = tokens.reshape(b, h, w, c, patch, patch).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * patch, w * patch, c)
