#!/usr/bin/env bash
# Sets up .venv and runs ruff, mypy, the layering contract (import-linter) and the pytest suite: every test
# but those marked slow (end-to-end runs of minutes each: the walkthrough, the README's snippets, the memory
# budget, the rate-distortion script). `--all` (or VQTOK_TESTS=all) runs those too: what CI runs.
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then select=(); else args+=("$a"); fi
done
if [ "${VQTOK_TESTS:-}" = "all" ]; then select=(); fi
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
.venv/bin/python -m pytest ${parallel[@]+"${parallel[@]}"} ${select[@]+"${select[@]}"} ${args[@]+"${args[@]}"}
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure${select[*]+ (slow tests run only with --all)}" >&2
  exit 1
fi
exit "$rc"
