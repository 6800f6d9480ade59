"""The offline job over several replicas (`parallel.data`): one engine process per replica, lines routed by prefix.

A model that fits on fewer devices than the machine has serves faster as several replicas than as one sharded over
all of them. `scripts/generate.py` with `parallel.data: N` starts N worker processes, each an `LLMEngine` on its own
`parallel.tensor` devices (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES), and stays the only reader of the input and
writer of the output, so resuming, duplicate ids and the summary work as with one replica.

Routing is the router's (engine.router.policy.PrefixAware over a PrefixIndex): each line goes where the least
prefill is left to do, counting what the replica's cache holds (its cache events come back with its answers, as the
live router reads them from a replica's feed) and what is queued there. Prompts sharing a system prompt or document
thus land where it is cached, and a popular one spreads once its replica is loaded.

A worker that dies (out of memory, killed) is marked down; the lines it had not answered go to the others, and
nothing is written twice. The job stops only when no worker is left.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable, Collection, Iterable

if TYPE_CHECKING:
    from engine.router.policy import RouteRequest

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the coordinator looks for dead workers while it waits


class _Lost(Exception):
    """A worker died (its answer pipe closed, or its process is gone)."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


def device_env(index: int, tensor: int, environ=os.environ) -> dict[str, str]:
    """The environment that gives replica `index` its own `tensor` accelerators: its slice of the visible devices
    (CUDA_VISIBLE_DEVICES or HIP_VISIBLE_DEVICES when set, else 0, 1, ...). Nothing on a CPU-only run."""
    if environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return {}
    visible = environ.get("CUDA_VISIBLE_DEVICES") or environ.get("HIP_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range((index + 1) * tensor)]
    mine = ids[index * tensor : (index + 1) * tensor]
    if len(mine) < tensor:
        raise ValueError(f"parallel.data: replica {index} needs devices {index * tensor}..{(index + 1) * tensor - 1} "
                         f"of the visible ones ({visible}), which has {len(ids)}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine), "HIP_VISIBLE_DEVICES": ",".join(mine)}


# ------------------------------------------------------------------------------------------------ worker
def _worker(index: int, config_path: str, overrides: list[str], env: dict, inbox, outbox, openai_format: bool) -> None:
    """One replica: an engine on its devices, answering the lines the coordinator sends until it sends None."""
    os.environ.update(env)
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops the job (and its workers)
    from engine.config import load_config
    from engine.engine import LLMEngine

    try:
        config = load_config(config_path, overrides + ["parallel.data=1"])
        engine = LLMEngine(config, progress=index == 0)
    except Exception as e:  # reported by the coordinator, which stops the job
        outbox.send(("failed", index, f"{type(e).__name__}: {e}"))
        return
    import jax

    outbox.send(("ready", index, (jax.default_backend(), jax.device_count(), engine.startup_s)))
    take = functools.partial(_take, inbox, parent)
    if openai_format:
        _answer_openai(index, engine, config, take, outbox)
    else:
        _answer_lines(index, engine, config, take, outbox)
    engine.shutdown()
    outbox.send(("done", index, None))


def _take(inbox, parent: int, block: bool = True):
    """The coordinator's next item (queue.Empty if none and not `block`). A worker whose coordinator is gone (killed
    outright: no None came) exits rather than wait forever."""
    while True:
        try:
            return inbox.get(timeout=POLL_S) if block else inbox.get_nowait()
        except queue.Empty:
            if not block:
                raise
            if os.getppid() != parent:
                raise SystemExit(0)


def _events(events) -> list[dict]:
    return [{"kind": e.kind, "block_hashes": list(e.block_hashes), "medium": e.medium} for e in events]


def _answer_lines(index: int, engine, config, take, outbox) -> None:
    from engine.offline_job import LineJob

    job = LineJob(engine, config.server.reasoning_parser)
    engine.drain_cache_events()  # events are kept from here on (an engine nobody drains keeps none)
    limit, closing = 4 * config.scheduler.max_running, False
    while not closing or len(job):
        while not closing and len(job) < limit:
            try:
                item = take(block=not len(job))  # idle: wait for work; busy: take what is there
            except queue.Empty:
                break
            if item is None:
                closing = True
                break
            rid, obj = item
            if (error := job.submit(rid, obj)) is not None:
                outbox.send(("answers", index, [{"id": rid, "error": error}], []))
        if len(job):
            records, events = job.step(), engine.drain_cache_events()
            if records or events:
                outbox.send(("answers", index, records, _events(events)))


def _answer_openai(index: int, engine, config, take, outbox) -> None:
    from engine import openai_batch
    from engine.async_engine import AsyncEngine
    from engine.server import create_app

    async_engine = AsyncEngine(engine)
    feed, seen = async_engine.feed, 0
    app = create_app(async_engine, config)

    async def lines():
        while (line := await asyncio.to_thread(take)) is not None:
            yield line

    def emit(record: dict) -> None:
        nonlocal seen
        new = feed.events_after(seen)
        seen = new["last_seq"]
        outbox.send(("answers", index, [record], new["events"]))

    asyncio.run(openai_batch.run(app, lines(), emit, 4 * config.scheduler.max_running))


# ------------------------------------------------------------------------------------------- coordinator
class Coordinator:
    """Starts the workers, routes each line to one, and hands each answer to `emit` exactly once."""

    def __init__(self, config_path: str, overrides: list[str], config, openai_format: bool):
        from engine.router.index import PrefixIndex
        from engine.router.policy import PrefixAware, ReplicaState

        self.config = config
        self.num = config.parallel.data
        self.openai_format = openai_format
        self.emit: Callable[[dict], None] = print
        self.page_size = config.cache.page_size
        self.limit = 5 * config.scheduler.max_running  # unanswered lines per worker: its batch, and a queue
        self.index = PrefixIndex(self.num)
        self.policy = PrefixAware(self.index, self.page_size)
        self.states = [ReplicaState() for _ in range(self.num)]
        self.unanswered: list[dict[str, tuple[object, RouteRequest]]] = [{} for _ in range(self.num)]  # by key
        self.answered = [0] * self.num  # lines each replica answered
        self.done: set[int] = set()
        from engine.router.prompts import RequestTokens

        self.tokens = RequestTokens(replica_tokenizer(config))  # prompt ids as the replicas compute them
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX state inherited
        # NOTE: a pipe per worker for its answers, not one shared queue: a worker killed while writing would hold the
        # shared queue's lock forever, and every other worker's answers with it.
        pipes = [ctx.Pipe(duplex=False) for _ in range(self.num)]
        self.conns = [receive for receive, _ in pipes]
        self.inboxes = [ctx.Queue() for _ in range(self.num)]
        try:
            envs = [device_env(i, config.parallel.tensor) for i in range(self.num)]
        except ValueError as e:
            raise SystemExit(str(e)) from e
        self.procs = [ctx.Process(target=_worker, args=(i, config_path, overrides, envs[i], self.inboxes[i],
                                                         pipes[i][1], openai_format), daemon=True)
                      for i in range(self.num)]
        for p in self.procs:
            p.start()
        for _, send in pipes:
            send.close()  # the workers hold the sending ends: a dead worker's pipe reads as closed

    def wait_ready(self) -> float:
        """Waits for every worker's engine; -> the slowest start-up. A worker that cannot start stops the job."""
        print(f"starting {self.num} replicas (parallel.data; the first one's progress is shown)", file=sys.stderr)
        ready: dict[int, tuple] = {}
        while len(ready) < self.num:
            try:
                msg = self._next(skip=ready)
            except _Lost as lost:
                self.stop()
                raise SystemExit(f"replica {lost.index} exited while starting (exit code "
                                 f"{self.procs[lost.index].exitcode})") from None
            if msg is None:
                continue
            kind, i, info = msg
            if kind == "failed":
                self.stop()
                raise SystemExit(f"replica {i} could not start: {info}")
            ready[i] = info
        backends = {backend for backend, _, _ in ready.values()}
        if len(backends) > 1:
            self.stop()
            raise SystemExit(f"the replicas run on different platforms ({sorted(backends)}): fewer devices than "
                             f"parallel.data x parallel.tensor = {self.num * self.config.parallel.tensor}?")
        return max(startup for _, _, startup in ready.values())

    # --- lines -----------------------------------------------------------------------------------
    def run(self, lines: Iterable, emit: Callable[[dict], None]) -> None:
        """Routes every line and hands every answer to `emit`. `lines`: this job's (number, id, fields, error), or
        Batch lines (openai_batch.BatchLine); lines with an error are answered here."""
        self.emit = emit
        for line in lines:
            key, body, error_record = self._unpack(line)
            if error_record is not None:
                self.emit(error_record)
                continue
            self._send(key, line, self._route(body))
        for inbox in self.inboxes:
            inbox.put(None)
        while len(self.done) < self.num:
            self._handle(self._receive())
        self._close()

    def _unpack(self, line) -> tuple[str | None, dict | None, dict | None]:
        """(key, body to route by, or the line's own error record)."""
        if self.openai_format:
            from engine import openai_batch

            if line.error is not None:
                return None, None, openai_batch.error_record(line)
            return line.custom_id, line.body | {"_url": line.url}, None
        number, rid, obj, error = line
        if error is not None:
            return None, None, {"id": rid, "error": error} if rid is not None else {"id": None, "line": number,
                                                                                    "error": error}
        return rid, obj, None

    def _route(self, body: dict) -> RouteRequest:
        from engine.router.prompts import body_route, path_kind

        adapters = self.config.lora.adapters
        if self.openai_format:
            return body_route(body, path_kind(body["_url"]), self.tokens, self.page_size, adapters)
        if "messages" in body:  # a chat line, as the chat request of its fields (offline_job renders it so)
            fields = {"model": body.get("adapter") or "", "messages": body["messages"],
                      **{k: body[k] for k in ("chat_template_kwargs", "continue_final_message", "cache_salt")
                         if k in body}}
            return body_route(fields, "chat", self.tokens, self.page_size, adapters)
        if "prompt_embeds" in body:  # (its rows are read where it runs: routed by load)
            from engine.router.policy import RouteRequest

            return RouteRequest((), 0)
        text = "prompt" if "prompt" in body else "query"  # (a rerank line: by its query)
        fields = {text: body[text], "cache_salt": body.get("cache_salt"), "model": body.get("adapter")}
        return body_route(fields, "text", self.tokens, self.page_size, adapters)

    def _send(self, key: str, line, request) -> None:
        choice = self.policy.route(request, self.states, time.monotonic())
        i = choice.replica
        state = self.states[i]
        state.in_flight += 1
        state.queued_tokens += request.prompt_len - choice.matched_len
        self.unanswered[i][key] = (line, request)
        item = line if self.openai_format else (line[1], line[2])
        self.inboxes[i].put(item)
        while self.states[i].up and state.in_flight >= self.limit:
            self._handle(self._receive())

    # --- answers ----------------------------------------------------------------------------------
    def _receive(self):
        """The next message from a worker; None after POLL_S without one. A worker found dead is handled here."""
        try:
            return self._next(skip=self.done)
        except _Lost as lost:
            self._lost(lost.index, self.procs[lost.index].exitcode)
            return None

    def _next(self, skip: Collection[int]):
        """The next message from a worker not in `skip`, or None after POLL_S; _Lost for a worker that died."""
        live = [i for i in range(self.num) if i not in skip]
        ready = multiprocessing.connection.wait([self.conns[i] for i in live], timeout=POLL_S)
        for i in live:
            if self.conns[i] in ready:
                try:
                    return self.conns[i].recv()
                except (EOFError, OSError, pickle.UnpicklingError):  # closed, or cut mid-message: the worker died
                    raise _Lost(i) from None
        for i in live:
            if not self.procs[i].is_alive():
                raise _Lost(i)
        return None

    def _handle(self, msg) -> None:
        if msg is None:
            return
        kind, i = msg[0], msg[1]
        if kind == "done":
            self.done.add(i)
            return
        if kind != "answers" or not self.states[i].up:
            return  # a late message from a worker already given up on: its lines went elsewhere
        records, events = msg[2], msg[3]
        for event in events:
            self.index.apply_event(i, event)
        state = self.states[i]
        for record in records:
            key = record.get("custom_id") if self.openai_format else record.get("id")
            entry = self.unanswered[i].pop(key, None)
            if entry is None:
                continue
            state.in_flight -= 1
            state.queued_tokens = max(0, state.queued_tokens - entry[1].prompt_len)
            self.answered[i] += 1
            self.emit(record)

    def _lost(self, i: int, exitcode) -> None:
        """Worker `i` died: its unanswered lines go to the others."""
        if not self.states[i].up:
            return
        lines = list(self.unanswered[i].items())
        self.states[i].up = False
        self.index.drop(i)
        self.unanswered[i] = {}
        self.done.add(i)
        log.error("replica %d died (exit code %s); its %d unanswered lines go to the other replicas", i, exitcode,
                  len(lines))
        print(f"replica {i} died (exit code {exitcode}); {len(lines)} lines sent to the others", file=sys.stderr)
        if not any(s.up for s in self.states):
            raise SystemExit("every replica died; run again to resume")
        for key, (line, request) in lines:
            self._send(key, line, request)

    def stop(self) -> int:
        """Ends the workers now (interrupted: what they had not answered is not written). -> lines unanswered."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        self._close()
        return sum(map(len, self.unanswered))

    def _close(self) -> None:
        for p in self.procs:
            p.join(timeout=60)
        for q in self.inboxes:
            q.cancel_join_thread()  # what a dead worker left unread is dropped, not waited for
            q.close()
        for conn in self.conns:
            conn.close()


def replica_tokenizer(config):
    """The tokenizer the replicas prompt with (and their chat template), to hash lines as they will."""
    from models.chat_template import read_chat_template
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source(config.model.path))
    if config.model.chat_template:
        tokenizer = tokenizer.with_chat_template(read_chat_template(config.model.chat_template))
    return tokenizer
