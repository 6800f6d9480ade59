"""`AsyncEngine`: an `LLMEngine` driven by one background thread, fed and drained from asyncio.

The engine is not thread safe, so only the engine thread touches it:

    HTTP handler (event loop)                     engine thread
    submit() -> command queue  ─────────────────▶ apply commands (add / abort / abort all)
                                                  engine.step()  while there is work
    RequestStream (asyncio.Queue) ◀── call_soon_threadsafe ── RequestOutput deltas
                                                  engine.drain_cache_events() -> CacheEventFeed
                                                  engine.stats() -> snapshot read by /load, /metrics

A stream that is closed before its requests finish (client gone, handler cancelled) aborts them, so
their pages go back to the pool at the next step boundary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from typing import Callable, Sequence

from engine.cache_feed import CacheEventFeed
from engine.engine import LLMEngine, RequestOutput
from engine.output import OutputKind
from engine.request import RequestError, SamplingParams

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine is shutting down (or died) and takes no more requests."""


class EngineOverloaded(EngineStopped):
    """The engine takes no more requests for now: as many as `max_waiting` already wait for a place in the batch."""


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str | None = None
    priority: int = 0  # scheduler.policy "priority": lower runs first
    adapter: str | None = None  # a LoRA adapter of the engine (None: the base model)
    images: tuple = ()  # engine.multimodal.ImageSpan of each image in the prompt
    # Pages of its prompt a prefill replica sent (engine.kv_transfer): (the last one's block hash, their payloads, the
    # first whose windowed layers' entries came along: a hybrid cache's)
    received: tuple | None = None


@dataclasses.dataclass(frozen=True)
class WeightUpdate:
    seconds: float  # the swap itself (reading the checkpoint came before, while serving)
    weights_version: int
    waited_for: int  # requests in flight when the update came, finished on the old weights
    aborted: int  # ... or aborted (abort_running)


IDLE_WAIT_S = 0.005  # engine thread's wait for commands when there is work but no step could be planned
HANDOFF_POLL_S = 0.005  # how often a prefill handed to a decode replica asks whether its pages are on disk


class RequestStream:
    """Outputs of the requests of one API call, as (index, RequestOutput), until every one has finished.

    Use as `async with engine.submit(...) as stream: async for index, out in stream: ...`; leaving
    the block early aborts the unfinished requests.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str], final_only: bool = False,
                 handoff: bool = False):
        self._engine = engine
        self.request_ids = request_ids
        self.final_only = final_only  # only each request's final output is delivered (a non-streaming call)
        # handoff: each request's whole prompt pages by block hash, set on the engine thread once it is added (a
        # prefill for a decode replica: engine.disaggregation)
        self.page_hashes: list[list[int]] | None = [] if handoff else None
        self.page_keys: list[tuple] | None = [] if handoff else None  # ... and their tokens and namespace
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._unfinished = set(request_ids)
        self.added: concurrent.futures.Future = concurrent.futures.Future()

    async def __aenter__(self) -> "RequestStream":
        try:
            await asyncio.wrap_future(self.added)  # raises RequestError / EngineStopped
        except asyncio.CancelledError:
            self.close()  # NOTE: queued after the add: an add not yet taken is skipped, a taken one aborted
            raise
        except BaseException:
            self._unfinished.clear()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return self._index[item.request_id], item

    def close(self) -> None:
        if self._unfinished:
            self._engine._abort(list(self._unfinished))
            self._unfinished.clear()

    def __del__(self):
        # NOTE: safety net for a stream dropped without close() (a response never started).
        if getattr(self, "_unfinished", None):
            self._engine._abort(list(self._unfinished))

    # called on the engine thread
    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


def _refuse(added: concurrent.futures.Future, error: BaseException) -> None:
    """Fails a queued add, unless its caller cancelled it meanwhile (a cancelled future takes no exception)."""
    if added.set_running_or_notify_cancel():
        added.set_exception(error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():  # its caller may have gone
        future.set_exception(error) if error is not None else future.set_result(result)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, feed: CacheEventFeed | None = None, max_waiting: int = 0):
        """max_waiting: a call whose requests would make more than this many wait is refused (EngineOverloaded);
        0: no limit."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.feed = feed or CacheEventFeed(recurrent=getattr(engine, "resumes_at_snapshots", False))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._accepting = True
        self.num_aborted = 0  # requests ended early: client gone, shutdown
        self._stats = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.on_finished: Callable[[RequestOutput], None] | None = None  # metrics hook, engine thread
        # Work waiting for the requests in flight to finish (a weight update, sleep; engine thread only), and the
        # requests that arrived meanwhile: they are added after it.
        self._when_idle: tuple | None = None  # (fn(waited, aborted), future, its loop, requests in flight, abort them)
        self._held: list[tuple] = []
        self.feed.publish(engine.drain_cache_events())

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Starts the engine thread (once; later calls do nothing)."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def begin_shutdown(self) -> None:
        """Stop accepting; every in-flight request ends now with finish_reason "abort" (signal-handler safe)."""
        self._accepting = False
        self._commands.put(("abort_all",))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Aborts everything and joins the engine thread."""
        self.begin_shutdown()
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def accepting(self) -> bool:
        return self._accepting and self._thread.is_alive()

    # ------------------------------------------------------------------------------ requests
    def submit(self, requests: Sequence[GenerateRequest], request_id: str, final_only: bool = False,
               handoff: bool = False) -> RequestStream:
        """Queues requests `{request_id}-{i}`; await the stream (`async with`) to learn if they were accepted.
        final_only: the stream yields each request's final output only (no wake-up of the caller per token).
        handoff: the stream learns each prompt's page hashes (`RequestStream.page_hashes`, for `disk_handoff`)."""
        stream = RequestStream(self, [f"{request_id}-{i}" for i in range(len(requests))], final_only, handoff)
        if not self.accepting:
            stream.added.set_exception(EngineStopped("the server is shutting down"))
        else:
            self._commands.put(("add", stream, list(requests)))
        return stream

    async def disk_handoff(self, hashes: list[int], timeout_s: float) -> int:
        """Waits until no page (or snapshot of recurrent states) named in `hashes` is still on its way to the disk tier,
        `timeout_s` at most -> how many of them, in a row from the first, are on disk."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (await self._on_engine_thread(lambda: self.engine.disk_saving(hashes))
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(HANDOFF_POLL_S)
        disk = self.engine.disk
        return 0 if disk is None else await self._on_engine_thread(lambda: disk.present(hashes))

    async def offer_pages(self, key: tuple) -> dict | None:
        """A prompt's pages (its `RequestStream.page_keys` entry) offered to a decode replica once (engine.kv_transfer:
        `ReplicaTransfer.offer`)."""
        return await self._on_engine_thread(lambda: self.engine.transfer.offer(*key))

    async def update_weights(self, source, abort_running: bool = False) -> "WeightUpdate":
        """New weights (`LLMEngine.update_weights`' sources): read and checked off the engine thread while it keeps
        serving, then swapped in once the requests in flight have finished (or been aborted, `abort_running`);
        requests that arrive meanwhile wait and run on the new weights."""
        prepared = await asyncio.get_running_loop().run_in_executor(None, self.engine.load_weights_for_update, source)

        def swap(waited: int, aborted: int) -> WeightUpdate:
            seconds = self.engine.update_weights(prepared)
            return WeightUpdate(seconds, self.engine.weights_version, waited, aborted)

        return await self._once_idle(swap, abort_running)

    async def sleep(self, level: int, abort_running: bool = False) -> None:
        """`LLMEngine.sleep` once the requests in flight have finished (or been aborted); requests that arrive meanwhile
        are refused as the sleeping engine refuses them."""
        await self._once_idle(lambda waited, aborted: self.engine.sleep(level), abort_running)

    async def wake_up(self) -> None:
        await self._on_engine_thread(self.engine.wake_up)

    async def _once_idle(self, fn: Callable[[int, int], object], abort_running: bool):
        """fn(requests waited for, requests aborted) on the engine thread once nothing is in flight."""
        return await self._ask("when_idle", fn, abort_running)

    async def load_adapter(self, name: str, path: str) -> None:
        """`LLMEngine.load_adapter`: the files read off the engine thread, the slot filled between steps."""
        loop = asyncio.get_running_loop()
        weights, digest = await loop.run_in_executor(None, self.engine.adapters.read, path)
        await self._on_engine_thread(lambda: self.engine.install_adapter(name, weights, digest))

    async def unload_adapter(self, name: str) -> None:
        await self._on_engine_thread(lambda: self.engine.unload_adapter(name))

    async def _on_engine_thread(self, fn: Callable[[], object]):
        """fn() on the engine thread, between steps -> its result (its exception raised here)."""
        return await self._ask("call", fn)

    async def _ask(self, *command):
        """Queues `command` + (a future, its loop) for the engine thread, which settles the future."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put((*command, done, loop))
        return await done

    def _abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    def stats(self) -> dict:
        """Latest `LLMEngine.stats()` (+ num_aborted), taken on the engine thread after each step."""
        return self._stats

    # -------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        wait_s: float | None = None
        try:
            while True:
                # Wait for commands only when idle; otherwise take what arrived since the last step.
                if not self._apply_commands(wait_s):
                    break
                wait_s = None
                if self._when_idle is not None and not self.engine.has_unfinished():
                    self._run_when_idle()
                if not self.engine.has_unfinished():
                    continue
                num_steps = self.engine.num_steps
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug; fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(RuntimeError(f"engine step failed: {e}"))
                    continue
                self._deliver(outputs)
                self._after_change()
                # NOTE: work but nothing schedulable (no plan) would spin; wait a little for commands instead.
                wait_s = IDLE_WAIT_S if self.engine.num_steps == num_steps else 0.0
        finally:
            self._accepting = False
            self._fail_all(EngineStopped("the server is shutting down"))
            if self._when_idle is not None:
                _, done, loop, _, _ = self._when_idle
                loop.call_soon_threadsafe(_settle, done, None, EngineStopped("the server is shutting down"))
            for cmd in self._held:
                _refuse(cmd[1].added, EngineStopped("the server is shutting down"))
            while True:  # requests queued behind the stop still get an answer
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    _refuse(cmd[1].added, EngineStopped("the server is shutting down"))
                elif cmd[0] in ("call", "when_idle"):
                    cmd[-2].get_loop().call_soon_threadsafe(_settle, cmd[-2], None,
                                                            EngineStopped("the server is shutting down"))

    def _apply_commands(self, wait_s: float | None) -> bool:
        """Applies queued commands, waiting up to `wait_s` for the first (None: until one comes); False on "stop"."""
        changed = False
        while True:
            try:
                cmd = self._commands.get(block=wait_s != 0.0, timeout=wait_s)
            except queue.Empty:
                break
            wait_s = 0.0
            changed = True
            if cmd[0] == "add":
                if self._when_idle is not None:
                    self._held.append(cmd)
                else:
                    self._add(cmd[1], cmd[2])
            elif cmd[0] == "call":
                _, fn, done, loop = cmd
                try:
                    result, error = fn(), None
                except Exception as e:
                    result, error = None, e
                loop.call_soon_threadsafe(_settle, done, result, error)
            elif cmd[0] == "when_idle":
                _, fn, abort_running, done, loop = cmd
                if self._when_idle is not None:
                    loop.call_soon_threadsafe(_settle, done, None, RequestError("a weight update or sleep is already "
                                                                                "waiting for the requests in flight"))
                    continue
                self._when_idle = (fn, done, loop, len(self._streams), abort_running)
                if abort_running:
                    self._abort_all()
            elif cmd[0] == "abort":
                gone = set(cmd[1])  # held requests whose client left are never added
                self._held = [c for c in self._held if not gone.intersection(c[1].request_ids)]
                for rid in cmd[1]:
                    if self.engine.abort(rid):
                        self._streams.pop(rid, None)
                        self.num_aborted += 1
            elif cmd[0] == "abort_all":
                self._abort_all()
            elif cmd[0] == "stop":
                return False
        if changed:
            self._after_change()
        return True

    def _add(self, stream: RequestStream, requests: list[GenerateRequest]) -> None:
        if not stream.added.set_running_or_notify_cancel():  # cancelled while queued: nobody waits, nothing added
            return
        if not self._accepting:
            stream.added.set_exception(EngineStopped("the server is shutting down"))
            return
        if self.max_waiting and (waiting := self.engine.num_waiting) + len(requests) > self.max_waiting:
            stream.added.set_exception(EngineOverloaded(
                f"the server is overloaded: {waiting} requests wait already (server.max_waiting_requests="
                f"{self.max_waiting}); try again shortly"))
            return
        added = []
        # A stream gets deltas: its step costs the same at any length.
        kind = OutputKind.FINAL if stream.final_only else OutputKind.DELTA
        try:
            for rid, req in zip(stream.request_ids, requests):
                self.engine.add_request(req.prompt_ids, req.params, request_id=rid, namespace=req.namespace,
                                        priority=req.priority, adapter=req.adapter, output_kind=kind,
                                        **({"images": req.images} if req.images else {}))
                added.append(rid)
                self._streams[rid] = stream
                if stream.page_hashes is not None:
                    stream.page_hashes.append(self.engine.prompt_page_hashes(rid))
                    stream.page_keys.append(self.engine.prompt_pages_key(rid))
                if req.received is not None:
                    self.engine.receive_prompt_pages(rid, *req.received)
        except Exception as e:  # all or nothing: one bad sample fails the call
            for rid in added:
                self.engine.abort(rid)
                self._streams.pop(rid, None)
            stream.added.set_exception(e if isinstance(e, RequestError) else RequestError(str(e)))
            return
        stream.added.set_result(None)

    def _run_when_idle(self) -> None:
        fn, done, loop, in_flight, aborted = self._when_idle
        self._when_idle = None
        try:
            result, error = fn(0 if aborted else in_flight, in_flight if aborted else 0), None
        except Exception as e:  # refused (bad weights, ...): the engine serves as before
            result, error = None, e
        loop.call_soon_threadsafe(_settle, done, result, error)
        held, self._held = self._held, []
        for cmd in held:
            self._add(cmd[1], cmd[2])
        self._after_change()  # an emptied cache reaches the router feed

    def _abort_all(self) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self.num_aborted += 1
            stream._put(RequestOutput(rid, "", [], True, "abort", "", [], 0, 0))
        self._streams.clear()

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream._put(error)
        self._streams.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop per step, not one per token.
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or (stream.final_only and not out.finished):
                continue
            if out.finished:
                del self._streams[out.request_id]
                if self.on_finished is not None:
                    try:
                        self.on_finished(out)
                    except Exception:
                        log.exception("on_finished hook failed")
            batches.setdefault(stream._loop, []).append((stream._queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _after_change(self) -> None:
        self.feed.publish(self.engine.drain_cache_events())
        self._stats = self._read_stats()

    def _read_stats(self) -> dict:
        stats = dict(self.engine.stats())
        stats["num_aborted"] = self.num_aborted
        return stats
