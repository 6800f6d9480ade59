"""scripts/kernel_bench.py, the benchmark gpu_check.sh runs on a GPU, smoke-tested on the CPU
(tiny shapes, Pallas in interpret mode): every row is produced, none fails, and our kernels agree
with the xla reference. A broken script would waste the rare GPU session it was meant for."""
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "kernel_bench.py"


def _run(*flags):
  out = subprocess.run([sys.executable, str(SCRIPT), "--quick", *flags], check=True,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert "failed" not in out, out
  return out


@pytest.mark.parametrize("flags,num_rows", [((), 20), (("--tune",), 6)])
def test_kernel_bench_quick(flags, num_rows):
  out = _run(*flags)
  rows = [line for line in out.splitlines() if line.startswith(("decode ", "prefill "))]
  assert len(rows) == num_rows, out
  # Last column: max |ours - xla reference|, bfloat16 outputs.
  errors = [float(line.split()[-1]) for line in rows]
  assert max(errors) < 5e-2, out
