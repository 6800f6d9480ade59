#!/usr/bin/env bash
# Runs the test suite (pass -m "not slow" for the fast subset). Exit code 5 (no tests ran) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests ran" >&2; exit 1; fi
exit "$rc"
