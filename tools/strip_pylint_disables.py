"""Replaces `# pylint: disable=...` comments with what ruff (the configured linter) needs.

No pylint runs on this repository, so those comments guard nothing. For each one:
- `wrong-import-position` becomes `# noqa: E402` where ruff flags that line with E402 (an import
  after `sys.path`/`matplotlib.use`/environment set-up), and is dropped where it does not;
- every other check (`g-import-not-at-top`, `import-outside-toplevel`, `protected-access`,
  `broad-except`, `exec-used`) has no configured ruff rule, so the comment is dropped.
A reason written after the check name, `(sklearn is slow to import)`, stays as a plain comment.

  python tools/strip_pylint_disables.py [PATH ...]   (default: the linted folders; prints a summary)

Run it before `ruff check --fix` / `ruff format` (tools/lint_fix.sh does), on a clean tree.
"""

import json
import pathlib
import re
import subprocess
import sys

DEFAULT_PATHS = ('nextstep_jax', 'tests', 'benchmarks', 'configs', 'launch', 'tools', 'setup.py')
# Pylint check -> the ruff rule that flags the same thing here (None: no configured rule).
RUFF_EQUIVALENT = {'wrong-import-position': 'E402'}
DISABLE = re.compile(r'(?P<lead>\s*)# pylint: disable=(?P<checks>[a-z0-9,-]+)(?P<reason>[^\n]*)$')


def ruff_findings(paths: list[str], rules: set[str]) -> set[tuple[str, int, str]]:
  """{(resolved file, line, code)} that ruff reports for `rules` on `paths` as they are now."""
  if not rules:
    return set()
  result = subprocess.run(
    [
      'ruff',
      'check',
      '--output-format',
      'json',
      '--no-cache',
      '--select',
      ','.join(sorted(rules)),
      *paths,
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  if result.returncode not in (0, 1):
    raise SystemExit(f'ruff failed ({result.returncode}): {result.stderr}')
  return {
    (str(pathlib.Path(f['filename']).resolve()), f['location']['row'], f['code'])
    for f in json.loads(result.stdout or '[]')
  }


def rewrite_line(line: str, flagged: set[str]) -> str:
  """`line` without its pylint comment; `# noqa: CODES` for the `flagged` ruff equivalents."""
  match = DISABLE.search(line)
  code = line[: match.start()]
  reason = match['reason'].strip()
  reason = reason[1:-1].strip() if reason.startswith('(') and reason.endswith(')') else reason
  codes = sorted(
    {RUFF_EQUIVALENT[c] for c in match['checks'].split(',') if RUFF_EQUIVALENT.get(c) in flagged}
  )
  comments = []
  if reason:
    comments.append(f'# {reason[0].upper()}{reason[1:]}.' if not code.strip() else f'# {reason}')
  if codes:
    comments.append(f'# noqa: {", ".join(codes)}')
  if not code.strip():  # A comment on a line of its own.
    return f'{match["lead"]}{" ".join(comments)}' if comments else None
  return code.rstrip() + ('  ' + '  '.join(comments) if comments else '')


def main(argv: list[str]) -> int:
  paths = argv or [p for p in DEFAULT_PATHS if pathlib.Path(p).exists()]
  files = sorted(
    {
      f
      for p in paths
      for f in (pathlib.Path(p).rglob('*.py') if pathlib.Path(p).is_dir() else [pathlib.Path(p)])
    }
  )
  findings = ruff_findings(paths, set(RUFF_EQUIVALENT.values()))
  changed_files = removed = converted = 0
  for path in files:
    text = path.read_text(encoding='utf-8')
    if '# pylint: disable=' not in text:
      continue
    resolved = str(path.resolve())
    out = []
    for number, line in enumerate(text.split('\n'), start=1):
      if not DISABLE.search(line):
        out.append(line)
        continue
      flagged = {code for (f, row, code) in findings if f == resolved and row == number}
      new = rewrite_line(line, flagged)
      converted += bool(new and '# noqa:' in new)
      removed += not (new and '# noqa:' in new)
      if new is not None:
        out.append(new)
    path.write_text('\n'.join(out), encoding='utf-8')
    changed_files += 1
  print(
    f'pylint comments: {converted} became `# noqa`, {removed} removed, in {changed_files} files'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
