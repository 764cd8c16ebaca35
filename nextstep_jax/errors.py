"""User errors: problems the person running a tool can fix, reported as one line each.

Console scripts (`nextstep_jax/cli/entry.py`) print a `UserError` as `error: <message>` without a
traceback and exit with its `exit_code`: 2 for bad usage (flags, config fields, prompts), 1 for
runtime problems (a damaged checkpoint, a held workdir, a failed save). Any other exception is a
bug and keeps its traceback. Modules at every layer raise subclasses of these (often also
subclassing the builtin they replace, e.g. `ValueError`, so existing handlers keep working); the
message names the problem and the fix.
"""


class UserError(Exception):
  """A runtime problem the user can fix (exit code 1)."""

  exit_code = 1


class UsageError(UserError):
  """Bad flags, config fields or inputs, found before any work starts (exit code 2)."""

  exit_code = 2
