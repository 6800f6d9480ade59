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


@pytest.mark.parametrize("flags,num_rows", [((), 14), (("--tune",), 6)])
def test_kernel_bench_quick(flags, num_rows):
  out = _run(*flags)
  rows = [line for line in out.splitlines() if line.startswith(("decode ", "prefill "))]
  assert len(rows) == num_rows, out
  # Last column: max |ours - xla reference|, bfloat16 outputs.
  errors = [float(line.split()[-1]) for line in rows]
  assert max(errors) < 5e-2, out
  if flags:  # --tune starts with the small-decode breakdown: the call and its pieces, unrolled search and looped
    pieces = out[out.index("small decode batch"):].splitlines()[2:7]
    assert [line.split()[0] for line in pieces] == ["whole", "whole", "token", "token", "merge"], out
    whiles = {line.rsplit(maxsplit=2)[0]: int(line.split()[-1]) for line in pieces}
    assert whiles["token metadata"] == 0 and whiles["token metadata, looped"] == 1, out


def test_goal_summary_reads_the_table(capsys):
  """The summary gpu_check prints under the table: each goal PASS / FAIL from its rows, n/a when
  the row is missing (a run cut short)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("kernel_bench", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  results = {  # (kind, a, b, backend) -> (seconds, fraction of copy bandwidth, of matmul rate)
      ("decode", 64, 8192, "pallas"): (1.0e-3, 0.75, 0.01),
      ("decode", 64, 8192, "jax_paged"): (1.1e-3, 0.68, 0.01),
      ("decode", 1, 1024, "pallas"): (2.0e-5, 0.20, 0.0),
      ("decode", 1, 1024, "jax_paged"): (1.0e-5, 0.40, 0.0),
  }
  bench.print_goals(results, "pallas")
  out = capsys.readouterr().out
  assert "PASS  decode 64 x 8k >= 70% of copy bandwidth: 75.0%" in out
  assert "n/a   prefill 2k over 8k" in out
  assert "FAIL  decode never slower than JAX's paged_attention: worst ratio 2.00x over 2 cases" in out


@pytest.mark.parametrize("tune", [False, True])
def test_linear_scan_bench_quick(tune):
  """scripts/linear_scan_bench.py (gpu_check's "linear" step) at tiny shapes, the kernel in interpret mode: every
  row produced, the kernel's outputs within bfloat16's reach of the XLA piece loop's."""
  script = SCRIPT.parent / "linear_scan_bench.py"
  out = subprocess.run([sys.executable, str(script), "--quick", *(["--tune"] if tune else [])], check=True,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert "failed" not in out, out
  rows = [line for line in out.splitlines() if line.startswith("tiny")]
  assert len(rows) == (10 if tune else 4), out
  if not tune:
    assert max(float(line.split()[-1]) for line in rows) < 2e-2, out


def test_linear_scan_bench_prices_kda_decays():
  """`linear_scan_bench.py --kda --quick`: the XLA loop with a decay per key channel against one per head, a row with
  both times and their ratio."""
  script = SCRIPT.parent / "linear_scan_bench.py"
  out = subprocess.run([sys.executable, str(script), "--kda", "--quick"], check=True, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  rows = [line.split() for line in out.splitlines() if line.startswith("2x16x16")]
  assert len(rows) == 1 and rows[0][-1].endswith("x") and float(rows[0][-2]) > 0, out
