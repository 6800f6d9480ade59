#!/usr/bin/env python
"""Replay synthetic traces through the router's policies over simulated replicas (no model).

    python scripts/simulate.py --trace many_groups --replicas 8,16,64 --requests 1000000

Prints one markdown table per trace (token hit rate, throughput, simulated TTFT, requests per
replica, prefill GPU-hours per day at 1M requests/day and the saving vs round_robin). Service
times come from --prefill-ms / --decode-ms (per token); the defaults are placeholders for an
H100-class replica until measured ones replace them. See docs/routing.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.router.simulator import SimConfig, TraceSpec, simulate  # noqa: E402

DEFAULT_RATE = {"support_desk": 8.0, "many_groups": 0.7}  # requests/s per replica


def _run(args: tuple[str, TraceSpec, SimConfig]) -> dict:
    policy, trace, cfg = args
    t0, c0 = time.perf_counter(), time.process_time()
    out = simulate(policy, trace, cfg)
    out["trace"] = trace.name
    out["rate_per_replica"] = trace.rate_per_replica
    out["prefill_ms_per_token"] = cfg.prefill_ms_per_token
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    print(f"  done {trace.name} {cfg.num_replicas:>3} replicas {policy:<13} in {out['wall_s']:.0f} s "
          f"({out['cpu_s']:.0f} s CPU)", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| replicas | policy | token hit rate | throughput (req/s) | prefill busy | TTFT p50 (s) | TTFT p99 (s) "
             "| requests/replica max / mean | prefill GPU-h/day @1M | saved vs round_robin (GPU-h/day) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["trace"], r["replicas"]): r["prefill_gpu_h_per_1m"] for r in rows if r["policy"] == "round_robin"}
    for r in rows:
        rr = base.get((r["trace"], r["replicas"]))
        saved = f"{rr - r['prefill_gpu_h_per_1m']:.1f}" if rr is not None else "n/a"
        # fraction of time a replica's prefill engine is busy at this arrival rate
        busy = (r.get("rate_per_replica", DEFAULT_RATE[r["trace"]]) * r["prefill_tokens_per_request"]
                * r.get("prefill_ms_per_token", SimConfig.prefill_ms_per_token) / 1e3)
        hit = f"{r['hit_rate']:.1%}" + (f" (host {r['host_hit_rate']:.1%})" if r.get("host_hit_rate") else "")
        lines.append(
            f"| {r['replicas']} | {r['policy']} | {hit} | {r['throughput_rps']:.1f} | {busy:.0%} "
            f"| {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} "
            f"| {r['per_replica_max']} / {r['per_replica_mean']:.0f} | {r['prefill_gpu_h_per_1m']:.1f} | {saved} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="support_desk,many_groups", help="support_desk, many_groups (comma-separated)")
    p.add_argument("--replicas", default="8,16,64", help="replica counts (comma-separated)")
    p.add_argument("--policies", default="round_robin,least_load,prefix_aware")
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--rate-per-replica", type=float, default=None,
                   help=f"Poisson arrivals per replica, req/s (default per trace: {DEFAULT_RATE})")
    p.add_argument("--num-pages", type=int, default=SimConfig.num_pages, help="KV pages per replica")
    p.add_argument("--page-size", type=int, default=SimConfig.page_size)
    p.add_argument("--max-running", type=int, default=SimConfig.max_running)
    p.add_argument("--prefill-ms", type=float, default=SimConfig.prefill_ms_per_token,
                   help="prefill cost per token (placeholder default: H100-class replica)")
    p.add_argument("--decode-ms", type=float, default=SimConfig.decode_ms_per_token,
                   help="decode step time per generated token (placeholder default)")
    p.add_argument("--feed-lag", type=float, default=SimConfig.feed_lag_s, help="cache event poll interval, s")
    p.add_argument("--host-pages", type=int, default=0, help="host-tier pages per replica (cache.host_memory_gb)")
    p.add_argument("--host-load-ms", type=float, default=SimConfig.host_load_ms_per_page,
                   help="placeholder: ms to copy one page back from the host tier")
    p.add_argument("--host-invisible", action="store_true",
                   help="the router's index does not get the host tier's events (as before the feed carried them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes")
    p.add_argument("--jsonl", help="append each result row to this file as soon as its run ends")
    a = p.parse_args(argv)

    jobs = []
    for trace_name in a.trace.split(","):
        rate = a.rate_per_replica or DEFAULT_RATE[trace_name]
        for n in (int(x) for x in a.replicas.split(",")):
            cfg = SimConfig(num_replicas=n, num_pages=a.num_pages, page_size=a.page_size,
                            max_running=a.max_running, prefill_ms_per_token=a.prefill_ms,
                            decode_ms_per_token=a.decode_ms, feed_lag_s=a.feed_lag, host_pages=a.host_pages,
                            host_load_ms_per_page=a.host_load_ms, host_visible=not a.host_invisible)
            for policy in a.policies.split(","):
                jobs.append((policy, TraceSpec(trace_name, a.requests, rate, a.seed), cfg))
    rows = []
    with ProcessPoolExecutor(a.jobs) if a.jobs > 1 else _Serial() as ex:
        for row in ex.map(_run, jobs) if a.jobs <= 1 else (f.result() for f in as_completed([ex.submit(_run, j) for j in jobs])):
            rows.append(row)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    order = {(p, t.name, c.num_replicas): i for i, (p, t, c) in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["policy"], r["trace"], r["replicas"])])
    for trace_name in a.trace.split(","):
        sel = [r for r in rows if r["trace"] == trace_name]
        rate = a.rate_per_replica or DEFAULT_RATE[trace_name]
        print(f"\n### {trace_name}: {a.requests:,} requests, {rate} req/s per replica, "
              f"{a.num_pages} pages x {a.page_size} tokens per replica, prefill {a.prefill_ms} ms/token, "
              f"decode {a.decode_ms} ms/token"
              + (f", host tier {a.host_pages} pages per replica ({'not ' if a.host_invisible else ''}seen by the router)"
                 if a.host_pages else "") + "\n")
        print(table(sel))


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


if __name__ == "__main__":
    main()
