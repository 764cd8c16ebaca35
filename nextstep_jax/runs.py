"""A run directory's layout, and `restore_run`: the one place that restores a run.

Two kinds of directory hold a model:
  training run (`nextstep-train --workdir DIR`): config.json, tokenizer.model (sentencepiece; or
    tokenizer.json when trained with text.tokenizer='hf') and checkpoints/<step>/ holding the
    train state {'params', 'opt_state', 'step'};
  converted release (`nextstep-convert --out DIR`): config.json, tokenizer.json (Hugging Face),
    params/0/ holding the params alone, and vae/ with the image tokenizer's weights.

`restore_run` reads either onto any mesh: params only (the optimizer moments stay on disk; the
params can be cast to another dtype while they load, or quantized: a `config` whose `model.quant`
asks for int8/int4 weights of a float run) or, for a training run, the full train state.
"""

import pathlib
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.data import text_tokenizer
from nextstep_jax.model import nextstep
from nextstep_jax.model import quant
from nextstep_jax.parallel import rules as rules_lib

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'  # A training run's sentencepiece model.
CHECKPOINT_DIR = 'checkpoints'  # A training run's checkpoints, one sub-directory per step.
CONVERTED_TOKENIZER_FILE = 'tokenizer.json'  # A converted release's Hugging Face tokenizer.
HF_TOKENIZER_FILE = CONVERTED_TOKENIZER_FILE  # A training run's, with text.tokenizer='hf'.
CONVERTED_PARAMS_DIR = 'params'  # A converted release's params (one checkpoint, step 0).
CONVERTED_VAE_DIR = 'vae'  # A converted release's image tokenizer weights.


class RunFilesError(errors.UserError, FileNotFoundError):
  """A training run or converted release lacks a file it needs."""


class RestoredRun(NamedTuple):
  """config: the run's stored config; graphdef: the model's static half; state: the params
  (params_only) or the full train state dict; step: the restored step; extra: its saved JSON."""

  config: ml_collections.ConfigDict
  graphdef: Any
  state: Any
  step: int
  extra: dict


def split_step(spec: str) -> tuple[str, int | None]:
  """'DIR' -> (DIR, None); 'DIR@STEP' -> (DIR, STEP) (an '@' in the last path component only)."""
  if '@' not in spec.rsplit('/', 1)[-1]:
    return spec, None
  workdir, _, step = spec.rpartition('@')
  if not step.isdigit():
    raise ValueError(f'{spec!r}: the step after "@" must be an integer (WORKDIR@STEP).')
  return workdir, int(step)


def is_converted(workdir: str) -> bool:
  """True for a `nextstep-convert` output, False for a training run."""
  return (epath.Path(workdir) / CONVERTED_PARAMS_DIR).exists()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json a training run or converted release was written with (a converted release's
  image tokenizer path made absolute)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise RunFilesError(
      f'{workdir} is not a training run: {CONFIG_FILE} is missing (train one with '
      'nextstep-train --workdir DIR, or convert a release with nextstep-convert).'
    )
  config = configlib.config_from_json(path.read_text())
  if is_converted(workdir) and config.image.vae.checkpoint == CONVERTED_VAE_DIR:
    config.image.vae.checkpoint = str(_absolute(workdir) / CONVERTED_VAE_DIR)  # Stored relative.
  return config


def check_files(workdir: str, *names: str) -> None:
  """RunFilesError naming the first of `names` (and config.json) missing from `workdir`."""
  for name in (CONFIG_FILE, *names):
    if not (epath.Path(workdir) / name).exists():
      raise RunFilesError(
        f'{workdir} is not a training run: {name} is missing (train one with nextstep-train '
        '--workdir DIR)'
        if name == CONFIG_FILE
        else f'{epath.Path(workdir) / name} is missing: {workdir} is incomplete; copy the file back '
        'from where the run was made, or recreate the run (nextstep-train / nextstep-convert)'
      )


def _absolute(workdir: str) -> epath.Path:
  return epath.Path(workdir if '://' in str(workdir) else pathlib.Path(workdir).absolute())


def checkpoint_dir(workdir: str) -> epath.Path:
  """Where a run's checkpoints live (checkpoints/ of a training run, params/ of a converted one)."""
  return epath.Path(workdir) / (CONVERTED_PARAMS_DIR if is_converted(workdir) else CHECKPOINT_DIR)


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run, oldest first."""
  ckpt = checkpoints.Checkpointer(checkpoint_dir(workdir), keep=1_000_000)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def local_copy(path: epath.Path) -> str:
  """A local filesystem path with the contents of `path` (itself when it is local)."""
  if '://' not in str(path):
    return str(path)
  with tempfile.NamedTemporaryFile(suffix=path.suffix, delete=False) as f:
    f.write(path.read_bytes())
  return f.name


def load_text_tokenizer(workdir: str):
  """The text tokenizer a training run was trained with: tokenizer.json (the official Hugging Face
  tokenizer, text.tokenizer='hf') when present, else its sentencepiece tokenizer.model."""
  root = epath.Path(workdir)
  if (root / HF_TOKENIZER_FILE).exists():
    return hf_tokenizer.HFTokenizer.load(local_copy(root / HF_TOKENIZER_FILE))
  check_files(workdir, TOKENIZER_FILE)
  return text_tokenizer.TextTokenizer.load(local_copy(root / TOKENIZER_FILE))


def restore_run(
  workdir: str,
  step: int | None = None,
  *,
  params_only: bool,
  mesh: jax.sharding.Mesh | None = None,
  rules=None,
  dtype=None,
  config: ml_collections.ConfigDict | None = None,
  abstract_state: Any = None,
  checkpointer: checkpoints.Checkpointer | None = None,
  without_lm_head: bool = False,
) -> RestoredRun:
  """Restores a training run or converted release, arrays read straight onto their shardings.

  Args:
    workdir: the run directory (local path or gs:// URL).
    step: the checkpoint step; None: the newest that restores (damaged newer ones are moved
      aside, see `checkpoints.Checkpointer.restore_newest`).
    params_only: read only the params (a training run's optimizer moments are not read).
    mesh: the mesh to shard onto under `rules`; None: every array on the first device.
    rules: logical-axis rules; default the config's `mesh.rules`.
    dtype: cast floating params to this dtype while loading (params_only); None keeps the config's.
    config: the run's config; default its config.json. Its `model.quant` may ask for weight-only
      quantization of a float run (params_only): the float params are read onto the mesh and
      quantized there one kernel at a time (model/quant.py). Quantized runs restore as stored.
    abstract_state: the abstract full train state (required for a full restore; the optimizer
      that shapes it belongs to training), sharded here like the params.
    checkpointer: an open Checkpointer on the run's checkpoints to use (and leave open).
    without_lm_head: (params_only) neither read nor place the LM head: image sampling never
      evaluates it (0.78B params at 14B, which a one-chip load could not hold next to the rest).

  Returns:
    RestoredRun(config, graphdef, state, step, extra).
  """
  stored_quant = (
    quant.QuantConfig.from_config(load_config(workdir).model) if config is not None else None
  )
  config = config or load_config(workdir)
  wanted_quant = quant.QuantConfig.from_config(config.model)
  if stored_quant is not None and stored_quant.enabled and stored_quant != wanted_quant:
    raise ValueError(
      f'{workdir} holds {stored_quant.mode} weights ({stored_quant}); it cannot be loaded as '
      f'{wanted_quant}: convert the release again with the --quantize setting you want.'
    )
  quantize_now = stored_quant is not None and wanted_quant.enabled and not stored_quant.enabled
  if quantize_now and not params_only:
    raise ValueError(f'model.quant.mode={wanted_quant.mode!r}: a quantized restore is params_only.')
  converted = is_converted(workdir)
  if converted and not params_only:
    raise ValueError(
      f'{workdir} is a converted release: it holds params only; use params_only=True.'
    )
  if not params_only and abstract_state is None:
    raise ValueError('a full restore needs abstract_state (training.state.abstract_train_state).')
  if without_lm_head and not params_only:
    raise ValueError('without_lm_head restores params only; pass params_only=True.')
  quantized_model = nextstep.abstract_model(config, lm_head=not without_lm_head)
  graphdef, abstract_params = nnx.split(quantized_model, nnx.Param)
  if quantize_now:  # Read the float params; quantized below.
    float_model = nextstep.abstract_model(config, quantized=False, lm_head=not without_lm_head)
    abstract_params = nnx.state(float_model, nnx.Param)
  if params_only:
    if dtype is not None:
      abstract_params = jax.tree.map(
        lambda x: (
          jax.ShapeDtypeStruct(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        ),
        abstract_params,
      )
    abstract_state = abstract_params if converted else {'params': abstract_params}
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
    )
  else:
    target = rules_lib.abstract_with_shardings(
      abstract_state, mesh, config.mesh.rules if rules is None else rules
    )
  ckpt = checkpointer or checkpoints.Checkpointer(checkpoint_dir(workdir), keep=1_000_000)
  try:
    partial = params_only and (without_lm_head or not converted)
    if converted:
      step = 0 if step is None else step
    if step is None:
      restored = ckpt.restore_newest(
        target, partial=partial, log=lambda line: print(f'warning: {line}', flush=True)
      )
      if restored is None:
        raise checkpoints.CheckpointNotFoundError(
          f'No checkpoint in {ckpt.directory}; train first (nextstep-train --workdir {workdir})'
        )
      state, extra, step = restored.state, restored.extra, restored.step
    else:
      state, extra = ckpt.restore(step, target, partial=partial)
  finally:
    if checkpointer is None:
      ckpt.close()
  if params_only and not converted:
    state = state['params']
  if quantize_now:
    shardings = None
    if mesh is not None:
      shardings = rules_lib.state_shardings(
        nnx.state(quantized_model, nnx.Param), mesh, config.mesh.rules if rules is None else rules
      )
    state = quant.quantize_params(state, quantized_model, wanted_quant, shardings)
  return RestoredRun(config, graphdef, state, step, extra)
