"""The VAE behind `get_tokenizer(config)` for image.tokenizer='vae': jitted, batch-sharded, chunked.

`VaeTokenizer.encode(images (B, S, S, 3) in [-1, 1]) -> latents (B, S/f, S/f, Z)` (normalised:
(z - shift) * scale) and `decode(latents) -> images` clipped to [-1, 1], both numpy in and out.
Each call pads B to a multiple of rows_per_pass = image.vae.batch_chunk x (devices on the `batch`
mesh axes) and runs lax.map over passes, each pass sharded over `batch`, so peak memory is one
pass of `batch_chunk` images per device (a 1024x1024 decode works with batch_chunk=1) and the
result is exactly the unchunked one. Inputs are the same numpy batch on every process; outputs are
gathered to every process. Images whose latent side exceeds image.vae.tile_size are encoded and
decoded in overlapping spatial tiles (`vae_tiling`, one tile at a time under lax.scan), so a pass
holds one tile's activations; smaller images are untouched.

Weights come from `image.vae.checkpoint`:
  * an official release directory: `config.json` + `checkpoint.pt` (or a .safetensors copy);
  * a `nextstep-train-tokenizer` workdir, whose `release/` holds its export in that same format;
  * '' : random initialisation from config.seed (smoke tests only).
The checkpoint's own model fields win; its latent channels and downsampling must match image.vae.
"""

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from nextstep_jax.image import vae
from nextstep_jax.image import vae_import
from nextstep_jax.image import vae_tiling
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib

RELEASE_DIR = 'release'
SAFETENSORS_FILE = 'vae.safetensors'


class VaeTokenizer:
  """See module docstring. `channels`, `downsample`, `latent_shape` as every tokenizer."""

  def __init__(
    self,
    model: vae.AutoEncoder,
    batch_chunk: int,
    mesh: jax.sharding.Mesh,
    rules,
    tiling: vae_tiling.Tiling = vae_tiling.Tiling(),
  ):
    tiling.check()
    self.model_config = model.cfg
    self.tiling = tiling
    self.channels = model.cfg.z_channels
    self.downsample = model.cfg.downsample
    graphdef, state = nnx.split(model)
    param_shardings = rules_lib.state_shardings(state, mesh, rules)
    self.params = jax.device_put(state, param_shardings)
    batch_axes = rules_lib.logical_to_spec(('batch',), rules)[0]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    self.rows_per_pass = batch_chunk * int(np.prod([mesh.shape[a] for a in batch_axes]))
    passes = rules_lib.activation_spec(mesh, rules, None, 'batch', None, None, None)
    # Outputs are gathered (replicated) so every process can read them as numpy.
    gathered = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def mapped(method):
      def run(params, x):
        model = nnx.merge(graphdef, params)
        return jax.lax.map(lambda rows: getattr(model, method)(rows, tiling=tiling), x)

      return jax.jit(run, in_shardings=(param_shardings, passes), out_shardings=gathered)

    self._encode, self._decode = mapped('encode'), mapped('decode')
    self._passes = passes

  def latent_shape(self, size: int) -> tuple[int, int, int]:
    return (size // self.downsample, size // self.downsample, self.channels)

  def _run(self, fn, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    b = x.shape[0]
    padded = np.asarray(vae.pad_rows(x, self.rows_per_pass))
    passes = padded.reshape(-1, self.rows_per_pass, *x.shape[1:])
    out = fn(self.params, jax.device_put(passes, self._passes))
    return np.asarray(out).reshape(-1, *out.shape[2:])[:b]

  def encode(self, images) -> np.ndarray:
    """images (B, S, S, 3) float in [-1, 1] -> normalised latents (B, S/f, S/f, Z) float32."""
    return self._run(self._encode, images)

  def decode(self, latents) -> np.ndarray:
    """latents (B, h, w, Z) -> images (B, h*f, w*f, 3) float32 clipped to [-1, 1]."""
    return np.clip(self._run(self._decode, latents), -1.0, 1.0)

  @classmethod
  def from_config(cls, config) -> 'VaeTokenizer':
    mesh = mesh_lib.make_mesh(config.mesh)
    return cls(
      load_model(config),
      config.image.vae.batch_chunk,
      mesh,
      config.mesh.rules,
      vae_tiling.Tiling.from_config(config.image.vae),
    )


def load_model(config) -> vae.AutoEncoder:
  """The autoencoder named by `config.image.vae` (see module docstring)."""
  v = config.image.vae
  wanted = vae.AutoEncoderConfig.from_config(v)
  if not v.checkpoint:
    return vae.AutoEncoder(wanted, nnx.Rngs(config.seed))
  root = pathlib.Path(v.checkpoint)
  if (root / RELEASE_DIR / vae_import.CONFIG_FILE).exists():
    root = root / RELEASE_DIR
  if not (root / vae_import.CONFIG_FILE).exists():
    raise FileNotFoundError(
      f'image.vae.checkpoint={v.checkpoint!r} is neither a nextstep-train-tokenizer workdir '
      f'({RELEASE_DIR}/{vae_import.CONFIG_FILE}) nor an official release directory '
      f'({vae_import.CONFIG_FILE} + {vae_import.TORCH_FILE} or *.safetensors).'
    )
  model = vae_import.load_release(root, dtype=wanted.dtype, param_dtype=wanted.param_dtype)
  got = model.cfg
  if (got.z_channels, got.downsample) != (wanted.z_channels, wanted.downsample):
    raise ValueError(
      f'image.vae.checkpoint={v.checkpoint!r} has z_channels={got.z_channels}, downsample '
      f'{got.downsample} (ch_mult={got.ch_mult}) but the config says z_channels='
      f'{wanted.z_channels}, ch_mult={wanted.ch_mult}; set image.vae.z_channels and '
      "image.vae.ch_mult (and model.latent_channels) to the checkpoint's."
    )
  return model


def export_release(directory: str | pathlib.Path, cfg: vae.AutoEncoderConfig, params) -> None:
  """Writes params in the official layout: config.json (model fields) + vae.safetensors
  (torch names, OIHW convs), loadable by `vae_import.load_release` and by image.vae.checkpoint."""
  root = pathlib.Path(directory)
  root.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(jax.device_get(var.get_value()), np.float32)
    tensors[vae_import.official_name(path)] = (
      value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    )
  vae_import.write_safetensors(root / SAFETENSORS_FILE, tensors)
  (root / vae_import.CONFIG_FILE).write_text(json.dumps(vae.config_dict(cfg), indent=2))


def channel_statistics(latents: np.ndarray) -> dict:
  """Per-channel mean/std of latents (B, h, w, Z) and the scalar normalisation they imply:
  shift = overall mean, scale = 1 / overall std (Flux's convention)."""
  flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
  mean, std = float(flat.mean()), float(flat.std())
  return {
    'channel_mean': flat.mean(0).tolist(),
    'channel_std': flat.std(0).tolist(),
    'mean': mean,
    'std': std,
    'shift_factor': mean,
    'scaling_factor': 1.0 / max(std, 1e-8),
  }
