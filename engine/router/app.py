"""The router: an OpenAI-compatible HTTP proxy in front of N replicas.

One request's life through the router:
1. tokenize once (chat: `encode_chat(messages)`; completions: `encode(prompt)` or the token ids)
   and cut the tokens into chained block hashes with the replicas' page size, namespace =
   the request's `cache_salt`, within its LoRA adapter's namespace when `model` names one of the
   adapters the replicas list in /v1/models (engine.block_hash.cache_namespace, page_hashes);
2. the policy picks a replica (engine.router.policy; prefix_aware records the request's hashes
   on it as pending);
3. the body is forwarded unchanged (httpx, streaming when the client asked for a stream);
4. a failure before any byte reached the client (connection refused or reset, timeout, a 5xx,
   an empty stream) is retried on a replica not yet tried, up to max_attempts; a transport
   failure also marks the replica down, which drops its index entries. After the first byte
   the response is committed: a replica dying mid-stream ends the stream with an SSE error event.

Background tasks keep the picture current: every health_interval_s, GET /health and /load on
each replica (a replica that answers again after being down is resynced from /v1/cache_state,
then rejoins); every poll_interval_s, GET /v1/cache_events?after=last_seq from each replica that
is up (a gap or a new epoch resyncs).

Admin calls (new weights, LoRA adapters loaded or unloaded, sleep, wake-up) go to every replica that is up
at once; the answer lists each replica's. A replica that comes up later is caught up (the fleet's weights and
adapters replayed) before it gets traffic.

Stored responses (/v1/responses) live in the memory of the replica that made them: a request with
`previous_response_id`, GET / DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items go to that replica
only (response_owners.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.parse
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.block_hash import cache_namespace, page_hashes
from engine.openai_protocol import error_body
from engine.openai_responses import input_messages, prompt_messages
from engine.router.config import RouterConfig
from engine.router.index import EventFeed, PrefixIndex
from engine.router.metrics import RouterMetrics
from engine.router.policy import Choice, NoReplicaAvailable, ReplicaState, RouteRequest, make_policy
from engine.router.response_owners import ResponseOwners

log = logging.getLogger("radixlm.router")

_FORWARD_HEADERS = ("authorization", "content-type", "accept", "openai-organization", "openai-project")
# Sent to every replica (engine/server.py's admin endpoints): a replica fleet changes weights and adapters together.
BROADCAST = ("/update_weights_from_disk", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up")


def load_tokenizer(path: str):
    if path == "bytes":
        from engine.router.fake_replica import ByteTokenizer

        return ByteTokenizer()
    from models.loader import resolve_path
    from models.tokenizer import Tokenizer

    return Tokenizer.load(resolve_path(path))


def body_route(body: dict, chat: bool, tokenizer, page_size: int, adapters=()) -> RouteRequest:
    """A request body's block hashes: tokenized once, full pages hashed in the request's cache namespace (its
    cache_salt, within the adapter its `model` names). An unparseable body routes with no prefix (the replica answers
    it with the proper 4xx). chat: chat messages, or a Responses body's instructions and input."""
    try:
        if chat:
            messages = body["messages"] if "messages" in body else \
                prompt_messages(body.get("instructions"), input_messages(body["input"]))
            tokens = tokenizer.encode_chat(messages)
        else:
            prompt = body["prompt"] if "prompt" in body else body["input"]  # completions, embeddings
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
                prompt = prompt[0]  # a batch of prompts: routed by the first
            tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        salt, model = body.get("cache_salt"), body.get("model")
        adapter = model if isinstance(model, str) and model in adapters else None
        hashes = page_hashes(tokens, page_size, cache_namespace(salt if isinstance(salt, str) else None, adapter))
    except Exception:
        return RouteRequest((), 0)
    return RouteRequest(tuple(hashes), len(tokens))


class Router:
    """Replica states, index, policy and the upstream client; no HTTP server of its own."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.urls = cfg.replica_urls
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.index = PrefixIndex(len(self.urls), cfg.pending_ttl_s)
        self.policy = make_policy(cfg.policy, self.index, cfg.page_size, cfg.prefill_weight,
                                  cfg.request_cost_tokens, cfg.hot_spot_ratio, cfg.hot_spot_slack)
        # NOTE: a replica starts down; it is routable once /health answers and its index is synced.
        self.states = [ReplicaState(up=False) for _ in self.urls]
        self.feeds = [EventFeed(self.index, slot) for slot in range(len(self.urls))]
        self.adapters: set[str] = set()  # LoRA adapter names the replicas serve (learned from their /v1/models)
        self.response_owners = ResponseOwners()  # stored /v1/responses ids -> the replica holding each
        self.metrics = RouterMetrics(self.urls)
        self.client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._prompt_tokens = self._matched_tokens = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = httpx.Timeout(self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        # NOTE: the key authenticates only the router's own calls (health, load, cache feeds);
        # client requests carry the client's own Authorization header through.
        key = self.cfg.replica_api_key or os.environ.get("RADIXLM_API_KEY")
        self._own_headers = {"authorization": f"Bearer {key}"} if key else {}
        # The fleet's state that admin calls set, replayed to a replica that comes up without it (restarted from its
        # config, or down during the call): the last weights update and the adapters loaded since, as (body, the
        # caller's headers).
        self._fleet_weights: tuple[bytes, dict[str, str]] | None = None
        self._fleet_adapters: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1000,
                                                                              max_keepalive_connections=200))
        await self.check_all()
        self._tasks = [asyncio.create_task(self._loop(self.check_all, self.cfg.health_interval_s)),
                       asyncio.create_task(self._loop(self.poll_all, self.cfg.poll_interval_s))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    async def _loop(self, fn, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except Exception:  # a background loop must survive anything one replica does
                log.exception("router background task failed")

    # --- replica health and cache feeds --------------------------------------------------------

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(slot) for slot in range(len(self.urls))))

    async def check(self, slot: int) -> None:
        url, st = self.urls[slot], self.states[slot]
        timeout = self.cfg.connect_timeout_s
        try:
            r = await self.client.get(f"{url}/health", timeout=timeout, headers=self._own_headers)
            if r.status_code != 200:
                raise httpx.HTTPStatusError("not ready", request=r.request, response=r)
            load = await self.client.get(f"{url}/load", timeout=timeout, headers=self._own_headers)
            if load.status_code == 200:
                st.waiting_tokens = int(load.json().get("waiting_tokens", 0))
            if not st.up:
                await self.catch_up(slot, load.json().get("weights") if load.status_code == 200 else None)
                self.adapters |= await self.learn_adapters(slot)
                await self.resync(slot)
                st.up = True
                self.metrics.up.labels(url).set(1)
                log.info("replica %s is up (epoch %s)", url, self.feeds[slot].epoch)
        except Exception as e:  # whatever the failure, a replica that cannot answer is down
            if st.up:
                log.warning("replica %s failed its health check: %r", url, e)
            self.mark_down(slot)

    async def learn_adapters(self, slot: int) -> set[str]:
        """LoRA adapters the replica serves (its /v1/models entries with a `parent`): a request naming one is hashed
        in that adapter's cache namespace, as the replica stores it."""
        try:
            r = await self.client.get(f"{self.urls[slot]}/v1/models", timeout=self.cfg.connect_timeout_s,
                                      headers=self._own_headers)
            if r.status_code == 200:
                return {m["id"] for m in r.json().get("data", []) if m.get("parent")}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no adapters learned: their requests route without prefix affinity
        return set()

    async def catch_up(self, slot: int, weights: str | None) -> None:
        """Replays to a replica coming up the admin calls it lacks: the fleet's weights if it serves others (its
        /load `weights`), and the adapters it does not list. A replay refused keeps it down (retried next check)."""
        calls = []
        if self._fleet_weights is not None and json.loads(self._fleet_weights[0]).get("model_path") != weights:
            calls.append(("/update_weights_from_disk", *self._fleet_weights))
        if self._fleet_adapters:
            served = await self.learn_adapters(slot)
            calls += [("/v1/load_lora_adapter", raw, headers) for name, (raw, headers) in self._fleet_adapters.items()
                      if name not in served]
        for path, raw, headers in calls:
            r = await self.client.post(f"{self.urls[slot]}{path}", content=raw, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"replaying {path} to {self.urls[slot]}: {r.status_code} {r.text[:200]}")
        if calls:
            log.info("replica %s caught up: %s", self.urls[slot], ", ".join(path for path, _, _ in calls))

    def _remember(self, path: str, raw: bytes, headers: dict[str, str]) -> None:
        """Records an admin call some replica took, for `catch_up`."""
        try:
            name = json.loads(raw).get("lora_name")
        except (ValueError, AttributeError):
            return
        if path == "/update_weights_from_disk":
            self._fleet_weights = (raw, headers)
        elif path == "/v1/load_lora_adapter":
            self._fleet_adapters[name] = (raw, headers)
        elif path == "/v1/unload_lora_adapter":
            self._fleet_adapters.pop(name, None)

    async def relearn_adapters(self) -> None:
        """The adapters every replica up serves now (after adapters were loaded or unloaded)."""
        learned = await asyncio.gather(*(self.learn_adapters(slot) for slot, st in enumerate(self.states) if st.up))
        self.adapters = set().union(*learned)

    async def broadcast(self, path: str, query: str, raw: bytes, headers: dict[str, str]) -> JSONResponse:
        """An admin call to every replica that is up, at once. -> 200 with each replica's answer when all succeed;
        else their shared status when all failed alike (a bad path: 400 everywhere), or 502 (some did, some not)."""
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARD_HEADERS}
        slots = [slot for slot, st in enumerate(self.states) if st.up]
        if not slots:
            return JSONResponse({"error": {"message": "no replica is up", "type": "upstream_unavailable"}}, 503)

        async def one(slot: int) -> dict:
            url = self.urls[slot]
            try:
                r = await self.client.post(f"{url}{path}" + (f"?{query}" if query else ""), content=raw, headers=fwd)
            except httpx.HTTPError as e:
                return {"replica": url, "status_code": 502, "body": {"error": {"message": f"{type(e).__name__}: {e}"}}}
            try:
                body = r.json()
            except ValueError:
                body = {"text": r.text}
            return {"replica": url, "status_code": r.status_code, "body": body}

        answers = await asyncio.gather(*(one(slot) for slot in slots))
        if any(a["status_code"] == 200 for a in answers):
            self._remember(path, raw, fwd)
        if path.endswith("_lora_adapter"):
            await self.relearn_adapters()
        codes = {a["status_code"] for a in answers}
        status = 200 if codes == {200} else codes.pop() if len(codes) == 1 else 502
        return JSONResponse({"success": status == 200, "replicas": answers}, status_code=status)

    def mark_down(self, slot: int) -> None:
        st = self.states[slot]
        if st.up:
            log.warning("replica %s is down; its index entries are dropped", self.urls[slot])
        st.up = False
        st.waiting_tokens = 0
        self.feeds[slot].drop()
        self.metrics.up.labels(self.urls[slot]).set(0)

    async def resync(self, slot: int) -> None:
        """Whole cache state from the replica; a replica without the feed endpoints stays unindexed."""
        r = await self.client.get(f"{self.urls[slot]}/v1/cache_state", timeout=self.cfg.request_timeout_s,
                                  headers=self._own_headers)
        if r.status_code == 404:
            return
        r.raise_for_status()
        self.feeds[slot].resync(r.json())

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(slot) for slot in range(len(self.urls)) if self.states[slot].up))

    async def poll(self, slot: int) -> None:
        feed, url = self.feeds[slot], self.urls[slot]
        try:
            for _ in range(100):  # at most 1M events per poll round
                if not feed.synced:
                    await self.resync(slot)
                    if not feed.synced:
                        return
                r = await self.client.get(f"{url}/v1/cache_events", params={"after": feed.last_seq},
                                          timeout=self.cfg.request_timeout_s, headers=self._own_headers)
                if r.status_code == 404:
                    return
                r.raise_for_status()
                status = feed.apply(r.json())
                if status == "resync":
                    feed.epoch = None  # next round of this loop fetches the snapshot
                elif status == "done":
                    return
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as e:
            log.warning("replica %s: bad cache feed response (%r)", url, e)
        except Exception as e:
            log.warning("replica %s: cache feed unreachable (%r)", url, e)
            self.mark_down(slot)

    # --- requests ------------------------------------------------------------------------------

    def route_request(self, body: dict, chat: bool) -> RouteRequest:
        return body_route(body, chat, self.tokenizer, self.cfg.page_size, self.adapters)

    async def forward(self, path: str, raw: bytes, headers: dict[str, str]):
        """Pick a replica, forward, retry on failure before the first byte. Returns a Starlette
        Response (streaming when the client asked for a stream)."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return JSONResponse({"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}},
                                status_code=400)
        stream = bool(body.get("stream"))
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARD_HEADERS}
        fwd["accept-encoding"] = "identity"  # NOTE: bytes are relayed raw, so they must not be compressed
        responses = path == "/v1/responses"
        learn = responses and body.get("store") is not False  # the replica keeps it: remember where
        pinned = None  # a conversation continues where its previous response is stored, and nowhere else
        if responses and isinstance(body.get("previous_response_id"), str):
            pinned = await self.response_owner(body["previous_response_id"], fwd)
            if isinstance(pinned, Response):
                return pinned
            req = RouteRequest((), 0)
        else:
            req = self.route_request(body, chat=path.endswith(("/chat/completions", "/responses")))
        tried: set[int] = set()
        last_error = "no replica is up"
        for _ in range(self.cfg.max_attempts if pinned is None else 1):
            if pinned is not None:
                choice = Choice(pinned, 0, "previous_response")
            else:
                try:
                    choice = self.policy.route(req, self.states, time.monotonic(), tried)
                except NoReplicaAvailable:
                    break
            slot, url = choice.replica, self.urls[choice.replica]
            tried.add(slot)
            matched = choice.matched_len
            if not self.policy.uses_index and req.block_hashes:
                matched = min(self.index.match(req.block_hashes)[slot] * self.cfg.page_size, req.prompt_len)
            self.metrics.decisions.labels(self.policy.name, choice.reason).inc()
            ticket = _Ticket(self, slot, req.prompt_len - matched)
            try:
                upstream = await self.client.send(
                    self.client.build_request("POST", url + path, content=raw, headers=fwd), stream=True)
            except Exception as e:  # NOTE: not only httpx.TransportError: httpcore can leak
                ticket.release()      # e.g. AttributeError when the peer dies mid-connect
                last_error = f"{url}: {e!r}"
                self._retry(slot, transport=True)
                continue
            if upstream.status_code >= 500:
                await upstream.aclose()
                ticket.release()
                last_error = f"{url}: HTTP {upstream.status_code}"
                self._retry(slot, transport=False)
                continue
            media_type = upstream.headers.get("content-type", "application/json")
            chunks = upstream.aiter_raw()
            try:
                if not stream:
                    content = await upstream.aread()
                    first = None
                else:
                    first = await chunks.__anext__()  # the stream is committed only once this arrives
            except Exception as e:  # a reset, a timeout, an empty stream: nothing reached the client
                await upstream.aclose()
                ticket.release()
                last_error = f"{url}: {e!r}"
                self._retry(slot, transport=not isinstance(e, StopAsyncIteration))
                continue
            self._count(slot, req.prompt_len, matched)
            ticket.first_byte()
            learn = learn and upstream.status_code == 200
            if not stream:
                await upstream.aclose()
                ticket.release()
                if learn:
                    self.response_owners.learn(content, slot)
                return Response(content, status_code=upstream.status_code, media_type=media_type)
            return StreamingResponse(self._relay(first, chunks, upstream, ticket, learn),
                                     status_code=upstream.status_code, media_type=media_type)
        self.metrics.failures.labels("no_replica" if not tried else "attempts_exhausted").inc()
        return JSONResponse({"error": {"message": f"no replica could serve the request ({last_error})",
                                       "type": "upstream_unavailable"}}, status_code=503 if not tried else 502)

    async def _relay(self, first: bytes, chunks, upstream: httpx.Response, ticket: "_Ticket", learn: bool = False):
        """learn: a Responses stream, whose first event names the response stored on this replica."""
        head = first if learn else None
        try:
            if head is not None and self.response_owners.learn(head, ticket.slot):
                head = None
            yield first
            async for chunk in chunks:
                if head is not None:  # the id may arrive split over chunks: look in the stream's opening bytes
                    head += chunk
                    if self.response_owners.learn(head, ticket.slot) or len(head) > 1 << 16:
                        head = None
                yield chunk
        except Exception as e:
            # NOTE: bytes already reached the client: no retry. Say so in the stream's own terms.
            self.metrics.failures.labels("mid_stream").inc()
            self.mark_down(ticket.slot)
            err = {"error": {"message": f"replica {self.urls[ticket.slot]} failed mid-stream: {e!r}",
                             "type": "upstream_error"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await upstream.aclose()
            ticket.release()

    async def response_owner(self, response_id: str, headers: dict[str, str],
                             param: str | None = "previous_response_id") -> int | Response:
        """The slot of the replica that stored the response: learned from the responses that passed through, else
        asked of every replica up (the id was evicted here, or the router restarted). An error response when no
        replica up holds it, or the one that does is down."""
        slot = self.response_owners.get(response_id)
        if slot is None:
            path = f"/v1/responses/{urllib.parse.quote(response_id, safe='')}"
            slots = [s for s, st in enumerate(self.states) if st.up]

            async def holds(s: int) -> bool:
                try:
                    r = await self.client.get(self.urls[s] + path, headers=headers, timeout=self.cfg.connect_timeout_s)
                    return r.status_code == 200
                except httpx.HTTPError:
                    return False

            found = await asyncio.gather(*(holds(s) for s in slots))
            slot = next((s for s, ok in zip(slots, found) if ok), None)
            if slot is None:
                return JSONResponse(error_body(f"no replica up holds response {response_id!r} (unknown, deleted, "
                                               "evicted, made with store: false, or its replica restarted)",
                                               param=param, code="response_not_found"), 404)
            self.response_owners.record(response_id, slot)
        if not self.states[slot].up:
            return JSONResponse(error_body(
                f"response {response_id!r} is stored on replica {self.urls[slot]}, which is down; a replica keeps its "
                "responses in its own memory, so this conversation cannot continue on another (send its whole input "
                "instead)", "upstream_unavailable", param, "replica_down"), 503)
        return slot

    async def stored_response(self, method: str, response_id: str, headers: dict[str, str], suffix: str = "",
                              query: str = "") -> Response:
        """GET or DELETE /v1/responses/{id}, or GET of its `suffix` ("/input_items") with the client's `query`, on the
        replica that stored it."""
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARD_HEADERS}
        slot = await self.response_owner(response_id, fwd, param=None)
        if isinstance(slot, Response):
            return slot
        url = f"{self.urls[slot]}/v1/responses/{urllib.parse.quote(response_id, safe='')}{suffix}"
        if query:
            url += f"?{query}"
        try:
            r = await self.client.request(method, url, headers=fwd, timeout=self.cfg.request_timeout_s)
        except httpx.HTTPError as e:
            return JSONResponse(error_body(f"{self.urls[slot]}: {e!r}", "upstream_unavailable"), 502)
        if r.status_code == 404 or (method == "DELETE" and r.status_code == 200):
            self.response_owners.forget(response_id)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    def _retry(self, slot: int, transport: bool) -> None:
        self.metrics.retries.labels(self.urls[slot]).inc()
        if transport:
            self.mark_down(slot)

    def _count(self, slot: int, prompt_len: int, matched: int) -> None:
        self.metrics.requests.labels(self.urls[slot]).inc()
        self.metrics.prompt_tokens.inc(prompt_len)
        self.metrics.matched_tokens.inc(matched)
        self._prompt_tokens += prompt_len
        self._matched_tokens += matched
        if self._prompt_tokens:
            self.metrics.hit_rate.set(self._matched_tokens / self._prompt_tokens)

    def describe(self) -> list[dict]:
        return [{"url": url, "up": st.up, "in_flight": st.in_flight, "queued_tokens": st.queued_tokens,
                 "waiting_tokens": st.waiting_tokens, "epoch": feed.epoch, "last_seq": feed.last_seq,
                 "index_blocks": self.index.num_confirmed(slot),
                 "pending_runs": self.index.num_pending_runs(slot)}
                for slot, (url, st, feed) in enumerate(zip(self.urls, self.states, self.feeds))]


class _Ticket:
    """One attempt's claim on a replica's load counters; released exactly once."""

    __slots__ = ("router", "slot", "tokens", "queued", "done")

    def __init__(self, router: Router, slot: int, tokens: int) -> None:
        self.router, self.slot, self.tokens = router, slot, tokens
        st = router.states[slot]
        st.in_flight += 1
        st.queued_tokens += tokens
        self.queued, self.done = True, False
        router.metrics.in_flight.labels(router.urls[slot]).set(st.in_flight)

    def first_byte(self) -> None:
        if self.queued:
            self.router.states[self.slot].queued_tokens -= self.tokens
            self.queued = False

    def release(self) -> None:
        if self.done:
            return
        self.first_byte()
        st = self.router.states[self.slot]
        st.in_flight -= 1
        self.done = True
        self.router.metrics.in_flight.labels(self.router.urls[self.slot]).set(st.in_flight)


def create_app(cfg: RouterConfig, tokenizer: Any = None):
    """The FastAPI app; `tokenizer` overrides cfg.tokenizer (tests)."""
    from contextlib import asynccontextmanager

    router = Router(cfg, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="RadixLM router", lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.forward("/v1/completions", await request.body(), dict(request.headers))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router.forward("/v1/chat/completions", await request.body(), dict(request.headers))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await router.forward("/v1/embeddings", await request.body(), dict(request.headers))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await router.forward("/v1/responses", await request.body(), dict(request.headers))

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    async def stored_response(request: Request, response_id: str):
        return await router.stored_response(request.method, response_id, dict(request.headers))

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(request: Request, response_id: str):
        return await router.stored_response("GET", response_id, dict(request.headers), "/input_items",
                                            request.url.query)

    for path in BROADCAST:
        async def admin(request: Request):
            return await router.broadcast(request.url.path, request.url.query, await request.body(),
                                          dict(request.headers))

        app.add_api_route(path, admin, methods=["POST"], summary="sent to every replica that is up")

    @app.get("/v1/models")
    async def models(request: Request):
        fwd = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        for slot, st in enumerate(router.states):
            if st.up:
                try:
                    r = await router.client.get(f"{router.urls[slot]}/v1/models", headers=fwd,
                                                timeout=cfg.connect_timeout_s)
                    return Response(r.content, status_code=r.status_code, media_type="application/json")
                except httpx.HTTPError:
                    continue
        return JSONResponse({"error": {"message": "no replica is up", "type": "upstream_unavailable"}},
                            status_code=503)

    @app.get("/health")
    async def health():
        up = sum(st.up for st in router.states)
        return JSONResponse({"status": "ok" if up else "no replica up", "replicas_up": up,
                             "replicas": len(router.states)}, status_code=200 if up else 503)

    @app.get("/replicas")
    async def replicas():
        return {"policy": router.policy.name, "replicas": router.describe()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for slot, url in enumerate(router.urls):
            router.metrics.index_blocks.labels(url).set(router.index.num_confirmed(slot))
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
