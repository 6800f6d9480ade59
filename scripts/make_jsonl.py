#!/usr/bin/env python3
"""A shared-prefix input file for the offline job (scripts/generate.py): chat lines whose system prompt is one of a
few long generated documents, each asked a short question; greedy, a fixed number of output tokens.

    python scripts/make_jsonl.py --output outputs/bench/shared_docs.jsonl --docs 8 --lines 128 --sentences 20

Used by the offline-job benchmarks in docs/benchmarks.md (same seed, same file).
"""
from __future__ import annotations

import argparse
import json
import os
import random

WORDS = "the of and to in is that for it as with was on be by this are from or at an which have not they but".split()
NOUNS = "engine cache page prefix token replica device kernel batch request model router scheduler tree memory".split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--docs", type=int, default=8, help="distinct system prompts")
    ap.add_argument("--lines", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=20, help="sentences per document (~33 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    docs = [" ".join(f"Section {k} of handbook {g}: the {rng.choice(NOUNS)} {rng.choice(WORDS)} {rng.choice(NOUNS)} "
                     + " ".join(rng.choice(WORDS + NOUNS) for _ in range(20)) + "." for k in range(args.sentences))
            for g in range(args.docs)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        for i in range(args.lines):
            doc = docs[rng.randrange(args.docs)]
            messages = [{"role": "system", "content": doc},
                        {"role": "user", "content": f"Question {i}: summarise section {i % args.sentences}."}]
            f.write(json.dumps({"id": f"q{i}", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                                "ignore_eos": True}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
