"""Shared-prefix load for a live router (or one replica): groups of requests sharing a long system
prompt, each with its own short question, streamed, with TTFT and throughput measured here.

    python -m engine.router.loadgen --url http://127.0.0.1:8080 --groups 12 --prefix-words 700 \
        --requests 360 --concurrency 6

Group popularity is uniform and requests are shuffled, so with more groups than one replica's
cache holds, only routing by prefix keeps every group's prefix hot somewhere. At the end the
router's /metrics hit-rate estimate is printed when the URL is a router.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


def group_prompt(group: int, words: int) -> str:
    rng = random.Random(group)
    vocab = ["alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor", "ivory", "jolly", "karma",
             "lunar", "mango", "nylon", "orbit", "pixel", "quartz", "radar", "sonic", "tango", "umbra", "vivid"]
    body = " ".join(rng.choice(vocab) for _ in range(words))
    return f"You are support agent #{group}. Policy manual follows. {body}"


def group_tools(group: int, n: int) -> list[dict]:
    """The `n` function tools an agent of `group` carries in every request (its own, as agents' are)."""
    rng = random.Random(1000 + group)
    verbs, things = ["lookup", "update", "cancel", "refund", "escalate", "schedule"], ["order", "ticket", "invoice",
                                                                                     "account", "shipment", "refund"]
    return [{"type": "function", "function": {
        "name": f"{rng.choice(verbs)}_{rng.choice(things)}_{group}_{k}",
        "description": f"Agent {group}'s tool {k}: " + " ".join(rng.choice(things) for _ in range(12)),
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}, "note": {"type": "string"}},
                       "required": ["id"]}}} for k in range(n)]


def request_body(model: str, group: int, i: int, words: int, max_tokens: int, tools: int = 0,
                 parts: bool = False) -> dict:
    """A request of `group`: its system prompt (and `tools` tools), then question `i`; `parts`: each message's
    content as a list of text parts, as typed clients send it."""
    messages = [{"role": "system", "content": group_prompt(group, words)},
                {"role": "user", "content": f"Question {i}: what does clause {i % 97} say?"}]
    if parts:
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    return {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "messages": messages,
            **({"tools": group_tools(group, tools)} if tools else {})}


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, list[float]]:
    """(TTFT: to the first chunk with text, not the role's that opens the stream; end to end; the gaps between the
    chunks with text after it: inter-token latencies) of one streamed chat."""
    t0 = time.perf_counter()
    ttft, last, gaps = None, 0.0, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(line)
            if not any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, gaps


def jobs(groups: int, requests: int, seed: int) -> list[tuple[int, int]]:
    """(group, request index) in send order: uniform group popularity, shuffled."""
    rng = random.Random(seed)
    return [(rng.randrange(groups), i) for i in range(requests)]


async def collect(url: str, model: str, work: list[tuple[int, int]], words: int, max_tokens: int,
                  concurrency: int, timeout_s: float = 600, tools: int = 0, parts: bool = False
                  ) -> list[tuple[float, float, list[float]]]:
    """Sends `work` with at most `concurrency` in flight (`request_body`'s); `one`'s timings per request."""
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[float, float, list[float]]] = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:

        async def task(g: int, i: int) -> None:
            async with sem:
                results.append(await one(client, url, request_body(model, g, i, words, max_tokens, tools, parts)))

        await asyncio.gather(*(task(g, i) for g, i in work))
    return results


async def run(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    results = await collect(a.url, a.model, jobs(a.groups, a.requests, a.seed), a.prefix_words, a.max_tokens,
                            a.concurrency, tools=a.tools, parts=a.text_parts)
    wall = time.perf_counter() - t0
    async with httpx.AsyncClient(timeout=60) as client:
        ttfts = sorted(r[0] for r in results)
        print(f"{len(results)} requests in {wall:.1f} s: {len(results) / wall:.2f} req/s, "
              f"TTFT p50 {statistics.median(ttfts):.3f} s, p99 {ttfts[int(0.99 * (len(ttfts) - 1))]:.3f} s")
        try:
            metrics = (await client.get(f"{a.url}/metrics")).text
            for line in metrics.splitlines():
                if line.startswith(("radixlm_router_hit_rate_estimate", "radixlm_router_requests_total",
                                    "radixlm_router_decisions_total", "radixlm_router_retries_total")):
                    print(line)
        except httpx.HTTPError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--prefix-words", type=int, default=700, help="system prompt length in words (~1.4 tokens each)")
    p.add_argument("--requests", type=int, default=360)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", type=int, default=0, help="function tools per request, each group its own")
    p.add_argument("--text-parts", action="store_true", help="message content as lists of text parts")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
