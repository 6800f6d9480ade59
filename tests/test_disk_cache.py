"""The disk tier of the prefix cache (engine.disk_cache): its files, and an engine restarted onto them.

The scheduler's side (what is written and read, waiting for reads, shared reads) is tested on host data in
tests/test_scheduler.py; here the bytes: a page read back equals the page written, damaged files are misses, the
directory is named by what the K/V depend on, and a new engine on the same directory gives the same greedy tokens.
"""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.disk_cache import DiskCache, layout_key
from engine.llm import LLM
from tests.test_engine import HYBRID, SMALL, _generate, _prompts, tiny_gemma3, tiny_model, tokenizer  # noqa: F401

SPECS = [((2, 3, 4, 8), np.float32), ((2, 3, 4, 8), np.float32), ((2, 3, 4), np.float32), ((2, 3, 4), np.float32)]


def _pages(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """n random pages of each array in SPECS: [L, Hkv, n, ...], as the runner hands them over."""
    return tuple(rng.standard_normal(s[:2] + (n,) + s[2:]).astype(d) for s, d in SPECS)


def _page(pages, i):
    return tuple(a[:, :, i] for a in pages)


def test_pages_read_back_as_written_and_damaged_files_are_misses(tmp_path):
    rng = np.random.default_rng(0)
    disk = DiskCache(tmp_path, "k1", SPECS, capacity_pages=100)
    hashes = [rng.integers(2**63) for _ in range(5)]
    pages = _pages(rng, 5)
    disk.put(hashes, pages, "k1")
    disk.put(hashes[:1], _pages(rng, 1), "stale key")  # pages of weights no longer served: dropped
    disk.flush()
    assert disk.present(hashes) == 5 and len(disk) == 5 and not disk.wanted(hashes[0])
    got = disk.fetch(hashes).result()
    assert list(got) == hashes
    for i, h in enumerate(hashes):
        for a, b in zip(got[h], _page(pages, i)):
            np.testing.assert_array_equal(a, b)

    # Another process (or a restart) finds the files, oldest first; one truncated file ends a read's run there.
    again = DiskCache(tmp_path, "k1", SPECS, capacity_pages=100)
    assert again.present(hashes) == 5
    path = again._path(hashes[2])
    with open(path, "r+b") as f:
        f.truncate(100)
    assert list(again.fetch(hashes).result()) == hashes[:2]
    assert not path.exists() and again.stats["read_errors"] == 1 and again.present(hashes) == 2
    os.remove(again._path(hashes[1]))  # something that cannot be read: a miss, and never looked up again
    os.mkdir(again._path(hashes[1]))
    assert list(again.fetch(hashes).result()) == hashes[:1] and again.present(hashes) == 1
    assert again.stats["read_errors"] == 2
    os.remove(again._path(hashes[0]))  # deleted by another process: a miss, not an error
    assert again.fetch(hashes).result() == {} and again.present(hashes) == 0 and again.stats["read_errors"] == 2

    # Another layout key is another directory; no key, no tier.
    other = DiskCache(tmp_path, "k2", SPECS, capacity_pages=100)
    assert other.present(hashes) == 0 and other.wanted(hashes[1])
    other.set_key(None)
    other.put(hashes, pages, None)
    other.flush()
    assert other.present(hashes) == 0 and not other.wanted(hashes[1]) and not any((tmp_path / "k2").rglob("*.kv"))
    for d in (disk, again, other):
        d.close()


def test_arrays_of_no_elements_and_a_failing_write_leave_the_writer_alive(tmp_path, monkeypatch):
    """A payload may hold an array of no elements (LFM2's recurrent state: its short convolution layers keep none but
    the convolution's); it reads back as written. A write that fails with anything, not only an OSError, is a write
    error: the writer thread lives on and writes the next pages (found by scripts/fuzz_engine.py on an LFM2-like
    model, whose empty state killed the thread)."""
    specs = [((2, 3, 4), np.float32), ((2, 0, 5), np.float32)]
    rng = np.random.default_rng(2)
    disk = DiskCache(tmp_path, "k", specs, capacity_pages=10)
    pages = tuple(rng.standard_normal(s[:2] + (3,) + s[2:]).astype(d) for s, d in specs)
    hashes = [11, 12, 13]
    disk.put(hashes, pages, "k")
    disk.flush()
    got = disk.fetch(hashes).result()
    for i, h in enumerate(hashes):
        assert got[h][1].shape == (2, 0, 5)
        np.testing.assert_array_equal(got[h][0], pages[0][:, :, i])
    import engine.disk_cache

    real, calls = os.replace, []

    def replace(src, dst):  # the first page's write fails with what no OSError handler catches
        calls.append(dst)
        if len(calls) == 1:
            raise TypeError("boom")
        real(src, dst)

    monkeypatch.setattr(engine.disk_cache.os, "replace", replace)
    disk.put([21, 22], tuple(a[:, :, :2] for a in pages), "k")
    disk.flush()
    assert disk.present([21]) == 0 and disk.present([22]) == 1 and disk.stats["write_errors"] == 1
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left
    disk.close()


def test_capacity_deletes_the_least_recently_used_files(tmp_path):
    rng = np.random.default_rng(1)
    disk = DiskCache(tmp_path, "k", SPECS, capacity_pages=3)
    hashes = list(range(1, 6))
    disk.put(hashes[:3], _pages(rng, 3), "k")
    disk.flush()
    disk.fetch(hashes[:1]).result()  # page 1 is now the most recently used
    disk.put(hashes[3:], _pages(rng, 2), "k")
    disk.flush()
    on_disk = {int(p.stem, 16) for p in (tmp_path / "k").rglob("*.kv")}
    assert on_disk == {1, 4, 5} and len(disk) == 3 and disk.stats["pages_deleted"] == 2
    # A restart with less room keeps the most recently used.
    smaller = DiskCache(tmp_path, "k", SPECS, capacity_pages=1)
    assert len(smaller) == 1 and len(list((tmp_path / "k").rglob("*.kv"))) == 1
    disk.close()
    smaller.close()


def test_replicas_sharing_a_directory_keep_one_capacity_together(tmp_path):
    """Each process lists the directory again as it writes (here every 2 pages): the files of all of them stay
    within one capacity, the least recently used (any process's) deleted first; a file another deleted is a miss."""
    rng = np.random.default_rng(2)
    a = DiskCache(tmp_path, "k", SPECS, capacity_pages=4, rescan_every=2)
    b = DiskCache(tmp_path, "k", SPECS, capacity_pages=4, rescan_every=2)
    a.put([1, 2, 3, 4], _pages(rng, 4), "k")
    a.flush()
    time.sleep(0.05)  # file times tick coarsely (a few ms)
    a.fetch([2]).result()  # page 2 is now the most recently used of a's
    time.sleep(0.05)
    b.put([5, 6, 7], _pages(rng, 3), "k")
    b.flush()
    on_disk = {int(p.stem, 16) for p in (tmp_path / "k").rglob("*.kv")}
    assert on_disk == {2, 5, 6, 7} and set(b._index) == on_disk
    assert a.present([1]) == 1 and a.fetch([1]).result() == {} and a.present([1]) == 0  # deleted by b: a miss
    assert a.present([2, 5]) == 2 and list(a.fetch([2, 5]).result()) == [2, 5]  # b's pages serve a too
    a.close()
    b.close()


def test_a_full_disk_loses_pages_not_the_engine(tmp_path, monkeypatch, caplog):
    """Writes that fail (no space left) leave no partial file, are counted, and are logged a few times, not once
    per page; the tier keeps serving what it has."""
    import errno

    from engine import disk_cache

    rng = np.random.default_rng(3)
    disk = DiskCache(tmp_path, "k", SPECS, capacity_pages=100)
    disk.put([1], _pages(rng, 1), "k")
    disk.flush()

    class Full:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_cache, "open", Full, raising=False)
    with caplog.at_level("WARNING", logger="engine.disk_cache"):
        disk.put(list(range(2, 30)), _pages(rng, 28), "k")
        disk.flush()
    assert disk.stats["write_errors"] == 28 and len([r for r in caplog.records if "could not write" in r.message]) == 2
    assert not list((tmp_path / "k").rglob("*.tmp")) and disk.present([1, 2]) == 1 and disk.wanted(2)
    monkeypatch.undo()
    assert list(disk.fetch([1]).result()) == [1]
    disk.close()


def test_layout_key_names_everything_the_kv_depends_on():
    base = {"weights": {"/m.gguf": (1, 2)}, "kv_dtype": "float32", "page_size": 16}
    assert layout_key(base) == layout_key(dict(base))
    assert len({layout_key(base), layout_key({**base, "kv_dtype": "int8"}), layout_key({**base, "page_size": 32}),
                layout_key({**base, "weights": {"/m.gguf": (1, 3)}})}) == 4


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_a_restarted_engine_reads_its_prompts_back_with_the_same_outputs(tiny_model, tokenizer, tmp_path, kv_dtype):
    """Engine A serves prompts with a disk tier and shuts down; engine B, new, on the same directory, gets the prompts'
    pages from disk: the same greedy tokens as an engine without the tier, more prompt tokens cached. A thrashing pool
    (16 pages) on the same files gives them too (debug checks on every step). An 8-bit cache's scales travel with it."""
    prompts = _prompts(tokenizer, random.Random(6))
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "cache.kv_dtype": kv_dtype, "debug_checks": True})
    plain = _generate(LLM(config, progress=False, model=tiny_model), prompts, max_tokens=8)
    with_disk = config.replace(**{"cache.disk_path": str(tmp_path)})
    a = LLM(with_disk, progress=False, model=tiny_model)
    assert _generate(a, prompts, max_tokens=8)[0] == plain[0]
    a.engine.shutdown()
    stats = a.engine.stats()
    assert stats["disk_pages"] == stats["disk_saved_pages"] > 10 and stats["disk_hit_tokens"] == 0

    for name, overrides in {"restart": {}, "restart+tiny": {"cache.num_pages": 16}}.items():
        b = LLM(with_disk.replace(**overrides), progress=False, model=tiny_model)
        tokens, cached = _generate(b, prompts, max_tokens=8)
        assert tokens == plain[0], name
        stats = b.engine.stats()
        assert stats["disk_hit_tokens"] > 0 and sum(cached) > sum(plain[1]), name
        assert b.engine.disk.stats["read_errors"] == 0
    assert len(os.listdir(tmp_path)) == 1  # one layout: these engines share the directory


def test_other_weights_or_layouts_never_read_each_others_files(tiny_model, tokenizer, tmp_path):
    """Other weights, another KV dtype or page size: another directory, so no hits across them; an update to weights
    given as arrays turns the tier off (nothing names them), and outputs stay the new weights' own."""
    import jax

    prompts = _prompts(tokenizer, random.Random(7))[:12]
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "cache.disk_path": str(tmp_path)})
    cfg, params, tok = tiny_model
    other_params = jax.tree.map(lambda a: a * 1.01, params)
    first = LLM(config, progress=False, model=tiny_model)
    _generate(first, prompts, max_tokens=4)
    first.engine.shutdown()
    for overrides, model in [({}, (cfg, other_params, tok)), ({"cache.kv_dtype": "bfloat16"}, tiny_model),
                             ({"cache.page_size": 32}, tiny_model)]:
        llm = LLM(config.replace(**overrides), progress=False, model=model)
        _generate(llm, prompts, max_tokens=4)
        assert llm.engine.stats()["disk_hit_tokens"] == 0, overrides
        llm.engine.shutdown()
    assert len(os.listdir(tmp_path)) == 4

    again = LLM(config, progress=False, model=tiny_model)
    again.update_weights(other_params)
    assert again.engine.disk.key is None
    fresh = LLM(config.replace(**{"cache.disk_path": None}), progress=False, model=(cfg, other_params, tok))
    assert _generate(again, prompts, max_tokens=4)[0] == _generate(fresh, prompts, max_tokens=4)[0]
    assert again.engine.stats()["disk_hit_tokens"] == 0


def test_a_hybrid_cache_restarted_onto_its_files(tiny_gemma3, tokenizer, tmp_path):  # noqa: F811
    """Gemma 3's hybrid cache (windowed layers in window slots): each page file holds every layer, the windowed ones
    read from the page's slot. A restarted engine, with a window-slot pool small enough to evict, gives the greedy
    tokens of one without the tier (debug checks on every step)."""
    model = tiny_gemma3
    prompts = _prompts(tokenizer, random.Random(8))
    config = EngineConfig().replace(**{**HYBRID, "cache.num_pages": 256, "debug_checks": True})
    plain = _generate(LLM(config, progress=False, model=model), prompts, max_tokens=6)
    with_disk = config.replace(**{"cache.disk_path": str(tmp_path)})
    first = LLM(with_disk, progress=False, model=model)
    assert first.engine.scheduler.window is not None  # hybrid
    assert _generate(first, prompts, max_tokens=6)[0] == plain[0]
    first.engine.shutdown()
    for name, overrides in {"restart": {}, "restart+few slots": {"cache.window_pages": 24}}.items():
        again = LLM(with_disk.replace(**overrides), progress=False, model=model)
        tokens, cached = _generate(again, prompts, max_tokens=6)
        assert tokens == plain[0], name
        assert again.engine.stats()["disk_hit_tokens"] > 0 and sum(cached) > sum(plain[1]), name
