"""Fresh random input for every test run, reproducible from one number.

A run of the suite draws one run seed (`RADIXLM_TEST_SEED` where set, else a new one, printed in pytest's header;
xdist workers inherit the controller's). Every draw a test makes, `seed()` or `rng()`, is a function of that run
seed, the test's node id and how many draws the test made before it: so each run sees new weights, ids and inputs,
and the same run seed gives a test the same draws whatever else runs, in whatever order, on whichever worker. A
failing test's report names the run seed and the command that reruns it (conftest.py).

A module-scoped fixture passes a `key` of its own (its module and name): it is set up during whichever test of the
module comes first, and its draws must not depend on which one that is.
"""
from __future__ import annotations

import os
import secrets
import zlib

import numpy as np

ENV = "RADIXLM_TEST_SEED"

_current = {"key": "", "draws": {}}  # the running test's node id; draws made per key


def run_seed() -> int:
    """This run's seed: RADIXLM_TEST_SEED, set on first use where absent (so that worker processes inherit it)."""
    if not os.environ.get(ENV):
        os.environ[ENV] = str(secrets.randbits(31))
    return int(os.environ[ENV])


def begin(nodeid: str) -> None:
    """A test starts: its draws, and those of the function-scoped fixtures it sets up, are keyed by its id."""
    _current["key"] = nodeid
    _current["draws"] = {}


def seed(key: str | None = None) -> int:
    """A fresh 31-bit seed: the next draw of `key` (default: the running test) in this run."""
    key = _current["key"] if key is None else key
    n = _current["draws"].get(key, 0)
    _current["draws"][key] = n + 1
    words = np.random.SeedSequence([run_seed(), zlib.crc32(key.encode()), n]).generate_state(1)
    return int(words[0] >> 1)


def rng(key: str | None = None) -> np.random.Generator:
    return np.random.default_rng(seed(key))
