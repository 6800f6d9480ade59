"""The router against real HTTP fake replicas (engine.router.fake_replica) on 127.0.0.1, no model:
a replica killed mid-run loses no request, its index entries go, and after a restart it
gets traffic again."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.local_replicas import free_ports
from engine.router.app import create_app
from engine.router.config import router_config_from_dict
from engine.router.fake_replica import ByteTokenizer, fake_output, prompt_tokens
from engine.router.prompts import PROBE_TEXT

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PS = 4


def wait_for(pred, timeout_s=20.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_replicas(ports, ttft_s: float, *extra: str, started: dict | None = None) -> dict[int, subprocess.Popen]:
    """Fake replica processes on `ports`, started together, returned once all answer /health (`started`: a dict that
    holds them from the moment they start, for the caller to stop should one never answer)."""
    procs = started if started is not None else {}
    procs.update({port: subprocess.Popen([sys.executable, "-m", "engine.router.fake_replica", "--port", str(port),
                                          "--page-size", str(PS), "--num-pages", "512", "--ttft-s", str(ttft_s), *extra],
                                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
                  for port in ports})
    for port in ports:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200,
                 what=f"fake replica on {port}")
    return procs


class RouterThread:
    """The router app under uvicorn in a thread of this process (so tests can read its state)."""

    def __init__(self, replicas, **overrides):
        import uvicorn

        [self.port] = free_ports(1)
        cfg = router_config_from_dict({"replicas": replicas, "page_size": PS, "tokenizer": "bytes",
                                       "port": self.port, "health_interval_s": 0.2, "poll_interval_s": 0.05,
                                       "connect_timeout_s": 1.0, "request_timeout_s": 30.0, **overrides})
        self.app = create_app(cfg)
        self.router = self.app.state.router
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what="router start")
        self.url = f"http://127.0.0.1:{self.port}"

    def replicas(self):
        return httpx.get(f"{self.url}/replicas", timeout=5).json()["replicas"]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def ask(url: str, i: int, stream: bool, tag: str):
    """One request; returns (text the client saw, expected text, status)."""
    body = {"model": "fake", "max_tokens": 4, "stream": stream,
            "messages": [{"role": "system", "content": f"{tag} prefix {i % 6} " + "x" * 40},
                         {"role": "user", "content": f"question {i}"}]}
    expected = "".join(fake_output(prompt_tokens(ByteTokenizer(), body, chat=True), 4))
    with httpx.Client(timeout=60) as c:
        if not stream:
            r = c.post(f"{url}/v1/chat/completions", json=body)
            return (r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text), expected, r.status_code
        text, done = "", False
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"]["content"]
        return text, expected, r.status_code if done else -1


@contextlib.contextmanager
def replicas_and_router(n: int, ttft_s: float, *extra: str, **router_overrides):
    """(ports, replica processes, RouterThread) of n fake replicas behind a router; every process is stopped on the
    way out, whatever failed (a replica that never answered, a router that did not start)."""
    ports, procs, router = free_ports(n), {}, None
    try:
        procs.update(start_replicas(ports, ttft_s, *extra, started=procs))
        router = RouterThread([f"http://127.0.0.1:{p}" for p in ports], **router_overrides)
        yield ports, procs, router
    finally:
        if router is not None:
            router.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def cluster():
    with replicas_and_router(3, 0.15) as running:
        yield running


def test_kill_replica_mid_run(cluster):
    ports, procs, router = cluster
    wait_for(lambda: all(r["up"] for r in router.replicas()), what="all replicas up")
    victim = 1
    # A burst that queues on every replica (each serves one request at a time, 0.15 s apiece).
    with ThreadPoolExecutor(24) as ex:
        futures = [ex.submit(ask, router.url, i, i % 2 == 0, "run1") for i in range(36)]
        wait_for(lambda: router.router.states[victim].in_flight >= 3, what="requests queued on the victim")
        assert router.router.index.num_confirmed(victim) + router.router.index.num_pending_runs(victim) > 0
        procs[ports[victim]].send_signal(signal.SIGKILL)
        procs[ports[victim]].wait()
        results = [f.result() for f in futures]
    # No request lost: every one completed with the right output, streams included.
    for text, expected, status in results:
        assert status == 200 and text == expected
    retries = sum(s.value for m in router.router.metrics.retries.collect() for s in m.samples
                  if s.name.endswith("_total"))
    assert retries >= 1, "the kill should have hit requests in flight on the victim"
    # The dead replica is down and its index entries are gone.
    state = router.replicas()[victim]
    assert not state["up"] and state["index_blocks"] == 0 and state["pending_runs"] == 0
    assert router.router.index.num_confirmed(victim) == 0
    # Restart (a new process: a new epoch); it rejoins after a resync and receives traffic again.
    procs.update(start_replicas([ports[victim]], ttft_s=0.15))
    wait_for(lambda: router.replicas()[victim]["up"], what="victim back up")
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda i: ask(router.url, 100 + i, i % 2 == 0, "run2"), range(12)))
    for text, expected, status in results:
        assert status == 200 and text == expected
    served = httpx.get(f"http://127.0.0.1:{ports[victim]}/stats", timeout=5).json()["served"]
    assert served >= 1
    wait_for(lambda: router.replicas()[victim]["index_blocks"] > 0, what="victim's feed re-indexed")
    metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert "radixlm_router_hit_rate_estimate" in metrics and "radixlm_router_replica_up" in metrics


def test_prefix_sticks_and_feed_confirms(cluster):
    ports, procs, router = cluster
    wait_for(lambda: all(r["up"] for r in router.replicas()), what="all replicas up")
    body = {"model": "fake", "max_tokens": 2, "prompt": "shared system prompt " * 8 + "q0"}
    first = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"]
    # The feed confirms the stored pages on that replica (events, not only the optimistic record).
    slot = [f"fake:{p}" for p in ports].index(first)
    wait_for(lambda: router.replicas()[slot]["index_blocks"] > 0, what="stored events indexed")
    for i in range(1, 5):
        body["prompt"] = "shared system prompt " * 8 + f"q{i}"
        assert httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"] == first
    # Embedding requests are routed by their input's prefix the same way.
    embed = {"model": "fake", "input": "shared system prompt " * 8 + "an embedding query"}
    assert httpx.post(f"{router.url}/v1/embeddings", json=embed, timeout=30).json()["replica"] == first
    query = "shared system prompt " * 8 + "a query"  # scores and reranks by their query's (text_1's)
    assert httpx.post(f"{router.url}/v1/score", json={"model": "fake", "text_1": query, "text_2": ["a", "b"]},
                      timeout=30).json()["replica"] == first
    assert httpx.post(f"{router.url}/v1/rerank", json={"model": "fake", "query": query, "documents": ["a"]},
                      timeout=30).json()["replica"] == first
    classify = {"model": "fake", "input": "shared system prompt " * 8 + "a reply to score"}
    assert httpx.post(f"{router.url}/classify", json=classify, timeout=30).json()["replica"] == first
    # A replica that refuses connections is skipped; all down -> 503.
    for proc in procs.values():
        proc.kill()
        proc.wait()
    r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30)
    assert r.status_code in (502, 503)
    wait_for(lambda: httpx.get(f"{router.url}/health", timeout=5).status_code == 503, what="router unhealthy")


def test_adapter_requests_keep_prefix_affinity():
    """The router learns the replicas' LoRA adapters from /v1/models and hashes a request for one in that adapter's
    cache namespace, as the replica stores it: repeated adapter prompts stick to the replica that cached them."""
    with replicas_and_router(3, 0.05, "--adapters", "sql") as (ports, procs, router):
        wait_for(lambda: all(r["up"] for r in router.replicas()), what="all replicas up")
        assert router.router.adapters == {"sql"}
        body = {"model": "sql", "max_tokens": 2, "prompt": "shared adapter prompt " * 8 + "q0"}
        first = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"]
        slot = [f"fake:{p}" for p in ports].index(first)
        wait_for(lambda: router.replicas()[slot]["index_blocks"] > 0, what="stored events indexed")
        confirmed = router.router.index.num_confirmed(slot)
        for i in range(1, 4):
            body["prompt"] = "shared adapter prompt " * 8 + f"q{i}"
            assert httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"] == first
        req = router.router.route_request(body, "/v1/completions")
        base = router.router.route_request({**body, "model": "fake"}, "/v1/completions")
        # The replica's stored-page events name the adapter's pages with the very hashes the router computes.
        assert confirmed > 0 and router.router.index.holds(slot, req.block_hashes[0])
        assert req.block_hashes[0] != base.block_hashes[0] and not router.router.index.holds(slot, base.block_hashes[0])


def test_admin_calls_reach_every_replica_and_the_router_follows(cluster):
    """Adapter loads and unloads, weight updates, sleep and wake-up sent to the router go to every replica up; the
    router learns the adapters anew and drops the index entries of caches the new weights emptied; a call every
    replica refuses keeps their status, and a replica down is skipped."""
    ports, procs, router = cluster
    wait_for(lambda: all(r["up"] for r in router.replicas()), what="all replicas up")
    urls = [f"http://127.0.0.1:{p}" for p in ports]

    loaded = httpx.post(f"{router.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a"}, timeout=30)
    assert loaded.status_code == 200 and loaded.json()["success"] is True
    assert sorted(a["replica"] for a in loaded.json()["replicas"]) == sorted(urls)
    assert router.router.adapters == {"sql"}
    for url in urls:
        assert "sql" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    refused = httpx.post(f"{router.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "bad"}, timeout=30)
    assert refused.status_code == 400 and refused.json()["success"] is False
    assert all("adapter_config.json" in a["body"]["error"]["message"] for a in refused.json()["replicas"])
    assert httpx.post(f"{router.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, timeout=30).status_code == 200
    assert router.router.adapters == set()

    body = {"model": "fake", "max_tokens": 2, "prompt": "a prompt to cache " * 8}
    slot = [f"fake:{p}" for p in ports].index(httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"])
    wait_for(lambda: router.router.index.num_confirmed(slot) > 0, what="stored events indexed")
    updated = httpx.post(f"{router.url}/update_weights_from_disk", json={"model_path": "/new"}, timeout=30)
    assert updated.status_code == 200 and all(a["body"]["weights_version"] == 1 for a in updated.json()["replicas"])
    wait_for(lambda: router.router.index.num_confirmed(slot) == 0, what="the emptied cache reaching the index")

    assert httpx.post(f"{router.url}/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": "/c"},
                      timeout=30).status_code == 200
    procs[ports[2]].kill()
    procs[ports[2]].wait()
    wait_for(lambda: not router.replicas()[2]["up"], what="the replica marked down")
    again = httpx.post(f"{router.url}/update_weights_from_disk", json={"model_path": "/newer"}, timeout=30)
    assert again.status_code == 200 and sorted(a["replica"] for a in again.json()["replicas"]) == sorted(urls[:2])

    # Restarted from its config (no adapter, its own weights), it is caught up before it rejoins.
    procs.update(start_replicas([ports[2]], ttft_s=0.15))
    wait_for(lambda: router.replicas()[2]["up"], what="the restarted replica up")
    assert httpx.get(f"{urls[2]}/load").json()["weights"] == "/newer"
    assert "chat" in [m["id"] for m in httpx.get(f"{urls[2]}/v1/models").json()["data"]]
    for url in urls[:2]:  # those that had both calls were not sent them again
        assert httpx.get(f"{url}/stats").json()["weights_version"] == 2


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/messages"])
def test_replica_dying_mid_stream_ends_the_stream_with_an_error(path):
    """After the first byte there is no retry: the client gets an SSE error event, not a silent cut (on Anthropic's
    Messages API, its `error` event)."""
    with replicas_and_router(2, 0.05, "--chunk-delay-s", "0.2", policy="round_robin") as (ports, procs, router):
        wait_for(lambda: all(r["up"] for r in router.replicas()), what="replicas up")
        body = {"model": "fake", "max_tokens": 20, "stream": True}
        body.update(messages=[{"role": "user", "content": "hello"}] if path == "/v1/messages" else {"prompt": "hello"})
        lines = []
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{router.url}{path}", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    lines.append(line)
                if not line.startswith("data: "):
                    continue
                lines.append(line)
                if len(lines) == 1:
                    victim = ports.index(int(json.loads(line[6:])["replica"].split(":")[1]))
                    procs[ports[victim]].kill()
        assert len(lines) < 21 and "data: [DONE]" not in lines
        error = json.loads(lines[-1][6:])
        assert "error" in error
        if path == "/v1/messages":
            assert lines[-2] == "event: error" and error["type"] == "error" and error["error"]["type"] == "api_error"
        wait_for(lambda: not router.replicas()[victim]["up"], what="victim marked down")
        # the next request goes to the survivor
        r = httpx.post(f"{router.url}{path}", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 200 and r.json()["replica"] == f"fake:{ports[1 - victim]}"


def test_the_routers_own_errors_take_the_shape_of_the_api_asked():
    """No replica up, or a body that is not a JSON object: OpenAI's error body on the OpenAI routes, Anthropic's on
    /v1/messages (which Anthropic's SDK reads)."""
    router = RouterThread([f"http://127.0.0.1:{free_ports(1)[0]}"])  # nothing listens there
    try:
        chat = {"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_unavailable"
        r = httpx.post(f"{router.url}/v1/messages", json=chat, timeout=10)
        assert r.status_code == 503 and r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
        assert "no replica could serve the request" in r.json()["error"]["message"]
        r = httpx.post(f"{router.url}/v1/messages", json=[chat], timeout=10)
        assert r.status_code == 400 and r.json() == {
            "type": "error", "error": {"type": "invalid_request_error", "message": "body must be a JSON object"}}
        anthropic = pytest.importorskip("anthropic")
        client = anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.InternalServerError, match="no replica could serve the request"):
            client.messages.create(model="fake", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    finally:
        router.stop()


def respond(url: str, body: dict) -> tuple[int, dict]:
    """POST /v1/responses -> (status, the response, or the error body); a stream's response is its last event's."""
    with httpx.Client(timeout=30) as c:
        if not body.get("stream"):
            r = c.post(f"{url}/v1/responses", json=body)
            return r.status_code, r.json()
        with c.stream("POST", f"{url}/v1/responses", json=body) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(r.read())
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        return 200, events[-1]["response"]


def test_responses_stay_with_the_replica_that_stored_them(cluster):
    """A request with previous_response_id, and GET / DELETE /v1/responses/{id}, reach the replica that stored the
    response (fake replicas answer 404 for ids they do not hold), even under round robin; the router learns the owner
    from whole and streamed responses, and a router that never saw an id finds it by asking the replicas. An owner
    that is down is a 503 naming it."""
    ports, procs, router = cluster
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rr = RouterThread(urls, policy="round_robin")
    try:
        wait_for(lambda: all(r["up"] for r in rr.replicas() + router.replicas()), what="all replicas up")
        # Without previous_response_id, prefix affinity as for chat: instructions and input hash as their messages.
        responses = rr.router.route_request({"model": "fake", "instructions": "be brief " * 8, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}, "/v1/responses")
        chat = rr.router.route_request({"model": "fake", "messages": [{"role": "system", "content": "be brief " * 8},
                                                                      {"role": "user", "content": "hi"}]},
                                       "/v1/chat/completions")
        assert responses.block_hashes == chat.block_hashes and len(chat.block_hashes) > 1
        owners = {}
        for i in range(6):
            status, first = respond(rr.url, {"model": "fake", "input": f"conversation {i}", "max_output_tokens": 3,
                                             "stream": i % 2 == 0})
            assert status == 200
            last = first
            for turn in range(2):
                status, last = respond(rr.url, {"model": "fake", "input": f"turn {turn}", "stream": turn == i % 2,
                                                "previous_response_id": last["id"], "max_output_tokens": 3})
                assert status == 200 and last["replica"] == first["replica"], last
            owners[last["id"]] = first["replica"]
        assert len(set(owners.values())) > 1  # round robin spread the conversations
        assert len(rr.router.response_owners) == 18
        for response_id, replica in owners.items():
            assert httpx.get(f"{rr.url}/v1/responses/{response_id}", timeout=30).json()["replica"] == replica
        # A router that never saw these ids asks the replicas, then remembers.
        some_id = next(iter(owners))
        status, more = respond(router.url, {"model": "fake", "input": "again", "previous_response_id": some_id})
        assert status == 200 and more["replica"] == owners[some_id]
        assert router.router.response_owners.get(some_id) is not None
        assert httpx.delete(f"{router.url}/v1/responses/{some_id}", timeout=30).json()["deleted"] is True
        for r in (httpx.get(f"{rr.url}/v1/responses/{some_id}", timeout=30),
                  httpx.post(f"{rr.url}/v1/responses", json={"model": "fake", "input": "x", "previous_response_id": some_id},
                             timeout=30)):
            assert r.status_code == 404 and some_id in r.json()["error"]["message"]
        status, unstored = respond(rr.url, {"model": "fake", "input": "x", "store": False})
        assert status == 200 and rr.router.response_owners.get(unstored["id"]) is None
        # The owner of a conversation goes down: continuing it is a clear error, not another replica's 404.
        victim_id, victim = next((rid, replica) for rid, replica in owners.items() if rid != some_id)
        slot = [f"fake:{p}" for p in ports].index(victim)
        procs[ports[slot]].kill()
        procs[ports[slot]].wait()
        wait_for(lambda: not rr.replicas()[slot]["up"], what="the owner marked down")
        status, error = respond(rr.url, {"model": "fake", "input": "x", "previous_response_id": victim_id})
        assert status == 503 and urls[slot] in error["error"]["message"] and "down" in error["error"]["message"]
    finally:
        rr.stop()


def test_input_items_come_from_the_replica_that_stored_the_response(cluster):
    """GET /v1/responses/{id}/input_items goes to the owner with the client's query (order, limit, after), and POST
    /v1/responses/{id}/cancel to the owner, from a router that saw the response and from one that asks the replicas;
    an unknown id is a 404 naming it."""
    ports, procs, router = cluster
    rr = RouterThread([f"http://127.0.0.1:{p}" for p in ports], policy="round_robin")
    try:
        wait_for(lambda: all(r["up"] for r in rr.replicas() + router.replicas()), what="all replicas up")
        made = [respond(rr.url, {"model": "fake", "max_output_tokens": 3, "input": [
            {"role": "user", "content": f"r{i} m{j}"} for j in range(3)]})[1] for i in range(3)]
        assert len({m["replica"] for m in made}) == 3  # round robin: one response per replica
        for i, m in enumerate(made):
            url = f"/v1/responses/{m['id']}/input_items"
            for base in (rr.url, router.url):  # `router` never saw the ids: it asks the replicas
                r = httpx.get(base + url, timeout=30)
                assert r.status_code == 200 and r.json()["replica"] == m["replica"], r.text
                assert [item["content"][0]["text"] for item in r.json()["data"]] == [f"r{i} m2", f"r{i} m1", f"r{i} m0"]
                cancel = httpx.post(f"{base}/v1/responses/{m['id']}/cancel", timeout=30)
                assert cancel.status_code == 200 and cancel.json()["replica"] == m["replica"], cancel.text
            page = httpx.get(rr.url + url, params={"order": "asc", "limit": 1}, timeout=30).json()
            assert [item["content"][0]["text"] for item in page["data"]] == [f"r{i} m0"] and page["has_more"] is True
            rest = httpx.get(rr.url + url, params={"order": "asc", "after": page["last_id"]}, timeout=30).json()
            assert [item["content"][0]["text"] for item in rest["data"]] == [f"r{i} m1", f"r{i} m2"]
        r = httpx.get(f"{rr.url}/v1/responses/resp_none/input_items", timeout=30)
        assert r.status_code == 404 and "resp_none" in r.json()["error"]["message"]
        assert httpx.post(f"{rr.url}/v1/responses/resp_none/cancel", timeout=30).status_code == 404
    finally:
        rr.stop()


def test_the_router_hashes_with_the_page_size_the_replicas_tell(cluster):
    """A router configured with another page size than its replicas' learns theirs from /v1/prompt_format (hashes cut
    as theirs are, so its index holds what their feeds report) and says so in /replicas; a replica that prompts
    otherwise than the fleet, or tokenizes otherwise than the router, is named in a warning."""
    ports, _, _ = cluster
    router = RouterThread([f"http://127.0.0.1:{p}" for p in ports], page_size=PS * 4)
    try:
        wait_for(lambda: all(r["up"] for r in router.replicas()), what="all replicas up")
        assert router.router.page_size == PS and router.router.policy.page_size == PS
        assert {r["prompt_format"] for r in router.replicas()} == {"hashed for"}
        body = {"model": "fake", "max_tokens": 2, "prompt": "learned page size " * 6}
        first = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30).json()["replica"]
        slot = [f"fake:{p}" for p in ports].index(first)
        req = router.router.route_request(body, "/v1/completions")
        assert len(req.block_hashes) == len(body["prompt"]) // PS
        wait_for(lambda: router.router.index.holds(slot, req.block_hashes[-1]), what="its pages indexed")
    finally:
        router.stop()


def test_a_replica_prompting_otherwise_is_named(caplog):
    from engine.router.prompts import PromptFormat

    cfg = router_config_from_dict({"replicas": ["http://a:1", "http://b:2"], "tokenizer": "bytes"})
    router = create_app(cfg).state.router
    probe = tuple(ByteTokenizer().encode(PROBE_TEXT))
    router.fleet.format = fleet = PromptFormat(PS, probe=probe)
    with caplog.at_level("WARNING", logger="radixlm.router"):
        router._check_format("http://a:1", fleet)
        assert not caplog.records
        router._check_format("http://b:2", PromptFormat(PS, "{{ messages }}", probe=(1, 2)))
    assert "http://b:2 tokenizes differently from the router's tokenizer (bytes)" in caplog.text
    assert "http://b:2 prompts otherwise than the fleet's first (chat_template, probe)" in caplog.text

    # Replicas restarted one by one with new settings: the fleet keeps its format while a replica up still prompts
    # so, and takes the new one once none does.
    fleet, new = router.fleet, PromptFormat(PS * 2, probe=probe)
    fleet.formats, fleet.states[0].up, fleet.states[1].up = [fleet.format, fleet.format], True, True
    fleet.adopt_format(1, new)
    assert fleet.format == PromptFormat(PS, probe=probe) and router.page_size == PS
    assert [d["prompt_format"] for d in fleet.describe()] == ["hashed for", "differs: page_size"]
    fleet.adopt_format(0, new)
    assert fleet.format == new and router.page_size == router.policy.page_size == PS * 2
    assert [d["prompt_format"] for d in fleet.describe()] == ["hashed for", "hashed for"]
