"""Start-up (compile) and warm time of a hybrid model whose layer pattern does not repeat, through the engine.

A random Granite 4.0-H-like model (Mamba-2 layers, attention at layers 3, 4, 9 and 13 of 16, hidden 256), 8 sequences
decoding 32 tokens after 40-token prompts, float32: prints the first `generate` (compiling) and the median of three
warm ones, and the first tokens (equal across versions of the scan). Run it on two commits to compare how
`models/llama.py` scans such a pattern (docs/architecture.md, "Linear attention layers and their states"):

    PYTHONPATH=. .venv/bin/python scripts/hybrid_scan_bench.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from engine.config import DEFAULT_MODEL  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from models import llama  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from models.loader import tokenizer_source  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    tokenizer = Tokenizer.load(tokenizer_source(DEFAULT_MODEL))
    layers = 16
    cfg = LlamaConfig(architecture="granitemoehybrid", vocab_size=tokenizer.vocab_size, hidden_size=256,
                      intermediate_size=512, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=64,
                      max_position=512, rope_layers=(False,) * layers, linear_kind="mamba2",
                      linear_layers=tuple(i not in (3, 4, 9, 13) for i in range(layers)), linear_num_key_heads=1,
                      linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=64, linear_conv_bias=True)
    llm = LLM(None, progress=False, model=(cfg, llama.init_params(cfg, jax.random.key(0), scale=0.3), tokenizer), **{
        "warmup": False, "cache.num_pages": 8192, "cache.page_size": 16, "model.max_model_len": 256,
        "scheduler.max_running": 8, "scheduler.max_batch_tokens": 256, "model.dtype": "float32",
        "compilation_cache_dir": ""})  # (a cached program would hide the compile time)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([[5 + i] * 40 for i in range(8)], greedy)
    first = time.perf_counter() - start
    warm = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate([[7 + i] * 40 for i in range(8)], greedy)
        warm.append(time.perf_counter() - start)
    print(f"first generate (compiling) {first:.1f} s; warm median {statistics.median(warm):.2f} s; "
          f"first tokens {outs[0].token_ids[:6]}")


if __name__ == "__main__":
    main()
