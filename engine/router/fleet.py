"""The replicas as the router sees them (`Fleet`): up or down, their cache feeds into the prefix index, the LoRA
adapters they serve, and the admin calls sent to all of them. Forwarding client requests is engine/router/forward.py's.

Background tasks keep the picture current: every health_interval_s, GET /health and /load on
each replica (a replica that answers again after being down tells how it prompts at /v1/prompt_format, is resynced
from /v1/cache_state, then rejoins); every poll_interval_s, GET /v1/cache_events?after=last_seq from each replica that
is up (a gap or a new epoch resyncs).

Admin calls (new weights, LoRA adapters loaded or unloaded, sleep, wake-up) go to every replica that is up
at once; the answer lists each replica's. A replica that comes up later is caught up (the fleet's weights and
adapters replayed) before it gets traffic.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import httpx
from fastapi.responses import JSONResponse

from engine.router.config import RouterConfig
from engine.router.index import EventFeed, PrefixIndex
from engine.router.metrics import RouterMetrics
from engine.router.policy import ReplicaState
from engine.router.prompts import PromptFormat

log = logging.getLogger("radixlm.router")

FORWARD_HEADERS = ("authorization", "x-api-key", "content-type", "accept", "openai-organization", "openai-project",
                   "anthropic-version", "anthropic-beta")
# Sent to every replica (engine/server.py's admin endpoints): a replica fleet changes weights and adapters together.
BROADCAST = ("/update_weights_from_disk", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up")


class Fleet:
    """Replica states and cache feeds (into `index`), the adapters served, the fleet's admin state, the background
    health and feed loops, and the upstream HTTP client (shared with forwarding). A replica is a slot: an index
    into `urls`, `states` and `feeds`."""

    def __init__(self, cfg: RouterConfig, index: PrefixIndex, metrics: RouterMetrics,
                 check_format=lambda url, fmt: None) -> None:
        self.cfg = cfg
        # How each replica prompts (its /v1/prompt_format; None: not told), and the one requests are hashed for: the
        # first a replica told. check_format(url, fmt) warns of a replica that prompts otherwise.
        self.formats: list[PromptFormat | None] = [None] * len(cfg.replica_urls)
        self.format: PromptFormat | None = None
        self._check_format = check_format
        self.urls = cfg.replica_urls
        self.index = index
        self.metrics = metrics
        # NOTE: a replica starts down; it is routable once /health answers and its index is synced.
        self.states = [ReplicaState(up=False) for _ in self.urls]
        self.feeds = [EventFeed(self.index, slot) for slot in range(len(self.urls))]
        self.adapters: set[str] = set()  # LoRA adapter names the replicas serve (learned from their /v1/models)
        self.client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []

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
                await self.learn_format(slot)
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

    async def learn_format(self, slot: int) -> None:
        """How the replica prompts (its /v1/prompt_format), asked as it comes up (`adopt_format`). A replica without the
        endpoint (404) is hashed for as configured; a bad answer is logged."""
        url = self.urls[slot]
        r = await self.client.get(f"{url}/v1/prompt_format", timeout=self.cfg.connect_timeout_s,
                                  headers=self._own_headers)
        if r.status_code == 404:
            return
        r.raise_for_status()
        try:
            fmt = PromptFormat.from_json(r.json())
        except ValueError as e:
            log.warning("replica %s: bad /v1/prompt_format answer (%s); its requests are hashed as configured", url, e)
            return
        self.adopt_format(slot, fmt)

    def adopt_format(self, slot: int, fmt: PromptFormat) -> None:
        """Records how the replica in `slot` prompts. It becomes the fleet's format when there is none yet, or when no
        other replica up prompts as the fleet's does (all of them were restarted with new settings, one by one)."""
        self.formats[slot] = fmt
        if fmt != self.format and not any(
                st.up and self.formats[s] == self.format for s, st in enumerate(self.states) if s != slot):
            self.format = fmt
            log.info("hashing prompts as replica %s prompts them: pages of %d tokens%s%s", self.urls[slot],
                     fmt.page_size, ", its chat template" if fmt.chat_template else "",
                     ", pairs through its score template" if fmt.cross_encoder and fmt.score_template else "")
        self._check_format(self.urls[slot], fmt)

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
        fwd = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
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

    def describe(self) -> list[dict]:
        return [{"url": url, "up": st.up, "in_flight": st.in_flight, "queued_tokens": st.queued_tokens,
                 "waiting_tokens": st.waiting_tokens, "epoch": feed.epoch, "last_seq": feed.last_seq,
                 "index_blocks": self.index.num_confirmed(slot),
                 "pending_runs": self.index.num_pending_runs(slot), "prompt_format": self._format_state(slot)}
                for slot, (url, st, feed) in enumerate(zip(self.urls, self.states, self.feeds))]

    def _format_state(self, slot: int) -> str:
        """"hashed for" (requests are hashed as it prompts), "unknown" (it has not told), or "differs: FIELDS"."""
        fmt = self.formats[slot]
        if fmt is None:
            return "unknown"
        differ = self.format.differences(fmt)
        return f"differs: {', '.join(differ)}" if differ else "hashed for"

