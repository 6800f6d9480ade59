"""`scripts/serve.py` with parallel.data=2 (engine/local_replicas.py): two replica processes behind the router on one
port. Requests keep prefix affinity, a killed replica is started again while the other serves, and stopping the
server stops the replicas."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine.local_replicas import free_ports
from tests.test_generate import tiny_checkpoint  # noqa: F401 (fixture)

SYSTEM = "You are a careful assistant for a hardware store. Answer in one short sentence. " * 6


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "serve.py"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_two_replicas_behind_one_port(tiny_checkpoint, tmp_path):  # noqa: F811
    [port] = free_ports(1)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set",
                             f"model.path={tiny_checkpoint}", "model.max_model_len=256", "cache.num_pages=256",
                             "warmup=false", "parallel.data=2", f"server.port={port}"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            _wait(lambda: http.get("/health").status_code == 200, 300, "the router")
            assert http.get("/health").json()["replicas_up"] == 2

            def chat(question: str) -> str:
                r = http.post("/v1/chat/completions", json={
                    "model": "smollm2-135m-instruct", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            answers = [chat(f"Question {i}?") for i in range(4)]
            time.sleep(1.0)  # the router reads the replicas' cache feeds every 0.2 s
            blocks = sorted(r["index_blocks"] for r in http.get("/replicas").json()["replicas"])
            assert blocks[0] == 0 and blocks[1] > 0, blocks  # one system prompt, one replica

            # A replica killed: the other serves (same greedy answers); it is started again and rejoins.
            replicas = _children(proc.pid)
            assert len(replicas) == 2, replicas
            os.kill(replicas[0], signal.SIGKILL)
            _wait(lambda: http.get("/health").json()["replicas_up"] == 1, 30, "the router to see the replica gone")
            assert [chat(f"Question {i}?") for i in range(4)] == answers
            _wait(lambda: http.get("/health").json()["replicas_up"] == 2, 300, "the replica to come back")
            assert len(_children(proc.pid)) == 2
    finally:
        replicas = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert code == 0, text[-3000:]
    assert "replica 0 exited" in text or "replica 1 exited" in text
    assert len(replicas) == 2 and not any(os.path.exists(f"/proc/{pid}") for pid in replicas)  # stopped with it
