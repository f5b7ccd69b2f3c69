#!/usr/bin/env bash
# Sets up .venv and runs everything CI runs: ruff, mypy, the layering contract (import-linter) and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache  # the layering contract in pyproject.toml
# pytest on worker processes (pytest-xdist): one per core, at most 4 (VQTOK_TEST_WORKERS overrides; 1 or 0:
# in this process). tests/conftest.py schedules --dist loadscope its own way: one worker runs all the tests
# of a module with a module-scoped fixture, and all the Ray tests; other tests one by one; the longest
# modules are handed out first.
if [ -n "${VQTOK_TEST_WORKERS:-}" ]; then
  workers=$VQTOK_TEST_WORKERS
else
  workers=$(nproc 2>/dev/null || echo 1)
  if [ "$workers" -gt 4 ]; then workers=4; fi
fi
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadscope); fi
set +e
.venv/bin/python -m pytest ${parallel[@]+"${parallel[@]}"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
