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

With `parallel.kv_transfer: jax` nothing is shared but the network (engine/kv_transfer.py): the prefill replica
answers as soon as its prompt is computed, with an offer of each prompt's pages (`transfer`: its transfer server's
address, its layout key, per distinct prompt a uuid); the router hands that on to the decode replica in `OFFERS_HEADER`,
and the decode replica pulls the pages before it queues the request (`receive_from_prefill`), whose admission takes
them as cached prompt pages. Whatever fails there (a malformed header, another layout, a pull that times out) costs
the decode replica only the prefill.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, GenerateRequest

log = logging.getLogger(__name__)

HEADER = "x-radixlm-prefill-only"
CACHED_ONLY = "cached"  # HEADER's value for an offer of the pages held, nothing computed (the router's peer fetch)
OFFERS_HEADER = "x-radixlm-kv-offers"  # the router's copy of a prefill answer's `transfer` (JSON), to a decode replica
_PREFILL_ONLY: contextvars.ContextVar[str] = contextvars.ContextVar("prefill_only", default="")
_OFFERS: contextvars.ContextVar[str | None] = contextvars.ContextVar("kv_offers", default=None)


class PrefillOnlyMarker:
    """ASGI middleware: marks the requests that carry `HEADER` (`prefill_only()` is true while they are handled) and
    keeps the value of `OFFERS_HEADER` for them (`kv_offers()`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        wanted = next((v.decode("latin-1").strip() for k, v in scope["headers"] if k == HEADER.encode() and marked(v)),
                      "")
        offers = next((v.decode("latin-1") for k, v in scope["headers"] if k == OFFERS_HEADER.encode()), None)
        token, offers_token = _PREFILL_ONLY.set(wanted), _OFFERS.set(offers)
        try:
            await self.app(scope, receive, send)
        finally:
            _PREFILL_ONLY.reset(token)
            _OFFERS.reset(offers_token)


def marked(value: str | bytes | None) -> bool:
    """Whether a value of `HEADER` asks for a prefill only (absent, empty or 0: no)."""
    value = (value or "").strip()
    return value not in ("", "0", b"", b"0")


def prefill_only() -> bool:
    """Whether the request being handled asks for a prefill for a decode replica (or an offer of what is cached)."""
    return bool(_PREFILL_ONLY.get())


def cached_only() -> bool:
    """Whether the request being handled asks only for an offer of the prompt pages this replica holds."""
    return _PREFILL_ONLY.get() == CACHED_ONLY


_warned: set = set()


def _warn_once(key, message: str, *args) -> None:
    """A warning about the setup (the same for every request until it changes): logged once."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def kv_offers() -> str | None:
    """The request being handled: the offer of its prompts' pages a prefill replica made (`OFFERS_HEADER`), or None."""
    return _OFFERS.get()


def distinct_prompts(requests: "list[GenerateRequest]") -> "dict[tuple, GenerateRequest]":
    """A call's requests by prompt (n samples of one prompt: one prefill), in the call's order: the prefill replica
    offers pages per entry, the decode replica builds the same call and pulls them per entry."""
    distinct: dict[tuple, GenerateRequest] = {}
    for r in requests:
        distinct.setdefault(_prompt_key(r), r)
    return distinct


def _prompt_key(r: "GenerateRequest") -> tuple:
    return tuple(r.prompt_ids), r.namespace, r.adapter, r.images


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
    runs = [GenerateRequest(r.prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), r.namespace, r.priority,
                            r.adapter, r.images) for r in distinct_prompts(requests).values()]
    stream = engine.submit(runs, f"prefill-{uuid.uuid4().hex}", final_only=True, handoff=True)
    async with stream:
        async for _, out in stream:
            if out.finish_reason == "abort":
                raise EngineStopped("the prefill was aborted (the server is shutting down)")
    transfer = engine.engine.transfer
    if transfer is not None:  # offered for a pull, nothing written for it
        offers = [await engine.offer_pages(key) for key in stream.page_keys]
        prompts = [{"prompt_tokens": len(r.prompt_ids), "pages": len(hashes), "pages_offered": o and o["pages"]}
                   for r, hashes, o in zip(runs, stream.page_hashes, offers)]
        return {"object": "prefill", "prompts": prompts, "seconds": round(time.perf_counter() - t0, 4),
                "transfer": transfer.answer(offers)}
    prompts = []
    for r, hashes in zip(runs, stream.page_hashes):
        on_disk = await engine.disk_handoff(hashes, timeout_s)
        prompts.append({"prompt_tokens": len(r.prompt_ids), "pages": len(hashes), "pages_on_disk": on_disk})
    return {"object": "prefill", "prompts": prompts, "seconds": round(time.perf_counter() - t0, 4)}


async def offer_cached(engine: "AsyncEngine", requests: "list[GenerateRequest]") -> dict:
    """A call marked `HEADER: cached` (the router's, for another replica that holds less of its prompts): the pages
    of each distinct prompt this replica's tree holds, offered as `prefill_for_decode` offers them; nothing computed,
    nothing queued. Prompts with images are not offered (their tokens are the engine's to make)."""
    from engine.block_hash import cache_namespace
    from engine.kv_transfer import offered_tokens

    t0, ps = time.perf_counter(), engine.engine.config.cache.page_size
    offers, prompts = [], []
    for r in distinct_prompts(requests).values():
        key = (offered_tokens(r.prompt_ids, ps), cache_namespace(r.namespace, r.adapter))
        offer = None if r.images else await engine.offer_pages(key)
        offers.append(offer)
        prompts.append({"prompt_tokens": len(r.prompt_ids), "pages_offered": offer and offer["pages"]})
    return {"object": "prefill", "prompts": prompts, "seconds": round(time.perf_counter() - t0, 4),
            "transfer": engine.engine.transfer.answer(offers)}


async def receive_from_prefill(engine: "AsyncEngine", requests: "list[GenerateRequest]", offers: str,
                               timeout_s: float) -> "list[GenerateRequest]":
    """A decode replica's call that a prefill replica computed (`offers`: the header's value): each distinct prompt's
    pages pulled (`timeout_s` at most), the requests returned carrying them (`GenerateRequest.received`). Anything
    amiss is logged and the requests go as they came: the decode replica computes their prompts."""
    from engine.kv_transfer import page_payloads  # (the router imports this module's headers alone: no JAX there)

    transfer = engine.engine.transfer
    if transfer is None:
        _warn_once("no transfer", "%s: this replica pulls no pages (parallel.kv_transfer is not jax): it computes the "
                                  "prompts", OFFERS_HEADER)
        return requests
    try:
        body = json.loads(offers)
        address, layout, entries = body["address"], body["layout"], list(body["offers"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is malformed (%r): the prompt is computed here", OFFERS_HEADER, e)
        return requests
    if layout != transfer.layout_key:
        _warn_once(("layout", layout, transfer.layout_key), "the prefill replica's pages are of another layout (%s, "
                   "this replica's %s: other weights, dtypes, page size or parallelism): its prompts are computed here",
                   layout, transfer.layout_key)
        return requests
    distinct = distinct_prompts(requests)
    if len(entries) != len(distinct):
        log.warning("%s: %d offers for %d prompts: the prompts are computed here", OFFERS_HEADER, len(entries),
                    len(distinct))
        return requests

    async def pull(offer: dict):
        try:
            arrays = await transfer.endpoint.pull(address, int(offer["uuid"]), transfer.specs(int(offer["padded"])),
                                                  timeout_s)
            payloads = await asyncio.to_thread(page_payloads, arrays, int(offer["pages"]))
            transfer.stats["received_pages"] += len(payloads)
            return str(offer["last_hash"]), payloads, int(offer.get("window_from", 0))
        except Exception as e:  # a timeout, a refused connection, a malformed offer: computed here instead
            transfer.stats["pulls_failed"] += 1
            log.warning("pulling prompt pages from %s failed (%r): the prompt is computed here", address, e)
            return None

    got = await asyncio.gather(*(pull(o) for o in entries if o))
    received = iter(got)
    by_prompt = {key: next(received) if o else None for key, o in zip(distinct, entries)}
    return [dataclasses.replace(r, received=by_prompt[_prompt_key(r)]) for r in requests]
