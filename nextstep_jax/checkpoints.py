"""Orbax checkpoints: a state pytree, a JSON `extra` and each process's data-iterator state.

Layout: `<directory>/<step>/{state,extra,data}`; `data/process_<i>-of-<n>.json` holds process i's
training-data state (`nextstep_jax.data.training_data`), written by that process. Saves are asynchronous (`wait()` blocks until the last
one is committed) and atomic: orbax writes into `<step>.orbax-checkpoint-tmp-<timestamp>` and
renames it to `<step>` once every array is written (on object stores, which cannot rename, it
writes `commit_success.txt` last instead). A checkpoint interrupted mid-write therefore never
counts as a step: `latest_step` ignores it, and a `Checkpointer` opened on the directory deletes it
in the background (finished before its first save). Only the newest `keep` checkpoints are kept.

Restores read arrays straight onto the shardings of the abstract target, so a run can resume on
another mesh; see `nextstep_jax.parallel.rules.abstract_with_shardings`.
"""
import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

_MAX_LISTED = 20  # Mismatched paths listed per kind in a restore error.


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree or array shapes differ from the abstract state."""


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
    if states and all(state == states[0] for state in states):
      return states[0]
    raise ValueError(
        f'{directory} holds per-process data states {[p.name for p in saved]} that differ, but this '
        f'job has {jax.process_count()} processes; resume with the process count that saved them.')


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

  def save(self, step: int, state: Any, extra: dict | None = None, data_state: dict | None = None,
           force: bool = False) -> bool:
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
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

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

  def restore(self, step: int | None, abstract_state: Any, partial: bool = False) -> tuple[Any, dict]:
    """Restores `step` (None: the latest) onto the shardings of `abstract_state`.

    Args:
      step: the step to restore, or None for the latest.
      abstract_state: the expected pytree, with `jax.ShapeDtypeStruct(shape, dtype,
        sharding=...)` (or jax.Array) leaves; restored arrays get these shapes, dtypes and
        shardings.
      partial: `abstract_state` is a dict naming only some of the saved top-level entries (e.g.
        {'params': ...}); only those are read, the rest stay on disk.

    Returns:
      (state, extra): state with the structure of `abstract_state`, extra the saved JSON dict.

    Raises:
      FileNotFoundError: no checkpoint (at `step`) exists.
      CheckpointMismatchError: listing paths missing on either side and shape mismatches.
    """
    if step is None:
      step = self.latest_step()
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(
          f'No checkpoint {"" if step is None else f"for step {step} "}in {self.directory} '
          f'(steps: {self.all_steps()}).')
    self._check_matches(step, abstract_state, partial)
    if partial:
      path = epath.Path(self.directory) / str(step) / 'state'
      with ocp.PyTreeCheckpointer() as checkpointer:
        state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state),
            partial_restore=True))
      return state, self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()),
    )
    return restored.state, restored.extra

  def restore_data_state(self, step: int) -> dict | None:
    """This process's data-iterator state saved at `step`; None if the checkpoint has none."""
    if 'data' not in self._manager.item_metadata(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(data=ProcessJsonRestore())).data

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def _check_matches(self, step: int, abstract_state: Any, partial: bool = False) -> None:
    saved = _shapes_by_path(self._manager.item_metadata(step)['state'])
    if partial:
      saved = {path: shape for path, shape in saved.items() if path.split('/')[0] in abstract_state}
    expected = _shapes_by_path(abstract_state)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    different = sorted(path for path in expected.keys() & saved.keys()
                       if saved[path] != expected[path])
    if not (missing or unexpected or different):
      return
    lines = [f'Checkpoint {self.directory}/{step} does not match the expected state:']
    lines += _listed('expected but not in the checkpoint',
                     [f'{path} {expected[path]}' for path in missing])
    lines += _listed('in the checkpoint but not expected',
                     [f'{path} {saved[path]}' for path in unexpected])
    lines += _listed('shape differs (checkpoint vs expected)',
                     [f'{path} {saved[path]} vs {expected[path]}' for path in different])
    raise CheckpointMismatchError('\n'.join(lines))


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """Leaf shapes keyed by '/'-joined paths; keys spelled as orbax stores them (all strings)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(key) for key in path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in leaves}


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
