"""Several replicas of one config on this host behind the prefix-aware router: `scripts/serve.py` with
`parallel.data: N`.

One command serves N replicas: each is a `serve.py` child process (one engine) on its own `parallel.tensor` devices
(engine.data_parallel.device_env) and a free port on 127.0.0.1, and this process runs the router
(engine.router) on `server.host:server.port` in front of them. Clients see one OpenAI-compatible server; admin
calls (weight updates, adapters, sleep) reach every replica through the router's broadcast.

A replica that exits is started again (after 1 s, doubling up to 60 s while it keeps failing soon after start);
meanwhile the router sends its traffic elsewhere, and when it is back the router's catch-up replays the fleet's
weight update and adapters to it (docs/routing.md). Stopping the server stops the replicas.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import uvicorn

SERVE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "serve.py")
MAX_BACKOFF_S = 60.0
PEER_FETCH_PAGES = 4  # with parallel.kv_transfer: jax, the router's peer_fetch_min_tokens in pages
STABLE_S = 300.0  # a replica up this long has its restart delay reset


def free_ports(n: int) -> list[int]:
    """n distinct free local ports: each socket stays bound until all are chosen (ports taken one at a time, each
    released before the next, may repeat)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class LocalReplicas:
    """The replica processes: started, waited for, restarted when they exit, stopped."""

    def __init__(self, config_path: str | None, overrides: list[str], config):
        from engine.data_parallel import device_env

        self.num = config.parallel.data
        self.ports = free_ports(self.num)
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.envs = [device_env(i, config.parallel.tensor) for i in range(self.num)]
        base = [sys.executable, SERVE] + (["--config", config_path] if config_path else [])
        self.cmds = [base + ["--set", *overrides, "parallel.data=1", "parallel.prefill_replicas=0", "server.host=127.0.0.1",
                             f"server.port={port}"]
                     for port in self.ports]
        self.procs: list[subprocess.Popen | None] = [None] * self.num
        self._started_s = [0.0] * self.num
        self.restarts = [0] * self.num
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, name="replica-watch", daemon=True)

    def start(self) -> None:
        for i in range(self.num):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.cmds[i], env={**os.environ, **self.envs[i]})
        self._started_s[i] = time.monotonic()

    def wait_healthy(self, timeout_s: float = 3600.0) -> None:
        """Until every replica answers /health (model loaded, steps compiled). A replica that exits first stops
        start-up: SystemExit naming it."""
        deadline, pending = time.monotonic() + timeout_s, set(range(self.num))
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    self.stop()
                    raise SystemExit(f"serve.py: replica {i} exited while starting (exit code "
                                     f"{self.procs[i].returncode}); its log is above")
                if _healthy(self.urls[i]):
                    pending.discard(i)
                    print(f"serve.py: replica {i} ready at {self.urls[i]}", file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"serve.py: replicas {sorted(pending)} not ready after {timeout_s:.0f} s")
            time.sleep(0.5)
        self._watch.start()

    def _watch_loop(self) -> None:
        """Restarts replicas that exit, with a delay that doubles while they keep failing soon after start."""
        delays = [1.0] * self.num
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is None:
                    if time.monotonic() - self._started_s[i] > STABLE_S:
                        delays[i] = 1.0
                    continue
                print(f"serve.py: replica {i} exited (code {proc.returncode}); starting it again in "
                      f"{delays[i]:.0f} s", file=sys.stderr, flush=True)
                if self._stopping.wait(delays[i]):
                    return
                delays[i] = min(delays[i] * 2, MAX_BACKOFF_S)
                self.restarts[i] += 1
                self._spawn(i)

    def stop(self) -> None:
        """SIGTERM to every replica (each ends its requests in flight and exits), then waits; SIGKILL after 30 s."""
        self._stopping.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def serve(config_path: str | None, overrides: list[str], config, api_key: str | None) -> int:
    """Runs the replicas and the router until SIGINT / SIGTERM."""
    from engine.data_parallel import replica_tokenizer
    from engine.router.app import create_app
    from engine.router.config import RouterConfig

    num_prefill = config.parallel.prefill_replicas
    if num_prefill and not config.cache.disk_path and config.parallel.kv_transfer != "jax":
        print("serve.py: config error: parallel.prefill_replicas hands prompts' KV to the decode replicas through the "
              "disk tier they share: set cache.disk_path (on a GPU host, a directory in memory such as /dev/shm/...), "
              "or pull them over the network: parallel.kv_transfer=jax",
              file=sys.stderr)
        return 2
    replicas = LocalReplicas(config_path, overrides, config)
    print(f"serve.py: starting {replicas.num} replicas (parallel.data) on ports {replicas.ports}"
          + (f", the first {num_prefill} prefill only" if num_prefill else ""), file=sys.stderr, flush=True)
    replicas.start()
    try:
        replicas.wait_healthy()
        router_cfg = RouterConfig(replicas=",".join(replicas.urls[num_prefill:]),
                                  prefill_replicas=",".join(replicas.urls[:num_prefill]),
                                  page_size=config.cache.page_size, tokenizer=config.model.path,
                                  replica_api_key=api_key, host=config.server.host, port=config.server.port,
                                  # replicas that pull pages over the network also pull a prefix from each other
                                  peer_fetch_min_tokens=PEER_FETCH_PAGES * config.cache.page_size
                                  if config.parallel.kv_transfer == "jax" else 0)
        app = create_app(router_cfg, replica_tokenizer(config))
        print(f"serve.py: serving {config.served_model_name!r} on http://{config.server.host}:{config.server.port}/v1 "
              f"through the router (prefix_aware) over {replicas.num} replicas"
              + (f" ({num_prefill} prefill, {replicas.num - num_prefill} decode)" if num_prefill else ""),
              file=sys.stderr, flush=True)
        _RouterServer(uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level="warning")).run()
    finally:
        replicas.stop()
    return 0


class _RouterServer(uvicorn.Server):
    """uvicorn, without re-raising the stop signal after its graceful shutdown: the replicas are stopped after it."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
