"""The sampler's top-k / top-p / min-p mask: ranked over each row's most likely tokens (what the engine runs) vs over
the whole sorted vocabulary (its fallback), side by side on one batch of rows.

    python scripts/sampler_bench.py                      # 16 rows x SmolLM2's 49152 ids
    python scripts/sampler_bench.py --vocab 262144       # Gemma 3's vocabulary

Rows ask for top-p 0.9, top-k 50 or min-p 0.05 in turn, over two kinds of logits: peaked (a few ids far above the
rest: every kept run inside the candidates) and with a flat tail (top-p reaches hundreds of ids into it, so the engine
ranks the candidates, then falls back to the whole sort). Prints each path's median time over --repeats runs (after
one warm call) and their ratio, and checks the two masks are equal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine import sampler  # noqa: E402
from engine.request import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    kinds = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.8, top_k=50),
             SamplingParams(temperature=0.8, min_p=0.05)]
    params = [kinds[i % len(kinds)] for i in range(args.rows)]
    s_in = sampler.build_inputs([(p, 0, 0, [], []) for p in params], args.rows, args.vocab, use_penalties=False)
    print(f"{jax.devices()[0].device_kind}, {args.rows} rows x {args.vocab} ids, median of {args.repeats} (ms)")
    print(f"  {'rows':<10} {'kept per row':>13} {'top-%d' % sampler.FILTER_CANDIDATES:>9} {'whole sort':>11} {'ratio':>7}")
    # peaked: 8 ids far above the rest, every kept run inside the candidates; flat tail: top-p 0.9 reaches into the
    # long tail (hundreds of ids), so the engine falls back to the whole sort after ranking the candidates
    for name, lift in (("peaked", 20.0), ("flat tail", 12.0)):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(args.rows, args.vocab)).astype(np.float32) * 2
        logits[np.arange(args.rows)[:, None], rng.integers(args.vocab, size=(args.rows, 8))] += lift
        x = jnp.asarray(logits)
        medians, masks = [], []
        for candidates in (sampler.FILTER_CANDIDATES, args.vocab):
            fn = jax.jit(lambda x, s, c=candidates: sampler._filter_mask(x, s, c))
            masks.append(np.asarray(fn(x, s_in)))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(x, s_in))
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
        assert (masks[0] == masks[1]).all(), "the two paths' masks differ"
        kept = masks[0].sum(1)
        print(f"  {name:<10} {f'{kept.min()}-{kept.max()}':>13} {medians[0] * 1e3:9.2f} {medians[1] * 1e3:11.2f} "
              f"{medians[1] / medians[0]:6.1f}x")


if __name__ == "__main__":
    main()
