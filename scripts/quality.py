"""What a lossy option (an 8-bit KV cache, int8 weights) costs in accuracy, against the plain configuration.

Each variant (a set of config overrides; the first is the reference) gets one engine, which scores the
same texts teacher-forced (prompt logprobs: every position's log-probability of the next text token and
its top-1 token) and continues short prompts greedily. Reported against the reference: perplexity, mean
|delta logprob| per token, top-1 agreement per position, and how many greedy tokens stay identical
before the first difference.

    .venv/bin/python scripts/quality.py --variants "" cache.kv_dtype=bfloat16 cache.kv_dtype=int8 \
        cache.kv_dtype=fp8_e4m3 model.quantization=int8

Texts: docstrings of standard-library modules (TEXT_MODULES; no network), cut into windows of --window tokens.
A variant may name another checkpoint of the model (`model.path=...`, e.g. a GPTQ / AWQ / compressed-tensors export).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from models import sharding  # noqa: E402
from models.loader import load_weights, tokenizer_source  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Write a short poem about the sea.",
           "List the planets of the solar system:", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "To make bread, you first", "SELECT name FROM users WHERE"]


# Scored text: the docstrings of these standard-library modules and their public members (English prose about
# code; fixed for a Python version, and no network).
TEXT_MODULES = ["argparse", "json", "logging", "collections", "functools", "itertools", "re", "pathlib", "subprocess",
                "threading", "unittest", "textwrap", "datetime", "decimal", "fractions", "statistics"]


def texts(tokenizer: Tokenizer, window: int, count: int) -> list[list[int]]:
    docs = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(a for a in dir(module) if not a.startswith("_")):
            doc = inspect.getdoc(getattr(module, attr))
            if doc and doc not in docs:
                docs.append(doc)
    ids = tokenizer.encode("\n\n".join(docs), add_special_tokens=False)
    return [ids[i * window:(i + 1) * window] for i in range(min(count, len(ids) // window))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="+", metavar="OVERRIDES",
                    default=["", "cache.kv_dtype=bfloat16", "cache.kv_dtype=int8", "cache.kv_dtype=fp8_e4m3",
                             "model.quantization=int8"],
                    help="space-separated KEY=VALUE overrides per variant (\"\": the config as it is); the first is the reference")
    ap.add_argument("--window", type=int, default=512, help="tokens per scored text")
    ap.add_argument("--num-texts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64, help="greedy tokens per prompt")
    args = ap.parse_args(argv)

    base = load_config(args.config, args.set)
    cfg, params = load_weights(base.model.path)
    tokenizer = Tokenizer.load(tokenizer_source(base.model.path))
    scored = texts(tokenizer, args.window, args.num_texts)
    results = {}
    for variant in args.variants:
        t0 = time.perf_counter()
        config = load_config(args.config, args.set + variant.split())
        # the base checkpoint's weights, loaded once; a variant naming another checkpoint (a quantized export of the
        # same model, over the same vocabulary) loads its own, as model.quantization says
        own = config.model.path != base.model.path
        llm = LLM(config, progress=False, model=None if own else (cfg, params, tokenizer))
        outs = llm.generate(scored, SamplingParams(max_tokens=1, prompt_logprobs=1))
        logprobs = np.array([lp for o in outs for lp in o.prompt_logprobs[1:]])
        top1 = np.array([top[0][0] for o in outs for top in o.prompt_top_logprobs[1:]])
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
        name = variant or "(reference)"
        weights_mb = sum(sharding.array_bytes(a) for a in jax.tree.leaves(llm.engine.params)) / 2**20
        results[name] = (logprobs, top1, [g.token_ids for g in greedy], weights_mb, llm.engine.stats()["pages_total"])
        print(f"{name}: {llm.engine.stats()['pages_total']} pages, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    ref_lp, ref_top, ref_greedy, *_ = next(iter(results.values()))
    print(f"{len(scored)} texts x {args.window} tokens scored, {len(PROMPTS)} prompts x {args.output_len} greedy tokens; "
          f"reference: {next(iter(results))}\n")
    print("| variant | weights (MiB) | KV pages | perplexity | mean abs delta logprob | top-1 agreement | "
          "greedy tokens identical before the first difference (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name, (lp, top1, greedy, weights_mb, pages) in results.items():
        same = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref_greedy, greedy)]
        print(f"| {name} | {weights_mb:.0f} | {pages:,} | {math.exp(-lp.mean()):.3f} | {np.abs(lp - ref_lp).mean():.4f} | "
              f"{(top1 == ref_top).mean():.2%} | {np.mean(same):.1f} of {args.output_len} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
