#!/usr/bin/env python3
"""A shared-prefix input file for the offline job (scripts/generate.py): chat lines whose system prompt is one of a
few long generated documents, each asked a short question; greedy, a fixed number of output tokens.

    python scripts/make_jsonl.py --output outputs/bench/shared_docs.jsonl --docs 8 --lines 128 --sentences 20

Used by the offline-job benchmarks in docs/benchmarks.md (same seed, same file).

`--kind instructions`: chat lines asking for explanations, lists, poems, comparisons... about everyday topics (a task
template times a topic), the first `--lines` of every pairing in a fixed shuffle; `--skip N` starts after the first
N (a held-out set). Training data for scripts/train_eagle3.py and the EAGLE-3 benchmark in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random

TASKS = ("Explain {} to a ten-year-old.", "Give three surprising facts about {}.", "Write a short poem about {}.",
         "What are the pros and cons of {}?", "Summarize the history of {} in a few sentences.",
         "How would you teach someone about {}?", "Write a short story that involves {}.",
         "What are common misconceptions about {}?", "Describe {} to someone who has never heard of it.",
         "List five questions a student might ask about {}.", "Why does {} matter in everyday life?",
         "Compare {} with something similar and explain the difference.")
TOPICS = ("volcanoes", "the moon", "bread baking", "electric cars", "honeybees", "the ocean tides", "chess",
          "rainbows", "the internet", "recycling", "dinosaurs", "coffee", "the human heart", "bicycles", "music",
          "photosynthesis", "airplanes", "libraries", "the Roman Empire", "snow", "gardening", "robots",
          "the solar system", "friendship", "money", "earthquakes", "vaccines", "penguins", "mountains", "trains",
          "writing letters", "clouds", "football", "cheese", "the printing press", "deserts", "sleep", "bridges",
          "mathematics", "forests", "lighthouses", "tea", "the weather", "museums", "rivers", "kites", "maps",
          "the alphabet", "sailing", "batteries")
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
    ap.add_argument("--kind", choices=["shared-docs", "instructions"], default="shared-docs")
    ap.add_argument("--skip", type=int, default=0, help="--kind instructions: start after this many lines")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.kind == "instructions":
        pairs = [(task, topic) for task in TASKS for topic in TOPICS]
        rng.shuffle(pairs)
        with open(args.output, "w") as f:
            for i, (task, topic) in enumerate(pairs[args.skip : args.skip + args.lines]):
                f.write(json.dumps({"id": f"i{args.skip + i}", "messages": [
                    {"role": "user", "content": task.format(topic)}], "max_tokens": args.max_tokens}) + "\n")
        return 0
    docs = [" ".join(f"Section {k} of handbook {g}: the {rng.choice(NOUNS)} {rng.choice(WORDS)} {rng.choice(NOUNS)} "
                     + " ".join(rng.choice(WORDS + NOUNS) for _ in range(20)) + "." for k in range(args.sentences))
            for g in range(args.docs)]
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
