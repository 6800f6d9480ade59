"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) on the chat endpoint's path.

A Messages request becomes a `ChatCompletionRequest`, so it gets the same chat template, sampling, tools and
reasoning parser; the chat reply becomes Anthropic content blocks:

    request:  system (a system message) + messages -> chat messages: text blocks joined, tool_use blocks the
              assistant's tool_calls (input as JSON arguments), tool_result blocks tool messages (before the turn's
              text), thinking blocks dropped (templates drop earlier turns' thinking); tools (name, description,
              input_schema) -> function tools; tool_choice auto / any / tool / none -> auto / required / named / none;
              stop_sequences -> stop; thinking -> chat_template_kwargs.enable_thinking (with a reasoning parser);
              messages ending with the assistant's text: a prefilled reply the model continues
              (continue_final_message), the reply holding only what follows
    reply:    a `thinking` block (the reasoning parser's thinking), a `text` block, `tool_use` blocks (`input` parsed);
              stop_reason end_turn | max_tokens | stop_sequence (and which) | tool_use
    stream:   SSE events in Anthropic's order (`Content`): message_start, per block content_block_start /
              content_block_delta / content_block_stop, message_delta (stop_reason, usage), message_stop

usage.input_tokens counts the prompt tokens the prefix cache did not hold, cache_read_input_tokens those it did (as
Anthropic splits them: their sum is the prompt). Errors are Anthropic's body, `{"type": "error", "error": {"type",
"message"}}`; what this server does not do (documents, server tools, unknown blocks; images for a model that takes none)
is a 400 naming it.
This module imports no JAX: the router uses `chat_request` to hash prompts.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.openai_protocol import ApiError, ChatCompletionRequest, describe_validation_error, sse_event
from engine.tool_calls import call_index

ROLES = ("user", "assistant")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and {"type": "tool", "name"}: that one
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# A message as `chat_messages` reads it (for the OpenAPI schema; the checks are there).
MESSAGE_SCHEMA = {
    "type": "object", "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["text", "tool_use", "tool_result", "thinking"]}, "text": {"type": "string"},
                           "id": {"type": "string"}, "name": {"type": "string"}, "input": {"type": "object"},
                           "tool_use_id": {"type": "string"}, "content": {"type": "string"}}}}]},
    },
}


class MessagesRequest(BaseModel):
    """POST /v1/messages; `messages`, `system`, `tools`, `tool_choice` and `thinking` are checked and translated by
    `chat_request`, which refuses what it does not support by name."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: str
    max_tokens: int = Field(ge=1)
    messages: Annotated[list[dict[str, Any]], Field(min_length=1, json_schema_extra={"items": MESSAGE_SCHEMA})]
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    cache_salt: str | None = None


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: the same body; max_tokens may be left out."""
    max_tokens: int | None = Field(None, ge=1)


# -------------------------------------------------------------------------------------------- request
def chat_messages(system: str | list | None, messages: list[dict]) -> list[dict]:
    """`system` and `messages` as the chat messages the template renders; anything else is an ApiError naming it."""
    out = [] if system is None else [{"role": "system", "content": _text(system, "system")}]
    tool_use_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{where}.role: expected user or assistant, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content: expected a string or a list of content blocks")
        texts, calls, results = [], [], []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_string(block, "text", at))
            elif kind == "tool_use" and role == "assistant":
                call_id, name = _string(block, "id", at), _string(block, "name", at)
                if not isinstance(block.get("input"), dict):
                    raise _bad(f"{at}.input: a tool_use block's input must be an object")
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": name, "arguments": json.dumps(block["input"])}})
                tool_use_ids.add(call_id)
            elif kind == "tool_result" and role == "user":
                call_id = _string(block, "tool_use_id", at)
                if call_id not in tool_use_ids:
                    raise _bad(f"{at}: no tool_use block with id {call_id!r} comes before this tool_result")
                text = _text(block.get("content", ""), f"{at}.content")
                results.append({"role": "tool", "tool_call_id": call_id,
                                "content": f"Error: {text}" if block.get("is_error") is True else text})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            elif kind in ("tool_use", "tool_result", "thinking", "redacted_thinking"):
                raise _bad(f"{at}: {kind} blocks are not allowed in {role} messages")
            elif kind == "image" and role == "user":  # (as the chat's image_url part: engine.multimodal)
                texts.append(_image_part(block, at))
            elif kind in ("image", "document"):
                raise _bad(f"{at}: {kind} blocks are not supported" + ("; text only" if kind == "document" else
                                                                        " in assistant messages"))
            else:
                raise _bad(f"{at}: content blocks of type {kind!r} are not supported (text, tool_use, tool_result and "
                           "thinking are)")
        out += results  # NOTE: tool results first: templates expect them right after the assistant's calls
        if texts or calls or not results:
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else \
                [{"type": "text", "text": t} if isinstance(t, str) else t for t in texts]
            out.append({"role": role, "content": content, **({"tool_calls": calls} if calls else {})})
    return out


def _image_part(block: dict, where: str) -> dict:
    """An image block ({"source": {"type": "base64", "media_type", "data"} or {"type": "url", "url"}}) as a chat
    image_url part."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media, data = _string(source, "media_type", f"{where}.source"), _string(source, "data", f"{where}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": _string(source, "url", f"{where}.source")}}
    raise _bad(f'{where}.source: expected {{"type": "base64", "media_type", "data"}} or {{"type": "url", "url"}}, '
               f"got type {kind!r}")


def chat_request(body: MessagesRequest, reasoning: bool) -> ChatCompletionRequest:
    """The chat request a Messages request runs as. reasoning: the server has a reasoning parser, so `thinking` sets
    the template's enable_thinking."""
    tools = _chat_tools(body.tools)
    messages = chat_messages(body.system, body.messages)
    final = messages[-1]
    # A conversation ending with the assistant's text is a prefilled reply: the model continues it.
    prefill = final["role"] == "assistant" and not final.get("tool_calls") and final["content"].strip() != ""
    fields = {"model": body.model, "messages": messages, "tools": tools, "continue_final_message": prefill or None,
              "tool_choice": _chat_tool_choice(body.tool_choice, bool(tools)), "max_tokens": body.max_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
              "stop": body.stop_sequences or None, "stream": body.stream, "cache_salt": body.cache_salt,
              "user": _user(body.metadata), "chat_template_kwargs": _thinking(body.thinking, reasoning)}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        message, param = describe_validation_error(e.errors())
        raise ApiError(400, message, param=param) from None


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Client tools in the chat shape; server tools (web_search_..., bash_..., a `type` other than custom) are refused."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f'tools[{i}]: server tools ({kind!r}) are not supported; only client tools ({{"name", '
                       '"description", "input_schema"}})', "tools")
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name: a tool needs a name", "tools")
        if not isinstance(schema, dict) or not isinstance(description, (str, type(None))):
            raise _bad(f"tools[{i}]: input_schema must be a JSON schema object, description a string", "tools")
        function = {"name": name, "parameters": schema, **({"description": description} if description else {})}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: dict | None, has_tools: bool) -> str | dict | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _bad('tool_choice: {"type": "tool"} needs a "name"', "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if not isinstance(kind, str) or kind not in TOOL_CHOICES:
        raise _bad(f'tool_choice: type {kind!r} is not supported; expected auto, any, tool or none', "tool_choice")
    return TOOL_CHOICES[kind] if has_tools or kind == "any" else None  # auto / none without tools: nothing to choose


def _thinking(thinking: dict | None, reasoning: bool) -> dict | None:
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled"):
        raise _bad(f'thinking.type: expected "enabled" or "disabled", got {kind!r}', "thinking")
    return {"enable_thinking": kind == "enabled"} if reasoning else None


def _user(metadata: dict | None) -> str | None:
    user = (metadata or {}).get("user_id")
    return user if isinstance(user, str) else None


def _text(content: Any, where: str) -> str:
    """A string, or text blocks, as one string; other blocks (images, documents) are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: expected a string or a list of text blocks")
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _bad(f"{where}[{j}]: {kind!r} blocks are not supported here; text only")
        texts.append(_string(block, "text", f"{where}[{j}]"))
    return "".join(texts)


def _string(block: dict, key: str, where: str) -> str:
    if not isinstance(block.get(key), str):
        raise _bad(f"{where}.{key}: required string is missing")
    return block[key]


def _bad(message: str, param: str = "messages") -> ApiError:
    return ApiError(400, message, param=param)


# -------------------------------------------------------------------------------------------- reply
class Content:
    """A message's content blocks as they grow, and the content_block_* events that tell them. Text comes as
    thinking, then text; a tool call as a tool_use block whose input streams as input_json_delta while the call is
    written (an input that is not a JSON object is sent whole when the call ends); one block is open at a time.
    one_tool_use (tool_choice.disable_parallel_tool_use): calls after the first are dropped."""

    def __init__(self, one_tool_use: bool = False):
        self.one_tool_use = one_tool_use
        self.blocks: list[dict] = []
        self._open: int | None = None  # index of the open block
        self._calls: dict[int, int | None] = {}  # a chat tool call's index -> its block (None: dropped)
        self._arguments = ""  # the open tool_use block's arguments so far
        self._streamed = False  # ... sent as input_json_delta as they came

    def add(self, fields: dict) -> list[dict]:
        """A chat reply's fields, whole or one stream delta: reasoning_content, content, tool_calls (a whole reply's
        calls each with its id; a stream's first delta of a call with its id and name, then pieces of arguments)."""
        events = []
        if fields.get("reasoning_content"):
            events += self._text("thinking", fields["reasoning_content"])
        if fields.get("content"):
            events += self._text("text", fields["content"])
        for call in fields.get("tool_calls") or ():
            events += self._call(call)
        return events

    def finish(self) -> list[dict]:
        return self._close()

    def _call(self, call: dict) -> list[dict]:
        events = []
        key = call_index(call, len(self._calls))
        if "id" in call:  # a call begins
            if self.one_tool_use and any(b["type"] == "tool_use" for b in self.blocks):
                self._calls[key] = None
                return []
            events += self._close()
            block = {"type": "tool_use", "id": _id("toolu"), "name": call["function"]["name"], "input": {}}
            self._open = self._calls[key] = len(self.blocks)
            self.blocks.append(block)
            self._arguments, self._streamed = "", False
            events.append({"type": "content_block_start", "index": self._open, "content_block": dict(block)})
        if self._calls.get(key) is None or self._calls[key] != self._open:
            return events
        piece = call["function"].get("arguments") or ""
        self._arguments += piece
        if piece and (self._streamed or self._arguments.lstrip().startswith("{")):
            self._streamed = True
            events.append({"type": "content_block_delta", "index": self._open,
                           "delta": {"type": "input_json_delta", "partial_json": piece}})
        return events

    def _text(self, kind: str, text: str) -> list[dict]:
        events = []
        if self._open is None or self.blocks[self._open]["type"] != kind:
            events += self._close()
            block = {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {})
            self._open = len(self.blocks)
            self.blocks.append(block)
            events.append({"type": "content_block_start", "index": self._open, "content_block": dict(block)})
        self.blocks[self._open][kind] += text
        return events + [{"type": "content_block_delta", "index": self._open,
                          "delta": {"type": f"{kind}_delta", kind: text}}]

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        block, events = self.blocks[index], []
        if block["type"] == "tool_use":
            block["input"] = _input(self._arguments)
            if not self._streamed:  # not an object as it came: the input it became, whole
                events.append({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        return events + [{"type": "content_block_stop", "index": index}]


def _input(arguments: str) -> dict:
    """A tool call's JSON arguments as tool_use input (an object; anything else is kept under "arguments")."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def stop_reason(finish_reason: str | None, matched: str | int | None,
                stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """A chat finish reason (and the stop string or token that ended it) -> (stop_reason, stop_sequence)."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(matched, str) and matched in (stop_sequences or ()):
        return "stop_sequence", matched
    return "end_turn", None


def usage(prompt_len: int, cached_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_len - cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


def error_body(status: int, message: str) -> dict:
    """Anthropic's error body for an HTTP status."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------------------------- routes
@dataclasses.dataclass(frozen=True)
class ChatPath:
    """What the chat endpoint lends this one (engine/server.py)."""
    # A chat request up to the engine -> (prompt ids, its RequestStream, its ChoiceFormatter); ApiError when refused.
    # A stream is already entered (refusals come before the 200).
    start: Callable[[ChatCompletionRequest], Awaitable[tuple[list[int], Any, Any]]]
    # The stream's final RequestOutputs by index; None when the client left (the requests are aborted).
    gather: Callable[[Request, Any], Awaitable[dict | None]]
    prompt_ids: Callable[[ChatCompletionRequest], Awaitable[list[int]]]  # the chat template's tokens (images'
    # positions included), nothing submitted
    reasoning: bool  # server.reasoning_parser is set


def routes(chat: ChatPath) -> APIRouter:
    api = APIRouter()

    def message(body: MessagesRequest, message_id: str, content: list[dict], stop: tuple[str | None, str | None],
                usage_: dict) -> dict:
        return {"id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage_}

    async def events(body: MessagesRequest, prompt_len: int, stream, fmt, content: Content) -> AsyncIterator[str]:
        message_id, started, final, finish = _id("msg"), False, None, None
        try:
            async with stream:
                async for index, step in stream:
                    if step.finish_reason == "abort":
                        raise RuntimeError("request aborted: the server is shutting down, or replacing its weights")
                    if not started:  # after the first step, which knows the cached prompt tokens
                        started = True
                        yield sse_event({"type": "message_start", "message": message(
                            body, message_id, [], (None, None), usage(prompt_len, step.cached_tokens, 0))})
                    choice = fmt.delta(index, step)
                    for e in content.add(choice["delta"]) if choice is not None else ():
                        yield sse_event(e)
                    if step.finished:
                        final = fmt.final(step)
                        finish = choice["finish_reason"] if choice is not None else final.finish_reason
        except RuntimeError as e:  # the engine stopped, or aborted the request
            yield sse_event(error_body(500, str(e)))
            return
        for e in content.finish():
            yield sse_event(e)
        yield sse_event({"type": "message_delta",
                    "delta": dict(zip(("stop_reason", "stop_sequence"),
                                      stop_reason(finish, final.stop_reason, body.stop_sequences))),
                    "usage": usage(prompt_len, final.cached_tokens, len(final.token_ids))})
        yield sse_event({"type": "message_stop"})

    @api.post("/v1/messages", response_model=None, summary="Create a message (Anthropic's Messages API)",
              openapi_extra=_body_schema(MessagesRequest))
    async def create_message(request: Request):
        try:
            body = await _parse(request, MessagesRequest)
            content = Content(bool((body.tool_choice or {}).get("disable_parallel_tool_use")))
            prompt_ids, stream, fmt = await chat.start(chat_request(body, chat.reasoning))
            if body.stream:
                return StreamingResponse(events(body, len(prompt_ids), stream, fmt, content),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            finals = await chat.gather(request, stream)
            if finals is None:  # the client left
                return JSONResponse({})
            final = fmt.final(finals[0])
            choice = fmt.choice(0, final)
            content.add(choice["message"])
            content.finish()
            return JSONResponse(message(body, _id("msg"), content.blocks,
                                        stop_reason(choice["finish_reason"], final.stop_reason, body.stop_sequences),
                                        usage(len(prompt_ids), final.cached_tokens, len(final.token_ids))))
        except ApiError as e:
            return JSONResponse(error_body(e.status, e.message), status_code=e.status, headers=e.headers)

    @api.post("/v1/messages/count_tokens", response_model=None, summary="A message's prompt tokens (Anthropic's)",
              openapi_extra=_body_schema(CountTokensRequest))
    async def count_tokens(request: Request):
        try:
            body = await _parse(request, CountTokensRequest)
            return {"input_tokens": len(await chat.prompt_ids(chat_request(body.model_copy(update={"stream": False}),
                                                                     chat.reasoning)))}
        except ApiError as e:
            return JSONResponse(error_body(e.status, e.message), status_code=e.status)

    return api


def _body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its own body with `_parse` (FastAPI sees none)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The request body as `model`; a 400 naming the field otherwise (Anthropic's error body, not FastAPI's)."""
    try:
        raw = json.loads(await request.body())
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ApiError(400, describe_validation_error(e.errors())[0]) from None
