"""Client requests through the router (`Router`), over the replicas a `Fleet` (engine/router/fleet.py) keeps.

One request's life through the router:
1. tokenize once, as the replicas will (engine/router/prompts.py: chats through the chat template call the server
   makes, with the chat template, page size and pair format the replicas report at /v1/prompt_format), and cut the
   tokens into chained block hashes with the replicas' page size, namespace = the request's `cache_salt`, within its
   LoRA adapter's namespace when `model` names one of the adapters the replicas list in /v1/models
   (engine.block_hash.cache_namespace, page_hashes);
2. the policy picks a replica (engine.router.policy; prefix_aware records the request's hashes
   on it as pending);
3. the body is forwarded unchanged (httpx, streaming when the client asked for a stream);
4. a failure before any byte reached the client (connection refused or reset, timeout, a 5xx,
   an empty stream) is retried on a replica not yet tried, up to max_attempts; a transport
   failure also marks the replica down, which drops its index entries. After the first byte
   the response is committed: a replica dying mid-stream ends the stream with an SSE error event.

Stored responses (/v1/responses) live in the memory of the replica that made them: a request with
`previous_response_id`, GET / DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items and POST
/v1/responses/{id}/cancel go to that replica
only (response_owners.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import anthropic_messages
from engine.disaggregation import CACHED_ONLY, HEADER as PREFILL_ONLY_HEADER, OFFERS_HEADER
from engine.openai_protocol import error_body
from engine.router.config import RouterConfig
from engine.router.fleet import FORWARD_HEADERS, Fleet
from engine.router.index import PrefixIndex
from engine.router.metrics import RouterMetrics
from engine.router.policy import Choice, NoReplicaAvailable, RouteRequest, make_policy
from engine.router.prompts import PromptFormat, RequestTokens, body_route, path_kind
from engine.router.response_owners import ResponseOwners

log = logging.getLogger("radixlm.router")
# Where a prefill replica's prompt pages help a decode replica: the paths that generate (pooling ones never go there).
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"})


def load_tokenizer(path: str):
    if path == "bytes":
        from engine.router.fake_replica import ByteTokenizer

        return ByteTokenizer()
    from models.loader import resolve_path
    from models.tokenizer import Tokenizer

    return Tokenizer.load(resolve_path(path))


class Router:
    """The policy, the stored responses' owners and the requests in flight, over a `Fleet`; no HTTP server of its
    own (engine/router/app.py serves it)."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.index = PrefixIndex(len(cfg.replica_urls), cfg.pending_ttl_s, cfg.affinity_ttl_s)
        self.policy = make_policy(cfg.policy, self.index, cfg.page_size, cfg.prefill_weight,
                                  cfg.request_cost_tokens, cfg.hot_spot_ratio, cfg.hot_spot_slack)
        self.metrics = RouterMetrics(cfg.replica_urls)
        self.fleet = Fleet(cfg, self.index, self.metrics, self._check_format)
        self._tokens: RequestTokens | None = None
        # NOTE: the fleet's own lists (never rebound): the policy reads the states the health checks write.
        self.urls, self.states = self.fleet.urls, self.fleet.states
        self.prefill_slots = cfg.prefill_slots  # prefill-only replicas (disaggregation): generation requests' first stop
        self.decode_slots = frozenset(range(len(self.urls))) - self.prefill_slots
        self.response_owners = ResponseOwners()  # stored /v1/responses ids -> the replica holding each
        self._prompt_tokens = self._matched_tokens = 0

    @property
    def client(self) -> httpx.AsyncClient | None:
        return self.fleet.client

    @property
    def adapters(self) -> set[str]:
        return self.fleet.adapters

    async def start(self) -> None:
        await self.fleet.start()

    async def stop(self) -> None:
        await self.fleet.stop()

    def _check_format(self, url: str, fmt: PromptFormat) -> None:
        """A replica told how it prompts: the policy weighs pages of the fleet's size; warns of a replica whose prompts
        the router cannot hash as it computes them (a tokenizer other than the router's: different ids for the probe
        text; or a format other than the fleet's)."""
        from engine.router.prompts import PROBE_TEXT

        self.policy.page_size = self.page_size
        if fmt.probe and list(fmt.probe) != list(self.tokenizer.encode(PROBE_TEXT)):
            log.warning("replica %s tokenizes differently from the router's tokenizer (%s): its requests' prefixes "
                        "will not be found; set the router's tokenizer to the replicas' model", url, self.cfg.tokenizer)
        differ = self.fleet.format.differences(fmt)
        if differ:
            log.warning("replica %s prompts otherwise than the fleet's first (%s): requests are hashed for the "
                        "first, so their prefixes will not be found on this one", url, ", ".join(differ))

    @property
    def page_size(self) -> int:
        """The replicas' page size (learned from them; until then, the configured one)."""
        fmt = self.fleet.format
        return self.cfg.page_size if fmt is None else fmt.page_size

    def request_tokens(self) -> RequestTokens:
        """Prompt tokens as the replicas compute them, for the format the fleet has learned (rebuilt when it does)."""
        fmt = self.fleet.format
        if self._tokens is None or self._tokens.format is not fmt:
            self._tokens = RequestTokens(self.tokenizer, fmt)
        return self._tokens

    def route_request(self, body: dict, path: str) -> RouteRequest:
        return body_route(body, path_kind(path), self.request_tokens(), self.page_size, self.adapters)

    async def forward(self, path: str, raw: bytes, headers: dict[str, str]):
        """Pick a replica, forward, retry on failure before the first byte. Returns a Starlette
        Response (streaming when the client asked for a stream)."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return _failure(path, 400, "body must be a JSON object", "invalid_request_error")
        stream = bool(body.get("stream"))
        anthropic = _is_anthropic(path)
        fwd = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        fwd["accept-encoding"] = "identity"  # NOTE: bytes are relayed raw, so they must not be compressed
        responses = path == "/v1/responses"
        learn = responses and body.get("store") is not False  # the replica keeps it: remember where
        pinned = None  # a conversation continues where its previous response is stored, and nowhere else
        if responses and isinstance(body.get("previous_response_id"), str):
            pinned = await self.response_owner(body["previous_response_id"], fwd)
            if isinstance(pinned, Response):
                return pinned
            req = RouteRequest((), 0)
        else:  # tokenized in a worker thread (the tokenizer lets go of the GIL): streams keep flowing meanwhile
            req = await asyncio.to_thread(self.route_request, body, path)
        offers = None  # a prefill replica's offer of the prompt's pages (parallel.kv_transfer: jax), for the decode one
        if self.prefill_slots and pinned is None and path in GENERATION_PATHS:
            if not self.cfg.prefill_min_tokens or self._uncached_tokens(req) >= self.cfg.prefill_min_tokens:
                offers = await self._prefill_first(path, raw, fwd, req)
            else:
                self.metrics.handoffs.labels("skipped_cached").inc()
        tried: set[int] = set()
        last_error = "no replica is up"
        for _ in range(self.cfg.max_attempts if pinned is None else 1):
            if pinned is not None:
                choice = Choice(pinned, 0, "previous_response")
            else:
                try:  # never a prefill-only replica
                    choice = self.policy.route(req, self.states, time.monotonic(), tried | self.prefill_slots)
                except NoReplicaAvailable:
                    break
            slot, url = choice.replica, self.urls[choice.replica]
            headers = fwd
            if offers is None and not tried and self.cfg.peer_fetch_min_tokens and req.block_hashes:
                offers = await self._peer_offer(slot, path, raw, fwd, req)
            if offers is not None and not tried:  # (an offer is pulled once: the first replica alone)
                headers = {**fwd, OFFERS_HEADER: offers}
            tried.add(slot)
            matched = choice.matched_len
            if not self.policy.uses_index and req.block_hashes:
                matched = min(self.index.match(req.block_hashes)[slot] * self.page_size, req.prompt_len)
            self.metrics.decisions.labels(self.policy.name, choice.reason).inc()
            ticket = _Ticket(self, slot, req.prompt_len - matched)
            try:
                upstream = await self.client.send(
                    self.client.build_request("POST", url + path, content=raw, headers=headers), stream=True)
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
            return StreamingResponse(self._relay(first, chunks, upstream, ticket, learn, anthropic),
                                     status_code=upstream.status_code, media_type=media_type)
        self.metrics.failures.labels("no_replica" if not tried else "attempts_exhausted").inc()
        return _failure(path, 503 if not tried else 502, f"no replica could serve the request ({last_error})",
                        "upstream_unavailable")

    def _uncached_tokens(self, req: RouteRequest) -> int:
        """The request's prompt tokens past the longest prefix any replica up holds, per the index (its pending entries
        included: a prefix just routed counts)."""
        depth = self.index.match(req.block_hashes) if req.block_hashes else [0] * len(self.urls)
        held = max((d for d, st in zip(depth, self.states) if st.up), default=0)
        return req.prompt_len - min(held * self.page_size, req.prompt_len)

    async def _prefill_first(self, path: str, raw: bytes, headers: dict[str, str], req: RouteRequest) -> str | None:
        """Prefill/decode disaggregation: the request, marked prefill-only, to a prefill replica (chosen by the policy
        among them), which answers once its prompt's pages are in the disk tier the decode replicas read, or with an
        offer of them to pull (-> the offer, for the decode replica's `OFFERS_HEADER`). Whatever fails here (no
        prefill replica up, an error, a timeout) only costs the decode replica the prefill: it then computes the
        prompt itself."""
        try:
            choice = self.policy.route(req, self.states, time.monotonic(), self.decode_slots)
        except NoReplicaAvailable:
            self.metrics.handoffs.labels("no_prefill_replica").inc()
            return None
        slot, url = choice.replica, self.urls[choice.replica]
        self.metrics.decisions.labels(self.policy.name, choice.reason).inc()
        ticket = _Ticket(self, slot, req.prompt_len - choice.matched_len)
        t0 = time.perf_counter()
        try:
            r = await self.client.post(url + path, content=raw, headers={**headers, PREFILL_ONLY_HEADER: "1"},
                                       timeout=self.cfg.request_timeout_s)
        except Exception as e:  # NOTE: as forward's: httpcore can leak other errors than httpx's
            log.warning("prefill replica %s failed (%r): the decode replica computes the prompt", url, e)
            self._retry(slot, transport=isinstance(e, httpx.TransportError))
            self.metrics.handoffs.labels("failed").inc()
            return None
        finally:
            ticket.release()
        self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        if r.status_code == 200:  # (prompt and matched tokens are counted once, for the decode replica)
            self.metrics.requests.labels(url).inc()
            self.metrics.handoffs.labels("ok").inc()
            try:
                return _offers_of(r)
            except ValueError:
                return None
        # A request the replicas refuse (400) is refused again, by name, by the decode replica: the client hears it
        # from there. Anything else is the prefill replica's trouble.
        self.metrics.handoffs.labels("refused" if r.status_code < 500 else "failed").inc()
        if r.status_code >= 500 or "no_disk_tier" in r.text:
            log.warning("prefill replica %s answered %d (%s): the decode replica computes the prompt", url,
                        r.status_code, r.text[:300])
        return None

    async def _peer_offer(self, slot: int, path: str, raw: bytes, headers: dict[str, str],
                          req: RouteRequest) -> str | None:
        """Peer fetch: where another replica up holds at least `peer_fetch_min_tokens` more of the prompt than `slot`
        does (per the index), its offer of the pages it holds (nothing computed there; `connect_timeout_s` at most),
        for `slot` to pull -> the offer, or None."""
        depth = self.index.match(req.exact_hashes)  # (pages hashed by an image's source are not offered)
        holder = max((r for r, st in enumerate(self.states) if st.up and r != slot), key=lambda r: depth[r],
                     default=None)
        if holder is None or (depth[holder] - depth[slot]) * self.page_size < self.cfg.peer_fetch_min_tokens:
            return None
        url = self.urls[holder]
        try:
            r = await self.client.post(url + path, content=raw, headers={**headers, PREFILL_ONLY_HEADER: CACHED_ONLY},
                                       timeout=self.cfg.connect_timeout_s)
            offers = _offers_of(r) if r.status_code == 200 else None
        except Exception as e:  # (as forward's: httpcore can leak other errors than httpx's)
            log.warning("peer fetch: replica %s failed to offer its pages (%r)", url, e)
            self.metrics.peer_fetches.labels("failed").inc()
            return None
        # (None: refused: no kv_transfer there, a field it refuses (the chosen replica says which))
        self.metrics.peer_fetches.labels("refused" if offers is None else "ok").inc()
        return offers

    async def _relay(self, first: bytes, chunks, upstream: httpx.Response, ticket: "_Ticket", learn: bool = False,
                     anthropic: bool = False):
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
            self.fleet.mark_down(ticket.slot)
            message = f"replica {self.urls[ticket.slot]} failed mid-stream: {e!r}"
            if anthropic:  # Anthropic's stream error: an `error` event
                yield f"event: error\ndata: {json.dumps(anthropic_messages.error_body(502, message))}\n\n".encode()
            else:
                yield f"data: {json.dumps(error_body(message, 'upstream_error'))}\n\n".encode()
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
        """GET or DELETE /v1/responses/{id}, or its `suffix` ("/input_items" with the client's `query`, POST "/cancel"),
        on the replica that stored it."""
        fwd = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
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
            self.fleet.mark_down(slot)

    def _count(self, slot: int, prompt_len: int, matched: int) -> None:
        self.metrics.requests.labels(self.urls[slot]).inc()
        self.metrics.prompt_tokens.inc(prompt_len)
        self.metrics.matched_tokens.inc(matched)
        self._prompt_tokens += prompt_len
        self._matched_tokens += matched
        if self._prompt_tokens:
            self.metrics.hit_rate.set(self._matched_tokens / self._prompt_tokens)


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


def _offers_of(r: httpx.Response) -> str | None:
    """A replica's prefill answer -> its offer of the prompt's pages (`transfer`) as `OFFERS_HEADER`'s value, or None
    (a prefill through the disk tier offers none); ValueError if the body is no JSON."""
    transfer = r.json().get("transfer")
    return None if transfer is None else json.dumps(transfer, separators=(",", ":"))


def _failure(path: str, status: int, message: str, kind: str) -> JSONResponse:
    """The router's own error response, shaped as the API of `path` answers errors (Anthropic's on /v1/messages)."""
    if _is_anthropic(path):
        return JSONResponse(anthropic_messages.error_body(status, message), status_code=status)
    return JSONResponse(error_body(message, kind), status_code=status)


def _is_anthropic(path: str) -> bool:
    """Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): its own body and error shapes."""
    return path.startswith("/v1/messages")
