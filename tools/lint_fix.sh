#!/usr/bin/env bash
# Brings the tree to a clean `make lint` in place: pylint comments -> what ruff needs, ruff's safe
# fixes (import order, pyupgrade), then the formatter. Run once on a clean tree and commit the result
# on its own ("make format" runs it with the venv's ruff). Findings ruff cannot fix are listed last.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=(nextstep_jax tests benchmarks configs launch tools setup.py)
PYTHON=${PYTHON:-python3}
"$PYTHON" tools/strip_pylint_disables.py "${PATHS[@]}"
ruff check --fix-only --quiet "${PATHS[@]}"
ruff format --quiet "${PATHS[@]}"
ruff check --fix-only --quiet "${PATHS[@]}"  # Import blocks the formatter re-wrapped.
echo 'Left for a person (none expected):'
ruff check --output-format concise "${PATHS[@]}" && ruff format --check "${PATHS[@]}"
