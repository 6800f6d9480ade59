"""Tool (function) calling for the chat API: the constraint a `tool_choice` implies, and the calls in a reply.

- `tool_choice` names a function: the reply is that function's arguments, held to its `parameters` schema
  by structured outputs, so any model produces a valid call.
- "required": the reply is a JSON list of one or more {"name", "arguments"} objects, each name one of the
  tools and its arguments that tool's schema (parallel calls).
- "auto": the model chooses; calls are read from `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  blocks (the Hermes format of Qwen 2.5/3, Hermes and SmolLM3 templates) and the rest is content.
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
            if isinstance(obj, dict) and obj.get("name") in self.functions:
                args = obj.get("arguments", obj.get("parameters", {}))
                calls.append(ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args)))
        if not calls:
            return text, []
        content = _BLOCK.sub("", text).strip()
        return content or None, calls


def _parameters(function: dict[str, Any]) -> dict:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}
