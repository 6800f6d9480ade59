"""Where compiled programs live: JAX's persistent compilation cache on disk, and the executables a process keeps in
memory, which a process that builds engine after engine must release before the kernel's limit on memory mappings."""
from __future__ import annotations

import gc
import logging
import os

import jax

log = logging.getLogger(__name__)

# The share of the kernel's limit on a process's memory mappings past which an engine being built first drops the
# executables JAX keeps (`release_executables_if_crowded`).
CROWDED_MAPS = 0.5
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"


def setup_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ("": none), every program in it however quickly it compiled:
    a restart on the same settings compiles nothing, and processes that share the directory (`parallel.data`
    replicas, test workers) load what another compiled. (A threshold of 0.5 s left ~3 in 4 of the programs of
    test_engine, test_lora and test_draft_model uncached: cold, one process, caching them all took 352 -> 331 s,
    23 -> 31 MB of cache, 2026-12-05; docs/architecture.md, "The suite on two workers".)"""
    if not directory:
        return
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX writes an entry in place, so a process sharing the directory can read one another is still writing: its
    # decompression then fails, and JAX warns and compiles the program itself (tests/test_compiled.py).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def memory_maps() -> tuple[int, int] | None:
    """(this process's memory mappings, the kernel's limit on them), or None where /proc does not tell (not Linux)."""
    try:
        with open(MAX_MAP_COUNT) as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


def release_executables_if_crowded(share: float = CROWDED_MAPS) -> bool:
    """Drops every executable JAX keeps in memory (`jax.clear_caches`) when this process's memory mappings pass `share`
    of the kernel's limit (vm.max_map_count, 65,530 by default); -> whether it did.

    Each executable XLA compiles for the CPU maps its code and data: a step program of a small model, ~60 regions. They
    outlive the jitted functions and engines that made them (JAX's caches keep up to 2,048 executables), and at the
    limit XLA fails to map the next one and the process segfaults (LLVM: "Cannot allocate memory"). A process that
    builds engine after engine of other settings reaches it: a notebook, a benchmark sweep, a test worker (one
    segfaulted at ~40,000 mappings in four suite runs on 2026-12-05). Engines still in use compile their programs
    again, or load them from the persistent cache, on their next call."""
    counted = memory_maps()
    if counted is None or counted[0] < share * counted[1]:
        return False
    jax.clear_caches()
    gc.collect()
    after = memory_maps()
    log.warning("%d memory mappings of the kernel's %d (vm.max_map_count): dropped the compiled programs JAX kept "
                "(%d mappings now); engines in use compile theirs again", counted[0], counted[1],
                after[0] if after else -1)
    return True
