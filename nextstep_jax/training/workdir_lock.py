"""One trainer per workdir: `<workdir>/train.lock` names the holder (host, pid, start time).

Two trainers on one workdir delete each other's in-progress checkpoints and interleave
metrics.jsonl, so the second one refuses with a `WorkdirLockedError` naming the holder. On a local
(or NFS) filesystem the lock is an `fcntl.flock` held on the file for the life of the run: the
kernel releases it when the holder exits in any way (kill -9 included), so a lock file whose flock
can be taken again is stale; it is reported and replaced. Object stores (gs://) have no locks:
there the file alone decides, and a lock of a process on this host that no longer runs is stale;
a lock from another host is reported with the fix (delete the file if that job is gone).
Only process 0 of a job takes the lock.
"""

import datetime
import errno
import json
import os
import socket
import sys

from etils import epath

from nextstep_jax import errors

LOCK_FILE = 'train.lock'


class WorkdirLockedError(errors.UserError):
  """Another trainer holds the workdir."""


def _describe(holder: dict) -> str:
  return (
    f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, started '
    f'{holder.get("started", "?")}'
  )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Context manager holding `<workdir>/train.lock` (a no-op when `enabled` is False)."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.enabled = enabled
    self._fd = None
    self.info = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(sys.argv)[:500],
    }

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    if '://' in str(self.path):
      self._acquire_by_content()
    else:
      self._acquire_local()
    return self

  def __exit__(self, *exc_info) -> None:
    if not self.enabled:
      return
    try:
      if self._fd is not None:
        os.ftruncate(self._fd, 0)  # Empty before unlocking: no moment of a lock naming a dead run.
        os.close(self._fd)
        self._fd = None
      self.path.unlink(missing_ok=True)
    except OSError:
      pass

  def _refuse(self, holder: dict, extra: str = '') -> None:
    raise WorkdirLockedError(
      f'workdir {self.path.parent} is in use by another trainer ({_describe(holder)}); wait for '
      f'it to finish, stop it, or use another --workdir{extra}'
    )

  def _acquire_local(self) -> None:
    import fcntl  # POSIX only

    fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      self._refuse(_read(self.path))
    previous = os.read(fd, 1 << 16)
    if previous.strip():
      print(
        f'warning: replaced a stale lock {self.path} ({_describe(_parse(previous))}: that '
        'process is gone)',
        flush=True,
      )
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(self.info).encode())
    os.fsync(fd)
    self._fd = fd

  def _acquire_by_content(self) -> None:
    if self.path.exists():
      holder = _read(self.path)
      same_host = holder.get('host') == self.info['host']
      if same_host and isinstance(holder.get('pid'), int) and not _pid_alive(holder['pid']):
        print(
          f'warning: replaced a stale lock {self.path} ({_describe(holder)}: that process is gone)',
          flush=True,
        )
      else:
        self._refuse(
          holder, '' if same_host else f'; if that job is no longer running, delete {self.path}'
        )
    self.path.write_text(json.dumps(self.info))


def _parse(data: bytes) -> dict:
  try:
    holder = json.loads(data)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def _read(path: epath.Path) -> dict:
  try:
    return _parse(path.read_bytes())
  except OSError:
    return {}
