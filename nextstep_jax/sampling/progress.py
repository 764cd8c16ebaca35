"""A progress bar over image tokens for the jitted generator, fed by a host callback.

Inside `generate_tokens` (when `SamplerConfig.progress_every` > 0) every `progress_every`-th
token issues an unordered `jax.debug.callback` with the number of tokens done; on the host that
advances the bar of the innermost `reporting(...)` block (no block: nothing happens). The
callback carries one scalar and nothing waits on it (measured in benchmarks/sampling_vs_official.py:
~70 us per token on the CPU VM). On a sharded computation the callback may run once per device;
the bar keeps the largest count, so repeats are harmless.
"""

import contextlib
import sys
import threading
import time

import jax

_ACTIVE: list['TokenProgress'] = []
_LOCK = threading.Lock()


class TokenProgress:
  """Console bar: `tokens 512/1024 [#####.....] 41.2 tok/s eta 12s` on one rewritten line."""

  def __init__(self, total_tokens: int, width: int = 30, stream=None, min_interval_s: float = 0.2):
    self.total = total_tokens
    self.done = 0
    self._offset = 0  # Tokens of earlier generate calls under the same bar.
    self._width, self._stream, self._interval = width, stream or sys.stderr, min_interval_s
    self._start = time.monotonic()
    self._last_print = 0.0

  def next_call(self, tokens_per_call: int) -> None:
    """Marks the end of one generate call (its last token is sampled outside the scan)."""
    with _LOCK:
      self._offset += tokens_per_call
      self._update(self._offset, force=True)

  def on_tokens(self, done_in_call: int) -> None:
    with _LOCK:
      self._update(self._offset + done_in_call)

  def _update(self, done: int, force: bool = False) -> None:
    self.done = max(self.done, done)
    now = time.monotonic()
    if not force and now - self._last_print < self._interval:
      return
    self._last_print = now
    rate = self.done / max(now - self._start, 1e-9)
    filled = int(self._width * self.done / max(self.total, 1))
    eta = (self.total - self.done) / rate if rate > 0 else 0.0
    self._stream.write(
      f'\rtokens {self.done}/{self.total} [{"#" * filled}{"." * (self._width - filled)}] '
      f'{rate:.1f} tok/s eta {eta:.0f}s' + ('\n' if self.done >= self.total else '')
    )
    self._stream.flush()


@contextlib.contextmanager
def reporting(bar: TokenProgress):
  """Routes the generator's token callbacks to `bar` inside the block."""
  _ACTIVE.append(bar)
  try:
    yield bar
  finally:
    _ACTIVE.remove(bar)


def _on_host(done) -> None:
  if _ACTIVE:
    _ACTIVE[-1].on_tokens(int(done))


def report(tokens_done: jax.Array, every: int) -> None:
  """Traced: a host callback when `tokens_done` (scalar int) is a multiple of `every`."""
  jax.lax.cond(
    tokens_done % every == 0,
    lambda: jax.debug.callback(_on_host, tokens_done, ordered=False),
    lambda: None,
  )
