"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API) on the chat path: request translation and
refusals, content blocks and stream events, Anthropic's error body and x-api-key (no model; the scripted fake engine
of tests/test_responses.py behind the real app); then SmolLM2 behind the real app on 127.0.0.1, compared with
/v1/chat/completions, driven by raw HTTP and by the official `anthropic` client."""
import json

import pytest

from engine.anthropic_messages import (Content, MessagesRequest, chat_messages, chat_request, error_body, stop_reason)
from engine.openai_protocol import ApiError
from test_responses import MODEL, PAGE_SIZE, _ChatTokenizer, _ScriptedEngine, fake, http, server  # noqa: F401

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                            "additionalProperties": False}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8,
                                           "messages": [{"role": "user", "content": "hi"}], **fields})


def _refusal(fields: dict) -> ApiError:
    with pytest.raises(ApiError) as e:
        chat_request(_request(**fields), reasoning=False)
    assert e.value.status == 400
    return e.value


# ---------------------------------------------------------------------------------------------- request
def test_blocks_become_chat_messages():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use the tool", "signature": "s"},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "down"}],
             "is_error": True},
            {"type": "text", "text": "thanks"}]},
        {"role": "assistant", "content": "ok"},
    ]
    assert chat_messages([{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}], messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: down"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "ok"},
    ]
    # A user turn of tool results only is tool messages only.
    only = chat_messages(None, messages[:2] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1"}]}])
    assert only[-1] == {"role": "tool", "tool_call_id": "toolu_1", "content": ""}


def test_request_becomes_a_chat_request():
    chat = chat_request(_request(
        system="terse", max_tokens=7, temperature=0, top_p=0.5, top_k=3, stop_sequences=["\n\n"], stream=True,
        cache_salt="s", tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
        metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 1024}), reasoning=False)
    assert [(m.role, m.content) for m in chat.messages] == [("system", "terse"), ("user", "hi")]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.top_k, chat.stop, chat.stream, chat.cache_salt,
            chat.user) == (7, 0, 0.5, 3, ["\n\n"], True, "s", "u")
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == WEATHER["input_schema"]
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.chat_template_kwargs is None  # no reasoning parser: thinking is ignored
    for kind, chat_kind in [("auto", "auto"), ("any", "required"), ("none", "none")]:
        assert chat_request(_request(tools=[WEATHER], tool_choice={"type": kind}), False).tool_choice == chat_kind
    assert chat_request(_request(tool_choice={"type": "auto"}), False).tool_choice is None  # no tools: nothing to do
    for kind, enabled in [("enabled", True), ("disabled", False)]:
        chat = chat_request(_request(thinking={"type": kind}), reasoning=True)
        assert chat.chat_template_kwargs == {"enable_thinking": enabled}


@pytest.mark.parametrize("fields, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].source: expected"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0]: image blocks are not supported in assistant messages"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
     "content blocks of type 'search_result' are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]},
     "no tool_use block with id 'toolu_9'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "tool_use blocks are not allowed in user messages"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}]},
     "input: a tool_use block's input must be an object"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role: expected user or assistant"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: expected a string or a list"),
    ({"system": [{"type": "image"}]}, "system[0]: 'image' blocks are not supported here"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "content[0].text: required string"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools ('web_search_20250305')"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tools ('bash_20250124')"),
    ({"tools": [{"name": "f"}]}, "tools[0]: input_schema must be a JSON schema object"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, 'tool_choice: {"type": "tool"} needs a "name"'),
    ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice: type 'sometimes' is not supported"),
    ({"thinking": {"type": "adaptive"}}, 'thinking.type: expected "enabled" or "disabled"'),
])
def test_unsupported_requests_are_refused_by_name(fields, message):
    assert message in _refusal(fields).message


def test_any_json_blocks_are_a_chat_request_or_a_400():
    """Whatever JSON the messages, system, tools and tool_choice hold: a chat request, or an ApiError."""
    from hypothesis import given, settings, strategies as st

    words = st.sampled_from(["type", "role", "content", "text", "id", "name", "input", "tool_use", "tool_result",
                             "tool_use_id", "is_error", "user", "assistant", "thinking", "tool", "any", "x"])
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | words,
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=4),
                               max_leaves=12)
    objects = st.dictionaries(words, json_values, max_size=5)

    @settings(max_examples=300, deadline=None)
    @given(messages=st.lists(objects, min_size=1, max_size=4), system=st.none() | words | st.lists(objects, max_size=2),
           tools=st.lists(objects, max_size=2), choice=st.none() | objects)
    def check(messages, system, tools, choice):
        try:
            chat_request(_request(messages=messages, system=system, tools=tools, tool_choice=choice), False)
        except ApiError as e:
            assert e.status == 400 and e.message

    check()


# ------------------------------------------------------------------------------------------------- reply
def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("thinking, text, calls", [
    ("", "Paris.", []), ("plan", "Paris.", []), ("only thinking", "", []), ("", "", []),
    ("", "Let me look.", [{"id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}},
                          {"id": "call_2", "function": {"name": "f", "arguments": '{"a": [2, "}"]}'}}]),
    ("plan", "", [{"id": "call_1", "function": {"name": "f", "arguments": "[1]"}}]),
])
def test_streamed_content_is_the_whole_content(thinking, text, calls):
    """Blocks from a whole reply equal those from any split of it into deltas (a call streamed as chat streams it:
    its id and name, then pieces of its arguments); each block starts, grows by deltas that add up to it, and stops,
    one at a time."""
    whole = Content()
    whole.add({"reasoning_content": thinking, "content": text, "tool_calls": calls})
    whole.finish()
    for size in (1, 3, 100):
        streamed, events = Content(), []
        deltas = [{"reasoning_content": r} for r in _split(thinking, size)] + \
                 [{"content": c} for c in _split(text, size)]
        for i, call in enumerate(calls):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                       for piece in _split(call["function"]["arguments"], size)]
        for delta in deltas:
            events += streamed.add(delta)
        events += streamed.finish()
        assert _without_ids(streamed.blocks) == _without_ids(whole.blocks)
        _check_blocks(events, streamed.blocks)
    assert [b["type"] for b in whole.blocks] == (["thinking"] if thinking else []) + (["text"] if text else []) + \
        ["tool_use"] * len(calls)
    if calls:
        assert whole.blocks[-1]["input"] == ({"a": [2, "}"]} if len(calls) == 2 else {"arguments": [1]})


def _without_ids(blocks: list[dict]) -> list[dict]:
    return [{k: ("*" if k == "id" else v) for k, v in b.items()} for b in blocks]


def _check_blocks(events: list[dict], blocks: list[dict]) -> None:
    """content_block_start / _delta / _stop events, one block at a time, in index order, adding up to `blocks`."""
    index = -1
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == index + 1
            index = e["index"]
            start = e["content_block"]
            assert start["type"] == blocks[index]["type"]
            grown = {**start, "input": ""} if start["type"] == "tool_use" else dict(start)
        else:
            assert e["index"] == index
        if e["type"] == "content_block_delta":
            kind, delta = blocks[index]["type"], e["delta"]
            key = {"text": "text", "thinking": "thinking", "tool_use": "partial_json"}[kind]
            assert delta["type"] == {"text": "text_delta", "thinking": "thinking_delta",
                                     "tool_use": "input_json_delta"}[kind]
            grown["input" if kind == "tool_use" else key] += delta[key]
        if e["type"] == "content_block_stop":
            if grown["type"] == "tool_use":
                grown["input"] = json.loads(grown["input"])
            assert grown == blocks[index]
    assert index == len(blocks) - 1


def test_stop_reasons_and_error_body():
    assert stop_reason("tool_calls", None, None) == ("tool_use", None)
    assert stop_reason("length", None, ["x"]) == ("max_tokens", None)
    assert stop_reason("stop", "\n\n", ["\n\n"]) == ("stop_sequence", "\n\n")
    assert stop_reason("stop", 2, ["\n\n"]) == ("end_turn", None)  # an end token
    assert stop_reason("stop", None, None) == ("end_turn", None)
    assert error_body(404, "no") == {"type": "error", "error": {"type": "not_found_error", "message": "no"}}
    assert error_body(503, "x")["error"]["type"] == "api_error"


# ----------------------------------------------------------------------------- a scripted fake engine, real app
def _post(client, body: dict, path: str = "/v1/messages", **kw):
    return client.post(path, json={"model": "fake", "max_tokens": 200, **body}, **kw)


def _events(client, body: dict) -> list[tuple[str, dict]]:
    """A streamed message's (event name, data) pairs, checking each `event:` line names its data's type."""
    events = []
    with client.stream("POST", "/v1/messages", json={"model": "fake", "max_tokens": 200, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                assert events[-1][1]["type"] == name
    return events


def _check_stream(events: list[tuple[str, dict]], whole: dict) -> None:
    """Anthropic's order, and the stream adds up to the whole message (ids aside)."""
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert set(names[1:-2]) <= {"content_block_start", "content_block_delta", "content_block_stop"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert {k: start[k] for k in ("type", "role", "model")} == {k: whole[k] for k in ("type", "role", "model")}
    _check_blocks([e for _, e in events[1:-2]], whole["content"] if not any(
        b["type"] == "tool_use" for b in whole["content"]) else _ids_from(events, whole["content"]))
    delta = events[-2][1]
    assert (delta["delta"]["stop_reason"], delta["delta"]["stop_sequence"]) == (whole["stop_reason"],
                                                                                whole["stop_sequence"])
    assert delta["usage"] == whole["usage"]


def _ids_from(events, blocks: list[dict]) -> list[dict]:
    """`blocks` with the stream's tool_use ids (each message makes its own)."""
    ids = {e["index"]: e["content_block"]["id"] for _, e in events if e["type"] == "content_block_start"
           and e["content_block"]["type"] == "tool_use"}
    return [{**b, "id": ids[i]} if i in ids else b for i, b in enumerate(blocks)]


def test_fake_reply_whole_and_streamed(fake):
    client, engine = fake("Bonjour. Au revoir.")
    body = {"system": "be kind", "messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "u"}}
    r = _post(client, body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert engine.prompts[-1] == "<system>be kind<user>hi<assistant>"
    assert whole["id"].startswith("msg_") and (whole["type"], whole["role"], whole["model"]) == (
        "message", "assistant", "fake")
    assert whole["content"] == [{"type": "text", "text": "Bonjour. Au revoir."}]
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("end_turn", None)
    prompt_len = len(engine.prompts[-1])
    assert whole["usage"] == {"input_tokens": prompt_len, "output_tokens": 19, "cache_read_input_tokens": 0,
                              "cache_creation_input_tokens": 0}
    _check_stream(_events(client, body), whole)
    short = _post(client, {**body, "max_tokens": 3}).json()
    assert short["stop_reason"] == "max_tokens" and short["content"] == [{"type": "text", "text": "Bon"}]
    _check_stream(_events(client, {**body, "max_tokens": 3}), short)
    count = _post(client, body, "/v1/messages/count_tokens")
    assert count.json() == {"input_tokens": prompt_len}
    assert client.post("/v1/messages/count_tokens", json={"model": "fake", **body}).json() == count.json()


def test_fake_thinking_and_tool_use(fake):
    """The reasoning parser's thinking is a thinking block; a Hermes <tool_call> is a tool_use block with parsed
    input (stop_reason tool_use), streamed as input_json_delta; its tool_result continues the conversation."""
    client, _ = fake("<think>plan</think>The answer.", reasoning_parser="qwen3")
    body = {"messages": [{"role": "user", "content": "q"}]}
    whole = _post(client, body).json()
    assert whole["content"] == [{"type": "thinking", "thinking": "plan", "signature": ""},
                                {"type": "text", "text": "The answer."}]
    _check_stream(_events(client, body), whole)

    client, engine = fake(CALL)
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER]}
    whole = _post(client, body).json()
    [block] = whole["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_") and block["name"] == "get_weather"
    assert block["input"] == {"city": "Paris"} and whole["stop_reason"] == "tool_use"
    events = _events(client, body)
    _check_stream(events, whole)
    assert {e["delta"]["type"] for _, e in events if e["type"] == "content_block_delta"} == {"input_json_delta"}
    after = _post(client, {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": whole["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "21C"}]}]})
    assert after.status_code == 200, after.text
    assert engine.prompts[-1] == "<user>weather?<assistant><tool>21C<assistant>"
    two = fake(CALL + CALL.replace("Paris", "Oslo"))[0]
    assert len(_post(two, body).json()["content"]) == 2
    one = _post(two, {**body, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}).json()
    assert [b["input"] for b in one["content"]] == [{"city": "Paris"}]


def test_fake_refusals_are_anthropic_errors(fake):
    client, _ = fake("ok")
    hi = [{"role": "user", "content": "x"}]
    for body, status, words in [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, ".source: expected"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]}]},
         400, "takes no images"),
        ({"messages": hi, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "server tools"),
        ({"model": "fake", "messages": hi, "whole": True}, 400, "max_tokens: required field is missing"),
        ({"messages": []}, 400, "messages"),
        ({"messages": hi, "max_tokens": "5"}, 400, "max_tokens"),
        ({"messages": hi, "model": "other"}, 404, "model 'other' does not exist"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, "prompt has"),
        ({"messages": hi, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400,
         "no tool named 'nope'"),
    ]:
        whole = body.pop("whole", False)
        r = client.post("/v1/messages", json=body if whole else {"model": "fake", "max_tokens": 64, **body})
        assert r.status_code == status, r.text
        assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}, r.text
        assert words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    for raw in (b"not json", b"[1]"):
        r = client.post("/v1/messages", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _post(client, {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "/v1/messages/count_tokens")
    assert r.status_code == 400 and ".source: expected" in r.json()["error"]["message"]


def test_fake_stream_error_event():
    """A request the engine aborts mid-stream (a weight update, a shutdown): an `error` event ends the stream."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    app = create_app(AsyncEngine(_AbortingEngine("a long reply")), EngineConfig(server=ServerConfig(model_name="fake")))
    with TestClient(app) as client:
        events = _events(client, {"messages": [{"role": "user", "content": "hi"}]})
    assert [name for name, _ in events] == ["message_start", "content_block_start"] + ["content_block_delta"] * 3 + [
        "error"]
    error = events[-1][1]
    assert error["error"]["type"] == "api_error" and "aborted" in error["error"]["message"]


class _AbortingEngine(_ScriptedEngine):
    """Aborts every request after its third character."""

    def step(self):
        from engine.engine import RequestOutput

        outs = super().step()
        for i, out in enumerate(outs):
            if len(out.token_ids) > 3:
                self.live.pop(out.request_id, None)
                outs[i] = RequestOutput(out.request_id, "", [], True, "abort", out.text, out.token_ids,
                                        out.prompt_tokens, 0)
        return outs


def test_fake_x_api_key_and_bearer():
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    app = create_app(AsyncEngine(_ScriptedEngine("ok")), EngineConfig(server=ServerConfig(model_name="fake")),
                     api_key="k3y")
    body = {"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        for headers in ({"x-api-key": "k3y"}, {"Authorization": "Bearer k3y"}):
            assert client.post("/v1/messages", json=body, headers=headers).status_code == 200
            assert client.post("/v1/chat/completions", json={**body, "max_tokens": 2},
                               headers=headers).status_code == 200
        for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = client.post("/v1/messages", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
            assert r.json()["type"] == "error"
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's body there


def test_router_hashes_the_equivalent_chat_messages():
    """The router routes a Messages body by the chat request it runs as (its system and messages as chat messages),
    in its cache_salt's namespace; a body the replica will refuse routes with no prefix."""
    from engine.router.prompts import RequestTokens, body_route

    tokens = RequestTokens(_ChatTokenizer())
    body = {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "You are a careful assistant. " * 3}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a fruit, please."}]}],
            "cache_salt": "s"}
    chat = {"model": "m", "messages": [{"role": "system", "content": "You are a careful assistant. " * 3},
                                       {"role": "user", "content": "Name a fruit, please."}], "cache_salt": "s"}
    routed = body_route(body, "anthropic", tokens, 16)
    assert routed == body_route(chat, "chat", tokens, 16) and len(routed.block_hashes) > 2
    assert routed != body_route({**chat, "cache_salt": None}, "chat", tokens, 16)
    refused = {**body, "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    assert body_route(refused, "anthropic", tokens, 16).block_hashes == ()


# ------------------------------------------------------------------------------------- SmolLM2, real socket
def _message(http, **fields) -> dict:
    r = http.post("/v1/messages", json={"model": MODEL, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _chat(http, messages: list[dict], **fields) -> dict:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _text(message: dict) -> str:
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


def _model_events(http, body: dict) -> list[tuple[str, dict]]:
    events = []
    with http.stream("POST", "/v1/messages", json={"model": MODEL, "temperature": 0, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


@pytest.mark.slow
def test_model_text_equals_chat_and_streams(http):
    """Greedy: system + messages give the chat endpoint's text for the same conversation; the stream's text deltas add
    up to it; count_tokens is the chat prompt's length."""
    system, question = "Answer in one sentence.", "What is the capital of France?"
    m = _message(http, system=system, max_tokens=24, messages=[{"role": "user", "content": question}])
    chat = _chat(http, [{"role": "system", "content": system}, {"role": "user", "content": question}], max_tokens=24)
    assert _text(m) == chat["choices"][0]["message"]["content"] and _text(m)
    assert m["usage"]["input_tokens"] + m["usage"]["cache_read_input_tokens"] == chat["usage"]["prompt_tokens"]
    assert m["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert m["stop_reason"] == ("end_turn" if chat["choices"][0]["finish_reason"] == "stop" else "max_tokens")
    count = http.post("/v1/messages/count_tokens", json={"model": MODEL, "system": system,
                                                         "messages": [{"role": "user", "content": question}]})
    assert count.json() == {"input_tokens": chat["usage"]["prompt_tokens"]}
    events = _model_events(http, {"system": system, "max_tokens": 24,
                                  "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]})
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [e["delta"]["text"] for _, e in events if e["type"] == "content_block_delta"]
    assert len(deltas) > 1 and "".join(deltas) == _text(m)
    assert events[-2][1]["delta"]["stop_reason"] == m["stop_reason"]
    assert events[-2][1]["usage"]["output_tokens"] == m["usage"]["output_tokens"]


@pytest.mark.slow
def test_model_assistant_prefill_is_continued(http):
    """A conversation ending with the assistant's text is a prefilled reply: the prompt ends inside that message
    (chat's continue_final_message, whose text this equals), and the reply holds only what follows."""
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    m = _message(http, max_tokens=8, messages=messages)
    chat = _chat(http, messages, max_tokens=8, continue_final_message=True)
    assert _text(m) == chat["choices"][0]["message"]["content"] and "Paris" in _text(m), _text(m)
    ids = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                       "continue_final_message": True}).json()["tokens"]
    assert m["usage"]["input_tokens"] + m["usage"]["cache_read_input_tokens"] == len(ids)
    text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe capital of France is"), text
    both = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                   "continue_final_message": True, "add_generation_prompt": True})
    assert both.status_code == 400 and "cannot both be true" in both.json()["error"]["message"]
    user_last = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages[:1], "max_tokens": 4,
                                                        "continue_final_message": True})
    assert user_last.status_code == 400 and "last message must be an assistant's" in user_last.json()["error"]["message"]


@pytest.mark.slow
def test_model_stop_sequences_max_tokens_and_cache(http):
    """A stop sequence the reply reaches ends it with stop_reason stop_sequence; max_tokens with max_tokens; a second
    turn reads the first turn's prompt pages from the prefix cache."""
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    full = _message(http, max_tokens=40, messages=messages)
    assert "5" in _text(full), _text(full)
    stopped = _message(http, max_tokens=40, messages=messages, stop_sequences=["5"])
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "5")
    assert _text(stopped) == _text(full)[:_text(full).index("5")]
    short = _message(http, max_tokens=3, messages=messages)
    assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 3
    first = _message(http, system="You are terse.", max_tokens=16,
                     messages=[{"role": "user", "content": "Name a fruit."}])
    prompt_len = first["usage"]["input_tokens"] + first["usage"]["cache_read_input_tokens"]
    second = _message(http, system="You are terse.", max_tokens=16, messages=[
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": "And a vegetable?"}])
    assert second["usage"]["cache_read_input_tokens"] >= prompt_len // PAGE_SIZE * PAGE_SIZE > 0, second["usage"]


@pytest.mark.slow
def test_model_tool_use_round_trip(http):
    """tool_choice {type: tool} gives a tool_use block whose input follows the schema (streamed as input_json_delta
    too); its tool_result gets a text reply."""
    body = {"max_tokens": 40, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    m = _message(http, **body)
    [block] = m["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and set(block["input"]) == {"city"}
    assert m["stop_reason"] == "tool_use"
    events = _model_events(http, body)
    partial = [e["delta"]["partial_json"] for _, e in events if e["type"] == "content_block_delta"]
    assert len(partial) > 3 and json.loads("".join(partial)) == block["input"]  # streamed as it was written
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    after = _message(http, max_tokens=16, tools=[WEATHER], messages=body["messages"] + [
        {"role": "assistant", "content": m["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                      "content": json.dumps({"temperature_c": 21})}]}])
    assert [b["type"] for b in after["content"]] == ["text"] and _text(after)


@pytest.mark.slow
def test_model_through_the_anthropic_client(server, http):
    """The official client's messages.create (whole and streamed) and count_tokens, over a real socket."""
    anthropic = pytest.importorskip("anthropic")

    client = anthropic.Anthropic(base_url=server, api_key="none", max_retries=0, timeout=300)
    greedy = {"temperature": 0}  # NOTE: sent as extra_body: recent clients dropped the sampling arguments
    question = "What is the capital of France?"
    m = client.messages.create(model=MODEL, max_tokens=16, extra_body=greedy, system="Answer in one word.",
                               messages=[{"role": "user", "content": question}])
    chat = _chat(http, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}],
                 max_tokens=16)
    assert m.content[0].text == chat["choices"][0]["message"]["content"] and m.type == "message"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    with client.messages.stream(model=MODEL, max_tokens=16, extra_body=greedy, system="Answer in one word.",
                                messages=[{"role": "user", "content": question}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == m.content[0].text and final.stop_reason == m.stop_reason
    count = client.messages.count_tokens(model=MODEL, system="Answer in one word.",
                                         messages=[{"role": "user", "content": question}])
    assert count.input_tokens == chat["usage"]["prompt_tokens"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "takes no images" in str(e.value)  # SmolLM2 has no vision tower
