#!/usr/bin/env bash
# Runs the test suite (pass -m "not slow" for the fast subset). Exit code 5 (no tests ran) is a failure.
# Two worker processes, each taking whole test files (module fixtures such as a live server start once per file) and
# keeping to its own share of the CPUs (tests/conftest.py);
# RADIXLM_TEST_WORKERS=0 runs in this process (a debugger, -s output), N runs N workers.
set -uo pipefail
cd "$(dirname "$0")/.."
# Most of a test's time on a fresh machine is XLA compiling for the CPU; its older fusion emitters compile ~30% faster
# and run these small models about as fast, and LLVM's optimization level 1 (of 3) cut five of the heaviest files'
# time by another ~14%, their real models' runs included (docs/architecture.md, "The suite on two workers"). Used
# where this jaxlib knows the flags (an unknown XLA flag aborts the process) and XLA_FLAGS does not already set them.
FAST_COMPILE="--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"
if [[ "${XLA_FLAGS:-}" != *xla_cpu_use_fusion_emitters* ]] &&
   XLA_FLAGS="$FAST_COMPILE" JAX_PLATFORMS=cpu .venv/bin/python -c "import jax; jax.devices()" 2>/dev/null; then
  export XLA_FLAGS="${XLA_FLAGS:-} $FAST_COMPILE"
fi
# The 25 slowest tests close the report: the suite's time goal (docs/architecture.md) starts from them; add
# --compile-report N for the N that spent the most time in JAX's tracing and compiling (tests/compile_report.py).
JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -n "${RADIXLM_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests ran" >&2; exit 1; fi
exit "$rc"
