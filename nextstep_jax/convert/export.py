"""A training run's params -> the converted layout, so `nextstep-sample --converted` samples it.

`export_run('WORKDIR[@STEP]', out_dir)` writes what `convert/official.py` writes for a release:

  out_dir/config.json     the run's config (image.vae.checkpoint = 'vae' when its VAE is copied)
  out_dir/tokenizer.json  the run's tokenizer.json (runs trained with text.tokenizer='hf')
  out_dir/params/0/       orbax params only (no optimizer state), in the run's param_dtype
  out_dir/vae/            the run's image tokenizer in the release layout (config.json +
                          checkpoint.pt or *.safetensors), when it has one

Params are read with `runs.restore_run(params_only=True)` straight onto their shardings under a
mesh of every device and written sharded, so no device holds the whole model.
"""

import pathlib
import shutil

import jax

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.image import vae_import
from nextstep_jax.image import vae_tokenizer
from nextstep_jax.parallel import mesh as mesh_lib


class ExportError(ValueError):
  """The run cannot be exported to the converted layout; the message says why and what to do."""


def _vae_release(checkpoint: str) -> pathlib.Path | None:
  """The release-layout folder of image.vae.checkpoint (a release dir or a tokenizer workdir)."""
  if not checkpoint:
    return None
  root = pathlib.Path(checkpoint)
  if (root / vae_tokenizer.RELEASE_DIR / vae_import.CONFIG_FILE).exists():
    root = root / vae_tokenizer.RELEASE_DIR
  return root if (root / vae_import.CONFIG_FILE).exists() else None


def export_run(spec: str, out_dir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None):
  """Exports run `spec` (WORKDIR or WORKDIR@STEP, default its latest checkpoint) into `out_dir`;
  returns the written config. Raises ExportError, FileNotFoundError (no run / no such step) or
  FileExistsError (out_dir holds params)."""
  workdir, step = runs.split_step(spec)
  if runs.is_converted(workdir):
    raise ExportError(f'{workdir} is already a converted release; pass a training workdir.')
  config = configlib.with_base_defaults(runs.load_config(workdir))
  root = pathlib.Path(workdir)
  tokenizer = root / runs.HF_TOKENIZER_FILE
  if not tokenizer.exists():
    raise ExportError(
      f'{root} was trained with the sentencepiece stand-in (no {runs.HF_TOKENIZER_FILE}); '
      'the converted layout needs the official tokenizer. Sample it with nextstep-sample '
      "--workdir, or fine-tune with text.tokenizer='hf'."
    )
  out_dir = pathlib.Path(out_dir).absolute()
  if (out_dir / runs.CONVERTED_PARAMS_DIR).exists():
    raise FileExistsError(
      f'{out_dir / runs.CONVERTED_PARAMS_DIR} exists; choose an empty --out directory.'
    )
  restored = runs.restore_run(
    workdir, step, params_only=True, config=config, mesh=mesh or mesh_lib.make_mesh(config.mesh)
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoints.Checkpointer(out_dir / runs.CONVERTED_PARAMS_DIR, keep=1, async_save=False)
  try:
    ckpt.save(0, restored.state, extra={'source': str(root.absolute()), 'step': restored.step})
    ckpt.wait()
  finally:
    ckpt.close()
  shutil.copyfile(tokenizer, out_dir / runs.CONVERTED_TOKENIZER_FILE)
  vae_release = (
    _vae_release(config.image.vae.checkpoint) if config.image.tokenizer == 'vae' else None
  )
  if vae_release is not None:
    (out_dir / runs.CONVERTED_VAE_DIR).mkdir(exist_ok=True)
    for path in vae_release.iterdir():
      if (
        path.name in (vae_import.CONFIG_FILE, vae_import.TORCH_FILE)
        or path.suffix == '.safetensors'
      ):
        shutil.copyfile(path, out_dir / runs.CONVERTED_VAE_DIR / path.name)
    config.image.vae.checkpoint = runs.CONVERTED_VAE_DIR
  (out_dir / runs.CONFIG_FILE).write_text(configlib.config_to_json(config))
  return config
