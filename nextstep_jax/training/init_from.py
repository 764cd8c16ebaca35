"""Fine-tuning start: the params of a converted release or of another run, restored onto the mesh.

`train.init_from` names the source:
  * a converted official checkpoint (`nextstep-convert --out DIR`): DIR holds params/0 (orbax) and
    tokenizer.json;
  * another training run's workdir, `WORKDIR` (its latest checkpoint) or `WORKDIR@STEP`.

Only the params are read (never the optimizer state), straight onto the training shardings: every
array is restored from its `ArrayRestoreArgs(sharding=..., dtype=param_dtype)`, so each device
reads its own shard and bf16 releases become f32 masters without a full copy on one device. The
caller starts a fresh optimizer at step 0; a run that already has checkpoints resumes from its own
(the loop checks those first), never from `init_from` again.

`train.init_from_skip` lists glob patterns (fnmatch) over dotted param paths, e.g.
'image_head.*' or 'lm_head.kernel': matching params keep their fresh random init (a new head, a
resized embedding) and need not exist in the source. Every other param must exist in the source
with the same shape; all missing, mis-shaped and unexpected names are listed in one
`InitFromError`.

`runs.restore_run` reads the whole param tree of a run's own model; a fine-tune compares the
source against another model (the training config's), leaves skipped names out and lists every
mismatch, so the read here is a per-array partial orbax restore of the layout runs.py defines.
"""

import dataclasses
import fnmatch
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from nextstep_jax import checkpoints
from nextstep_jax import nn
from nextstep_jax import runs

_MAX_LISTED = 30


class InitFromError(ValueError):
  """`train.init_from` names no usable checkpoint, or its params do not fit the model."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the params come from: kind 'converted' or 'run', the directory, the step, the orbax
  `state` directory and the path prefix of the params inside the saved tree."""

  kind: str
  root: epath.Path
  step: int
  state_dir: epath.Path
  prefix: tuple[str, ...]


def resolve(spec: str) -> Source:
  """Parses `DIR` or `DIR@STEP` (runs only) into a `Source` (layout: nextstep_jax/runs.py);
  raises InitFromError naming the fix."""
  try:
    path, step = runs.split_step(spec)
  except ValueError as error:
    raise InitFromError(f'train.init_from={spec!r}: {error}') from error
  root = epath.Path(path)
  if not root.exists():
    raise InitFromError(
      f'train.init_from={spec!r}: {root} does not exist; pass a converted release '
      '(nextstep-convert --out DIR) or a training workdir, optionally WORKDIR@STEP.'
    )
  if runs.is_converted(path):
    if step is not None:
      raise InitFromError(
        f'train.init_from={spec!r}: {root} is a converted release (one params '
        'checkpoint); drop the "@STEP".'
      )
    return Source('converted', root, 0, runs.checkpoint_dir(path) / '0' / 'state', ())
  if (root / runs.CHECKPOINT_DIR).is_dir():
    steps = runs.checkpoint_steps(path)
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
      raise InitFromError(
        f'train.init_from={spec!r}: no checkpoint {"" if step is None else step} in '
        f'{root / runs.CHECKPOINT_DIR} (steps: {steps}).'
      )
    return Source('run', root, step, runs.checkpoint_dir(path) / str(step) / 'state', ('params',))
  raise InitFromError(
    f'train.init_from={spec!r}: {root} is neither a converted release '
    f'({runs.CONVERTED_PARAMS_DIR}/) nor a training workdir ({runs.CHECKPOINT_DIR}/); pass '
    'the directory that nextstep-convert --out or nextstep-train --workdir wrote.'
  )


def param_name(path: tuple[str, ...]) -> str:
  """Dotted name of a param path as users write it in init_from_skip ('decoder.layers.mlp.up_proj.kernel')."""
  return '.'.join(part for part in path if part != 'value')


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(checkpoints._key_name(k) for k in path): leaf for path, leaf in leaves}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def _listed(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED] + (
    [f'... and {len(items) - _MAX_LISTED} more'] if len(items) > _MAX_LISTED else []
  )
  return f'{len(items)} {title}:\n    ' + '\n    '.join(shown)


def restore_params(
  spec: str, abstract_params: Any, skip: tuple[str, ...] = (), param_dtype: str | None = None
) -> tuple[dict, set]:
  """Reads the params of `spec` onto the shardings of `abstract_params`.

  Args:
    spec: `train.init_from` (see module docstring).
    abstract_params: nnx.State of ShapeDtypeStructs carrying NamedShardings (the training target).
    skip: fnmatch patterns of dotted param names left out (kept at their random init).
    param_dtype: dtype the params are cast to on restore (None: the target's dtype).

  Returns:
    ({path tuple: jax.Array} of the restored params, set of skipped path tuples).

  Raises:
    InitFromError: listing every missing, mis-shaped and unexpected name at once.
  """
  source = resolve(spec)
  metadata = _flat(ocp.PyTreeCheckpointer().metadata(source.state_dir).item_metadata.tree)
  n = len(source.prefix)
  saved = {path[n:]: meta for path, meta in metadata.items() if path[:n] == source.prefix}
  expected = _flat(abstract_params)
  skipped = {
    path for path in expected if any(fnmatch.fnmatchcase(param_name(path), p) for p in skip)
  }
  missing = sorted(
    param_name(p) + f' {expected[p].shape}' for p in expected.keys() - saved.keys() - skipped
  )
  unexpected = sorted(
    param_name(p) + f' {tuple(saved[p].shape)}'
    for p in saved.keys() - expected.keys()
    if not any(fnmatch.fnmatchcase(param_name(p), pattern) for pattern in skip)
  )
  misshaped = sorted(
    f'{param_name(p)} {tuple(saved[p].shape)} in the source vs {expected[p].shape} in the model'
    for p in (expected.keys() & saved.keys()) - skipped
    if tuple(saved[p].shape) != tuple(expected[p].shape)
  )
  unused = [
    pattern
    for pattern in skip
    if not any(fnmatch.fnmatchcase(param_name(p), pattern) for p in expected.keys() | saved.keys())
  ]
  problems = [
    _listed(title, items)
    for title, items in (
      ('params missing from the source', missing),
      ('params of the source the model does not have', unexpected),
      ('params with another shape', misshaped),
      ('init_from_skip patterns matching no param', unused),
    )
    if items
  ]
  if problems:
    raise InitFromError(
      f'train.init_from={spec!r} ({source.kind}, step {source.step}) does not fit the model of this '
      'config:\n  '
      + '\n  '.join(problems)
      + '\n  Make the model fields match the source (a converted '
      "release's config.json lists them) or leave new params at their init with train.init_from_skip "
      "patterns (e.g. 'image_head.*')."
    )
  wanted = sorted(expected.keys() - skipped)
  dtype = nn.DTYPES[param_dtype] if param_dtype else None
  item = _nest({source.prefix + p: expected[p] for p in wanted})
  restore_args = _nest(
    {
      source.prefix + p: ocp.ArrayRestoreArgs(
        sharding=expected[p].sharding,
        global_shape=expected[p].shape,
        dtype=dtype or expected[p].dtype,
      )
      for p in wanted
    }
  )
  restored = ocp.PyTreeCheckpointer().restore(
    source.state_dir,
    args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
  )
  flat = _flat(restored)
  return {path[n:]: flat[path] for path in flat}, skipped


def initial_params(
  spec: str,
  abstract_params: Any,
  fresh_params_fn,
  skip: tuple[str, ...] = (),
  param_dtype: str | None = None,
) -> Any:
  """The params to start fine-tuning from: `abstract_params`' structure, restored values, and the
  values of `fresh_params_fn()` (a sharded random init, called only if a pattern skips something)
  at skipped paths."""
  restored, skipped = restore_params(spec, abstract_params, skip, param_dtype)
  fresh = _flat(fresh_params_fn()) if skipped else {}

  def pick(path, _):
    key = tuple(checkpoints._key_name(k) for k in path)
    return fresh[key] if key in skipped else restored[key]

  return jax.tree_util.tree_map_with_path(pick, abstract_params)


def initial_state(config, tx, abstract_state: Any, shardings: Any) -> dict:
  """A fresh train state (optimizer zeros, step 0) whose params come from `config.train.init_from`.

  With LoRA (train.lora.rank > 0) the adapters start fresh (a source has none) and the optimizer
  state covers the trained params only."""
  from nextstep_jax.model import lora
  from nextstep_jax.training import state as state_lib

  lora_cfg = lora.LoraConfig.from_config(config)
  skip = tuple(config.train.init_from_skip) + (lora.INIT_FROM_SKIP if lora_cfg else ())
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract_state['params'],
    shardings['params'],
  )

  def fresh():
    return jax.jit(
      lambda: state_lib.init_state(config, tx)['params'], out_shardings=shardings['params']
    )()

  params = initial_params(config.train.init_from, target, fresh, skip, config.model.param_dtype)
  opt_state = jax.jit(
    lambda p: tx.init(lora.split_trainable(p, lora_cfg)[0]), out_shardings=shardings['opt_state']
  )(params)
  step = jax.device_put(jax.numpy.zeros((), jax.numpy.int32), shardings['step'])
  return {'params': params, 'opt_state': opt_state, 'step': step}
