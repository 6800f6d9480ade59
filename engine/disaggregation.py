"""Prefill/decode disaggregation, the replica's side: a prefill for a decode replica.

The router (engine/router/forward.py, `prefill_replicas`) sends a generation request first to a prefill replica with
the header `X-RadixLM-Prefill-Only: 1`, then, unchanged, to a decode replica. Both replicas share one disk tier
(`cache.disk_path`, the same layout key): the prefill replica computes the prompt, its whole pages go through the
disk tier's write-through as any prefill's do, and it answers once none of them is still on its way to the files
(`AsyncEngine.disk_handoff`). The decode replica's admission finds them on disk, reads them in, and computes only the
prompt's last page before its first token, which it samples itself: outputs are those of one replica.

On the prefill replica the request is built as the server builds any (chat template, tools, images, cache_salt,
adapter, priority; its fields checked), then run with `max_tokens: 1` and none of its sampling options; the answer
is a small JSON body (`object: "prefill"`), never the completion. LoRA adapters' pages are not kept on disk (the disk
tier skips them): their prompts are prefilled again by the decode replica.
"""
from __future__ import annotations

import contextvars
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, GenerateRequest

HEADER = "x-radixlm-prefill-only"
_PREFILL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("prefill_only", default=False)


class PrefillOnlyMarker:
    """ASGI middleware: marks the requests that carry `HEADER` (`prefill_only()` is true while they are handled)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        wanted = any(k == HEADER.encode() and marked(v) for k, v in scope["headers"])
        token = _PREFILL_ONLY.set(wanted)
        try:
            await self.app(scope, receive, send)
        finally:
            _PREFILL_ONLY.reset(token)


def marked(value: str | bytes | None) -> bool:
    """Whether a value of `HEADER` asks for a prefill only (absent, empty or 0: no)."""
    value = (value or "").strip()
    return value not in ("", "0", b"", b"0")


def prefill_only() -> bool:
    """Whether the request being handled asks for a prefill for a decode replica."""
    return _PREFILL_ONLY.get()


class PrefillDone(Exception):
    """A prefill-only call's answer (the server turns it into a 200 JSON response instead of a completion)."""

    def __init__(self, body: dict):
        super().__init__("prefill done")
        self.body = body


async def prefill_for_decode(engine: "AsyncEngine", requests: "list[GenerateRequest]", timeout_s: float) -> dict:
    """Runs each distinct prompt of a call with one token to sample, then waits (`timeout_s` at most) until its pages
    are on disk -> the answer's body: per prompt, its tokens, whole pages and how many of them, in a row, are on disk.
    Raises what `AsyncEngine.submit` raises (the engine's refusals)."""
    from engine.async_engine import EngineStopped, GenerateRequest  # (the router imports HEADER alone: no JAX there)
    from engine.request import SamplingParams

    t0 = time.perf_counter()
    distinct: dict[tuple, GenerateRequest] = {}
    for r in requests:  # n samples of one prompt: one prefill
        distinct.setdefault((tuple(r.prompt_ids), r.namespace, r.adapter, r.images), r)
    runs = [GenerateRequest(r.prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), r.namespace, r.priority,
                            r.adapter, r.images) for r in distinct.values()]
    stream = engine.submit(runs, f"prefill-{uuid.uuid4().hex}", final_only=True, handoff=True)
    async with stream:
        async for _, out in stream:
            if out.finish_reason == "abort":
                raise EngineStopped("the prefill was aborted (the server is shutting down)")
    prompts = []
    for r, hashes in zip(runs, stream.page_hashes):
        on_disk = await engine.disk_handoff(hashes, timeout_s)
        prompts.append({"prompt_tokens": len(r.prompt_ids), "pages": len(hashes), "pages_on_disk": on_disk})
    return {"object": "prefill", "prompts": prompts, "seconds": round(time.perf_counter() - t0, 4)}
