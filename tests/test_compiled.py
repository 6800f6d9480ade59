"""Compiled programs (engine/compiled.py): the persistent cache keeps every program, and an entry read while it was
being written (JAX writes in place) costs a compile, never a crash; a process past half its limit on memory mappings
drops the executables JAX keeps, which frees their mappings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from engine import compiled

# Runs a small program through the persistent cache in `directory`, printing its result.
PROGRAM = """
import sys
import jax, jax.numpy as jnp
from engine.compiled import setup_compilation_cache
setup_compilation_cache(sys.argv[1])
print(float(jax.jit(lambda x: jnp.sin(x).sum() * 3)(jnp.arange(7.0))))
"""


def _run(directory) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", PROGRAM, str(directory)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_a_torn_cache_entry_is_compiled_again(tmp_path, keep):
    """Every program is cached however quickly it compiled; an entry cut short (empty, or half of it: what a reader
    sees while another process writes it) is warned about and compiled again, with the right result."""
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    want = float(jnp.sin(jnp.arange(7.0)).sum() * 3)
    assert float(first.stdout.split()[-1]) == pytest.approx(want)
    entries = [p for p in tmp_path.iterdir() if p.name.endswith("-cache")]
    assert entries
    for entry in entries:
        data = entry.read_bytes()
        entry.write_bytes(data[:int(len(data) * keep)])
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr
    assert float(again.stdout.split()[-1]) == pytest.approx(want)
    assert "Error reading persistent compilation cache entry" in again.stderr


# Counts memory mappings while compiling, in a fresh process: a test worker that ran other files frees their
# executables whenever the garbage collector happens to run, which would move the counts under the test.
RELEASE = """
import json
import jax, jax.numpy as jnp, numpy as np
from engine import compiled

def compile_many(n, offset):
    for i in range(n):
        f = jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum(0))
        np.asarray(f(jnp.ones((offset + i, 8))))

compile_many(5, 3)  # whatever the first compiles in a process map once
before = compiled.memory_maps()[0]
compile_many(60, 10)
grown, limit = compiled.memory_maps()
kept = compiled.release_executables_if_crowded(share=1.0)
untouched = compiled.memory_maps()[0]
released = compiled.release_executables_if_crowded(share=grown / limit / 2)
after = compiled.memory_maps()[0]
compile_many(3, 10)  # programs compile again afterwards
print(json.dumps(dict(before=before, grown=grown, kept=kept, untouched=untouched, released=released, after=after)))
"""


@pytest.mark.skipif(compiled.memory_maps() is None, reason="no /proc memory maps here")
def test_release_frees_the_executables_mappings():
    """Executables keep their mappings after their jitted functions are gone; past the share of the limit
    `release_executables_if_crowded` drops them (mappings fall back), and below it does nothing."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert run.returncode == 0, run.stderr
    n = json.loads(run.stdout.splitlines()[-1])
    assert n["grown"] > n["before"] + 60
    assert not n["kept"] and n["untouched"] >= n["grown"]
    assert n["released"]
    assert n["after"] < n["before"] + (n["grown"] - n["before"]) // 4


def test_a_suite_worker_keeps_to_its_share_of_the_cpus():
    """tests/conftest.py: every thread of a pytest-xdist worker, XLA's (started since) among them, keeps to the
    worker's share of the CPUs its parent may use: worker i of n the i-th, (i+n)-th, ... (all of them with fewer CPUs
    than workers)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not worker.startswith("gw"):
        pytest.skip("one process (RADIXLM_TEST_WORKERS=0): nothing shared")
    jnp.arange(1 << 16).sum().block_until_ready()  # XLA's pools started
    cpus = sorted(os.sched_getaffinity(os.getppid()))
    mine = set(cpus[int(worker[2:]) :: count]) if 2 <= count <= len(cpus) else set(cpus)
    sets = {}
    for thread in os.listdir("/proc/self/task"):
        try:
            sets[thread] = os.sched_getaffinity(int(thread))
        except OSError:  # it ended meanwhile
            pass
    assert len(sets) > 1 and sets == dict.fromkeys(sets, mine)


def test_the_compile_report_names_each_tests_programs_across_workers():
    """`--compile-report N` (tests/compile_report.py) under pytest-xdist: each worker's tests, with the functions they
    compiled, reach the controller's summary."""
    tests = ["tests/test_linear_scan.py::test_unit_lower_inverse",
             "tests/test_kernels.py::test_bucket_of_matches_searchsorted"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                          "loadfile", "--compile-report", "5", *tests], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")})
    assert run.returncode == 0, run.stdout + run.stderr
    report = run.stdout[run.stdout.index("JAX compile report"):]
    for test, function in zip(tests, ("unit_lower_inverse", "searchsorted")):
        line = next(line for line in report.splitlines() if test in line)
        assert f"{function} " in line.split(": ", 1)[1], line
        totals = next(line for line in report.splitlines() if line.endswith(f"  {function}"))
        assert int(totals.split()[3]) >= 1, totals
