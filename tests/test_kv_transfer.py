"""Prompt pages pulled from a prefill replica over the network (`parallel.kv_transfer: jax`, engine/kv_transfer.py).

The prefill replica answers with an offer of its prompt's pages; the decode replica, given the offer, pulls them with
JAX's transfer server before it queues the request, whose admission takes them as cached prompt pages: its tokens
are those of a replica that computed everything. Every failure (another prompt, another layout, an offer pulled
already, a malformed header) costs the decode replica only the prefill."""
from __future__ import annotations

import asyncio
import collections
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.cache_tiers import CacheTiers
from engine.config import ConfigKeyError, EngineConfig
from engine.disaggregation import HEADER, OFFERS_HEADER
from engine.engine import LLMEngine
from engine.kv_transfer import TransferEndpoint, padded_pages
from engine.llm import LLM
from engine.request import SamplingParams, Sequence
from engine.server import create_app
from models import llama
from models.config import LlamaConfig
from tests.test_engine import SMALL, tiny_model, tokenizer  # noqa: F401 (fixtures)
import fresh

JAX = {"parallel.kv_transfer": "jax"}
SYSTEM = "You are the help desk of a garden centre. Answer in one short sentence, naming the greenhouse. " * 3


def _client(model, **overrides) -> TestClient:
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "server.model_name": "tiny", **overrides})
    return TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False, model=model)), config))


def _chat(question: str, **fields) -> dict:
    return {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], **fields}


def _stats(client: TestClient) -> dict:
    return client.app.state.engine.engine.stats()


def _prefill(prefill: TestClient, path: str, body: dict) -> dict:
    done = prefill.post(path, json=body, headers={HEADER: "1"})
    assert done.status_code == 200 and done.json()["object"] == "prefill", done.text
    return done.json()


def _text(response) -> str:
    """A chat's or completion's choices' texts (a stream's, joined per choice), in order."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return [c.get("message", {}).get("content") or c.get("text") for c in response.json()["choices"]]
    texts = collections.defaultdict(str)
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
    return [texts[i] for i in sorted(texts)]


def test_padded_pages_are_few_shapes_and_never_less():
    sizes = [padded_pages(n) for n in range(1, 200)]
    assert all(p >= n and p - n < 8 for n, p in zip(range(1, 200), sizes))
    assert sizes[:9] == [1, 2, 4, 4, 8, 8, 8, 8, 16] and len(set(sizes)) == 28


def test_the_endpoint_moves_arrays_once_and_a_stuck_pull_times_out():
    """An offer pulled gives the arrays bit for bit, on the puller's devices; a second pull of it, and one of a uuid
    never offered, never arrive: `pull` gives up at its deadline instead of waiting, and later pulls still work."""
    rng = np.random.default_rng(fresh.seed())
    server, client = TransferEndpoint("127.0.0.1:0"), TransferEndpoint("127.0.0.1:0")
    arrays = (jnp.asarray(rng.standard_normal((2, 3, 4, 16, 8)), jnp.bfloat16),
              jnp.asarray(rng.integers(-128, 127, (2, 3, 4, 16)), jnp.int8))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for a in arrays]

    async def pulls():
        uuid = server.offer(arrays)
        got = await client.pull(server.address, uuid, specs, timeout_s=10)
        for stuck in (uuid, uuid + 1):
            with pytest.raises(TimeoutError, match="did not arrive"):
                await client.pull(server.address, stuck, specs, timeout_s=0.3)
        again = await client.pull(server.address, server.offer(arrays), specs, timeout_s=10)
        return got, again

    got, again = asyncio.run(pulls())
    for a, b, c in zip(arrays, got, again):
        assert b.dtype == a.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(a), np.asarray(c))


def test_transfer_bench_runs(capsys):
    """scripts/transfer_bench.py (gpu_check.sh's "transfer" step) at a tiny size."""
    from scripts import transfer_bench

    assert transfer_bench.main(["--mib", "1", "--reps", "1"]) == 0
    assert "transfer GB/s" in capsys.readouterr().out


def test_received_pages_continue_a_match_after_the_host_tier_and_before_the_disk():
    """CacheTiers: a prompt's pages past the tree come from the host tier, then from pages received, then from the
    disk tier, in a row; received pages leave once the tree stores them, the oldest first past capacity."""
    stats = type("Stats", (), {"received_dropped_pages": 0})()
    tiers = CacheTiers(4, num_host_pages=4, stats=stats)
    tiers.received_capacity = 3
    seq = Sequence(request_id="a", prompt_ids=list(range(100, 121)), params=SamplingParams(), namespace="ns")
    from engine.block_hash import page_hashes

    hashes = page_hashes(seq.prompt_ids[:20], 4, "ns")
    root = type("Match", (), {"num_tokens": 0, "node": type("Node", (), {"last_hash": lambda self: None})()})()
    tiers.host.store(hashes[0])
    tiers.receive(hashes[1:3], ["p1", "p2"])
    assert tiers.continue_match(seq, root) == ([tiers.host.lookup(hashes[0])], ["p1", "p2"]) and seq.received_pages == 2
    tiers.receive(hashes[3:5], ["p3", "p4"])  # capacity 3: p1 dropped, and the run from the host slot ends there
    assert stats.received_dropped_pages == 1 and tiers.continue_match(seq, root)[1] == []
    tiers.tree_storing([7], [hashes[3]], "ns")
    assert list(tiers.received) == [hashes[2], hashes[4]]

    # A hybrid cache (a window of 8 tokens over pages of 4): a run ends only where the received pages its end's window
    # reaches carry windowed entries (from `window_from` on)
    hybrid = CacheTiers(4, stats=stats, window_slot=lambda page: -1, first_window_page=lambda pos: max(0, pos - 7) // 4)
    hybrid.received_capacity = 10
    for window_from, taken in ((0, 5), (3, 5), (4, 0)):
        hybrid.receive(hashes, ["q"] * 5, window_from)
        assert len(hybrid.continue_match(seq, root)[1]) == taken, window_from
    hybrid.receive(hashes[:3], ["q"] * 3, 1)  # pages 0-2, windowed entries from page 1: the window of 12 reaches 1, 2
    assert len(hybrid.continue_match(seq, root)[1]) == 3


def test_a_decode_replica_pulls_the_prefill_replicas_pages_and_answers_as_one_replica(tiny_model):  # noqa: F811
    """Neither replica has a disk tier. The prefill replica's answer offers each distinct prompt's pages before the
    page of its last token; the decode replica given the offer takes them as cached prompt tokens (n samples,
    a stream, a completion of two prompts) and answers with the tokens of a replica that computed everything."""
    rng = random.Random(fresh.seed())
    things = rng.sample(["tulips", "rakes", "seed trays", "compost", "hoses", "gnomes", "pruners"], 3)
    with _client(tiny_model) as alone, _client(tiny_model, **JAX) as prefill, _client(tiny_model, **JAX) as decode:
        for i, thing in enumerate(things):
            body = _chat(f"Where are the {thing}?", n=2, stream=i == 1)
            want = _text(alone.post("/v1/chat/completions", json={**body, "stream": False}))
            done = _prefill(prefill, "/v1/chat/completions", body)
            [prompt], transfer = done["prompts"], done["transfer"]
            assert prompt["pages_offered"] == (prompt["prompt_tokens"] - 1) // 16 > 3 and "pages_on_disk" not in prompt
            decode.app.state.engine.engine.reset_prefix_cache()  # (else the system prompt's pages are cached already)
            before = _stats(decode)["transfer_hit_tokens"]
            got = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(transfer)})
            assert got.status_code == 200 and _text(got) == want
            # one pull for n = 2; each sample admitted before the other's pages reach the tree takes them
            assert _stats(decode)["transfer_hit_tokens"] - before in (prompt["pages_offered"] * 16 * k for k in (1, 2))
        text = {"model": "tiny", "prompt": [SYSTEM + " greenhouse 3", SYSTEM + " greenhouse 12"], "max_tokens": 5,
                "temperature": 0}
        transfer = _prefill(prefill, "/v1/completions", text)["transfer"]
        assert len(transfer["offers"]) == 2
        got = decode.post("/v1/completions", json=text, headers={OFFERS_HEADER: json.dumps(transfer)})
        assert _text(got) == _text(alone.post("/v1/completions", json=text))
        assert got.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert _stats(prefill)["transfer_offered_pages"] == _stats(decode)["transfer_received_pages"]
        assert _stats(decode)["transfer_pulls_failed"] == 0 and _stats(prefill)["transfer_hit_tokens"] == 0


def test_a_replica_offers_the_pages_it_holds_without_computing(tiny_model):  # noqa: F811
    """`X-RadixLM-Prefill-Only: cached` (the router's peer fetch): a replica that answered one question offers the
    pages it holds of another question's prompt (the shared system prompt) at once, computing nothing; the replica
    that pulls them answers as alone. A replica without the transport refuses by name."""
    first, second = _chat("Where are the tulips?"), _chat("Where are the wheelbarrows?", max_tokens=4)
    with _client(tiny_model) as alone, _client(tiny_model, **JAX) as holder, _client(tiny_model, **JAX) as chosen:
        holder.post("/v1/chat/completions", json=first)
        before = _stats(holder)
        done = holder.post("/v1/chat/completions", json=second, headers={HEADER: "cached"})
        assert done.status_code == 200 and done.json()["object"] == "prefill", done.text
        after = _stats(holder)
        assert after["prompt_tokens"] == before["prompt_tokens"] and after["num_steps"] == before["num_steps"]
        [offer] = done.json()["transfer"]["offers"]
        assert 0 < offer["pages"] < (done.json()["prompts"][0]["prompt_tokens"] - 1) // 16  # the shared pages only
        got = chosen.post("/v1/chat/completions", json=second, headers={OFFERS_HEADER: json.dumps(done.json()["transfer"])})
        assert _text(got) == _text(alone.post("/v1/chat/completions", json=second))
        assert _stats(chosen)["transfer_hit_tokens"] == offer["pages"] * 16
        refused = alone.post("/v1/chat/completions", json=second, headers={HEADER: "cached"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_kv_transfer"


def test_an_offer_takes_the_pages_the_host_tier_holds_after_the_tree(tiny_model):  # noqa: F811
    """A replica whose small pool let most of a prompt's pages go to its host tier offers them from there after the
    tree's; the replica that pulls them takes them all and answers as alone."""
    body = _chat("Where are the seed potatoes?")
    small = {**JAX, "cache.num_pages": 16, "cache.host_num_pages": 64}
    with _client(tiny_model) as alone, _client(tiny_model, **small) as holder, _client(tiny_model, **JAX) as chosen:
        holder.post("/v1/chat/completions", json=body)
        for i in range(3):  # other prompts push the first one's pages out to the host tier
            holder.post("/v1/completions", json={"model": "tiny", "prompt": f"{i} " * 120, "max_tokens": 2})
        ids = holder.post("/tokenize", json={"model": "tiny", "messages": body["messages"]}).json()["tokens"]
        pages = (len(ids) - 1) // 16
        in_tree = holder.app.state.engine.engine.scheduler.tree.match(ids[: pages * 16]).num_tokens // 16
        done = holder.post("/v1/chat/completions", json=body, headers={HEADER: "cached"}).json()
        [offer] = done["transfer"]["offers"]
        assert in_tree < offer["pages"] == pages and _stats(holder)["host_saved_pages"] > 0
        got = chosen.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(done["transfer"])})
        assert _text(got) == _text(alone.post("/v1/chat/completions", json=body))
        assert _stats(chosen)["transfer_hit_tokens"] == pages * 16


def _windowed(tokenizer):  # noqa: F811
    """A tiny Gemma 3: windowed layers of 24 tokens around a global one (a hybrid cache by default)."""
    cfg = LlamaConfig(architecture="gemma3", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, max_position=1024, sliding_window=24,
                      sliding_layers=(True, False, True), rope_theta=1e6, rope_local_theta=1e4, qk_norm=True,
                      sandwich_norms=True, embed_scale=8.0, hidden_act="gelu_tanh")
    return cfg, llama.init_params(cfg, jax.random.key(fresh.seed()), scale=0.5), tokenizer


def test_a_hybrid_cache_sends_its_windowed_layers_where_the_window_slots_are(tokenizer):  # noqa: F811
    """Gemma-style windowed layers in window slots (cache.hybrid): an offer carries each page's windowed entries where
    the tree still holds its slot; the decode replica answers as alone, with every page taken while the slots were
    there, and with none whose window lacks them after the prefill replica's slots were evicted (a small window pool
    and another prompt)."""
    model = _windowed(tokenizer)
    body = _chat("Where are the tomato cages?")
    few_slots = {**JAX, "cache.window_pages": 8}
    with _client(model) as alone, _client(model, **few_slots) as prefill, _client(model, **JAX) as decode:
        want = _text(alone.post("/v1/chat/completions", json=body))
        transfer = _prefill(prefill, "/v1/chat/completions", body)["transfer"]
        [offer] = transfer["offers"]
        assert offer["window_from"] == 0 and offer["pages"] > 3
        got = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(transfer)})
        assert _text(got) == want and _stats(decode)["transfer_hit_tokens"] == offer["pages"] * 16
        # another prompt, whose window slots push out those of the first prompt's first pages
        prefill.post("/v1/completions", json={"model": "tiny", "prompt": "0 " * 40, "max_tokens": 2})
        done = prefill.post("/v1/chat/completions", json=body, headers={HEADER: "cached"}).json()
        [offer] = done["transfer"]["offers"]
        assert 0 < offer["window_from"] < offer["pages"], offer  # (the first pages' windowed entries are gone)
        decode.app.state.engine.engine.reset_prefix_cache()
        before = _stats(decode)["transfer_hit_tokens"]
        got = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(done["transfer"])})
        assert _text(got) == want
        taken = (_stats(decode)["transfer_hit_tokens"] - before) // 16

        def whole(k: int) -> bool:  # the windowed layers (24 tokens) of the first token after k pages see real entries
            return all(i >= offer["window_from"] for i in range(max(0, 16 * k - 24) // 16, k))

        assert taken == max(k for k in range(offer["pages"] + 1) if k == 0 or whole(k))


def test_pages_cross_between_tensor_parallel_replicas(tiny_model):  # noqa: F811
    """Two devices a replica (the test process has four CPU devices): each device's share of the pages crosses, and
    the decode replica answers as a replica of the same layout computing everything."""
    tp = {"parallel.tensor": 2}
    body = _chat("Where are the cold frames?")
    with _client(tiny_model, **tp) as alone, _client(tiny_model, **JAX, **tp) as prefill, \
            _client(tiny_model, **JAX, **tp) as decode:
        transfer = _prefill(prefill, "/v1/chat/completions", body)["transfer"]
        got = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(transfer)})
        assert _text(got) == _text(alone.post("/v1/chat/completions", json=body))
        assert _stats(decode)["transfer_hit_tokens"] == transfer["offers"][0]["pages"] * 16


def test_offers_that_do_not_fit_cost_only_the_prefill(tiny_model, tokenizer, caplog):  # noqa: F811
    """An offer for another prompt or another namespace (block hashes differ), from a replica of other weights
    (another layout), pulled already, or malformed: the decode replica computes the prompt and answers as alone."""
    cfg = tiny_model[0]
    other = (cfg, llama.init_params(cfg, jax.random.key(fresh.seed()), scale=0.5), tokenizer)
    body, salted = _chat("Where are the watering cans?"), _chat("Where are the watering cans?", cache_salt="s")
    with _client(tiny_model) as alone, _client(tiny_model, **JAX) as prefill, _client(other, **JAX) as stranger, \
            _client(tiny_model, **JAX, **{"cache.disk_read_timeout_s": 0.5}) as decode:
        want = _text(alone.post("/v1/chat/completions", json=body))

        def offer(replica=prefill) -> str:
            return json.dumps(_prefill(replica, "/v1/chat/completions", body)["transfer"])

        cases = {"another prompt": (_chat("Where are the trowels?"), offer()), "another namespace": (salted, offer()),
                 "another layout": (body, offer(stranger)), "malformed": (body, "{not json")}
        for case, (sent, header) in cases.items():
            got = decode.post("/v1/chat/completions", json=sent, headers={OFFERS_HEADER: header})
            assert got.status_code == 200 and _text(got) == _text(alone.post("/v1/chat/completions", json=sent)), case
        stats = _stats(decode)  # (the first two pulled, then not taken)
        pulled = sum(json.loads(cases[c][1])["offers"][0]["pages"] for c in ("another prompt", "another namespace"))
        assert stats["transfer_received_pages"] == pulled and stats["transfer_hit_tokens"] == 0
        assert stats["transfer_pulls_failed"] == 0
        assert "of another layout" in caplog.text and "is malformed" in caplog.text
        header = offer()
        decode.app.state.engine.engine.reset_prefix_cache()  # (the cases above computed this prompt here)
        first = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: header})
        assert _text(first) == want and _stats(decode)["transfer_hit_tokens"] > 0
        decode.app.state.engine.engine.reset_prefix_cache()
        again = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: header})  # pulled already
        assert _text(again) == want and _stats(decode)["transfer_pulls_failed"] == 1
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_pages_received_past_the_buffer_are_dropped_and_computed(tiny_model):  # noqa: F811
    """A decode replica whose buffer holds one page takes the last page offered; the rest of the prompt, computed,
    gives the same tokens."""
    body = _chat("Where are the bird feeders?")
    tiny_buffer = {**JAX, "parallel.kv_transfer_buffer_gb": 1e-9}
    with _client(tiny_model) as alone, _client(tiny_model, **JAX) as prefill, _client(tiny_model, **tiny_buffer) as decode:
        transfer = _prefill(prefill, "/v1/chat/completions", body)["transfer"]
        got = decode.post("/v1/chat/completions", json=body, headers={OFFERS_HEADER: json.dumps(transfer)})
        assert _text(got) == _text(alone.post("/v1/chat/completions", json=body))
        stats = _stats(decode)
        assert stats["transfer_dropped_pages"] == transfer["offers"][0]["pages"] - 1
        assert stats["transfer_hit_tokens"] == 0  # (the one page kept is not where the prompt's match continues)


def test_a_replica_without_either_transport_refuses_prefills_by_name(tiny_model):  # noqa: F811
    with _client(tiny_model) as alone:
        refused = alone.post("/v1/chat/completions", json=_chat("?"), headers={HEADER: "1"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_disk_tier"
        assert "parallel.kv_transfer: jax" in refused.json()["error"]["message"]


def test_config_refusals(tiny_model, tokenizer):  # noqa: F811
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 32, **JAX})
    with pytest.raises(ConfigKeyError, match="needs cache.prefix_caching"):
        LLM(base.replace(**{"cache.prefix_caching": False}), progress=False, model=tiny_model)
    from test_gated_delta import _tiny_cfg

    linear = _tiny_cfg()
    with pytest.raises(ConfigKeyError, match="snapshots of recurrent states"):
        LLM(base, progress=False, model=(linear, llama.init_params(linear, jax.random.key(0)), tokenizer))
    for bad in ("localhost", ":80", "host:port", "h:70000"):
        with pytest.raises(ConfigKeyError, match="kv_transfer_address must be host:port"):
            EngineConfig().replace(**{"parallel.kv_transfer_address": bad})
    with pytest.raises(ConfigKeyError, match="not allowed"):
        EngineConfig().replace(**{"parallel.kv_transfer": "nixl"})
