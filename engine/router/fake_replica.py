"""A fake replica: the replica HTTP contract the router codes against, with no model.

Real HTTP (FastAPI), a real RadixCache over a PagePool publishing the cache event feed, and a
deterministic "generator" (the output depends only on the prompt's tokens and max_tokens), so
router tests (tests/test_router_faults.py) and demos run in seconds on any machine:

    python -m engine.router.fake_replica --port 8001 [--num-pages 256] [--ttft-s 0.05]

Requests are served one at a time (an asyncio lock = the replica's queue); each waits
ttft_s + new_prompt_tokens * prefill_s_per_token before its first byte, and a stream then sends
its whole body in one write (or one chunk every chunk_delay_s). Tokenizer: one token per UTF-8 byte (`ByteTokenizer`); the router
uses the same with `tokenizer: bytes`.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.block_hash import cache_namespace
from engine.disaggregation import CACHED_ONLY, HEADER as PREFILL_ONLY_HEADER, OFFERS_HEADER, marked
from engine.openai_responses import input_items, input_messages, item_page, prompt_messages
from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.router.prompts import PROBE_TEXT, PromptFormat

MAX_EVENTS_PER_CALL = 10_000


class ByteTokenizer:
    """One token per UTF-8 byte; chat turns rendered as "<role>content\\n", then "<assistant>"."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **_) -> list[int]:
        """(A chat template's other arguments, tools among them, are not rendered.)"""
        text = "".join(f"<{m.get('role', 'user')}>{m.get('content', '')}\n" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


def fake_output(tokens: list[int], max_tokens: int) -> list[str]:
    """Deterministic "generated" words for a prompt."""
    seed = hashlib.blake2b(bytes(str(tokens), "ascii"), digest_size=4).hexdigest()
    return [f" w{seed}-{i}" for i in range(max_tokens)]


def prompt_tokens(tok: ByteTokenizer, body: dict, chat: bool) -> list[int]:
    if chat:
        return tok.encode_chat(body["messages"])
    # completions' prompt, embeddings' input, score's text_1, rerank's query
    prompt = next((body[k] for k in ("prompt", "input", "text_1", "query") if k in body), "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # a batch: the router routes (and this fake serves) the first prompt
    return tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]


def create_app(page_size: int = 16, num_pages: int = 256, ttft_s: float = 0.05,
               prefill_s_per_token: float = 0.0, name: str = "fake", max_events: int = 100_000,
               chunk_delay_s: float = 0.0, adapters: tuple[str, ...] = ()):
    app = FastAPI()
    adapters = list(adapters)  # the admin endpoints below change it
    pool = PagePool(num_pages)
    cache = RadixCache(pool, page_size)
    tok = ByteTokenizer()
    epoch = uuid.uuid4().hex
    events: deque[dict] = deque(maxlen=max_events)
    state = {"seq": 0, "served": 0, "prefills": 0, "waiting": 0, "waiting_tokens": 0, "running": 0, "offers": [],
             "peer_offers": 0}
    lock = asyncio.Lock()

    def publish() -> None:
        for e in cache.drain_events():
            state["seq"] += 1
            events.append({"seq": state["seq"], "kind": e.kind, "block_hashes": list(e.block_hashes),
                           "parent_hash": e.parent_hash, "namespace": e.namespace})

    async def serve(tokens: list[int], namespace: str | None) -> None:
        """Queue, "prefill" (sleep), and store the prompt's full pages in the cache."""
        state["waiting"] += 1
        state["waiting_tokens"] += len(tokens)
        async with lock:
            state["waiting"] -= 1
            state["waiting_tokens"] -= len(tokens)
            state["running"] += 1
            try:
                full = tokens[: len(tokens) - len(tokens) % page_size]
                m = cache.match(full, namespace)
                await asyncio.sleep(ttft_s + (len(tokens) - m.num_tokens) * prefill_s_per_token)
                need = len(full) // page_size
                if pool.num_free < need:
                    cache.evict(need - pool.num_free)
                if pool.num_free >= need:
                    pages = pool.alloc(need)
                    cache.insert(full, pages, namespace)
                    pool.unref(pages)
                publish()
            finally:
                state["running"] -= 1
                state["served"] += 1

    def prefill_only(request: Request) -> bool:
        return marked(request.headers.get(PREFILL_ONLY_HEADER))

    def transfer(offer_id: int, tokens: list[int]) -> dict:
        """An offer of the prompt's pages as `parallel.kv_transfer: jax` makes one."""
        offer = {"uuid": offer_id, "pages": len(tokens) // page_size, "padded": 0, "last_hash": "0"}
        return {"address": name, "layout": "fake", "offers": [offer]}

    def prefilled(tokens: list[int]) -> dict:
        """A prefill for a decode replica, answered as a replica does (engine/disaggregation.py), with an offer of the
        prompt's pages (the uuid counts the prefills)."""
        state["prefills"] += 1
        return {"object": "prefill", "prompts": [{"prompt_tokens": len(tokens)}], "replica": name,
                "transfer": transfer(state["prefills"], tokens)}

    async def completion(request: Request, chat: bool):
        if (offers := request.headers.get(OFFERS_HEADER)) is not None:  # (what a decode replica would pull)
            state["offers"].append(json.loads(offers)["offers"][0]["uuid"])
        body = await request.json()
        tokens = prompt_tokens(tok, body, chat)
        max_tokens = int(body.get("max_tokens") or 8)
        model = body.get("model")
        if request.headers.get(PREFILL_ONLY_HEADER) == CACHED_ONLY:  # the router's peer fetch: offered, not computed
            state["peer_offers"] += 1
            return {"object": "prefill", "replica": name, "transfer": transfer(1000 + state["peer_offers"], tokens)}
        await serve(tokens, cache_namespace(body.get("cache_salt"), model if model in adapters else None))
        if prefill_only(request):
            return prefilled(tokens)
        words = fake_output(tokens, max_tokens)
        rid, created, model = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time()), body.get("model", "fake")
        usage = {"prompt_tokens": len(tokens), "completion_tokens": max_tokens,
                 "total_tokens": len(tokens) + max_tokens}
        if body.get("stream"):
            chunks = []
            for w in words:
                delta = {"index": 0, "delta": {"content": w}} if chat else {"index": 0, "text": w}
                chunks.append({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": model, "choices": [delta], "replica": name})
            lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
            if chunk_delay_s <= 0:
                return Response("".join(lines), media_type="text/event-stream")

            async def trickle():
                for line in lines:
                    yield line
                    await asyncio.sleep(chunk_delay_s)

            return StreamingResponse(trickle(), media_type="text/event-stream")
        text = "".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": usage, "replica": name}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/messages")
    async def messages(request: Request):  # the router relays bytes as they come: the chat path's serve its tests
        return await completion(request, chat=True)

    stored: dict[str, list[dict]] = {}  # /v1/responses kept: id -> the conversation, up to the reply
    stored_items: dict[str, list[dict]] = {}  # id -> its input items

    @app.post("/v1/responses")
    async def responses(request: Request):
        """Responses as a replica stores them (previous_response_id continues a conversation stored here, else 404);
        a stream opens with response.created, which names the id."""
        body = await request.json()
        previous = body.get("previous_response_id")
        if previous is not None and previous not in stored:
            return JSONResponse({"error": {"message": f"no stored response {previous!r}",
                                           "param": "previous_response_id", "code": "response_not_found"}}, 404)
        conversation = stored.get(previous, []) + input_messages(body["input"])
        tokens = tok.encode_chat(prompt_messages(body.get("instructions"), conversation))
        await serve(tokens, cache_namespace(body.get("cache_salt"), None))
        if prefill_only(request):
            return prefilled(tokens)
        text = "".join(fake_output(tokens, int(body.get("max_output_tokens") or 8)))
        rid = f"resp_{uuid.uuid4().hex}"
        response = {"id": rid, "object": "response", "status": "completed", "previous_response_id": previous,
                    "output": [{"type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": text}]}], "replica": name}
        if body.get("store", True):
            stored[rid] = conversation + [{"role": "assistant", "content": text}]
            stored_items[rid] = input_items(body["input"])
        if not body.get("stream"):
            return response
        events = [("response.created", {"response": {**response, "status": "in_progress", "output": []}}),
                  ("response.output_text.delta", {"delta": text}), ("response.completed", {"response": response})]
        lines = [f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i, **e})}\n\n"
                 for i, (kind, e) in enumerate(events)]

        async def trickle():  # in 7-byte pieces: the router finds the id however the stream is cut
            for line in lines:
                for i in range(0, len(line), 7):
                    yield line[i:i + 7]
                    await asyncio.sleep(chunk_delay_s)

        return StreamingResponse(trickle(), media_type="text/event-stream")

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    async def stored_response(request: Request, response_id: str):
        if response_id not in stored:
            return JSONResponse({"error": {"message": f"no stored response {response_id!r}"}}, 404)
        if request.method == "DELETE":
            del stored[response_id], stored_items[response_id]
            return {"id": response_id, "object": "response", "deleted": True}
        return {"id": response_id, "object": "response", "replica": name}

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):  # every response here is finished: returned as it is
        if response_id not in stored:
            return JSONResponse({"error": {"message": f"no stored response {response_id!r}"}}, 404)
        return {"id": response_id, "object": "response", "status": "completed", "replica": name}

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, order: str = "desc", limit: int = 20, after: str | None = None):
        if response_id not in stored:
            return JSONResponse({"error": {"message": f"no stored response {response_id!r}"}}, 404)
        return {**item_page(stored_items[response_id], order, limit, after), "replica": name}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        tokens = prompt_tokens(tok, body, chat=False)
        model = body.get("model")
        await serve(tokens, cache_namespace(body.get("cache_salt"), model if model in adapters else None))
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}],
                "model": model, "usage": {"prompt_tokens": len(tokens), "total_tokens": len(tokens)}, "replica": name}

    # the query's (text_1's) pages are what the router routes by; a classifier's input as an embedding's
    for path in ("/v1/score", "/v1/rerank", "/classify"):
        async def pooled(request: Request):
            body = await request.json()
            tokens = prompt_tokens(tok, body, chat=False)
            await serve(tokens, cache_namespace(body.get("cache_salt"), None))
            return {"usage": {"prompt_tokens": len(tokens), "total_tokens": len(tokens)}, "replica": name}

        app.add_api_route(path, pooled, methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": name}] + [
            {"id": a, "object": "model", "owned_by": name, "parent": "fake"} for a in adapters]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/load")
    async def load():
        return {"running": state["running"], "waiting": state["waiting"],
                "waiting_tokens": state["waiting_tokens"], "pages_free": pool.num_free,
                "pages_total": num_pages, "weights": state.get("weights", "fake")}

    @app.get("/v1/cache_events")
    async def cache_events(after: int = 0):
        oldest = events[0]["seq"] if events else state["seq"] + 1
        gap = after + 1 < oldest and after < state["seq"]
        out = [e for e in events if e["seq"] > after][:MAX_EVENTS_PER_CALL]
        return {"epoch": epoch, "last_seq": state["seq"], "gap": gap, "events": out}

    @app.get("/v1/cache_state")
    async def cache_state():
        by_ns: dict[str, list[int]] = {}
        for namespace, root in cache._roots.items():
            stack = [root]
            while stack:
                node = stack.pop()
                by_ns.setdefault(namespace or "", []).extend(node.hashes)
                stack.extend(node.children.values())
        return {"epoch": epoch, "last_seq": state["seq"], "block_hashes": by_ns}

    @app.get("/v1/prompt_format")
    async def prompt_format():
        return PromptFormat(page_size, probe=tuple(tok.encode(PROBE_TEXT))).as_json()

    # Admin endpoints as a replica answers them: adapters come and go, new weights empty the cache (its removals go
    # out on the feed); "bad" as a path is refused as a missing checkpoint is.
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await request.json()
        if body["lora_path"] == "bad":
            return JSONResponse({"error": {"message": "LoRA adapter bad: adapter_config.json not found"}}, 400)
        adapters.append(body["lora_name"])
        return {"success": True}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        adapters.remove((await request.json())["lora_name"])
        return {"success": True}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        path = (await request.json())["model_path"]
        if path == "bad":
            return JSONResponse({"error": {"message": "bad: no such file or directory"}}, 400)
        state["weights"] = path
        cache.reset()
        publish()
        state["weights_version"] = state.get("weights_version", 0) + 1
        return {"success": True, "weights_version": state["weights_version"]}

    @app.get("/stats")
    async def stats():
        return {"served": state["served"], "prefills": state["prefills"], "offers": state["offers"],
                "peer_offers": state["peer_offers"], "epoch": epoch, "name": name, "weights_version": state.get("weights_version", 0)}

    app.state.cache = cache
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="fake replica for router tests and demos (no model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=256)
    p.add_argument("--ttft-s", type=float, default=0.05)
    p.add_argument("--prefill-s-per-token", type=float, default=0.0)
    p.add_argument("--chunk-delay-s", type=float, default=0.0,
                   help="0: a stream's whole body in one write; else this pause between its chunks")
    p.add_argument("--name", default=None)
    p.add_argument("--adapters", default="", help="comma-separated LoRA adapter names it claims to serve")
    a = p.parse_args()
    import uvicorn

    app = create_app(a.page_size, a.num_pages, a.ttft_s, a.prefill_s_per_token, a.name or f"fake:{a.port}",
                     chunk_delay_s=a.chunk_delay_s, adapters=tuple(x for x in a.adapters.split(",") if x))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
