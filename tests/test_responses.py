"""POST /v1/responses (OpenAI's Responses API) on the chat path: request translation and refusals, output items and
stream events, the response store (no model; a scripted fake engine behind the real app); then SmolLM2 behind the
real app on 127.0.0.1, compared with /v1/chat/completions, driven by raw HTTP and by the official `openai` client."""
import copy
import json
import socket
import threading
import time

import httpx
import pytest

from engine.openai_protocol import ApiError, ResponsesRequest
from engine.openai_responses import Output, ResponseStore, chat_request, input_items, input_messages, item_page
from test_server_units import _FakeEngine, _FakeTokenizer  # the fake engine behind the real app

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


def _request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def _refusal(fields: dict, history=()) -> ApiError:
    with pytest.raises(ApiError) as e:
        chat_request(_request(**fields), list(history))
    assert e.value.status == 400
    return e.value


# ---------------------------------------------------------------------------------------------- request
def test_input_items_become_chat_messages():
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                      "function": {"name": "f", "arguments": "{}"}}]}]
    items = [
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "developer", "content": [{"type": "input_text", "text": "be "}, {"type": "input_text", "text": "brief"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call", "call_id": "call_3", "name": "g", "arguments": '{"x": 2}'},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "2"}]},
    ]
    assert input_messages(items, history) == [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": "ok", "tool_calls": [  # text and parallel calls: one assistant turn
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
            {"id": "call_3", "type": "function", "function": {"name": "g", "arguments": '{"x": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "2"},
    ]


def test_request_becomes_a_chat_request():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chat, conversation = chat_request(_request(
        input="c", instructions="terse", max_output_tokens=7, temperature=0, top_p=0.5, stream=True, cache_salt="s",
        tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, user="u"), history)
    assert conversation == history + [{"role": "user", "content": "c"}]  # no instructions: not carried over
    assert [(m.role, m.content) for m in chat.messages] == [("system", "terse"), ("user", "a"), ("assistant", "b"),
                                                           ("user", "c")]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.stream, chat.cache_salt) == (7, 0, 0.5, True, "s")
    assert chat.tools[0].function.name == "get_weather" and chat.tools[0].function.parameters == WEATHER["parameters"]
    assert chat.tool_choice.function.name == "get_weather"
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    chat, _ = chat_request(_request(text={"format": {"type": "json_schema", "name": "x", "schema": schema,
                                                     "strict": True}}), [])
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert chat_request(_request(text={"format": {"type": "json_object"}}), [])[0].response_format == {"type": "json_object"}
    assert chat_request(_request(text={"format": {"type": "text"}}, tool_choice="required", tools=[WEATHER]),
                        [])[0].response_format is None


@pytest.mark.parametrize("fields, message, param", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0]: 'web_search_preview' tools are not supported", "tools"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "'file_search' tools are not supported", "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].name: a function tool needs a name", "tools"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice: 'web_search_preview' is not supported", "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice: 'sometimes' is not supported", "tool_choice"),
    ({"background": True, "store": False}, "background: true needs store: true", "store"),
    ({"background": True, "stream": True}, "background: true with stream: true is not supported", "stream"),
    ({"conversation": "conv_1"}, "conversation: the Conversations API is not supported", "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt: stored prompt templates are not supported", "prompt"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format: type 'grammar' is not supported", "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0]: an input_image part needs an image_url", "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "'input_file' parts", "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]: items of type 'item_reference' are not", "input"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "items of type 'web_search_call'", "input"),
    ({"input": [{"content": "no role"}]}, "input[0]: items of type None", "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role: expected one of user, assistant", "input"),
    ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role: expected one of user, assistant", "input"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
     "input[0]: no function_call with call_id 'call_9'", "input"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id: required", "input"),
])
def test_unsupported_requests_are_refused_by_name(fields, message, param):
    e = _refusal(fields)
    assert message in e.message, e.message
    assert e.param == param


def test_any_json_items_are_a_chat_request_or_a_400():
    """Whatever JSON the items, tools, tool_choice and text hold: a chat request, or an ApiError naming the problem."""
    from hypothesis import given, settings, strategies as st

    words = st.sampled_from(["type", "role", "content", "text", "call_id", "name", "arguments", "output", "message",
                             "function_call", "function_call_output", "input_text", "user", "function", "format",
                             "json_schema", "schema", "reasoning", "x"])
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | words,
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=4),
                               max_leaves=12)
    objects = st.dictionaries(words, json_values, max_size=5)

    @settings(max_examples=300, deadline=None)
    @given(items=st.lists(objects, min_size=1, max_size=4), tools=st.lists(objects, max_size=2),
           choice=st.none() | words | objects, text=st.none() | objects)
    def check(items, tools, choice, text):
        try:
            chat_request(_request(input=items, tools=tools, tool_choice=choice, text=text), [])
        except ApiError as e:
            assert e.status == 400 and e.message

    check()


def test_request_body_validation_names_the_field():
    import pydantic

    from engine.openai_protocol import describe_validation_error

    for body, message in [({"model": "m"}, "input: required field is missing"),
                          ({"model": "m", "input": []}, "input: expected a string or a non-empty list of input items"),
                          ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens: Input should be"),
                          ({"model": "m", "input": "x", "store": "yes"}, "store: Input should be a valid boolean")]:
        with pytest.raises(pydantic.ValidationError) as e:
            ResponsesRequest.model_validate(body)
        assert describe_validation_error(e.value.errors())[0].startswith(message)


# ----------------------------------------------------------------------------------------------- output
def _without_ids(x):
    """Items or events with their generated ids blanked (they differ between two responses)."""
    x = copy.deepcopy(x)
    for obj in x if isinstance(x, list) else [x]:
        for o in (obj, obj.get("item") or {}):
            for key in ("id", "item_id", "call_id"):
                if key in o:
                    o[key] = "*"
    return x


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("reasoning, content, calls, status", [
    ("", "Paris.", [], "completed"),
    ("think first", "Paris.", [], "completed"),
    ("only thinking", "", [], "incomplete"),
    ("", "", [], "completed"),
    ("", "Let me look.", [{"id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}},
                          {"id": "call_2", "function": {"name": "f", "arguments": '{"a": 2}'}}], "completed"),
    ("plan", "", [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}], "completed"),
])
def test_streamed_output_is_the_whole_output(reasoning, content, calls, status):
    """Items built from a whole reply equal those built from any split of it into stream deltas; the events are
    numbered from 0 and each item opens, grows and closes in OpenAI's order."""
    whole = Output()
    whole.add({"reasoning_content": reasoning, "content": content, "tool_calls": calls})
    whole.finish(status)
    for size in (1, 3, 100):
        streamed, events = Output(), []
        deltas = [{"reasoning_content": r} for r in _split(reasoning, size)] + [{"content": c} for c in _split(content, size)]
        for delta in deltas + [{"tool_calls": calls}]:
            events += streamed.add(delta)
        events += streamed.finish(status)
        assert _without_ids(streamed.items) == _without_ids(whole.items)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        _check_event_order(events, streamed.items)
    kinds = [item["type"] for item in whole.items]
    assert kinds == (["reasoning"] if reasoning else []) + (["message"] if content or not calls else []) + \
        ["function_call"] * len(calls)
    assert whole.items[-1]["status"] == status


def test_streamed_logprobs_are_the_whole_replys():
    """The answer's token logprobs: on the output_text part, split over the delta events with their text (a token
    whose text is held back, as a possible stop string, comes with the next text), whole on the done event (with
    the tokens whose text never came)."""
    content = "Paris is big."
    entries = [{"token": c, "logprob": -i / 10, "bytes": [ord(c)], "top_logprobs": []} for i, c in enumerate(content)]
    shown = len(content) - 2  # the last two tokens' text is never shown (a stop string)
    whole = Output(logprobs=True)
    whole.add({"content": content[:shown]}, entries)
    whole_events = whole.finish("completed")
    streamed, events = Output(logprobs=True), []
    texts = [content[i] for i in range(shown)]
    texts[3:6] = ["", "", content[3:6]]  # tokens 3 and 4 held back, shown with token 5
    for i in range(len(content)):
        events += streamed.add({"content": texts[i] if i < shown else ""}, [entries[i]])
    events += streamed.finish("completed")
    assert _without_ids(streamed.items) == _without_ids(whole.items)
    assert streamed.items[0]["content"][0]["logprobs"] == entries
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [e["delta"] for e in deltas] == [c for c in texts if c]
    assert [len(e["logprobs"]) for e in deltas] == [1, 1, 1, 3] + [1] * (len(deltas) - 4)
    assert sum((e["logprobs"] for e in deltas), []) == entries[:shown]
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == entries and whole_events[0]["logprobs"] == entries
    plain = Output()  # not asked for: none kept, empty lists as OpenAI sends them
    events = plain.add({"content": "Hi"}, entries[:2]) + plain.finish("completed")
    assert all(e["logprobs"] == [] for e in events if e["type"].startswith("response.output_text"))
    assert plain.items[0]["content"][0]["logprobs"] == []


def _check_event_order(events: list[dict], items: list[dict]) -> None:
    """Each output item: added, then its parts and deltas, then done with the item as it ended."""
    per_item: dict[int, list[str]] = {}
    for e in events:
        per_item.setdefault(e["output_index"], []).append(e["type"].removeprefix("response."))
    assert sorted(per_item) == list(range(len(items)))
    for index, item in enumerate(items):
        kinds = per_item[index]
        if item["type"] == "function_call":  # its arguments as they were written, then done
            assert kinds[0] == "output_item.added" and kinds[-2:] == ["function_call_arguments.done", "output_item.done"]
            assert set(kinds[1:-2]) == {"function_call_arguments.delta"}
            deltas = "".join(e["delta"] for e in events if e["output_index"] == index and e["type"].endswith(".delta"))
            assert deltas == item["arguments"]
            continue
        text = "output_text" if item["type"] == "message" else "reasoning_text"
        assert kinds[:2] == ["output_item.added", "content_part.added"]
        assert kinds[-3:] == [f"{text}.done", "content_part.done", "output_item.done"]
        assert set(kinds[2:-3]) <= {f"{text}.delta"}
        deltas = "".join(e["delta"] for e in events if e["output_index"] == index and e["type"].endswith(".delta"))
        assert deltas == item["content"][0]["text"]
        assert next(e for e in events if e["output_index"] == index and e["type"] == "response.output_item.done")["item"] == item


def test_store_keeps_the_most_recently_used():
    store = ResponseStore(2)
    for name in "abc":
        store.put({"id": name}, [{"role": "user", "content": name}])
    assert store.get("a") is None and len(store) == 2
    assert store.get("b").conversation == [{"role": "user", "content": "b"}]  # b is now the most recent
    store.put({"id": "d"}, [])
    assert store.get("c") is None and store.get("b") is not None
    assert store.delete("b") and not store.delete("b") and len(store) == 1
    none = ResponseStore(0)
    none.put({"id": "a"}, [])
    assert none.get("a") is None


def test_input_items_get_ids_and_pages():
    [item] = input_items("hi")
    assert item["id"].startswith("msg_") and {k: v for k, v in item.items() if k != "id"} == {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}], "status": "completed"}
    sent = [{"role": "assistant", "content": "a"}, {"type": "function_call", "id": "fc_mine", "call_id": "c",
                                                    "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "1"}, {"type": "reasoning", "summary": []}]
    items = input_items(sent)
    assert sent[0] == {"role": "assistant", "content": "a"}  # the request's items are not changed
    assert [i["id"][:3] for i in items] == ["msg", "fc_", "fco", "rs_"] and items[1]["id"] == "fc_mine"
    assert items[0]["content"] == [{"type": "output_text", "text": "a"}] and "status" not in items[3]
    ids = [i["id"] for i in items]
    page = item_page(items, "desc", 2, None)
    assert [i["id"] for i in page["data"]] == ids[:1:-1] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (ids[3], ids[2])
    page = item_page(items, "desc", 2, page["last_id"])
    assert [i["id"] for i in page["data"]] == ids[1::-1] and page["has_more"] is False
    assert [i["id"] for i in item_page(items, "asc", 20, ids[0])["data"]] == ids[1:]
    assert item_page(items, "asc", 5, ids[3]) == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                                  "has_more": False}
    with pytest.raises(ApiError) as e:
        item_page(items, "asc", 5, "msg_other")
    assert e.value.status == 400 and e.value.param == "after" and "msg_other" in e.value.message


# ----------------------------------------------------------------------------- a scripted fake engine, real app
@pytest.fixture
def fake():
    """-> make(reply, **server config): a TestClient of the real app over a fake engine that answers `reply`."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.server import create_app

    clients = []

    def make(reply: str, **server):
        engine = _ScriptedEngine(reply)
        config = EngineConfig(server=ServerConfig(model_name="fake", api_key=None, **server))
        client = TestClient(create_app(AsyncEngine(engine), config, api_key=None))
        clients.append(client.__enter__())
        return client, engine

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class _ScriptedEngine(_FakeEngine):
    """Answers `reply` to every prompt, one character per step: "stop" at its end, "length" at max_tokens. One token
    per character; chats render as "<role>content" turns."""

    def __init__(self, reply: str):
        super().__init__()
        self.reply = reply
        self.tokenizer = _ChatTokenizer()
        self.max_model_len = 512
        self.adapter_names = []
        self.prompts: list[str] = []  # each request's prompt, as text

    def add_request(self, prompt_ids, params, request_id=None, **kw):
        self.prompts.append("".join(map(chr, prompt_ids)))
        return super().add_request(prompt_ids, params, request_id, **kw)

    def step(self):
        from engine.engine import RequestOutput

        time.sleep(self.step_s)
        self.num_steps += 1
        outs = []
        for rid, (prompt, params, out) in list(self.live.items()):
            out.append(ord(self.reply[len(out)]))
            reason = "stop" if len(out) == len(self.reply) else "length" if len(out) >= params.max_tokens else None
            if reason:
                del self.live[rid]
            outs.append(RequestOutput(rid, chr(out[-1]), [out[-1]], reason is not None, reason, "".join(map(chr, out)),
                                      list(out), len(prompt), 0))
        return outs


class _ChatTokenizer(_FakeTokenizer):
    def encode_chat(self, messages, add_generation_prompt=True, tools=None, **_):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def _events(client, body: dict) -> list[dict]:
    """A streamed response's events, checking each SSE `event:` line names its data's type."""
    events = []
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                assert events[-1]["type"] == name
    return events


def _check_stream(events: list[dict], whole: dict) -> dict:
    """A stream is well formed and ends in the response a non-streamed call gives (ids aside). -> its response."""
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert events[-1]["type"] == f"response.{final['status']}"
    assert {e["response"]["id"] for e in (events[0], events[1], events[-1])} == {final["id"]}
    _check_event_order(events[2:-1], final["output"])
    assert _without_ids(final["output"]) == _without_ids(whole["output"])
    assert {k: v for k, v in final.items() if k not in ("id", "created_at", "output")} == \
        {k: v for k, v in whole.items() if k not in ("id", "created_at", "output")}
    return final


def test_fake_reply_whole_and_streamed(fake):
    client, engine = fake("Bonjour.")
    body = {"model": "fake", "input": "hi", "instructions": "be kind", "metadata": {"k": "v"}}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert engine.prompts[-1] == "<system>be kind<user>hi<assistant>"
    assert whole["object"] == "response" and whole["id"].startswith("resp_") and whole["status"] == "completed"
    [message] = whole["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Bonjour.", "annotations": [], "logprobs": []}]
    prompt_len = len(engine.prompts[-1])
    assert whole["usage"] == {"input_tokens": prompt_len, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": prompt_len + 8}
    assert (whole["instructions"], whole["metadata"], whole["store"], whole["temperature"], whole["tools"],
            whole["previous_response_id"], whole["incomplete_details"]) == ("be kind", {"k": "v"}, True, 1.0, [], None, None)
    _check_stream(_events(client, body), whole)
    short = client.post("/v1/responses", json={**body, "max_output_tokens": 3}).json()
    assert short["status"] == "incomplete" and short["incomplete_details"] == {"reason": "max_output_tokens"}
    assert short["output"][0]["status"] == "incomplete" and short["output"][0]["content"][0]["text"] == "Bon"
    _check_stream(_events(client, {**body, "max_output_tokens": 3}), short)


def test_fake_reasoning_and_tool_calls(fake):
    """The reasoning parser's thinking is a reasoning item (its tokens in usage); Hermes <tool_call> blocks are
    function_call items, their arguments streamed as they are written."""
    client, _ = fake("<think>plan</think>The answer.", reasoning_parser="qwen3")
    whole = client.post("/v1/responses", json={"model": "fake", "input": "q"}).json()
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["output"][0]["content"] == [{"type": "reasoning_text", "text": "plan"}]
    assert whole["output"][1]["content"][0]["text"] == "The answer."
    assert whole["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    _check_stream(_events(client, {"model": "fake", "input": "q"}), whole)

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    client, engine = fake(call)
    body = {"model": "fake", "input": "weather?", "tools": [WEATHER]}
    whole = client.post("/v1/responses", json=body).json()
    [item] = whole["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather" and item["call_id"].startswith("call_")
    assert json.loads(item["arguments"]) == {"city": "Paris"} and whole["tool_choice"] == "auto"
    events = _events(client, body)
    _check_stream(events, whole)
    kinds = [e["type"].removeprefix("response.function_call_arguments.") for e in events if "function_call" in e["type"]]
    assert kinds == ["delta"] * (len(kinds) - 1) + ["done"] and len(kinds) > 3  # the arguments as they were written
    # The call's output continues the conversation; its text reaches the template as a tool message.
    after = client.post("/v1/responses", json={"model": "fake", "previous_response_id": whole["id"], "input": [
        {"type": "function_call_output", "call_id": item["call_id"], "output": "21C"}]})
    assert after.status_code == 200, after.text
    assert engine.prompts[-1] == "<user>weather?<assistant><tool>21C<assistant>"


def test_fake_conversation_state_get_and_delete(fake):
    client, engine = fake("ok", max_stored_responses=2)
    first = client.post("/v1/responses", json={"model": "fake", "input": "one", "instructions": "A"}).json()
    second = client.post("/v1/responses", json={"model": "fake", "input": "two", "instructions": "B",
                                                "previous_response_id": first["id"]}).json()
    assert engine.prompts[-1] == "<system>B<user>one<assistant>ok<user>two<assistant>"  # A is not carried over
    assert second["previous_response_id"] == first["id"]
    third = client.post("/v1/responses", json={"model": "fake", "previous_response_id": second["id"], "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "three"}]}]}).json()
    assert engine.prompts[-1] == "<user>one<assistant>ok<user>two<assistant>ok<user>three<assistant>"
    assert client.get(f"/v1/responses/{third['id']}").json() == third
    gone = client.get(f"/v1/responses/{first['id']}")  # server.max_stored_responses=2: the oldest went
    assert gone.status_code == 404 and first["id"] in gone.json()["error"]["message"]
    assert gone.json()["error"]["code"] == "response_not_found"
    assert client.delete(f"/v1/responses/{third['id']}").json() == {"id": third["id"], "object": "response",
                                                                     "deleted": True}
    assert client.delete(f"/v1/responses/{third['id']}").status_code == 404
    r = client.post("/v1/responses", json={"model": "fake", "input": "x", "previous_response_id": third["id"]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert third["id"] in r.json()["error"]["message"]
    unstored = client.post("/v1/responses", json={"model": "fake", "input": "x", "store": False}).json()
    assert unstored["store"] is False and client.get(f"/v1/responses/{unstored['id']}").status_code == 404


def test_fake_input_items_list_a_stored_responses_input(fake):
    client, _ = fake("ok")
    first = client.post("/v1/responses", json={"model": "fake", "input": "one"}).json()
    sent = [{"role": "user", "content": f"m{i}"} for i in range(25)]
    second = client.post("/v1/responses", json={"model": "fake", "input": sent, "previous_response_id": first["id"],
                                                 "instructions": "not an item"}).json()
    url = f"/v1/responses/{second['id']}/input_items"
    page = client.get(url).json()  # newest first, 20 at a time; only this turn's input
    texts = [item["content"][0]["text"] for item in page["data"]]
    assert page["object"] == "list" and texts == [f"m{i}" for i in range(24, 4, -1)] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
    rest = client.get(url, params={"after": page["last_id"]}).json()
    assert [item["content"][0]["text"] for item in rest["data"]] == ["m4", "m3", "m2", "m1", "m0"]
    assert rest["has_more"] is False
    asc = client.get(url, params={"order": "asc", "limit": 3}).json()
    assert [item["id"] for item in asc["data"]] == [item["id"] for item in rest["data"][::-1][:3]]
    assert client.get(url, params={"order": "asc", "limit": 3}).json() == asc  # ids are stored, not made per call
    [item] = client.get(f"/v1/responses/{first['id']}/input_items").json()["data"]
    assert item["role"] == "user" and item["content"] == [{"type": "input_text", "text": "one"}]
    for params, param in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg_none"}, "after")]:
        r = client.get(url, params=params)
        assert r.status_code == 400 and param in r.json()["error"]["message"], r.text
    gone = client.get("/v1/responses/resp_none/input_items")
    assert gone.status_code == 404 and "resp_none" in gone.json()["error"]["message"]
    assert gone.json()["error"]["code"] == "response_not_found"
    unstored = client.post("/v1/responses", json={"model": "fake", "input": "x", "store": False}).json()
    assert client.get(f"/v1/responses/{unstored['id']}/input_items").status_code == 404


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _poll(client, response_id: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (got := client.get(f"/v1/responses/{response_id}").json())["status"] == "in_progress":
        assert time.monotonic() < deadline, got
        time.sleep(0.02)
    return got


def test_fake_background_responses_are_polled_cancelled_and_continued(fake):
    """background: true returns the response in_progress at once; GET shows it so until it is the response a
    foreground call gives (and it continues a conversation like one); cancel aborts the engine's request and leaves
    it "cancelled" (a finished one is returned as it is); a conversation cannot continue an unfinished response, a
    foreground one cannot be cancelled, and deleting an unfinished one stops it."""
    client, engine = fake("The answer is 42.")
    body = {"model": "fake", "input": "question", "temperature": 0}
    fg = client.post("/v1/responses", json=body).json()
    started = client.post("/v1/responses", json={**body, "background": True}).json()
    assert started["status"] == "in_progress" and started["background"] is True and started["output"] == []
    assert client.get(f"/v1/responses/{started['id']}/input_items").json()["data"][0]["content"][0]["text"] == "question"
    done = _poll(client, started["id"])
    assert done["status"] == "completed" and done["background"] is True
    assert _without_ids(done["output"]) == _without_ids(fg["output"]) and done["usage"] == fg["usage"]
    assert client.post(f"/v1/responses/{done['id']}/cancel").json() == done  # finished: as it is
    after = client.post("/v1/responses", json={**body, "input": "and?", "previous_response_id": done["id"]})
    assert after.status_code == 200 and "The answer is 42." in engine.prompts[-1]

    engine.step_s = 0.05  # 17 characters: ~0.85 s
    slow = client.post("/v1/responses", json={**body, "background": True}).json()
    r = client.post("/v1/responses", json={**body, "input": "x", "previous_response_id": slow["id"]})
    assert r.status_code == 400 and "has not finished" in r.json()["error"]["message"]
    aborted = engine.num_aborted
    cancelled = client.post(f"/v1/responses/{slow['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["id"] == slow["id"]
    _until(lambda: engine.num_aborted == aborted + 1 and not engine.live)  # the engine thread takes the abort
    assert client.get(f"/v1/responses/{slow['id']}").json() == cancelled
    r = client.post(f"/v1/responses/{fg['id']}/cancel")
    assert r.status_code == 400 and "only those can be cancelled" in r.json()["error"]["message"]
    assert client.post("/v1/responses/resp_none/cancel").status_code == 404
    gone = client.post("/v1/responses", json={**body, "background": True}).json()
    assert client.delete(f"/v1/responses/{gone['id']}").json()["deleted"] is True
    assert client.get(f"/v1/responses/{gone['id']}").status_code == 404
    _until(lambda: engine.num_aborted == aborted + 2 and not engine.live)


def test_fake_parallel_tool_calls_false_keeps_the_first_call(fake):
    calls = "".join(f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}</tool_call>'
                    for city in ("Paris", "Oslo"))
    client, engine = fake(calls)
    body = {"model": "fake", "input": "weather?", "tools": [WEATHER]}
    both = client.post("/v1/responses", json=body).json()
    assert [json.loads(item["arguments"])["city"] for item in both["output"]] == ["Paris", "Oslo"]
    one = client.post("/v1/responses", json={**body, "parallel_tool_calls": False}).json()
    [item] = one["output"]
    assert item["type"] == "function_call" and json.loads(item["arguments"]) == {"city": "Paris"}
    assert one["parallel_tool_calls"] is False
    events = _events(client, {**body, "parallel_tool_calls": False})
    assert _without_ids(_check_stream(events, one)["output"]) == _without_ids(one["output"])
    # The stored conversation holds the one call, and its output continues it.
    after = client.post("/v1/responses", json={"model": "fake", "previous_response_id": one["id"], "input": [
        {"type": "function_call_output", "call_id": item["call_id"], "output": "21C"}]})
    assert after.status_code == 200, after.text
    assert engine.prompts[-1].count("<tool>") == 1


def test_fake_refusals_are_openai_errors(fake):
    client, _ = fake("ok")
    for body, status, words in [
        ({"model": "fake", "input": "x", "tools": [{"type": "web_search"}]}, 400, "'web_search' tools are not supported"),
        ({"model": "fake", "input": "x", "background": True, "store": False}, 400, "needs store: true"),
        ({"model": "fake", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "'input_audio' parts"),
        ({"model": "fake", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
         400, "this model takes no images"),
        ({"model": "fake", "input": "x", "max_output_tokens": "5"}, 400, "max_output_tokens"),
        ({"model": "other", "input": "x"}, 404, "model 'other' does not exist"),
        ({"model": "fake", "input": "x" * 600}, 400, "prompt has"),
        ({"model": "fake", "input": "x", "top_logprobs": 21}, 400, "top_logprobs"),
    ]:
        r = client.post("/v1/responses", json=body)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert words in r.json()["error"]["message"], r.text
    client, _ = fake("ok", reasoning_parser="qwen3")
    r = client.post("/v1/responses", json={"model": "fake", "input": "x", "include": ["message.output_text.logprobs"]})
    assert r.status_code == 400 and "server.reasoning_parser" in r.json()["error"]["message"], r.text


def test_fake_batch_file_line():
    """An OpenAI Batch file's /v1/responses line is answered by the endpoint, in process."""
    import asyncio

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ServerConfig
    from engine.openai_batch import parse_line, run
    from engine.server import create_app

    app = create_app(AsyncEngine(_ScriptedEngine("ok")), EngineConfig(server=ServerConfig(model_name="fake")))
    line = parse_line(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/responses",
                                  "body": {"model": "fake", "input": "hi"}}), 1)
    records = []
    assert asyncio.run(run(app, [line], records.append, concurrency=1))
    [record] = records
    assert record["custom_id"] == "a" and record["response"]["status_code"] == 200
    assert record["response"]["body"]["output"][0]["content"][0]["text"] == "ok"


# ------------------------------------------------------------------------------------- SmolLM2, real socket
MODEL = "smollm2-135m-instruct"
PAGE_SIZE = 16
# test_server.py's, so the persistent compilation cache serves both
OVERRIDES = ["scheduler.max_batch_tokens=64", "scheduler.max_running=8", "cache.num_pages=256",
             "model.max_model_len=512", f"cache.page_size={PAGE_SIZE}", "server.max_body_bytes=65536",
             "warmup=false"]  # (the API formats under test need no warm-up; test_server's server compiles it)


@pytest.fixture(scope="module")
def server():
    """SmolLM2 behind the real app, under uvicorn in a thread of this process, on a free loopback port."""
    import uvicorn

    from engine.async_engine import AsyncEngine
    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.server import create_app

    config = load_config("configs/serve-smollm2.yaml", OVERRIDES)
    app = create_app(AsyncEngine(LLMEngine(config, progress=False)), config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        yield c


def _chat(http, messages: list[dict], **fields) -> dict:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _respond(http, **fields) -> dict:
    r = http.post("/v1/responses", json={"model": MODEL, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"])


@pytest.mark.slow
def test_model_input_and_instructions_equal_chat(http):
    """Greedy: a string input is the chat's user message, instructions its system message; streamed deltas add up to
    the same text and the stream ends in the same response."""
    question = "What is the capital of France?"
    r = _respond(http, input=question, max_output_tokens=20)
    chat = _chat(http, [{"role": "user", "content": question}], max_tokens=20)
    assert _text(r) == chat["choices"][0]["message"]["content"] and _text(r)
    assert r["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert r["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    terse = _respond(http, input=question, instructions="Answer in one word.", max_output_tokens=12)
    chat = _chat(http, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}],
                 max_tokens=12)
    assert _text(terse) == chat["choices"][0]["message"]["content"]
    events = _events(http, {"model": MODEL, "temperature": 0, "input": question, "max_output_tokens": 20})
    final = _check_stream(events, r | {"usage": events[-1]["response"]["usage"]})
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == _text(final) == _text(r)


@pytest.mark.slow
def test_model_logprobs_equal_chat(http):
    """include message.output_text.logprobs with top_logprobs: the answer's token logprobs are chat's for the same
    messages, on the output_text part and, streamed, over its delta events."""
    question = "Name three colors."
    r = _respond(http, input=question, max_output_tokens=10, include=["message.output_text.logprobs"], top_logprobs=3)
    chat = _chat(http, [{"role": "user", "content": question}], max_tokens=10, logprobs=True, top_logprobs=3)
    got, want = r["output"][0]["content"][0]["logprobs"], chat["choices"][0]["logprobs"]["content"]
    assert len(got) == 10 and [e["token"] for e in got] == [e["token"] for e in want]
    assert [e["bytes"] for e in got] == [e["bytes"] for e in want]
    for g, w in zip(got, want):
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [t["token"] for t in g["top_logprobs"]] == [t["token"] for t in w["top_logprobs"]]
        assert len(g["top_logprobs"]) == 3
    events = _events(http, {"model": MODEL, "temperature": 0, "input": question, "max_output_tokens": 10,
                            "top_logprobs": 3})  # top_logprobs alone asks for them too
    streamed = sum((e["logprobs"] for e in events if e["type"] == "response.output_text.delta"), [])
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert [e["token"] for e in streamed] == [e["token"] for e in done["logprobs"]] == [e["token"] for e in got]


@pytest.mark.slow
def test_model_previous_response_id_equals_chat_and_hits_the_cache(http):
    """Two turns by previous_response_id: the second turn's text is the chat endpoint's on the whole conversation,
    and the prefix cache served at least the first turn's prompt pages."""
    first = _respond(http, input="Name a fruit.", instructions="You are terse.", max_output_tokens=16)
    second = _respond(http, input="And a vegetable?", instructions="You are terse.", max_output_tokens=16,
                      previous_response_id=first["id"])
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": _text(first)}, {"role": "user", "content": "And a vegetable?"}]
    chat = _chat(http, messages, max_tokens=16)
    assert _text(second) == chat["choices"][0]["message"]["content"]
    assert second["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"] // PAGE_SIZE * PAGE_SIZE > 0, (cached, first["usage"])


@pytest.mark.slow
def test_model_json_schema_and_incomplete(http):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = _respond(http, input="Weather in Paris, as JSON.", max_output_tokens=48,
                 text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert r["status"] == "completed" and set(json.loads(_text(r))) == {"city", "sunny"}
    assert r["text"]["format"]["name"] == "weather"
    short = _respond(http, input="Tell me a long story.", max_output_tokens=3)
    assert short["status"] == "incomplete" and short["incomplete_details"] == {"reason": "max_output_tokens"}
    assert short["usage"]["output_tokens"] == 3 and short["output"][0]["status"] == "incomplete"


@pytest.mark.slow
def test_model_function_call_round_trip(http):
    """A named tool_choice gives a function_call held to the schema (streamed as argument events too); its output,
    sent back with previous_response_id, gets a text reply."""
    first = _respond(http, input="What is the weather in Paris?", tools=[WEATHER], max_output_tokens=40,
                     tool_choice={"type": "function", "name": "get_weather"})
    [call] = first["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert set(json.loads(call["arguments"])) == {"city"}
    events = _events(http, {"model": MODEL, "temperature": 0, "input": "What is the weather in Paris?",
                            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
                            "max_output_tokens": 40})
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == call["arguments"] and done["name"] == "get_weather"
    second = _respond(http, previous_response_id=first["id"], tools=[WEATHER], max_output_tokens=16, input=[
        {"type": "function_call_output", "call_id": call["call_id"], "output": json.dumps({"temperature_c": 21})}])
    assert [item["type"] for item in second["output"]] == ["message"] and _text(second)


@pytest.mark.slow
def test_model_get_delete_and_unknown_ids(http):
    r = _respond(http, input="Hi!", max_output_tokens=4, metadata={"run": "7"})
    assert http.get(f"/v1/responses/{r['id']}").json() == r
    assert http.delete(f"/v1/responses/{r['id']}").json()["deleted"] is True
    for response in (http.get(f"/v1/responses/{r['id']}"), http.delete(f"/v1/responses/{r['id']}"),
                     http.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": r["id"]})):
        assert response.status_code == 404 and r["id"] in response.json()["error"]["message"]
    r = http.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [{"type": "file_search"}]})
    assert r.status_code == 400 and "'file_search' tools are not supported" in r.json()["error"]["message"]


@pytest.mark.slow
def test_model_through_the_openai_client(server, http):
    """The official client's responses.create / retrieve / delete / cancel (background: true) and its typed stream, over
    a real socket."""
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    question = "What is the capital of France?"
    r = client.responses.create(model=MODEL, input=question, instructions="Answer in one word.", max_output_tokens=12,
                                temperature=0)
    chat = _chat(http, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}],
                 max_tokens=12)
    assert r.output_text == chat["choices"][0]["message"]["content"] and r.status == "completed"
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    follow = client.responses.create(model=MODEL, input="Why?", previous_response_id=r.id, max_output_tokens=8,
                                     temperature=0, instructions="Answer in one word.")  # (not carried over)
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(follow.id).output_text == follow.output_text
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)
    stream = client.responses.create(model=MODEL, input=question, instructions="Answer in one word.",
                                     max_output_tokens=12, temperature=0, stream=True)
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    started = client.responses.create(model=MODEL, input=question, instructions="Answer in one word.",
                                      max_output_tokens=12, temperature=0, background=True)
    assert started.status == "in_progress" and started.background
    _until(lambda: client.responses.retrieve(started.id).status != "in_progress", timeout_s=120)
    assert client.responses.retrieve(started.id).output_text == r.output_text
    long = client.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=400, background=True)
    assert client.responses.cancel(long.id).status in ("cancelled", "completed")


def test_truncation_auto_drops_the_oldest_turns(fake):
    """A previous_response_id chain that outgrows the context: "disabled" (the default) is a 400 naming the context;
    "auto" drops whole turns from the oldest until the prompt fits, keeping the instructions and this turn's input,
    and the next turn continues from the shortened conversation. An input that alone does not fit stays a 400."""
    client, engine = fake("r" * 40)
    body = {"model": "fake", "instructions": "sys", "max_output_tokens": 40}
    previous = None
    for i in range(12):  # each turn adds ~60 tokens; the context is 512
        r = client.post("/v1/responses", json={**body, "input": f"question {i} " + "q" * 10,
                                               "previous_response_id": previous, "truncation": "auto"})
        assert r.status_code == 200, r.text
        previous = r.json()["id"]
        prompt = engine.prompts[-1]
        assert prompt.startswith("<system>sys<user>") and prompt.endswith(f"question {i} " + "q" * 10 + "<assistant>")
        assert len(prompt) + 40 <= 512 and r.json()["truncation"] == "auto"
    assert "<user>question 0 " not in prompt and "<user>question 7 " in prompt  # the oldest went, the recent stayed
    refused = client.post("/v1/responses", json={**body, "input": "next", "previous_response_id": previous,
                                                 "max_output_tokens": 200})
    assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]
    alone = client.post("/v1/responses", json={**body, "input": "x" * 600, "truncation": "auto"})
    assert alone.status_code == 400 and alone.json()["error"]["code"] == "context_length_exceeded"
