"""Compiled programs (engine/compiled.py): the persistent cache keeps every program, and an entry read while it was
being written (JAX writes in place) costs a compile, never a crash; a process past half its limit on memory mappings
drops the executables JAX keeps, which frees their mappings."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
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


def _compile_many(n: int, offset: int) -> None:
    for i in range(n):
        f = jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum(0))
        np.asarray(f(jnp.ones((offset + i, 8))))


@pytest.mark.skipif(compiled.memory_maps() is None, reason="no /proc memory maps here")
def test_release_frees_the_executables_mappings(monkeypatch):
    """Executables keep their mappings after their jitted functions are gone; past the share of the limit
    `release_executables_if_crowded` drops them (mappings fall back), and below it does nothing."""
    _compile_many(5, 3)  # whatever the first compiles in a process map once
    before = compiled.memory_maps()[0]
    _compile_many(60, 10)
    grown = compiled.memory_maps()[0]
    assert grown > before + 60
    assert not compiled.release_executables_if_crowded(share=1.0)
    assert compiled.memory_maps()[0] >= grown
    assert compiled.release_executables_if_crowded(share=grown / compiled.memory_maps()[1] / 2)
    assert compiled.memory_maps()[0] < before + (grown - before) // 4
    _compile_many(3, 10)  # programs compile again afterwards
