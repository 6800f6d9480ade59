#!/usr/bin/env python3
"""Host cost of suffix decoding (`speculative.method: suffix`): what its proposals and its index of answers take.

Runs the config's model on the extraction workload (scripts/bench.py's) with suffix decoding, timing every
`SuffixCache.propose` (one sequence's draft) and `SuffixCache.sync` (a step's new output tokens indexed); then
measures the memory an output index takes per token (`tracemalloc`, answers of random tokens, the texts included).

    PYTHONPATH=. .venv/bin/python scripts/suffix_cost.py --num-requests 64 --max-running 8
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=80)
    ap.add_argument("--num-tokens", type=int, default=8, help="speculative.num_tokens")
    ap.add_argument("--answers", type=int, default=1000, help="memory: answers indexed")
    ap.add_argument("--answer-len", type=int, default=200, help="memory: tokens an answer")
    args = ap.parse_args(argv)

    from engine import suffix_decoding
    from engine.config import load_config
    from engine.llm import LLM
    from engine.request import SamplingParams
    from scripts.bench import extraction_prompts

    times: dict[str, list[float]] = {"propose": [], "sync": []}
    for name in times:
        def timed(self, *a, _call=getattr(suffix_decoding.SuffixCache, name), _name=name, **kw):
            t0 = time.perf_counter()
            out = _call(self, *a, **kw)
            times[_name].append(time.perf_counter() - t0)
            return out
        setattr(suffix_decoding.SuffixCache, name, timed)
    config = load_config(args.config, ["warmup=false", "speculative.method=suffix",
                                       f"speculative.num_tokens={args.num_tokens}",
                                       f"scheduler.max_running={args.max_running}"])
    llm = LLM(config)
    prompts = extraction_prompts(random.Random(0), llm.tokenizer, args.num_requests)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.output_len))
    stats = llm.engine.stats()
    print(f"{args.num_requests} extraction prompts, {args.max_running} at a time: {stats['num_steps']} steps, "
          f"{stats['spec_accepted_tokens']} of {stats['spec_draft_tokens']} draft tokens accepted, "
          f"{stats['suffix_cache_tokens']} answer tokens indexed")
    for name, what in (("propose", "a proposal (one sequence)"), ("sync", "indexing a step's new tokens")):
        t = sorted(times[name])
        print(f"  {what:<32} {len(t):6} calls  median {statistics.median(t) * 1e6:7.1f} us  "
              f"p90 {t[int(0.9 * len(t))] * 1e6:7.1f} us")

    rng = random.Random(0)
    answers = [[rng.randrange(llm.engine.model_cfg.vocab_size) for _ in range(args.answer_len)]
               for _ in range(args.answers)]
    tracemalloc.start()
    index = suffix_decoding.SuffixIndex(config.speculative.ngram_min)
    for seg, answer in enumerate(answers):
        index.extend(seg, list(answer))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  output index: {held / 2**20:.1f} MiB for {args.answers} answers of {args.answer_len} tokens, "
          f"{held / (args.answers * args.answer_len):.0f} bytes a token (texts included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
