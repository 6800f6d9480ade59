"""The offline job in OpenAI's Batch API file format: each input line names an endpoint and a request body, and
its output line carries that endpoint's response.

    input:  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., ...}}
    output: {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": ...,
             "body": {...}}, "error": null}

URLs: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/score, /v1/rerank. The bodies go to the server's own handlers
(`engine.server.create_app`) in this process, through an ASGI transport (no socket), so a batch line takes every
field an HTTP request takes (n, tools, response_format, logprobs, echo, ...) with the same checks; a body the
server refuses gets its error response (status_code 400/404, the error body) and the job goes on. A line that names
no request (not JSON, no custom_id, another method or URL, no body object, "stream": true) gets `response: null`
and an `error: {code, message}`, as OpenAI reports such lines. Output lines come in the order requests finish.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import uuid
from typing import AsyncIterable, AsyncIterator, Callable, Iterable

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/score", "/v1/rerank")


@dataclasses.dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 1-based line number in the input file
    custom_id: str | None
    url: str = ""
    body: dict | None = None
    error: tuple[str, str] | None = None  # (code, message) of a line that names no request


def parse_line(line: str, number: int) -> BatchLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BatchLine(number, None, error=("invalid_json_line", f"line {number}: not valid JSON ({e.msg})"))
    if not isinstance(obj, dict):
        return BatchLine(number, None, error=("invalid_json_line", f"line {number}: expected a JSON object"))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(number, None, error=("missing_custom_id", f"line {number}: 'custom_id' must be a non-empty string"))
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if method != "POST":
        return BatchLine(number, custom_id, error=("invalid_method", f"'method' must be \"POST\", got {method!r}"))
    if url not in URLS:
        return BatchLine(number, custom_id, error=("invalid_url", f"'url' must be one of {', '.join(URLS)}; got {url!r}"))
    if not isinstance(body, dict):
        return BatchLine(number, custom_id, error=("invalid_body", "'body' must be a JSON object (the request body)"))
    if body.get("stream"):
        return BatchLine(number, custom_id, error=("invalid_body", "'stream': true is not supported in a batch"))
    return BatchLine(number, custom_id, url, body)


def is_batch_file(path: str) -> bool:
    """Whether the file's first non-empty line is a JSON object with a custom_id (OpenAI's format)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "custom_id" in obj
    return False


def response_record(custom_id: str, status_code: int, body: dict) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def error_record(line: BatchLine) -> dict:
    code, message = line.error
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
              "error": {"code": code, "message": message}}
    if line.custom_id is None:
        record["line"] = line.number  # what a resumed run skips
    return record


def count(record: dict, totals: dict) -> None:
    """Adds an output line to the job's totals: requests (status 200), errors, and the usage of the response."""
    response = record["response"]
    if response is None or response["status_code"] != 200:
        totals["errors"] += 1
        return
    totals["requests"] += 1
    usage = response["body"].get("usage", {})
    totals["prompt"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    totals["cached"] += details.get("cached_tokens", 0)
    totals["generated"] += usage.get("completion_tokens", usage.get("output_tokens", 0))


def texts(record: dict) -> list[tuple[str, str]]:
    """(custom_id, text) of each choice of a completions or chat response (what --print shows)."""
    response = record["response"]
    if response is None or response["status_code"] != 200:
        return []
    choices = response["body"].get("choices", [])
    return [(record["custom_id"], c["message"]["content"] if "message" in c else c.get("text")) for c in choices]


async def run(app, lines: Iterable[BatchLine] | AsyncIterable[BatchLine], emit: Callable[[dict], None],
              concurrency: int) -> bool:
    """Posts each line's body to `app` (started and stopped here), at most `concurrency` at a time, and emits each
    line's record (`lines` may be asynchronous: a data-parallel worker's, engine.data_parallel). SIGINT or SIGTERM
    stops feeding and drops the requests in flight (they are aborted, nothing is written for them). -> whether every
    line was answered."""
    import httpx

    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main.cancel)
    slots = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task] = set()

    async def post(client: httpx.AsyncClient, line: BatchLine) -> None:
        try:
            response = await client.post(line.url, json=line.body)
            body = response.json()
        except (httpx.HTTPError, ValueError) as e:
            emit(error_record(dataclasses.replace(line, error=("server_error", f"{type(e).__name__}: {e}"))))
        else:
            emit(response_record(line.custom_id, response.status_code, body))
        finally:
            slots.release()

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a handler's crash is its 500
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://batch",
                                                                    timeout=None) as client:
        try:
            async for line in _each(lines):
                if line.error is not None:
                    emit(error_record(line))
                    continue
                await slots.acquire()
                task = asyncio.create_task(post(client, line))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.wait(set(in_flight))
            return True
        except asyncio.CancelledError:
            main.uncancel()
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            return False
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


async def _each(lines: Iterable[BatchLine] | AsyncIterable[BatchLine]) -> AsyncIterator[BatchLine]:
    if hasattr(lines, "__aiter__"):
        async for line in lines:
            yield line
    else:
        for line in lines:
            yield line
