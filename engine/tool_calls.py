"""Tool (function) calling for the chat API: the constraint a `tool_choice` implies, and the calls in a reply.

- `tool_choice` names a function: the reply is that function's arguments, held to its `parameters` schema
  by structured outputs, so any model produces a valid call.
- "required": the reply is a JSON list of one or more {"name", "arguments"} objects, each name one of the
  tools and its arguments that tool's schema (parallel calls).
- "auto": the model chooses; calls are read from `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  blocks (the Hermes format of Qwen 2.5/3, Hermes and SmolLM3 templates) and the rest is content; or,
  when the whole reply is JSON calls, from it: `{"name": ..., "parameters": ...}` (Llama 3.1-3.3, several
  separated by ";"), `[{"name": ..., "arguments": ...}, ...]` (Mistral, after `[TOOL_CALLS]`), optionally
  after the `<|python_tag|>` / `[TOOL_CALLS]` markers when they are kept as text.
- "none" (or no tools): a plain reply.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from engine.request import RequestError, StructuredOutput

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]")  # Llama 3, Mistral: what precedes their calls


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
        calls = []
        for block in _BLOCK.findall(text):
            try:
                obj = json.loads(block)
            except ValueError:
                continue
            call = self._call(obj)
            if call is not None:
                calls.append(call)
        if calls:
            content = _BLOCK.sub("", text).strip()
            return content or None, calls
        calls = self._bare_calls(text)
        return (None, calls) if calls else (text, [])

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


def _parameters(function: dict[str, Any]) -> dict:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}
