"""Tool (function) calling for the chat API: the constraint a `tool_choice` implies, and the calls in a reply.

- `tool_choice` names a function: the reply is that function's arguments, held to its `parameters` schema
  by structured outputs, so any model produces a valid call.
- "required": the reply is a JSON list of one or more {"name", "arguments"} objects, each name one of the
  tools and its arguments that tool's schema (parallel calls).
- "auto": the model chooses; calls are read from `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  blocks (the Hermes format of Qwen 2.5/3, Hermes and SmolLM3 templates), or from GLM-4.5's
  `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>` (each value a string where the
  tool's schema says string, else read as JSON where it parses), or Qwen3-Coder's
  `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function></tool_call>` (values as GLM's), or from
  DeepSeek's `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ```json ARGS ```<｜tool▁call▁end｜>` (V3, R1; V3.1
  without `function` and the fence), its `<｜tool▁calls▁begin｜>` / `<｜tool▁calls▁end｜>` around them dropped, or
  Kimi K2's `<|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>ARGS<|tool_call_end|>` (the id
  `functions.NAME:INDEX` kept as the call's), its `<|tool_calls_section_begin|>` / `_end|>` dropped, or MiniMax-M2's
  `<invoke name="NAME"><parameter name="KEY">VALUE</parameter>...</invoke>` (values as GLM's), its
  `<minimax:tool_call>` / `</minimax:tool_call>` around them dropped; the rest is content; or,
  when the whole reply is JSON calls, from it: `{"name": ..., "parameters": ...}` (Llama 3.1-3.3, several
  separated by ";"), `[{"name": ..., "arguments": ...}, ...]` (Mistral, after `[TOOL_CALLS]`), optionally
  after the `<|python_tag|>` / `[TOOL_CALLS]` markers when they are kept as text; or from Mistral's later calls
  (tokenizer v11 on: Mistral Small 3.2, Devstral, Magistral), each `[TOOL_CALLS]NAME[ARGS]{...}` (v13:
  `[TOOL_CALLS]NAME[CALL_ID]ID[ARGS]{...}`, the id kept as the call's), the text before the first content; or, when
  the whole reply is a Python list of calls with keyword arguments (Llama 3.2's and Llama 4's "pythonic" format,
  optionally inside `<|python_start|>` ... `<|python_end|>`), `[get_weather(city="Paris"), get_time()]`, each value a
  Python literal.
- "none" (or no tools): a plain reply.

Streamed (`ToolCallStream`), a call goes out as it is written, as OpenAI streams them: its id and name once the
name is read, then its arguments piece by piece. Content streams around `<tool_call>` blocks; whole-reply JSON
calls stream once an object names a tool (until then the reply is held, and parsed whole when it ends). On valid
replies the stream's calls and content are `parse`'s (the content up to surrounding whitespace); where JSON breaks
after a call began to stream, the call stays and what follows is content, where `parse` would keep no call.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from engine.output import partial_stop_len
from engine.request import RequestError, StructuredOutput

# A call block's opening tag -> its closing one: Hermes' (Qwen, GLM-4.5, Qwen3-Coder), DeepSeek-V3's and Kimi K2's
# (special tokens), MiniMax-M2's (each <invoke> one call; several may share one <minimax:tool_call>)
BLOCK_TAGS = {"<tool_call>": "</tool_call>", "<｜tool▁call▁begin｜>": "<｜tool▁call▁end｜>",
              "<|tool_call_begin|>": "<|tool_call_end|>", "<invoke name=": "</invoke>"}
_BLOCK = re.compile("|".join(rf"{re.escape(o)}\s*(.*?)\s*{re.escape(c)}" for o, c in BLOCK_TAGS.items()), re.S)
# DeepSeek's, Kimi K2's and MiniMax-M2's around their blocks: never content
_WRAPPERS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
             "<minimax:tool_call>", "</minimax:tool_call>")
_MARKUP = (*BLOCK_TAGS, *_WRAPPERS)
# A call object's start when its name comes first, up to the first character of its arguments.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]")  # Llama 3, Mistral: what precedes their calls
# Mistral's calls from tokenizer v11 on, each after its own [TOOL_CALLS]: the name, v13's call id, the JSON arguments
_MISTRAL = "[TOOL_CALLS]"
_MISTRAL_CALL = re.compile(r"\s*([^\s\[]+)\s*(?:\[CALL_ID\]\s*([^\s\[]+)\s*)?\[ARGS\](.*)", re.S)
_PYTHONIC_WRAP = ("<|python_start|>", "<|python_end|>")  # Llama 4's, around pythonic calls
_BARE_STARTS = (*_MARKERS, _PYTHONIC_WRAP[0])  # what begins a reply that is whole-reply calls (with "{" and "[")
_CONTENT_MARKUP = (*_MARKUP, _MISTRAL)  # what a stream in content looks for: blocks, wrappers, Mistral's later calls
# What a reply's calls are read by that a tokenizer may make special tokens (a reply with tools keeps them in its text
# where it does): the blocks' tags, Mistral's markers (its tekken tokenizer's control tokens)
CALL_MARKUP = (*BLOCK_TAGS, _MISTRAL, "[ARGS]", "[CALL_ID]")
# GLM-4.5's block body: the name, then key / value pairs
_XML_CALL = re.compile(r"\s*([^\s<]+)\s*((?:<arg_key>.*?</arg_key>\s*<arg_value>.*?</arg_value>\s*)*)", re.S)
_XML_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
# DeepSeek-V3's / R1's block body (`function`, the name, the arguments in a JSON code fence), and V3.1's (name, arguments)
_DEEPSEEK_CALL = re.compile(r"\s*function<｜tool▁sep｜>([^\s<]+)\s*```(?:json)?\s*(.*?)\s*```\s*", re.S)
_DEEPSEEK_V31_CALL = re.compile(r"\s*([^\s<]+)<｜tool▁sep｜>(.*)", re.S)
# Kimi K2's block body: the call's id (`functions.NAME:INDEX`), then its JSON arguments
_KIMI_CALL = re.compile(r"\s*((?:functions\.)?([^\s:<]+)(?::\d+)?)\s*<\|tool_call_argument_begin\|>(.*)", re.S)
# Qwen3-Coder's block body: <function=NAME> and its <parameter=KEY>VALUE</parameter>s
_FUNCTION_CALL = re.compile(r"\s*<function=([^>\s]+)>\s*((?:<parameter=[^>]+>.*?</parameter>\s*)*)</function>\s*", re.S)
_PARAMETER = re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", re.S)
# MiniMax-M2's block body, after `<invoke name=`: the quoted name, then <parameter name="KEY">VALUE</parameter>s
_INVOKE = re.compile(r'"([^"]+)"\s*>\s*((?:<parameter name="[^"]*">.*?</parameter>\s*)*)', re.S)
_INVOKE_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.S)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class ToolChoice:
    """A chat request's tools and tool_choice: `constraint()` for the engine, `parse(text)` for the reply."""

    def __init__(self, tools: list[dict], choice: str | dict | None):
        self.functions = {t["function"]["name"]: t["function"] for t in tools}
        if len(self.functions) != len(tools):
            raise RequestError("tools: function names must be unique")
        if choice is None:
            choice = "auto" if tools else "none"
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name")
            if name not in self.functions:
                raise RequestError(f"tool_choice: no tool named {name!r} (tools: {', '.join(self.functions) or 'none'})")
            self.mode, self.name = "named", name
        else:
            if choice in ("auto", "required") and not tools:
                raise RequestError(f'tool_choice "{choice}" needs tools')
            self.mode, self.name = choice, None

    @property
    def active(self) -> bool:
        """The reply may be tool calls (so a stream holds its text back until the end)."""
        return self.mode != "none" and bool(self.functions)

    def constraint(self) -> StructuredOutput | None:
        if self.mode == "named":
            return StructuredOutput(json=_parameters(self.functions[self.name]))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _parameters(f)},
                      "required": ["name", "arguments"], "additionalProperties": False}
                     for name, f in self.functions.items()]
            return StructuredOutput(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}})
        return None

    def constrain(self, structured: StructuredOutput | None, own: str) -> StructuredOutput | None:
        """The reply's constraint: the one this tool_choice forces (named, "required"), else `structured`; a request
        with both is refused (`own` names the caller's constraint fields in the message)."""
        forced = self.constraint()
        if forced is None:
            return structured
        if structured is not None:
            raise RequestError(f'tool_choice: "{self.mode}" already constrains the reply; drop {own}')
        return forced

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; content None when the reply is only calls."""
        if not self.active:
            return text, []
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            return None, [ToolCall(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
        for wrapper in _WRAPPERS:
            text = text.replace(wrapper, "")
        calls = []
        for match in _BLOCK.finditer(text):
            call = self._block_call(next(g for g in match.groups() if g is not None))
            if call is not None:
                calls.append(call)
        if calls:
            content = _BLOCK.sub("", text).strip()
            return content or None, calls
        head, calls = self._mistral_calls(text)
        if calls:
            return head.strip() or None, calls
        calls = self._bare_calls(text) or self._pythonic_calls(text)
        return (None, calls) if calls else (text, [])

    def _mistral_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text before the first call, the calls) of Mistral's `[TOOL_CALLS]NAME[(CALL_ID]ID)[ARGS]{...}` calls;
        ("", []) unless every [TOOL_CALLS] starts one (its arguments a JSON object) of a known tool."""
        head, *parts = text.split(_MISTRAL)
        calls = []
        for part in parts:
            m = _MISTRAL_CALL.fullmatch(part)
            if m is None:
                return "", []
            try:
                call = self._call({"name": m.group(1), "arguments": json.loads(m.group(3))})
            except ValueError:
                return "", []
            if call is None:
                return "", []
            calls.append(call if m.group(2) is None else dataclasses.replace(call, id=m.group(2)))
        return head, calls

    def _pythonic_calls(self, text: str) -> list[ToolCall]:
        """Calls when the whole reply is a Python list of calls to known tools with keyword arguments whose values are
        literals (Llama 3.2's / Llama 4's pythonic format; Llama 4's <|python_start|> / <|python_end|> around it);
        anything else: no calls."""
        import ast

        body = text.strip().removeprefix(_PYTHONIC_WRAP[0]).removesuffix(_PYTHONIC_WRAP[1]).strip()
        if not body.startswith("["):
            return []
        try:
            tree = ast.parse(body, mode="eval").body
        except (SyntaxError, ValueError):
            return []
        if not isinstance(tree, ast.List) or not tree.elts:
            return []
        calls = []
        for node in tree.elts:
            if (not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args
                    or node.func.id not in self.functions or any(k.arg is None for k in node.keywords)):
                return []
            try:
                args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError:
                return []
            calls.append(ToolCall(node.func.id, json.dumps(args)))
        return calls

    def _block_call(self, body: str) -> ToolCall | None:
        """The call a block's body holds: a JSON object, GLM-4.5's name and key / value pairs, Qwen3-Coder's
        <function=...> or MiniMax-M2's <invoke name=...> with its parameters, DeepSeek's name and arguments, or Kimi
        K2's id and arguments (the id kept as the call's, as Kimi's template reads it back)."""
        try:
            return self._call(json.loads(body))
        except ValueError:
            pass
        if m := _KIMI_CALL.fullmatch(body):
            try:
                call = self._call({"name": m.group(2), "arguments": json.loads(m.group(3))})
            except ValueError:
                return None
            return None if call is None else dataclasses.replace(call, id=m.group(1))
        for form, parameter in ((_FUNCTION_CALL, _PARAMETER), (_INVOKE, _INVOKE_PARAMETER)):
            if m := form.fullmatch(body):
                # (Qwen3-Coder's template writes each value between newlines: one on each side is markup)
                pairs = [(k, v.removeprefix("\n").removesuffix("\n")) for k, v in parameter.findall(m.group(2))]
                return self._call(self._typed_call(m.group(1), pairs))
        m = _DEEPSEEK_CALL.fullmatch(body) or _DEEPSEEK_V31_CALL.fullmatch(body)
        if m is None:
            m = _XML_CALL.fullmatch(body)
            return None if m is None else self._call(self._typed_call(m.group(1), _XML_ARG.findall(m.group(2))))
        try:
            return self._call({"name": m.group(1), "arguments": json.loads(m.group(2))})
        except ValueError:
            return None

    def _typed_call(self, name: str, pairs: list[tuple[str, str]]) -> dict | None:
        """A call written as key / value text pairs (GLM-4.5's, Qwen3-Coder's, MiniMax-M2's) as {"name", "arguments"}: a value is
        kept as text where the tool's schema types it string (or says nothing), else read as JSON where it parses."""
        if name not in self.functions:
            return None
        properties = _parameters(self.functions[name]).get("properties", {})
        args = {}
        for key, value in pairs:
            key, kind = key.strip(), properties.get(key.strip(), {}).get("type", "string")
            if kind != "string":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            args[key] = value
        return {"name": name, "arguments": args}

    def _call(self, obj: Any) -> ToolCall | None:
        """A call from one parsed {"name", "arguments" | "parameters"} object naming one of the tools."""
        if not isinstance(obj, dict) or obj.get("name") not in self.functions:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))

    def _bare_calls(self, text: str) -> list[ToolCall]:
        """Calls when the whole reply is JSON calls (after an optional marker): objects or lists of objects,
        separated by whitespace, "," or ";". Anything else, or a name that is not a tool: no calls."""
        rest = text.strip()
        for marker in _MARKERS:
            rest = rest.removeprefix(marker).strip()
        decoder, calls = json.JSONDecoder(), []
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                return []
            for item in obj if isinstance(obj, list) else [obj]:
                call = self._call(item)
                if call is None:
                    return []
                calls.append(call)
            rest = rest[end:].lstrip().lstrip(";,").lstrip()
        return calls


class _ValueEnd:
    """Where a JSON object or array that starts at text[0] ends, read as the text grows: brackets counted outside
    strings (escapes honoured)."""

    def __init__(self):
        self.pos, self.depth, self.in_string, self.escaped, self.end = 0, 0, False, False, None

    def scan(self, text: str) -> int | None:
        """-> the offset just past the closing bracket, or None while it has not come; `text` only grows."""
        while self.end is None and self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.pos
        return self.end


class _CallReader:
    """One call object as it is written: once `{"name": <a tool>, "arguments": {` (or `[`) is read, the call's
    header and then its arguments' text as it grows; any other shape is held whole and parsed when it ends."""

    def __init__(self, choice: "ToolChoice"):
        self.choice = choice
        self.call: ToolCall | None = None  # set once streaming
        self.held = False  # the head did not match: parsed when the object ends
        self._args_at = 0
        self._args = _ValueEnd()
        self._sent = 0

    def update(self, text: str) -> tuple[ToolCall | None, str]:
        """The object's text so far -> (the call, when this text began it; its new arguments text)."""
        started = None
        if self.call is None and not self.held:
            m = _HEAD.match(text)
            if m is not None:
                name = json.loads(m.group(1))
                if name in self.choice.functions and text[m.end()] in "{[":
                    self.call = started = ToolCall(name, "")
                    self._args_at = m.end()
                else:
                    self.held = True
        if self.call is None:
            return None, ""
        value = text[self._args_at:]
        end = self._args.scan(value)
        upto = len(value) if end is None else end
        delta, self._sent = value[self._sent:upto], upto
        return started, delta

    def close(self, text: str, block: bool = False) -> tuple[ToolCall | None, str]:
        """The whole object: what `update` has not said yet; a held object becomes a call if it parses as one (a
        `<tool_call>` block's body, `block`, in GLM-4.5's form too)."""
        started, args = self.update(text)
        if self.call is not None:
            return started, args
        if block:
            call = self.choice._block_call(text)
        else:
            try:
                call = self.choice._call(json.loads(text))
            except ValueError:
                call = None
        return (call, call.arguments) if call is not None else (None, "")


def call_index(call: dict, num_seen: int) -> int:
    """Which call a chat `tool_calls` entry adds to, `num_seen` calls seen so far: a stream's entries name it
    (`index`); a whole reply's come one per call, each with its id."""
    return call.get("index", num_seen if "id" in call else num_seen - 1)


class ToolCallStream:
    """One streamed chat choice's answer text in, (content, tool call deltas in OpenAI's stream shape) out, step by
    step. auto: content streams, `<tool_call>` blocks become calls as they are written (a tail that may still become
    the tag waits); a block that is not a call waits, with the content after it, until a call makes it dropped (as
    `parse` drops it) or the end makes it content; a reply that starts like whole-reply JSON calls (`{`, `[`, a
    marker) streams its calls once an object names a tool, and is held until then (parsed whole at the end). named:
    the reply is the arguments. required: a JSON list of calls, each streamed as it is written. `complete` (the
    reply stopped, not cut by the length limit): only then do held replies parse as calls; otherwise what is held
    ends as content."""

    def __init__(self, choice: "ToolChoice"):
        self.choice = choice
        self.text = ""
        self.num_calls = 0
        self._state = {"auto": "start", "named": "named", "required": "list"}[choice.mode]
        self._pos = 0  # text read up to here (content or list scanning)
        self._reader: _CallReader | None = None
        self._block_at = 0  # where the open block's (or list element's) text starts
        self._tag = ""  # the open block's opening tag
        self._element: _ValueEnd | None = None
        self._bare_failed = False  # whole-reply JSON calls: text that is no call came
        self._space = ""  # whitespace after the content sent so far: sent once more content follows
        self._sent_content = False
        self._held: list[tuple[str, str]] | None = None  # ("content" | "block", text) behind a block that is no call

    def feed(self, text: str, finished: bool, complete: bool = True) -> tuple[str, list[dict]]:
        self.text += text
        self._content_out, self._calls_out = [], []
        getattr(self, f"_{self._state}")(finished, complete)
        if finished:
            self._finish(complete)
        return "".join(self._content_out), self._merged_calls()

    # ---- modes
    def _named(self, finished: bool, complete: bool) -> None:
        if self._pos == 0 and self.text:
            self._begin(ToolCall(self.choice.name, ""))
        if len(self.text) > self._pos:
            self._arguments(self.text[self._pos:])
            self._pos = len(self.text)

    def _list(self, finished: bool, complete: bool) -> None:
        self._objects()

    def _objects(self) -> bool:
        """Reads call objects from `_pos` on, separated by whitespace, `,` or `;`, in a list or not, each streamed as it
        is written. -> False once an object is not a call, or other text comes (`_pos` stays at its start)."""
        while True:
            if self._reader is None:
                rest = self.text[self._pos:]
                skipped = len(rest) - len(rest.lstrip(" \t\r\n[],;"))
                if rest[skipped:] and not rest[skipped:].startswith("{"):
                    return False
                self._pos += skipped
                if not rest[skipped:]:
                    return True
                self._reader, self._element, self._block_at = _CallReader(self.choice), _ValueEnd(), self._pos
            element = self.text[self._block_at:]
            end = self._element.scan(element)
            if end is None:
                self._read(self._reader.update(element))
                return True
            started, args = self._reader.close(element[:end])
            if started is None and self._reader.call is None:
                self._reader = None
                return False
            self._read((started, args))
            self._reader, self._pos = None, self._block_at + end

    def _start(self, finished: bool, complete: bool) -> None:
        body = self.text.lstrip()
        if not finished and any(m.startswith(body) for m in _BARE_STARTS):  # a marker may still be arriving
            return
        if body.startswith(("{", "[", *_BARE_STARTS)):
            self._state = "bare"
            rest = body
            for marker in _MARKERS:
                rest = rest.removeprefix(marker).lstrip()
            self._pos = len(self.text) - len(rest)
            self._bare(finished, complete)
        elif body:
            self._state = "content"
            self._content(finished, complete)

    def _bare(self, finished: bool, complete: bool) -> None:
        """Whole-reply JSON calls: each streamed once its object names a tool; until one does, all is held and the
        finished reply parsed whole (calls, or content). After calls, text that is no call ends as content."""
        if not self._bare_failed:
            self._bare_failed = not self._objects()
        if not finished:
            return
        if self.num_calls:
            if self._bare_failed or self._reader is not None and self._reader.call is None:
                self._say(self.text[self._pos:])
            return
        content, calls = self.choice.parse(self.text) if complete else (self.text, [])
        if content:
            self._say(content)
        for call in calls:
            self._read((call, call.arguments))

    def _content(self, finished: bool, complete: bool) -> None:
        while True:
            if self._reader is not None:  # inside a block
                closing = BLOCK_TAGS[self._tag]
                close = self.text.find(closing, self._block_at)
                if close < 0:
                    block = self.text[self._block_at:]
                    self._read(self._reader.update(block[:len(block) - partial_stop_len(block, (closing,))]))
                    return
                block = self.text[self._block_at:close]
                started, args = self._reader.close(block, block=True)
                if started is None and self._reader.call is None:  # not a call
                    if self.num_calls == 0:
                        self._held = (self._held or []) + [("block", self._tag + block + closing)]
                else:
                    self._read((started, args))
                self._reader, self._pos = None, close + len(closing)
                continue
            found = [(at, tag) for tag in _CONTENT_MARKUP if (at := self.text.find(tag, self._pos)) >= 0]
            if not found:
                end = len(self.text) if finished else len(self.text) - partial_stop_len(self.text[self._pos:],
                                                                                        _CONTENT_MARKUP)
                self._plain(self.text[self._pos:end])
                self._pos = end
                return
            opening, tag = min(found)
            self._plain(self.text[self._pos:opening])
            if tag == _MISTRAL:  # Mistral's calls after content: all the rest is held, parsed when the reply ends
                self._state, self._pos = "tail", opening
                return
            if tag in _WRAPPERS:
                self._pos = opening + len(tag)
                continue
            self._reader, self._block_at, self._tag = _CallReader(self.choice), opening + len(tag), tag

    def _tail(self, finished: bool, complete: bool) -> None:
        """Mistral's calls after content: held until the reply ends (`_finish`)."""

    def _finish(self, complete: bool) -> None:
        if self._state == "tail":
            _, calls = self.choice.parse(self.text) if complete else (None, [])
            for call in calls:
                self._read((call, call.arguments))
            if not calls:
                self._plain(self.text[self._pos:])
        if self._state == "content" and self._reader is not None and self._reader.call is None:
            self._plain(self._tag + self.text[self._block_at:])  # a block never closed is text
            self._reader = None
        if self._held is not None:  # no call came after the block that is not one: all of it is content
            held, self._held = self._held, None
            self._plain("".join(text for _, text in held))
        if self.num_calls == 0 and self._space:
            self._say(self._space)
            self._space = ""

    # ---- output
    def _plain(self, text: str) -> None:
        """Content, its surrounding whitespace held (a reply with calls has its content stripped)."""
        if not text:
            return
        if self._held is not None:
            self._held.append(("content", text))
            return
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        if not self._sent_content and self.num_calls:
            body = body.lstrip()
        if body:
            self._say(body)

    def _say(self, text: str) -> None:
        self._sent_content = True
        self._content_out.append(text)

    def _read(self, step: tuple[ToolCall | None, str]) -> None:
        started, args = step
        if started is not None:
            self._begin(started)
        if args:
            self._arguments(args)

    def _begin(self, call: ToolCall) -> None:
        if self._held is not None:  # a call after a block that is no call: that block is dropped, content kept
            held, self._held = self._held, None
            for kind, text in held:
                if kind == "content":
                    self._plain(text)
        self.num_calls += 1
        self._calls_out.append({"index": self.num_calls - 1, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}})

    def _arguments(self, text: str) -> None:
        self._calls_out.append({"index": self.num_calls - 1, "function": {"arguments": text}})

    def _merged_calls(self) -> list[dict]:
        """This step's deltas, one per call: a call's header and its arguments so far go out together."""
        merged: list[dict] = []
        for d in self._calls_out:
            if merged and merged[-1]["index"] == d["index"]:
                merged[-1]["function"]["arguments"] += d["function"]["arguments"]
            else:
                merged.append({**d, "function": dict(d["function"])})
        return merged


def _parameters(function: dict[str, Any]) -> dict:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}
