"""OpenAI's Responses API (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`) on the chat endpoint's path.

A Responses request becomes a `ChatCompletionRequest`, so it gets the same chat template, sampling, tools,
structured outputs and reasoning parser; the chat reply becomes Responses output items:

    request:  instructions (a system message) + the stored conversation of `previous_response_id` + `input` items
              -> chat messages; function tools -> chat tools; `text.format` -> response_format;
              `max_output_tokens` -> max_tokens
    reply:    a `reasoning` item (the reasoning parser's thinking), a `message` item (`output_text`), `function_call`
              items (`call_id`, `name`, `arguments`; only the first with parallel_tool_calls: false); status
              "incomplete" when max_output_tokens ended it
    stream:   typed SSE events in OpenAI's order, numbered by `sequence_number` (`Output`)

Conversation state: with `store` (the default) a finished response is kept with its conversation as chat messages
(`ResponseStore`, LRU of `server.max_stored_responses`), and with this turn's input as items (input_items lists
them). A request naming it in `previous_response_id` sends only the new turn; the prompt it renders starts with the
earlier turns' tokens, which the radix cache still holds, so only the new turn is prefilled. With `background: true` the response is made with no client waiting: the call returns it
"in_progress" at once, GET polls it, `POST /v1/responses/{id}/cancel` aborts it. What this server does not do
(built-in tools, non-text input, unknown item types) is a 400 naming it. This module imports no JAX: the router uses `chat_body` to hash prompts.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from engine.openai_protocol import ApiError, ChatCompletionRequest, ResponsesRequest, describe_validation_error, sse_event
from engine.tool_calls import call_index

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")
ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -------------------------------------------------------------------------------------------- request
def input_messages(items: str | list[dict], history: list[dict] = ()) -> list[dict]:
    """Responses input (a string, or items) as the chat messages that follow `history`: function_call items become
    the assistant's tool_calls, function_call_output items tool messages; reasoning items are dropped (templates drop
    earlier turns' thinking). Anything else is an ApiError naming the item."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    call_ids = {call["id"] for m in history for call in m.get("tool_calls") or ()}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            role = ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise _bad(f"{where}.role: expected one of {', '.join(ROLES)}, got {item.get('role')!r}")
            messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            call_ids.add(call["id"])
            if messages and messages[-1]["role"] == "assistant":  # parallel calls, or calls after text: one turn
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            if call_id not in call_ids:
                raise _bad(f"{where}: no function_call with call_id {call_id!r} comes before this output")
            output = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind != "reasoning":
            raise _bad(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                       "function_call_output and reasoning items are)")
    return messages


def input_items(items: str | list[dict]) -> list[dict]:
    """A turn's `input` (already accepted by `input_messages`) as the items input_items lists: a string is one user
    message; a message's string content becomes one text part; each item keeps its id, or gets one."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in copy.deepcopy(items):
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item["content"], str):
            part = "output_text" if item["role"] == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if kind != "reasoning":
            item.setdefault("status", "completed")
        out.append({"id": item.pop("id", None) or _id(ITEM_ID_PREFIX[kind]), **item})
    return out


def item_page(items: list[dict], order: str, limit: int, after: str | None) -> dict:
    """OpenAI's list object of `items` in `order` ("asc": as sent, "desc": newest first): up to `limit` of them, those
    after the item whose id is `after` (a 400 naming it when there is none)."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise _bad(f"after: this response has no input item {after!r}", "after")
        start = ids.index(after) + 1
    data = ordered[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(ordered)}


def chat_request(body: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list[dict]]:
    """-> (the chat request this turn runs as, the conversation so far: `history` and this turn's input, without the
    instructions, which previous_response_id does not carry over)."""
    _refuse_unsupported(body)
    conversation = [*history, *input_messages(body.input, history)]
    return chat_body(body, conversation), conversation


def without_oldest_turn(conversation: list[dict], keep: int) -> list[dict] | None:
    """truncation "auto": the conversation without its oldest turn (its first message and what follows up to the
    next user message, so no reply or tool result is left without what it answers); None when that would cut into
    the last `keep` messages (this turn's input)."""
    cut = 1
    while cut < len(conversation) and conversation[cut]["role"] != "user":
        cut += 1
    return conversation[cut:] if len(conversation) - cut >= keep else None


def chat_body(body: ResponsesRequest, conversation: list[dict]) -> ChatCompletionRequest:
    """The chat request a turn runs as, over `conversation` (the instructions put before it)."""
    fields = {"model": body.model, "messages": prompt_messages(body.instructions, conversation),
              "tools": _chat_tools(body.tools), "tool_choice": _chat_tool_choice(body.tool_choice),
              "response_format": _response_format(body.text), "max_tokens": body.max_output_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "user": body.user,
              "priority": body.priority, "cache_salt": body.cache_salt,
              "reasoning_effort": (body.reasoning or {}).get("effort")}
    if wants_logprobs(body):
        fields.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        message, param = describe_validation_error(e.errors())
        raise ApiError(400, message, param=param) from None


def wants_logprobs(body: ResponsesRequest) -> bool:
    """The answer's token logprobs are asked for: `include` names them, or `top_logprobs` wants some."""
    return LOGPROBS_INCLUDE in (body.include or ()) or bool(body.top_logprobs)


def prompt_messages(instructions: str | None, conversation: list[dict]) -> list[dict]:
    """The chat messages a turn renders: the instructions as a system message, then the conversation."""
    return ([] if instructions is None else [{"role": "system", "content": instructions}]) + conversation


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.background and not body.store:
        raise _bad("background: true needs store: true (the response is fetched with GET /v1/responses/{id})", "store")
    if body.background and body.stream:
        raise _bad("background: true with stream: true is not supported; poll GET /v1/responses/{id}", "stream")
    if body.conversation is not None:
        raise _bad("conversation: the Conversations API is not supported; continue with previous_response_id",
                   "conversation")
    if body.prompt is not None:
        raise _bad("prompt: stored prompt templates are not supported; send instructions and input", "prompt")


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Function tools in the chat shape; built-in tools (web_search, file_search, ...) are refused by name."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise _bad(f'tools[{i}]: {kind!r} tools are not supported; only function tools ({{"type": "function", '
                       '"name", "parameters"})', "tools")
        name, params, description = tool.get("name"), tool.get("parameters"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name: a function tool needs a name", "tools")
        if not isinstance(params, (dict, type(None))) or not isinstance(description, (str, type(None))):
            raise _bad(f"tools[{i}]: parameters must be a JSON schema object, description a string", "tools")
        out.append({"type": "function", "function": {k: v for k, v in (("name", name), ("description", description),
                                                                        ("parameters", params)) if v is not None}})
    return out


def _chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise _bad('tool_choice: {"type": "function"} needs a "name"', "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise _bad(f'tool_choice: {kind!r} is not supported; expected "none", "auto", "required" or {{"type": "function", '
               '"name": ...})', "tool_choice")


def _response_format(text: dict | None) -> dict | None:
    """text.format as chat's response_format (structured outputs)."""
    fmt = (text or {}).get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema: json_schema needs a JSON schema object", "text")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"]}}
    raise _bad(f"text.format: type {kind!r} is not supported; expected text, json_object or json_schema", "text")


def _content(content: Any, where: str) -> str | list[dict]:
    """A message's content: its text, or with input_image parts ({"image_url": a data: or http(s) URL}) the chat's
    text and image_url parts in order."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                                for p in content):
        return _text(content, where)
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise _bad(f"{where}[{j}]: an input_image part needs an image_url (a data: or http(s) URL; "
                           "file_id is not supported)")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            kind = part.get("type") if isinstance(part, dict) else None
            raise _bad(f"{where}[{j}]: {kind!r} parts are not supported ({', '.join(TEXT_PARTS)}, input_image)")
    return parts


def _text(content: Any, where: str) -> str:
    """A message's content (a string, or text parts) as one string; other parts (images, files, audio) are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: expected a string or a list of input_text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}]: {kind!r} parts are not supported; text only ({', '.join(TEXT_PARTS)})")
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    if not isinstance(item.get(key), str):
        raise _bad(f"{where}.{key}: required string is missing")
    return item[key]


def _bad(message: str, param: str = "input") -> ApiError:
    return ApiError(400, message, param=param)


# -------------------------------------------------------------------------------------------- output
_PART = {"message": "output_text", "reasoning": "reasoning_text"}  # an item's text part, and its events' names
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class Output:
    """A response's output items as they grow, and the stream events that tell it (numbered from 0). Text comes as
    thinking, then answer; a function call's arguments as they are written; one item is open at a time.
    parallel_tool_calls False: function calls after the first are dropped. logprobs: the message's output_text part
    and its events carry the answer's token logprobs (chat's `logprobs.content` entries, the shape the Responses API
    gives them)."""

    def __init__(self, parallel_tool_calls: bool = True, logprobs: bool = False):
        self.parallel_tool_calls = parallel_tool_calls
        self.logprobs = logprobs
        self.items: list[dict] = []
        self._open: dict | None = None  # the item text or arguments go to
        self._calls: dict[int, dict | None] = {}  # a chat tool call's index -> its function_call item (None: dropped)
        self._sequence = 0
        self._pending: list[dict] = []  # token logprobs whose text has not come yet (held back as a possible stop)

    def event(self, type_: str, **fields) -> dict:
        e = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return e

    def add(self, fields: dict, logprobs: list[dict] | None = None) -> list[dict]:
        """A chat reply's fields, whole or one stream delta: reasoning_content, content, tool_calls; with the logprobs
        of its tokens (chat's `logprobs.content`)."""
        if self.logprobs and logprobs:
            self._pending += logprobs
        events = []
        if fields.get("reasoning_content"):
            events += self._text("reasoning", fields["reasoning_content"])
        if fields.get("content"):
            events += self._text("message", fields["content"])
        for call in fields.get("tool_calls") or ():
            events += self._call(call)
        return events

    def _call(self, call: dict) -> list[dict]:
        """A function_call item: added when its call begins (id and name), its arguments' deltas as they come, done
        when the next item begins or the response ends."""
        events = []
        key = call_index(call, len(self._calls))
        if "id" in call:
            if not self.parallel_tool_calls and any(item["type"] == "function_call" for item in self.items):
                self._calls[key] = None
                return []
            events += self._close("completed")
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": ""}
            self._calls[key] = item
            self.items.append(item)
            self._open = item
            events.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                     item=copy.deepcopy(item)))
        item = self._calls.get(key)
        piece = call["function"].get("arguments") or ""
        if item is not None and item is self._open and piece:
            item["arguments"] += piece
            events.append(self.event("response.function_call_arguments.delta", **self._where(), delta=piece))
        return events

    def finish(self, status: str) -> list[dict]:
        """Closes the open item with the response's status ("completed" or "incomplete"); a reply with neither text
        nor calls is one empty message."""
        events = []
        if not any(item["type"] in ("message", "function_call") for item in self.items):
            events += self._close("completed") + self._open_item("message")
        return events + self._close(status)

    def text_of(self, kind: str) -> str:
        return "".join(item["content"][0]["text"] for item in self.items if item["type"] == kind)

    def _text(self, kind: str, text: str) -> list[dict]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close("completed") + self._open_item(kind)
        part = self._open["content"][0]
        part["text"] += text
        logprobs = {}
        if kind == "message":
            logprobs["logprobs"], self._pending = self._pending, []
            part["logprobs"] += logprobs["logprobs"]
        return events + [self.event(f"response.{_PART[kind]}.delta", **self._where(), delta=text, **logprobs)]

    def _open_item(self, kind: str) -> list[dict]:
        if kind == "message":
            item = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": _PART[kind], "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": _id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            part = {"type": _PART[kind], "text": ""}
        self.items.append(item)
        self._open = item
        events = [self.event("response.output_item.added", output_index=len(self.items) - 1, item=copy.deepcopy(item)),
                  self.event("response.content_part.added", **self._where(), part=dict(part))]
        item["content"].append(part)
        return events

    def _close(self, status: str) -> list[dict]:
        item = self._open
        if item is None:
            return []
        where = self._where()
        self._open = None
        item["status"] = status
        kind = item["type"]
        if kind == "function_call":
            return [self.event("response.function_call_arguments.done", **where, name=item["name"],
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item))]
        part = item["content"][0]
        logprobs = {}
        if kind == "message":  # the tokens of text never shown (a stop string's) too, as chat gives them
            part["logprobs"] += self._pending
            self._pending = []
            logprobs["logprobs"] = list(part["logprobs"])
        return [self.event(f"response.{_PART[kind]}.done", **where, text=part["text"], **logprobs),
                self.event("response.content_part.done", **where, part=dict(part)),
                self.event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item))]

    def _where(self) -> dict:
        """The open item's place, as its events name it."""
        where = {"item_id": self._open["id"], "output_index": len(self.items) - 1}
        return where if self._open["type"] == "function_call" else {**where, "content_index": 0}


def response_object(body: ResponsesRequest, response_id: str, created_at: int, status: str, output: list[dict] = (),
                    usage: dict | None = None, error: dict | None = None) -> dict:
    """The response as OpenAI shapes it, echoing the request's settings."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": body.background,
        "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
        "output": list(output), "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning or {"effort": None, "summary": None}, "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "truncation": body.truncation or "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {},
    }


# ---------------------------------------------------------------------------------------------- state
@dataclasses.dataclass(frozen=True)
class Stored:
    response: dict
    conversation: list[dict] | None  # chat messages up to and including the reply, no instructions (None: unfinished)
    input_items: list[dict] = ()  # this turn's input, as items with ids (`input_items`)


class ResponseStore:
    """Stored responses by id, least recently used first out past `capacity` (0: none kept)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict] | None, items: list[dict] = ()) -> None:
        self._entries[response["id"]] = Stored(response, conversation, list(items))
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None


# --------------------------------------------------------------------------------------------- routes
@dataclasses.dataclass(frozen=True)
class ChatPath:
    """What the chat endpoint lends this one (engine/server.py)."""
    # A chat request up to the engine -> (prompt ids, its RequestStream, its ChoiceFormatter); ApiError when refused.
    # A stream is already entered (refusals come before the 200).
    start: Callable[[ChatCompletionRequest], Awaitable[tuple[list[int], Any, Any]]]
    # The stream's final RequestOutputs by index; None when the client left (the requests are aborted).
    gather: Callable[[Request, Any], Awaitable[dict | None]]
    count_tokens: Callable[[str], int]  # tokens of a text (the reply's reasoning tokens)
    # Waits for the engine to take a stream's requests; its refusals (overloaded, shutting down) as ApiErrors.
    enter: Callable[[Any], Awaitable[None]]
    reasoning: bool = False  # the server has a reasoning parser (server.reasoning_parser)


class _Detached:
    """The client of a background response: never gone (the response is made whoever waits for it)."""

    @staticmethod
    async def is_disconnected() -> bool:
        return False


@dataclasses.dataclass
class _Reply:
    """One response being made."""
    body: ResponsesRequest
    prompt_ids: list[int]
    conversation: list[dict]  # up to this turn's input
    input_items: list[dict]  # this turn's input (`input_items`)
    output: Output
    id: str = dataclasses.field(default_factory=lambda: _id("resp"))
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))


def routes(chat: ChatPath, store: ResponseStore) -> APIRouter:
    api = APIRouter()
    background: dict[str, asyncio.Task] = {}  # response id -> the task making it (background: true, unfinished)

    def stored(response_id: str, param: str | None = None) -> Stored:
        entry = store.get(response_id)
        if entry is None:
            raise _not_found(response_id, param)
        return entry

    def finish(reply: _Reply, final) -> tuple[list[dict], dict]:
        """Closes the output after the final RequestOutput -> (its last events, the response); stores it."""
        status = "incomplete" if final.finish_reason == "length" else "completed"
        events = reply.output.finish(status)
        reasoning = reply.output.text_of("reasoning")
        output_tokens = len(final.token_ids)
        usage = {"input_tokens": len(reply.prompt_ids), "input_tokens_details": {"cached_tokens": final.cached_tokens},
                 "output_tokens": output_tokens,
                 "output_tokens_details": {"reasoning_tokens": min(chat.count_tokens(reasoning), output_tokens)
                                           if reasoning else 0},
                 "total_tokens": len(reply.prompt_ids) + output_tokens}
        response = response_object(reply.body, reply.id, reply.created_at, status, reply.output.items, usage)
        if reply.body.store:
            store.put(response, reply.conversation + input_messages(reply.output.items), reply.input_items)
        return events, response

    def answer(reply: _Reply, fmt, final) -> dict:
        """The finished response after the final RequestOutput (stored with store: true)."""
        final = fmt.final(final)
        choice = fmt.choice(0, final)
        reply.output.add(choice["message"], _token_logprobs(choice))
        return finish(reply, final)[1]

    async def make_in_background(reply: _Reply, stream, fmt) -> None:
        """background: true: the response made with no client waiting; the store holds it "in_progress" until it is
        "completed" (or "incomplete"), "failed" (the engine stopped or aborted it) or "cancelled"."""
        try:
            finals = await chat.gather(_Detached(), stream)
            answer(reply, fmt, finals[0])
        except asyncio.CancelledError:  # POST /v1/responses/{id}/cancel; leaving gather aborted the request
            store.put(response_object(reply.body, reply.id, reply.created_at, "cancelled"), None, reply.input_items)
        except Exception as e:  # noqa: BLE001 - whatever ended it is the response's error
            message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            store.put(response_object(reply.body, reply.id, reply.created_at, "failed",
                                      error={"code": "server_error", "message": message}), None, reply.input_items)
        finally:
            background.pop(reply.id, None)

    async def events(reply: _Reply, stream, fmt) -> AsyncIterator[str]:
        out = reply.output
        for kind in ("response.created", "response.in_progress"):
            yield sse_event(out.event(kind, response=response_object(reply.body, reply.id, reply.created_at, "in_progress")))
        final = None
        try:
            async with stream:
                async for index, step in stream:
                    if step.finish_reason == "abort":
                        raise RuntimeError("request aborted: the server is shutting down, or replacing its weights")
                    choice = fmt.delta(index, step)
                    for e in out.add(choice["delta"], _token_logprobs(choice)) if choice is not None else ():
                        yield sse_event(e)
                    if step.finished:
                        final = fmt.final(step)
        except RuntimeError as e:  # the engine stopped, or aborted the request
            failed = response_object(reply.body, reply.id, reply.created_at, "failed", out.items,
                                     error={"code": "server_error", "message": str(e)})
            yield sse_event(out.event("response.failed", response=failed))
            return
        done, response = finish(reply, final)
        for e in done:
            yield sse_event(e)
        yield sse_event(out.event(f"response.{response['status']}", response=response))

    @api.post("/v1/responses", response_model=None, summary="Create a model response (OpenAI's Responses API)")
    async def create_response(request: Request, body: ResponsesRequest):
        history = [] if body.previous_response_id is None else \
            stored(body.previous_response_id, "previous_response_id").conversation
        if history is None:
            raise _bad(f"previous_response_id: {body.previous_response_id!r} has not finished (background); poll GET "
                       "/v1/responses/{id} until its status is completed", "previous_response_id")
        if chat.reasoning and wants_logprobs(body):
            raise _bad(f"include: {LOGPROBS_INCLUDE} is not supported when the server splits off reasoning "
                       "(server.reasoning_parser)", "include")
        turn, conversation = chat_request(body, history)
        keep = len(conversation) - len(history)  # this turn's input
        while True:
            try:
                prompt_ids, stream, fmt = await chat.start(turn)
                break
            except ApiError as e:  # truncation "auto": the oldest turns go until the prompt fits
                shorter = without_oldest_turn(conversation, keep) if body.truncation == "auto" else None
                if e.code != "context_length_exceeded" or shorter is None:
                    raise
                conversation = shorter
                turn = chat_body(body, conversation)
        reply = _Reply(body, prompt_ids, conversation, input_items(body.input),
                       Output(body.parallel_tool_calls, wants_logprobs(body)))
        if body.stream:
            return StreamingResponse(events(reply, stream, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if body.background:
            await chat.enter(stream)  # a refusal is this call's error, not a failed response
            response = response_object(body, reply.id, reply.created_at, "in_progress")
            store.put(response, None, reply.input_items)
            background[reply.id] = asyncio.create_task(make_in_background(reply, stream, fmt))
            return JSONResponse(response)
        finals = await chat.gather(request, stream)
        if finals is None:  # the client left
            return JSONResponse({})
        return JSONResponse(answer(reply, fmt, finals[0]))

    @api.get("/v1/responses/{response_id}", summary="A stored response")
    async def get_response(response_id: str):
        return stored(response_id).response

    @api.post("/v1/responses/{response_id}/cancel", summary="Cancel a background response")
    async def cancel_response(response_id: str):
        """A background response still being made is aborted and becomes "cancelled"; a finished one is returned as
        it is."""
        entry = stored(response_id)
        if not entry.response["background"]:
            raise _bad(f"{response_id!r} was not made with background: true; only those can be cancelled", "response_id")
        task = background.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        return stored(response_id).response

    @api.get("/v1/responses/{response_id}/input_items", summary="A stored response's input items")
    async def list_input_items(response_id: str, order: Literal["asc", "desc"] = "desc",
                               limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None):
        return item_page(stored(response_id).input_items, order, limit, after)

    @api.delete("/v1/responses/{response_id}", summary="Delete a stored response")
    async def delete_response(response_id: str):
        if (task := background.get(response_id)) is not None:  # being made: stopped first
            task.cancel()
            await asyncio.wait([task])
        if not store.delete(response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    return api


def _token_logprobs(choice: dict) -> list[dict] | None:
    """A chat choice's token logprobs (its `logprobs.content`), if it has them."""
    return (choice.get("logprobs") or {}).get("content")


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no stored response {response_id!r} (unknown, deleted, evicted, or made with store: false)",
                    param=param, code="response_not_found")
