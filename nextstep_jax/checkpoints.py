"""Orbax checkpoints: a state pytree, a JSON `extra` and each process's data-iterator state.

Layout: `<directory>/<step>/{state,extra,data}`; `data/process_<i>-of-<n>.json` holds process i's
training-data state (`nextstep_jax.data.training_data`), written by that process. Saves are
asynchronous (`wait()` blocks until the last one is committed) and atomic: orbax writes into
`<step>.orbax-checkpoint-tmp-<timestamp>` and renames it to `<step>` once every array is written (on
object stores, which cannot rename, it writes `commit_success.txt` last instead). A checkpoint
interrupted mid-write therefore never counts as a step: `latest_step` ignores it, and a
`Checkpointer` opened on the directory deletes it in the background (finished before its first
save). Only the newest `keep` checkpoints are kept.

Damaged checkpoints (a deleted or truncated file, from a disk fault or a hand edit) fall back:
`restore_newest` restores the newest step that restores, moving each damaged step directory aside
into `<directory>.damaged/<step>-<UTC time>` (never deleted) and printing which step was skipped
and why. Every orbax/TensorStore failure while restoring becomes one `CheckpointDamagedError`
naming the checkpoint and the probable cause (a missing file, an empty file, a truncated or
corrupt data file); a tree that does not match is a `CheckpointMismatchError` (no fallback: every
step of the run would differ the same way). A failed save (disk full, permissions) is a
`CheckpointSaveError`, raised by the next `save`, `check_for_errors`, `wait` or `close`.

Restores read arrays straight onto the shardings of the abstract target, so a run can resume on
another mesh; see `nextstep_jax.parallel.rules.abstract_with_shardings`.
"""

import dataclasses
import datetime
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from nextstep_jax import errors

_MAX_LISTED = 20  # Mismatched paths listed per kind in a restore error.


class CheckpointMismatchError(errors.UserError, ValueError):
  """The checkpoint's tree or array shapes differ from the abstract state."""


class CheckpointNotFoundError(errors.UserError, FileNotFoundError):
  """No checkpoint (at the requested step) exists."""


class CheckpointDamagedError(errors.UserError, RuntimeError):
  """A checkpoint exists but cannot be read back: files missing, empty, truncated or corrupt."""

  def __init__(self, message: str, step: int, cause: str):
    super().__init__(message)
    self.step, self.cause = step, cause


class CheckpointSaveError(errors.UserError, RuntimeError):
  """Writing a checkpoint failed (disk full, permission denied, ...)."""


# Files every committed checkpoint holds (relative to its step directory).
_REQUIRED_FILES = (
  '_CHECKPOINT_METADATA',
  'state/_METADATA',
  'state/manifest.ocdbt',
  'extra/metadata',
)
DAMAGED_SUFFIX = '.damaged'  # Damaged steps are kept in <directory>.damaged/<step>-<time>.
SUPERSEDED_SUFFIX = '.superseded'  # Steps newer than a `--step` resume, kept likewise.


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore_newest` restored."""

  step: int
  state: Any
  extra: dict
  data_state: dict | None  # This process's data-iterator state (None: not asked for or not saved).
  skipped: list[str]  # One line per damaged newer step moved aside.


class ProcessJsonHandler(ocp.JsonCheckpointHandler):
  """One JSON dict per process: `process_<i>-of-<n>.json`, each written by its own process.

  A process restores its own file. When the process count changed, the saved dicts are usable
  only if they are all equal (a global state, such as the built-in data's step); otherwise the
  restore fails naming the saved and current process counts.
  """

  async def _save_fn(self, x, directory):
    (directory / _process_file(jax.process_index(), jax.process_count())).write_text(json.dumps(x))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> dict:
    del item, args
    own = directory / _process_file(jax.process_index(), jax.process_count())
    if own.exists():
      return json.loads(own.read_text())
    saved = sorted(directory.glob('process_*-of-*.json'))
    states = [json.loads(path.read_text()) for path in saved]
    if not states:
      raise FileNotFoundError(
        f'{own} is missing (no process_*-of-*.json data state in {directory})'
      )
    if states and all(state == states[0] for state in states):
      return states[0]
    raise ValueError(
      f'{directory} holds per-process data states {[p.name for p in saved]} that differ, but this '
      f'job has {jax.process_count()} processes; resume with the process count that saved them.'
    )


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


def _process_file(index: int, count: int) -> str:
  return f'process_{index}-of-{count}.json'


class Checkpointer:
  """Saves and restores (state pytree, JSON extra) pairs under one directory, keeping `keep`."""

  def __init__(self, directory: str | pathlib.Path, keep: int, async_save: bool = True):
    """Opens (creating if needed) `directory` and starts deleting leftover partial checkpoints.

    Args:
      directory: the checkpoint root (local path or an orbax-supported URL such as gs://).
      keep: how many of the newest checkpoints to keep.
      async_save: write arrays in a background thread (`save` returns once they are copied off
        the devices).
    """
    if '://' not in str(directory):  # Orbax needs absolute local paths.
      directory = pathlib.Path(directory).absolute()
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
    )
    self._manager = ocp.CheckpointManager(
      directory,
      options=options,
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'extra': ocp.JsonCheckpointHandler(),
        'data': ProcessJsonHandler(),
      },
    )

  def save(
    self,
    step: int,
    state: Any,
    extra: dict | None = None,
    data_state: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving `state` (pytree of jax.Arrays), `extra` and this process's `data_state`.

    Every process calls this. `extra` (JSON-serialisable) is written by process 0; `data_state`
    (JSON-serialisable, this process's data-iterator state) by each process into its own file.

    Returns:
      Whether a save was started (False when `step` is not newer than the latest checkpoint,
      unless `force`).
    """
    items = dict(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {}))
    if data_state is not None:
      items['data'] = ProcessJsonSave(data_state)
    with self._save_errors(f'saving step {step}'):
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError if a background save has failed (cheap; call every step)."""
    with self._save_errors('a background save'):
      self._manager.check_for_errors()

  def _save_errors(self, what: str):
    return _SaveErrors(self.directory, what)

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the step all processes agreed to stop at after a preemption notice
    (SIGTERM to any of them; needs `jax.distributed.initialize`). Call once per step, everywhere."""
    return self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return list(self._manager.all_steps())

  def restore(
    self, step: int | None, abstract_state: Any, partial: bool = False
  ) -> tuple[Any, dict]:
    """Restores `step` (None: the newest that restores, see `restore_newest`) onto the
    shardings of `abstract_state`.

    Args:
      step: the step to restore, or None for the newest restorable one.
      abstract_state: the expected pytree, with `jax.ShapeDtypeStruct(shape, dtype,
        sharding=...)` (or jax.Array) leaves; restored arrays get these shapes, dtypes and
        shardings.
      partial: `abstract_state` names only part of the saved tree (e.g. {'params': ...}, or
        params without the LM head); only that is read, the rest stays on disk.

    Returns:
      (state, extra): state with the structure of `abstract_state`, extra the saved JSON dict.

    Raises:
      CheckpointNotFoundError: no checkpoint (at `step`) exists.
      CheckpointMismatchError: listing paths missing on either side and shape mismatches.
      CheckpointDamagedError: `step` was given and cannot be read back.
    """
    if step is None:
      restored = self.restore_newest(abstract_state, partial=partial)
      if restored is None:
        raise CheckpointNotFoundError(
          f'No checkpoint in {self.directory}; train first (nextstep-train)'
        )
      return restored.state, restored.extra
    if step not in self.all_steps():
      raise CheckpointNotFoundError(
        f'No checkpoint for step {step} in {self.directory}; saved steps: {self.all_steps()}'
      )
    restored = self._restore_step(step, abstract_state, with_data=False, partial=partial)
    return restored.state, restored.extra

  def restore_newest(
    self, abstract_state: Any, with_data: bool = False, log=print, partial: bool = False
  ) -> Restored | None:
    """Restores the newest step that restores; None when there is no checkpoint at all.

    A damaged step (`CheckpointDamagedError`) is moved aside to `<directory>.damaged/` (on a
    single process; with several processes the error is raised, as they could disagree) and the
    next older step is tried; `log` gets one line per skipped step. with_data: also restore this
    process's data-iterator state; partial: see `restore`.

    Raises:
      CheckpointDamagedError: every checkpoint is damaged (all moved aside), or one is damaged in a
        multi-process job.
      CheckpointMismatchError: the newest readable checkpoint holds a different tree.
    """
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self._restore_step(step, abstract_state, with_data, partial)
      except CheckpointDamagedError as error:
        if jax.process_count() > 1:
          raise
        kept = self._move_aside(step)
        line = (
          f'checkpoint step {step} is damaged ({error.cause}); skipped it and moved it aside to '
          f'{kept} (not deleted); trying the previous checkpoint'
        )
        log(line)
        skipped.append(line)
        continue
      restored.skipped = skipped
      return restored
    if skipped:
      raise CheckpointDamagedError(
        f'every checkpoint in {self.directory} is damaged (moved aside to '
        f'{self._damaged_root()}); start a new run or restore the files from a backup',
        step=-1,
        cause='all damaged',
      )
    return None

  def _restore_step(
    self, step: int, abstract_state: Any, with_data: bool, partial: bool = False
  ) -> Restored:
    step_dir = epath.Path(self.directory) / str(step)
    try:
      metadata = self._manager.item_metadata(step)
      if metadata is None or metadata.get('state') is None:
        raise FileNotFoundError(f'{step_dir}/state/_METADATA is missing')
      self._check_matches(step, abstract_state, metadata, partial)
      has_data = with_data and 'data' in metadata and metadata.get('data') is not False
      if partial:
        with ocp.PyTreeCheckpointer() as checkpointer:
          state = checkpointer.restore(
            step_dir / 'state',
            args=ocp.args.PyTreeRestore(
              abstract_state,
              ocp.checkpoint_utils.construct_restore_args(abstract_state),
              partial_restore=True,
            ),
          )
        items = dict(extra=ocp.args.JsonRestore())
      else:
        items = dict(state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore())
      if has_data:
        items['data'] = ProcessJsonRestore()
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      if not partial:
        state = restored.state
    except CheckpointMismatchError:
      raise
    except Exception as error:  # orbax/TensorStore raise many kinds
      cause = diagnose(step_dir, error)
      raise CheckpointDamagedError(
        f'checkpoint {step_dir} cannot be restored: {cause}. Restore the files, or move the '
        f'directory away to resume from an older step (saved steps: {self.all_steps()})',
        step=step,
        cause=cause,
      ) from error
    return Restored(step, state, restored.extra, restored.data if has_data else None, skipped=[])

  def set_aside_newer(self, step: int) -> list[str]:
    """Moves the checkpoints newer than `step` to `<directory>.superseded/` (kept, so a run can
    resume from an older step and save over those step numbers); returns one line per move."""
    lines = []
    if jax.process_index() == 0:
      for newer in [s for s in self.all_steps() if s > step]:
        kept = self._move_aside(newer, SUPERSEDED_SUFFIX)
        lines.append(
          f'resuming from step {step}: moved the newer checkpoint {newer} aside to {kept}'
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('nextstep_set_aside_newer')
    self._manager.reload()
    return lines

  def _damaged_root(self, suffix: str = '.damaged') -> epath.Path:
    root = epath.Path(self.directory)
    return root.parent / (root.name + suffix)

  def _move_aside(self, step: int, suffix: str = '.damaged') -> epath.Path:
    """Moves step `step`'s directory to `<directory><suffix>/<step>-<UTC time>`; returns it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
    target = self._damaged_root(suffix) / f'{step}-{stamp}'
    target.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(self.directory) / str(step)).rename(target)
    self._manager.reload()
    return target

  def restore_data_state(self, step: int) -> dict | None:
    """This process's data-iterator state saved at `step`; None if the checkpoint has none."""
    if 'data' not in self._manager.item_metadata(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(data=ProcessJsonRestore())).data

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    with self._save_errors('waiting for a save'):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    with self._save_errors('finishing the last save'):
      self._manager.close()

  def _check_matches(self, step: int, abstract_state: Any, metadata, partial: bool = False) -> None:
    saved = _shapes_by_path(metadata['state'])
    expected = _shapes_by_path(abstract_state)
    missing = sorted(expected.keys() - saved.keys())
    # A partial restore reads a subset (the params without the optimizer, a model without its LM
    # head): what it leaves in the checkpoint is not an error.
    unexpected = [] if partial else sorted(saved.keys() - expected.keys())
    different = sorted(
      path for path in expected.keys() & saved.keys() if saved[path] != expected[path]
    )
    if not (missing or unexpected or different):
      return
    lines = [f'Checkpoint {self.directory}/{step} does not match the expected state:']
    lines += _listed(
      'expected but not in the checkpoint', [f'{path} {expected[path]}' for path in missing]
    )
    lines += _listed(
      'in the checkpoint but not expected', [f'{path} {saved[path]}' for path in unexpected]
    )
    lines += _listed(
      'shape differs (checkpoint vs expected)',
      [f'{path} {saved[path]} vs {expected[path]}' for path in different],
    )
    raise CheckpointMismatchError('\n'.join(lines))


class _SaveErrors:
  """Context manager turning any exception of a save into one CheckpointSaveError line."""

  def __init__(self, directory, what: str):
    self.directory, self.what = directory, what

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb) -> bool:
    if error is None or isinstance(error, (CheckpointSaveError, KeyboardInterrupt)):
      return False
    text = _first_line(error)
    hint = (
      'free disk space'
      if 'No space left' in str(error)
      else 'check that the directory is writable'
      if 'ermission' in str(error)
      else 'check the storage'
    )
    raise CheckpointSaveError(
      f'checkpoint save failed in {self.directory} ({self.what}): {text}; {hint}, then rerun to '
      'resume from the last complete checkpoint'
    ) from error


def _first_line(error: BaseException, limit: int = 300) -> str:
  """The most specific line of an exception chain (TensorStore messages nest their causes)."""
  text = f'{type(error).__name__}: {error}'
  for pattern in (r'No space left on device', r'Permission denied'):
    if re.search(pattern, text):
      return pattern
  line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return line[:limit] + ('...' if len(line) > limit else '')


def diagnose(step_dir: epath.Path, error: BaseException) -> str:
  """The probable cause of a failed restore of `step_dir`: missing or empty files first (by
  inspection), then what the error says (truncated / corrupt data)."""
  missing = [name for name in _REQUIRED_FILES if not (step_dir / name).exists()]
  if missing:
    return f'file {", ".join(missing)} is missing'
  try:
    empty = sorted(
      str(path.relative_to(step_dir))
      for path in _files(step_dir, depth=4)
      if path.stat().length == 0 and path.name != 'commit_success.txt'
    )
  except OSError:
    empty = []
  if empty:
    return f'file {", ".join(empty[:3])} is empty'
  text = str(error)
  found = re.search(r'NOT_FOUND[^\n]*?"?(file://)?([^"\s]+/[^"\s]+)', text)
  if found or isinstance(error, FileNotFoundError):
    where = found.group(2) if found else str(error)
    return f'a data file is missing ({where[-160:]})'
  if re.search(
    r'OUT_OF_RANGE|DATA_LOSS|truncat|Unexpected end|corrupt|checksum|Error reading|'
    r'Failed to decode|Invalid|JSONDecodeError|Expecting',
    text,
    re.IGNORECASE,
  ):
    return f'a data file is truncated or corrupt ({_first_line(error, 160)})'
  return f'unreadable ({_first_line(error, 160)})'


def _files(root: epath.Path, depth: int) -> list[epath.Path]:
  """Files under `root` down to `depth` levels (epath has no recursive glob on object stores)."""
  out = []
  for path in root.iterdir():
    if path.is_dir():
      out += _files(path, depth - 1) if depth > 1 else []
    else:
      out.append(path)
  return out


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """Leaf shapes keyed by '/'-joined paths; keys spelled as orbax stores them (all strings)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    '/'.join(_key_name(key) for key in path): tuple(getattr(leaf, 'shape', ()))
    for path, leaf in leaves
  }


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key.key)  # FlattenedIndexKey


def _listed(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  shown = [f'    {item}' for item in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    shown.append(f'    ... and {len(items) - _MAX_LISTED} more')
  return [f'  {title}:'] + shown
