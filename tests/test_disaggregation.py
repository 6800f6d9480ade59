"""Prefill/decode disaggregation (engine/disaggregation.py, the router's `prefill_replicas`).

A replica asked for a prefill only computes the prompt and answers once its pages are in the disk tier; a decode
replica on the same files then computes only the prompt's last page and gives the tokens one replica gives. The
router sends each generation request to a prefill replica first, then to a decode replica; a prefill replica that
fails only costs the decode replica the prefill."""
from __future__ import annotations

import json
import random
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.disaggregation import HEADER
from engine.engine import LLMEngine
from engine.server import create_app
from engine.local_replicas import free_ports
from tests.test_engine import SMALL, tiny_model, tokenizer  # noqa: F401 (fixtures)
from tests.test_generate import tiny_checkpoint  # noqa: F401 (fixture)
from tests.test_router_faults import ask, replicas_and_router, start_replicas, wait_for

SYSTEM = "You are the help desk of a hardware store. Answer in one short sentence, naming the aisle. " * 3


def _client(tiny_model, **overrides) -> TestClient:  # noqa: F811
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "server.model_name": "tiny", **overrides})
    return TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False, model=tiny_model)), config))


def _chat(question: str, **fields) -> dict:
    return {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], **fields}


def _slow_writes(monkeypatch, seconds: float = 0.05, disk=None) -> None:
    """Every file of the disk tier (of the DiskCache `disk` alone, if given) written `seconds` late: an answer that
    does not wait for its pages misses some."""
    from engine.disk_cache import DiskCache

    write = DiskCache._write_one

    def slow(self, *args):
        time.sleep(seconds)
        return write(self, *args)

    if disk is None:
        monkeypatch.setattr(DiskCache, "_write_one", slow)
    else:
        monkeypatch.setattr(disk, "_write_one", lambda *args: slow(disk, *args))


def test_a_decode_replica_reads_the_prefill_replicas_pages_and_answers_as_one_replica(tiny_model, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """The prefill replica's answer says every whole page of the prompt is on disk, and is no completion; the decode
    replica on the same files takes them as cached prompt tokens and answers with the tokens of a replica that did
    everything itself (completions, chat, a stream); n samples are one prefill; a refused request is refused by
    the prefill replica as any replica refuses it; a replica without a disk tier refuses prefills by name."""
    questions = [f"Where are the {thing}?" for thing in ("hammers", "ladders", "paint rollers", "hinges")]
    with _client(tiny_model) as alone:
        expected = [alone.post("/v1/chat/completions", json=_chat(q)).json() for q in questions]
        expected_text = alone.post("/v1/completions", json={"model": "tiny", "prompt": SYSTEM + " aisle 7", "max_tokens":
                                                            5, "temperature": 0}).json()["choices"][0]["text"]
        refused = alone.post("/v1/chat/completions", json=_chat("?"), headers={HEADER: "1"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_disk_tier", refused.text
        assert "cache.disk_path" in refused.json()["error"]["message"]

    disk = {"cache.disk_path": str(tmp_path)}
    _slow_writes(monkeypatch)
    with _client(tiny_model, **disk) as prefill, _client(tiny_model, **disk) as decode:
        for q, want in zip(questions, expected):
            body = _chat(q, n=2, stream=q.endswith("ladders?"))
            done = prefill.post("/v1/chat/completions", json=body, headers={HEADER: "1"})
            assert done.status_code == 200, done.text
            [one] = done.json()["prompts"]  # n = 2: one prompt, one prefill
            assert done.json()["object"] == "prefill" and one["pages"] == one["prompt_tokens"] // 16 > 3
            assert one["pages_on_disk"] == one["pages"]
            got = decode.post("/v1/chat/completions", json=_chat(q)).json()
            assert got["choices"][0]["message"] == want["choices"][0]["message"]
            assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= (one["pages"] - 1) * 16
        assert decode.app.state.engine.engine.stats()["disk_hit_tokens"] > 0
        assert prefill.app.state.engine.engine.stats()["disk_hit_tokens"] == 0

        text = {"model": "tiny", "prompt": SYSTEM + " aisle 7", "max_tokens": 5, "temperature": 0}
        assert prefill.post("/v1/completions", json=text, headers={HEADER: "1"}).json()["object"] == "prefill"
        assert decode.post("/v1/completions", json=text).json()["choices"][0]["text"] == expected_text

        bad = prefill.post("/v1/chat/completions", json=_chat("?", temperature=-1), headers={HEADER: "1"})
        assert bad.status_code == 400 and "temperature" in bad.text


def _stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()


def _counter(url: str, name: str, outcome: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'{name}{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_the_router_prefills_on_a_prefill_replica_then_decodes_elsewhere():
    """Generation requests (streamed or not) reach the prefill replica first, marked, and are answered by a decode
    replica, which gets the prefill's offer of the prompt's pages; pooling requests never go to a prefill replica; with the prefill replica gone, the decode replicas
    serve alone."""
    [prefill_port] = free_ports(1)
    procs = {}
    try:
        start_replicas([prefill_port], 0.0, started=procs)
        prefill_url = f"http://127.0.0.1:{prefill_port}"
        with replicas_and_router(2, 0.0, prefill_replicas=[prefill_url]) as (ports, _, router):
            answers = [ask(router.url, i, i % 2 == 1, "pd") for i in range(6)]
            assert all(got == want and status == 200 for got, want, status in answers), answers
            assert _stats(prefill_port)["prefills"] == _stats(prefill_port)["served"] == 6
            assert sum(_stats(p)["served"] for p in ports) == 6 and all(_stats(p)["prefills"] == 0 for p in ports)
            assert _counter(router.url, "radixlm_router_prefill_handoffs_total", "ok") == 6
            # each prefill's offer of its pages (parallel.kv_transfer: jax) reached the decode replica that answered
            assert sorted(u for p in ports for u in _stats(p)["offers"]) == list(range(1, 7))
            rng = random.Random(0)
            for _ in range(3):
                r = httpx.post(router.url + "/v1/embeddings", json={"model": "fake", "input": "x" * rng.randint(9, 99)})
                assert r.status_code == 200 and r.json()["replica"] != f"fake:{prefill_port}"
            assert _stats(prefill_port)["served"] == 6

            procs[prefill_port].kill()
            procs[prefill_port].wait()
            assert all(got == want for got, want, _ in (ask(router.url, i, False, "pd") for i in range(6, 9)))
            wait_for(lambda: not router.router.states[2].up, what="the prefill replica marked down")
            assert all(got == want for got, want, _ in (ask(router.url, i, True, "pd") for i in range(9, 12)))
            assert _counter(router.url, "radixlm_router_prefill_handoffs_total", "ok") == 6
            lost = sum(_counter(router.url, "radixlm_router_prefill_handoffs_total", o)
                       for o in ("failed", "no_prefill_replica"))
            assert lost == 6
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_prompts_mostly_cached_skip_the_prefill_replica():
    """prefill_min_tokens: a group's first request (its whole prompt new to every replica) is prefilled first; the next
    ones, whose prompts the index finds held but for a short tail, go straight to a decode replica."""
    [prefill_port] = free_ports(1)
    procs = {}
    try:
        start_replicas([prefill_port], 0.0, started=procs)
        with replicas_and_router(1, 0.0, prefill_replicas=[f"http://127.0.0.1:{prefill_port}"],
                                 prefill_min_tokens=24) as (_, _, router):
            for i in (0, 6, 12):  # one group ("prefix 0"): ~75 bytes shared, a tail of ~15
                got, want, status = ask(router.url, i, False, "pd")
                assert got == want and status == 200
            assert _stats(prefill_port)["prefills"] == 1
            assert _counter(router.url, "radixlm_router_prefill_handoffs_total", "ok") == 1
            assert _counter(router.url, "radixlm_router_prefill_handoffs_total", "skipped_cached") == 2
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_the_router_has_a_replica_without_the_prefix_pull_it_from_the_one_that_holds_it():
    """peer_fetch_min_tokens: round robin sends a group's second request to the replica that lacks its prefix; the
    router asks the holder for an offer of its pages (nothing computed there) and hands it to the chosen replica.
    Requests to replicas holding as much as any other carry none."""
    with replicas_and_router(2, 0.0, policy="round_robin", peer_fetch_min_tokens=32) as (ports, _, router):
        for k, i in enumerate((0, 6, 12, 18)):  # one group ("prefix 0"), alternating replicas
            got, want, status = ask(router.url, i, i == 6, "peer")
            assert got == want and status == 200
            if k < 2:  # (later requests find the prefix in the index by the replica's events, not by a guess)
                wait_for(lambda: router.router.index.num_confirmed(k) > 0, what=f"replica {k}'s pages indexed")
        stats = [_stats(p) for p in ports]
        assert [s["peer_offers"] for s in stats] == [1, 0] and [s["offers"] for s in stats] == [[], [1001]]
        assert all(s["prefills"] == 0 for s in stats)
        assert _counter(router.url, "radixlm_router_peer_fetches_total", "ok") == 1


@pytest.mark.parametrize("key", ["replicas", "prefill_replicas"])
def test_router_config_refuses_a_replica_listed_twice_or_not_a_url(key):
    from engine.config import ConfigKeyError
    from engine.router.config import router_config_from_dict

    cfg = router_config_from_dict({"replicas": ["http://a:1", "http://b:1"], "prefill_replicas": "http://c:1"})
    assert cfg.replica_urls == ("http://a:1", "http://b:1", "http://c:1") and cfg.prefill_slots == {2}
    with pytest.raises(ConfigKeyError, match="twice"):
        router_config_from_dict({"replicas": "http://a:1", "prefill_replicas": "http://a:1"})
    with pytest.raises(ConfigKeyError, match=f"{key}: 'ftp://x' is not"):
        router_config_from_dict({"replicas": "http://a:1", key: "http://d:1,ftp://x"})


def test_serve_py_needs_a_disk_tier_for_prefill_replicas():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set",
                           "parallel.data=2", "parallel.prefill_replicas=1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cache.disk_path" in done.stderr, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set",
                           "parallel.data=2", "parallel.prefill_replicas=2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "parallel.prefill_replicas must be in [0, parallel.data)" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["disk", "jax"])
def test_serve_py_with_one_prefill_and_one_decode_replica(tiny_checkpoint, tmp_path, transport):  # noqa: F811
    """serve.py with parallel.data=2 and parallel.prefill_replicas=1: every chat is prefilled by the one replica and
    answered by the other from the pages it left on disk (or, parallel.kv_transfer: jax, that it pulled from the
    prefill replica over the network, with no disk tier), with the tokens the decode replica gives computing the whole
    prompt itself (another cache_salt, sent to it directly)."""
    import signal
    import subprocess
    import sys

    from tests.test_serve_replicas import _wait

    [port] = free_ports(1)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set",
                             f"model.path={tiny_checkpoint}", "model.max_model_len=256", "cache.num_pages=256",
                             "warmup=false", "parallel.data=2", "parallel.prefill_replicas=1",
                             f"cache.disk_path={tmp_path / 'kv'}" if transport == "disk" else "parallel.kv_transfer=jax",
                             f"server.port={port}"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            _wait(lambda: http.get("/health").status_code == 200, 300, "the router")
            [decode, prefill] = [r["url"] for r in http.get("/replicas").json()["replicas"]]
            body = {"model": "smollm2-135m-instruct", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            for i in range(3):
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]
                r = http.post("/v1/chat/completions", json={**body, "messages": messages})
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]  # every whole page read from disk but the last token's
                assert usage["prompt_tokens_details"]["cached_tokens"] >= (usage["prompt_tokens"] // 16 - 1) * 16 > 0
                alone = httpx.post(decode + "/v1/chat/completions", timeout=60,
                                   json={**body, "messages": messages, "cache_salt": f"alone {i}"}).json()
                assert alone["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                assert r.json()["choices"][0]["message"] == alone["choices"][0]["message"]
            text = ""  # a stream: its first token comes from the decode replica, after the prefill
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "messages": messages}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
            assert text == alone["choices"][0]["message"]["content"]
            metrics = http.get("/metrics").text
            assert 'radixlm_router_prefill_handoffs_total{outcome="ok"} 4.0' in metrics, metrics
            hits = "radixlm_disk_hit_tokens_total" if transport == "disk" else "radixlm_kv_transfer_hit_tokens_total"
            assert f"{hits} 0.0" not in httpx.get(decode + "/metrics").text
            assert f"{hits} 0.0" in httpx.get(prefill + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_a_model_with_linear_attention_layers_resumes_at_the_prefills_snapshot(tmp_path, monkeypatch):
    """A Qwen3.5-shaped model (tiny, random): the prefill replica's answer waits for the snapshot of its recurrent
    states too (files written slowly here, snapshots the slowest), and the decode replica resumes there: the greedy tokens of an engine
    without prefix caching."""
    import asyncio

    import jax

    from engine.async_engine import GenerateRequest
    from engine.disaggregation import prefill_for_decode
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models import llama
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_gated_delta import _tiny_cfg
    from test_hybrid_tiers import TIERED
    from test_models import SMOLLM2
    import fresh

    cfg = _tiny_cfg()
    model = (cfg, llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3),
             Tokenizer.load(tokenizer_source(SMOLLM2)))
    rng = random.Random(fresh.seed())
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (40, rng.randrange(33, 48))]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLM(None, progress=False, model=model, **TIERED,
                                     **{"cache.prefix_caching": False}).generate(prompts, greedy)]
    disk = {"cache.disk_path": str(tmp_path)}

    decode = LLM(None, progress=False, model=model, **TIERED, **disk)
    _slow_writes(monkeypatch)

    async def prefill_then_decode() -> tuple[dict, list]:  # (the prefill replica still serving while the decode runs)
        engine = AsyncEngine(LLMEngine(EngineConfig().replace(**TIERED, **disk), progress=False, model=model))
        _slow_writes(monkeypatch, 0.5, engine.engine._disk.states)  # the snapshots' files come last
        engine.start()
        other = [rng.randrange(3, cfg.vocab_size) for _ in range(20)]  # steps running throughout (no idle writes)
        busy = engine.submit([GenerateRequest(other, SamplingParams(max_tokens=60, ignore_eos=True))], "busy")
        try:
            async with busy:
                done = await prefill_for_decode(engine, [GenerateRequest(p, greedy) for p in prompts], timeout_s=30)
                return done, await asyncio.to_thread(decode.generate, prompts, greedy)
        finally:
            engine.stop()

    done, got = asyncio.run(prefill_then_decode())
    assert [p["pages_on_disk"] for p in done["prompts"]] == [len(p) // 8 for p in prompts]
    assert [o.token_ids for o in got] == want
    # (each resumes at a snapshot the prefill took at the end of one of its chunks: with a busy engine, where those
    # end varies, and the last page's may not be one)
    assert decode.engine.stats()["disk_state_hits"] == 2 and all(o.cached_tokens > 0 for o in got)
