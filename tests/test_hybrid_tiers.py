"""Hybrid models' (linear attention layers') recurrent states in the cache tiers: snapshots of the states the device
lets go kept in the host tier, written to the disk tier beside the pages and read back by a restarted replica, the
host memory split between pages and snapshots as the device's is, and sleep freeing the states; tiny random Qwen3.5
models (test_gated_delta's) through the engine, greedy tokens against an engine without prefix caching."""
from __future__ import annotations

import random
import shutil

import jax
import numpy as np
import pytest

from models import gated_delta, llama
from test_gated_delta import _tiny_cfg
import fresh

TIERED = {"warmup": False, "cache.num_pages": 24, "cache.page_size": 8, "model.max_model_len": 128,
          "scheduler.max_running": 2, "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32],
          "cache.state_snapshots": 2, "debug_checks": True}  # (one compiled forward a setting)


@pytest.mark.parametrize("tp", [1, 2])
def test_host_tier_keeps_snapshots_the_device_lets_go(tp):
    """A device cache too small for three system prompts, with two snapshot slots: the snapshots its evictions and
    slot reuse let go are copied to the host tier's state slots beside their pages, and prompts sharing a prefix
    resume there (their state copied back in): the greedy tokens of an engine without prefix caching, more prompt
    tokens from the cache than without the host tier; at tensor parallelism 2 too (the states split by head)."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(fresh.seed())
    systems = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(33, 48))] for _ in range(3)]
    waves = [[s + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(1, 12))] for s in systems]
             for _ in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    small = TIERED
    runs = {}
    for name, overrides in {"uncached": {"cache.prefix_caching": False}, "device": {},
                            "host": {"cache.host_num_pages": 48, "cache.host_state_snapshots": 6,
                                     "parallel.tensor": tp}}.items():
        if tp > 1 and name == "device":
            continue
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **small, **overrides)
        outs = [llm.generate(wave, greedy) for wave in waves]
        runs[name] = ([o.token_ids for wave in outs for o in wave], sum(o.cached_tokens for w in outs for o in w),
                      llm.engine.stats())
    tokens, cached, stats = runs["host"]
    assert tokens == runs["uncached"][0]
    assert stats["host_state_hits"] > 0 and stats["host_saved_states"] > 0
    assert stats["host_state_snapshots_total"] == 6 and 0 < stats["host_state_snapshots_used"] <= 6
    if tp == 1:
        assert runs["device"][0] == tokens and runs["device"][2]["host_state_hits"] == 0
        assert cached > runs["device"][1]


def test_disk_tier_serves_a_restarted_replica_its_pages_and_snapshots(tmp_path):
    """Every snapshot a step takes is written to the disk tier beside the pages: a restarted replica (empty device
    cache) resumes prompts sharing a prefix from the files, pages and recurrent state read back: the greedy tokens
    of an engine without prefix caching; with the host tier too, on a pool small enough to thrash."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(fresh.seed())
    # the first prompt fills whole pages: resumed a page back, where its last token is computed again
    first_turns = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (40, rng.randrange(33, 48))]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    small = TIERED
    plain = LLM(None, progress=False, model=(cfg, params, tokenizer), **small, **{"cache.prefix_caching": False})
    answers = [o.token_ids for o in plain.generate(first_turns, greedy)]
    # the same prompt again (its prompt-end snapshot), and a conversation's next turn (its latest snapshot)
    later = [first_turns[0], first_turns[1] + answers[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(5)]]
    want = [o.token_ids for o in plain.generate(later, greedy)]
    first = LLM(None, progress=False, model=(cfg, params, tokenizer), **small,
                **{"cache.disk_path": str(tmp_path / "disk")})
    assert [o.token_ids for o in first.generate(first_turns, greedy)] == answers
    first.engine.shutdown()
    stats = first.engine.stats()
    assert stats["disk_saved_states"] > 0 and stats["disk_state_snapshots"] == stats["disk_saved_states"]
    for i, overrides in enumerate(({}, {"cache.host_num_pages": 32, "cache.host_state_snapshots": 4})):
        shutil.copytree(tmp_path / "disk", tmp_path / f"restart{i}")  # (each restart on the first run's files alone)
        again = LLM(None, progress=False, model=(cfg, params, tokenizer), **small,
                    **{"cache.disk_path": str(tmp_path / f"restart{i}"), **overrides})
        got = again.generate(later, greedy)
        assert [o.token_ids for o in got] == want
        assert again.engine.stats()["disk_state_hits"] == 2
        assert got[0].cached_tokens == 32
        assert got[1].cached_tokens == (len(first_turns[1]) + 6 - 1) // 8 * 8
        again.engine.shutdown()


def test_sleep_frees_the_recurrent_states_too():
    """An engine asleep holds none of its device arrays, the linear layers' states (running slots and snapshots: a
    Qwen3.5-9B's 50 MiB a slot) included, and wakes to the same greedy tokens."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))),
              **{"warmup": False, "cache.num_pages": 24, "cache.page_size": 8, "model.max_model_len": 128})
    rng = fresh.rng()
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (20, 37)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(prompts, greedy)]
    runner = llm.engine.runner
    held = sum(a.nbytes for a in (*jax.tree.leaves(runner.params), *runner.kv, *jax.tree.leaves(runner.states)))
    live = sum(a.nbytes for a in jax.live_arrays())
    llm.sleep(1)
    assert live - sum(a.nbytes for a in jax.live_arrays()) >= held
    llm.wake_up()
    got = llm.generate(prompts, greedy)
    assert [o.token_ids for o in got] == before and all(o.cached_tokens == 0 for o in got)


def test_host_tier_splits_its_memory_between_pages_and_snapshots_as_the_device_does():
    from engine.config import ConfigKeyError, EngineConfig
    from engine.kv_plan import plan_kv_cache

    cfg = _tiny_cfg()
    slot_bytes = gated_delta.state_bytes_per_slot(cfg)
    config = EngineConfig().replace(**{"cache.memory_gb": 0.05, "cache.state_snapshots": 8, "cache.host_memory_gb": 0.2})
    plan = plan_kv_cache(config, cfg, 256, np.dtype(np.float32))
    device = 8 * slot_bytes / (8 * slot_bytes + plan.num_pages * plan.page_bytes)
    host = plan.num_host_states * slot_bytes / (plan.num_host_states * slot_bytes + plan.num_host_pages * plan.page_bytes)
    assert plan.num_host_states > 0 and abs(host - device) < 0.01
    assert plan.num_host_states * slot_bytes + plan.num_host_pages * plan.page_bytes <= 0.2 * 2**30
    given = plan_kv_cache(config.replace(**{"cache.host_state_snapshots": 3}), cfg, 256, np.dtype(np.float32))
    assert given.num_host_states == 3 and given.num_host_pages > plan.num_host_pages
    pages = plan_kv_cache(config.replace(**{"cache.host_memory_gb": 0.0, "cache.host_num_pages": plan.num_pages}), cfg,
                          256, np.dtype(np.float32))
    assert pages.num_host_states == 8  # as many per page as the device
    with pytest.raises(ConfigKeyError, match="cache.host_memory_gb=0.001 cannot hold cache.host_state_snapshots=1000"):
        plan_kv_cache(config.replace(**{"cache.host_memory_gb": 0.001, "cache.host_state_snapshots": 1000}), cfg, 256,
                      np.dtype(np.float32))


def test_the_routers_index_counts_what_a_hybrid_replica_resumes():
    """The router's feed from a replica of a model with linear attention layers (engine.cache_feed: recurrent, with
    `medium: "snapshot"` events for the prefixes whose states have a snapshot, on the device or in the host tier): an
    index fed from it predicts, for each prompt, exactly the cached tokens the replica then serves it, over a pool
    small enough to thrash into the host tier; where the tree holds more pages than that, counting them would
    overestimate."""
    from engine.block_hash import page_hashes
    from engine.cache_feed import CacheEventFeed
    from engine.llm import LLM
    from engine.request import SamplingParams
    from engine.router.index import EventFeed, PrefixIndex
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    rng = random.Random(fresh.seed())
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **TIERED,
              **{"cache.host_num_pages": 32, "cache.host_state_snapshots": 3})
    engine = llm.engine
    feed, index = CacheEventFeed(recurrent=engine.resumes_at_snapshots), PrefixIndex(1)
    router = EventFeed(index, 0)
    feed.publish(engine.drain_cache_events())
    router.resync(feed.state())
    systems = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(20, 40))] for _ in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    overcounted = 0
    for _ in range(14):
        prompt = rng.choice(systems) + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(0, 14))]
        hashes = page_hashes(prompt[: len(prompt) - 1], 8)
        [predicted] = index.match(hashes)
        overcounted += len(engine.scheduler.tree.match(prompt[: len(prompt) - 1]).pages) > predicted
        [out] = llm.generate([prompt], greedy)
        assert out.cached_tokens == predicted * 8, (out.cached_tokens, predicted)
        feed.publish(engine.drain_cache_events())
        assert router.apply(feed.events_after(router.last_seq)) == "done"
    assert feed.state()["recurrent"] and index.is_recurrent(0) and overcounted
    assert any(e["medium"] == "snapshot" and e["kind"] == "removed" for e in feed.events_after(0)["events"])
