"""One mixture-of-experts layer (models/moe.py), both paths, at Qwen3-30B-A3B's shapes: which pays at which batch.

    python scripts/moe_bench.py            # an accelerator: decode and prefill token counts, bfloat16
    python scripts/moe_bench.py --quick    # tiny shapes on the CPU: a smoke test

`grouped` runs each token's top-k experts as grouped matmuls (lax.ragged_dot); `dense` runs every expert on every
token; `int8` is the grouped path on int8 experts (a scale per output feature, model.quantization: int8) as XLA runs
it (converting every expert's weights for ragged_dot), `int8+k` the same experts read by the Pallas grouped kernel
(pallas_kernels/fp8_matmul.py: only the experts with rows, as their bytes; interpret mode with --quick). Each row:
median time of the jitted layer (router, top-k, experts, combine), the useful rate (2 x 3 x tokens x k x hidden x
intermediate FLOPs, the work the top-k experts need, whatever the path does), and the largest difference from the
dense path's output (the int8 rows: from `int8`'s). scripts/gpu_check.sh runs it; `model.moe_backend` picks the
path.

    python scripts/moe_bench.py --lora 4   # also both paths with 4 LoRA adapters of every expert (rank 16), the
                                           # tokens spread over them and the base model: what the experts' adapters cost

The `+lora` rows' differences are from `dense+lora`'s output.
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

from models import moe, quant  # noqa: E402


def median_s(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768, help="one expert's intermediate size")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--lora", type=int, default=0, help="also time both paths with this many LoRA adapters of "
                        "every expert's gate / up / down (token t takes adapter t mod (N + 1); 0: the base model)")
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.experts, args.top_k, args.tokens, args.reps = 32, 16, 8, 2, [1, 24], 3
    dtype = jnp.float32 if args.quick else jnp.dtype(args.dtype)
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k
    key = jax.random.split(jax.random.key(0), 5)
    p = {"router": jax.random.normal(key[0], (h, e)) * h**-0.5,
         "moe_gate": jax.random.normal(key[1], (e, h, i)) * h**-0.5,
         "moe_up": jax.random.normal(key[2], (e, h, i)) * h**-0.5,
         "moe_down": jax.random.normal(key[3], (e, i, h)) * i**-0.5}
    p = {name: w.astype(dtype) for name, w in p.items()}
    int8 = {"router": p["router"]}
    for name in ("moe_gate", "moe_up", "moe_down"):
        values, scales = quant.quantize_weight(np.asarray(p[name], np.float32)[None])
        int8[name], int8[name + quant.SCALE_SUFFIX] = jnp.asarray(values[0]), jnp.asarray(scales[0])
    kernel = "pallas_interpret" if args.quick else "pallas"
    routing = moe.Routing(top_k=k)
    paths = {"grouped": (jax.jit(lambda x, p: moe.grouped_moe(x, p, routing, moe.swiglu)), p, "dense"),
             "dense": (jax.jit(lambda x, p: moe.dense_moe(x, p, routing, moe.swiglu)), p, "dense"),
             "int8": (jax.jit(lambda x, p: moe.grouped_moe(x, p, routing, moe.swiglu)), int8, "int8"),
             "int8+k": (jax.jit(lambda x, p: moe.grouped_moe(x, p, routing, moe.swiglu, quant_kernels=kernel)), int8,
                        "int8")}
    if jax.default_backend() == "cpu" and not args.quick:  # (a CPU runs the Pallas kernel only interpreted: untimed)
        del paths["int8+k"]
    if args.lora:  # every expert's three projections adapted by each of N adapters: A [N, E, in, R], B [N, E, R, out]
        n, r = args.lora, args.lora_rank
        lkey = jax.random.split(jax.random.fold_in(key[4], 2**31), 6)
        lora = {name: {"a": (jax.random.normal(lkey[2 * j], (n, e, d_in, r)) * d_in**-0.5).astype(dtype),
                       "b": (jax.random.normal(lkey[2 * j + 1], (n, e, r, d_out)) * 0.01).astype(dtype)}
                for j, (name, d_in, d_out) in enumerate((("moe_gate", h, i), ("moe_up", h, i), ("moe_down", i, h)))}

        def adapted(grouped):
            def run(x, p):
                onehot = (jnp.arange(x.shape[0]) % (n + 1))[:, None] == jnp.arange(1, n + 1)[None, :]
                return moe.moe_mlp(x, p, routing, moe.swiglu, grouped, lora=moe.ExpertLora(lora, onehot))
            return jax.jit(run)

        paths["grouped+lora"] = (adapted(True), p, "dense+lora")
        paths["dense+lora"] = (adapted(False), p, "dense+lora")
    print(f"MoE layer on {jax.devices()[0].device_kind}: hidden {h}, {e} experts of {i}, top {k}, "
          f"{jnp.dtype(dtype).name}, median of {args.reps}"
          + (f"; {args.lora} LoRA adapters of rank {args.lora_rank}" if args.lora else ""))
    print(f"{'tokens':>7} {'path':>12} {'ms':>9} {'TFLOP/s':>9} {'max diff':>9}")
    rows = []
    for t in args.tokens:
        x = jax.random.normal(jax.random.fold_in(key[4], t), (t, h)).astype(dtype)
        refs = {name: np.asarray(paths[name][0](x, paths[name][1]), np.float32) for name in ("dense", "int8")
                + (("dense+lora",) if args.lora else ())}
        for name, (fn, weights, reference) in paths.items():
            seconds = median_s(fn, x, weights, reps=args.reps)
            diff = float(np.max(np.abs(np.asarray(fn(x, weights), np.float32) - refs[reference])))
            rate = 2 * 3 * t * k * h * i / seconds / 1e12
            rows.append(dict(tokens=t, path=name, ms=seconds * 1e3, tflops=rate, max_diff=diff))
            print(f"{t:>7} {name:>12} {seconds * 1e3:>9.3f} {rate:>9.3f} {diff:>9.2e}")
    return rows


if __name__ == "__main__":
    main()
