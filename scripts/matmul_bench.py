"""Projection matmuls over each weight format (model.quantization), at Llama-3-8B's MLP shapes: what 4 or 8 bits buy.

    python scripts/matmul_bench.py            # an accelerator: decode batches and a prefill chunk, bfloat16
    python scripts/matmul_bench.py --quick    # tiny shapes on the CPU: a smoke test

Each format runs `models.llama.linear`, the engine's own projection code, as the engine does: weights stacked
[L, in, out] and read one layer at a time under `lax.scan` (per layer, x -> w_up -> w_down, hidden 4096 ->
intermediate 14336 -> 4096). Formats: `none` (model dtype), `int8` (a float32 scale per output feature, W8A16),
`w8a8` (the same weights, each token's activations in int8: an int8 x int8 -> int32 dot), `int4/32` and `int4/128` (a
float16 scale and offset per group of 32 or 128 inputs, W4A16), `mxfp4` (e2m1 codes, a power of two per 32 inputs; a
table lookup where int4 has a multiply-add), `fp8` (e4m3 weights, a scale per output feature, W8A16), `w8a8_fp8`
(e4m3 activations too: an e4m3 x e4m3 dot, the FP8 tensor cores on Hopper and MI300), `fp8/128` (e4m3 with a scale
per 128 x 128 block, as an FP8 checkpoint such as DeepSeek-V3's is served; W8A16, dequantized by XLA) and
`fp8/128+k` (the same weights read by the Pallas kernel, pallas_kernels/fp8_matmul.py). Each row: median time
per layer, the weight bytes it read per second (the format's own bytes, scales included) and that as a fraction of
the device-to-device copy bandwidth measured at start-up, the speed-up over `none`, XLA's temporary buffer size for
the whole program (a converted layer's weight materialized before its matmul shows here as about its bf16 size:
the dequantization was not fused into the GEMM), and the largest difference from `none` over the dequantized weights,
relative to the largest output (float rounding only; the W8A8 formats add their activations' rounding).
scripts/gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import llama, quant, sharding  # noqa: E402
from pallas_kernels import fp8_matmul  # noqa: E402
from scripts.kernel_bench import measure_ceilings, time_fn  # noqa: E402

# (quantize_params' method, group size, activations quantized, FP8 block kernel); fp8/128: blocks of 128 x 128
# (`quant_blocks`), dequantized by XLA or read by pallas_kernels/fp8_matmul.py ("pallas" on a GPU that converts e4m3,
# "pallas_interpret" with --quick)
FORMATS = {"none": None, "int8": ("int8", 1, False, "none"), "w8a8": ("int8", 1, True, "none"),
           "int4/32": ("int4", 32, False, "none"), "int4/128": ("int4", 128, False, "none"),
           "mxfp4": ("mxfp4", 32, False, "none"), "fp8": ("fp8", 1, False, "none"),
           "w8a8_fp8": ("fp8", 1, True, "none"), "fp8/128": ("fp8_blocks", 128, False, "none"),
           "fp8/128+k": ("fp8_blocks", 128, False, "pallas")}


def quant_blocks(weights: dict, method: str, group: int) -> dict:
    """The weights in one of FORMATS' quantized forms (host arrays)."""
    if method != "fp8_blocks":
        return quant.quantize_params({"layers": weights}, method, group)["layers"]
    out = {}
    for k, w in weights.items():
        out[k], out[k + quant.BLOCK_SCALE_SUFFIX] = quant.quantize_weight_fp8_blocks(w, group)
    return out


def stacked_mlp(params: dict, x: jax.Array, quantized_activations: bool = False,
                quant_kernels: str = "none") -> jax.Array:
    """x [N, H] through every layer's w_up then w_down (no activation: the matmuls alone), one layer per scan step."""
    def layer(x, p):
        up = llama.linear(x, p, "w_up", quantized_activations, quant_kernels)
        return llama.linear(up, p, "w_down", quantized_activations, quant_kernels), None

    return jax.lax.scan(layer, x, params)[0]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 64, 2048])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.tokens, args.reps = 128, 256, 2, [1, 24], 3
    dtype = jnp.float32 if args.quick else jnp.bfloat16
    h, i, n = args.hidden, args.intermediate, args.layers
    rng = np.random.default_rng(0)
    weights = {"w_up": (rng.standard_normal((n, h, i), np.float32) * h**-0.5),
               "w_down": (rng.standard_normal((n, i, h), np.float32) * i**-0.5)}
    copy_bw, _ = measure_ceilings(args.quick)
    print(f"projections on {jax.devices()[0].device_kind}: {n} layers of {h} -> {i} -> {h}, activations "
          f"{jnp.dtype(dtype).name}, median of {args.reps}; copy ceiling {copy_bw / 1e9:.0f} GB/s")
    print(f"{'tokens':>7} {'format':>9} {'ms/layer':>9} {'GB/s':>8} {'of copy':>8} {'vs none':>8} {'temp MiB':>9} "
          f"{'rel diff':>9}")
    rows, jitted = [], jax.jit(stacked_mlp, static_argnums=(2, 3))
    kernel = "pallas_interpret" if args.quick else "pallas" if fp8_matmul.supported(jax.devices()[0]) else None
    formats, references = {}, {}  # the arrays of each format; the float weights they stand for (on the device)
    for name, method in FORMATS.items():
        if method and method[3] != "none" and kernel is None:
            print(f"{name}: skipped ({jax.devices()[0].device_kind} cannot convert e4m3 in Triton)")
            continue
        if method is None:
            formats[name] = references[name] = {k: jnp.asarray(w, dtype) for k, w in weights.items()}
            continue
        formats[name] = jax.tree.map(jnp.asarray, quant_blocks(weights, *method[:2]))
        references[name] = {k: quant.dequantize_weight(formats[name], k, dtype) for k in weights}
    for t in args.tokens:
        x = jax.random.normal(jax.random.key(t), (t, h)).astype(dtype)
        base_s = None
        for name, params in formats.items():
            activations = bool(FORMATS[name] and FORMATS[name][2])
            quant_kernels = kernel if FORMATS[name] and FORMATS[name][3] != "none" else "none"

            def fn(p, x, activations=activations, quant_kernels=quant_kernels):
                return jitted(p, x, activations, quant_kernels)

            seconds = time_fn(fn, params, x, reps=args.reps) / n
            base_s = base_s or seconds
            nbytes = sum(sharding.array_bytes(a) for a in jax.tree.leaves(params)) / n
            temp = jitted.lower(params, x, activations, quant_kernels).compile().memory_analysis()
            temp_mib = temp.temp_size_in_bytes / 2**20 if temp is not None else float("nan")
            want = np.asarray(jitted(references[name], x, False), np.float32)
            diff = float(np.max(np.abs(np.asarray(fn(params, x), np.float32) - want)) / max(np.abs(want).max(), 1e-30))
            rows.append(dict(tokens=t, format=name, ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                             of_copy=nbytes / seconds / copy_bw, speedup=base_s / seconds, temp_mib=temp_mib,
                             rel_diff=diff))
            r = rows[-1]
            print(f"{t:>7} {name:>9} {r['ms']:>9.3f} {r['gbps']:>8.1f} {r['of_copy']:>8.0%} {r['speedup']:>7.2f}x "
                  f"{temp_mib:>9.1f} {diff:>9.1e}")
    return rows


if __name__ == "__main__":
    main()
