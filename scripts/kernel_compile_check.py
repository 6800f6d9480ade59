"""Compiles every attention kernel for H100/H200 (sm90), A100 (sm80) and MI300 (gfx942) on this
machine, no GPU needed, and prints what each binary uses: shared memory, registers, spills and
matrix instructions (pallas_kernels/gpu_compile.py). Exits 1 if any kernel fails to compile,
overflows shared memory or spills, or if an attention dot misses the matrix units.

    .venv/bin/python scripts/kernel_compile_check.py [--targets sm90,gfx942] [--shapes llama3-8b]

The shapes (gpu_compile.HEAD_SHAPES) include DeepSeek-V3's latent cache (a 64-wide RoPE key and a
512-wide latent per token, 16 or 128 q heads on one kv head).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402

from pallas_kernels import gpu_compile  # noqa: E402

VARIANTS = {"causal": dict(), "window+softcap": dict(sliding_window=512, soft_cap=30.0),
            "traced window": dict(traced_window=True)}  # per-layer windows (Gemma 3)


def problems(kind: str, report: gpu_compile.CompileReport, wgmma: bool = True) -> list[str]:
  """What is wrong with one compiled kernel, if anything. wgmma: whether the prefill tile has the
  64 rows Hopper's wgmma needs (all but a latent cache's float32 tile of 16 rows)."""
  found = []
  if not report.fits:
    found.append(f"shared memory {report.shared_bytes} B over "
                 f"{gpu_compile.TARGETS[report.target].shared_limit_bytes} B")
  if report.spill_bytes:
    found.append(f"spills {report.spill_bytes} B")
  if kind != "write_kv" and not report.matrix_instructions:
    found.append("dots off the matrix units")
  if kind == "prefill" and wgmma and report.target == "sm90" and report.matrix_instructions != "HGMMA":
    found.append("prefill without wgmma")
  return found


# pallas_kernels/fp8_matmul.py: (what, rows M, experts E (0: the dense kernel), K, N, weight dtype, scales), bfloat16
# rows. DeepSeek-V3's shapes in 128 x 128 blocks (the grouped kernel over one device's share of 8: the experts' 2048
# intermediate features / 8), and Qwen3-30B-A3B's experts (128 of 2048 x 768) with a scale per output feature
# (model.quantization int8 / fp8 on its float checkpoint).
FP8_MATMULS = [("decode wq_a", 1, 0, 7168, 1536, "float8_e4m3fn", "block"),
               ("batch-64 mlp", 64, 0, 7168, 18432, "float8_e4m3fn", "block"),
               ("prefill wo", 2048, 0, 16384, 7168, "float8_e4m3fn", "block"),
               ("decode experts", 8, 256, 7168, 256, "float8_e4m3fn", "block"),
               ("prefill experts", 16384, 256, 256, 7168, "float8_e4m3fn", "block"),
               ("int8 experts", 64, 128, 2048, 768, "int8", "feature"),
               ("e4m3 experts", 8192, 128, 768, 2048, "float8_e4m3fn", "feature")]


def fp8_matmul_rows(targets) -> int:
  """Compiles the 8-bit weight matmuls at FP8_MATMULS' shapes for each target and prints a row each; returns how many
  had problems. A target that cannot convert e4m3 (sm80) is reported, not counted: the engine keeps XLA's path there."""
  import jax

  from pallas_kernels.fp8_matmul import block_fp8_matmul, grouped_scaled_matmul, row_block

  failures = 0
  for what, m, e, k, n, wdtype, scales in FP8_MATMULS:
    experts = (e,) if e else ()
    scale_shape = (*experts, k // 128, n // 128) if scales == "block" else (*experts, n)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((*experts, k, n), jnp.dtype(wdtype)),
            jax.ShapeDtypeStruct(scale_shape, jnp.float32), *([jax.ShapeDtypeStruct((e,), jnp.int32)] if e else []))
    for target in targets:
      label = (f"{what:15s} {'bfloat16':8s} {f'{m}x{k}x{n}' + (f'/{e}' if e else ''):14s} "
               f"{'grouped' if e else 'fp8mm':8s} {target.name:6s}")
      try:
        [module] = gpu_compile.triton_modules(grouped_scaled_matmul if e else block_fp8_matmul, *args, target=target)
        report = gpu_compile.compile_module(module, target)
      except Exception as err:  # noqa: BLE001
        e4m3 = target.name == "sm80" and wdtype == "float8_e4m3fn"
        print(f"{label} compile failed ({type(err).__name__}): "
              + ("no e4m3 conversion before sm89, XLA's path serves it" if e4m3 else str(err)[:300]))
        failures += not e4m3
        continue
      found = problems("prefill" if row_block(-(-m // (e or 1))) >= 64 else "decode", report)
      failures += bool(found)
      print(f"{label} {report.num_warps:5d} {report.num_stages:6d} {report.shared_bytes / 1024:7.0f} "
            f"{report.registers:4d} {report.spill_bytes:5d} {report.matrix_instructions or '-':6s} "
            f"{'; '.join(found)}", flush=True)
  return failures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="sm90,gfx942",
                      help=f"any of {','.join(gpu_compile.TARGETS)}")
  parser.add_argument("--shapes", default=",".join(gpu_compile.HEAD_SHAPES))
  parser.add_argument("--dtypes", default="bfloat16,float32")
  args = parser.parse_args()
  targets = [gpu_compile.TARGETS[t] for t in args.targets.split(",")]
  print(f"{'heads':15s} {'dtype':8s} {'variant':14s} {'kernel':8s} {'target':6s} {'warps':>5s} "
        f"{'stages':>6s} {'smem KB':>7s} {'regs':>4s} {'spill':>5s} {'matrix':6s} problems")
  failures, start = 0, time.time()
  for shape in args.shapes.split(","):
    heads = gpu_compile.HEAD_SHAPES[shape]
    latent = isinstance(heads[2], tuple)
    for dtype in args.dtypes.split(","):
      wgmma = not (latent and jnp.dtype(dtype).itemsize > 2)
      for variant, options in VARIANTS.items():
        for target in targets:
          modules = gpu_compile.engine_kernels(*heads, jnp.dtype(dtype), target=target, **options)
          for kind, module in modules.items():
            try:
              report = gpu_compile.compile_module(module, target)
            except Exception as e:  # noqa: BLE001  (report every kernel, then fail)
              failures += 1
              print(f"{shape:15s} {dtype:8s} {variant:14s} {kind:8s} {target.name:6s} "
                    f"compile failed: {type(e).__name__}: {str(e)[:300]}")
              continue
            found = problems(kind, report, wgmma)
            failures += bool(found)
            print(f"{shape:15s} {dtype:8s} {variant:14s} {kind:8s} {target.name:6s} "
                  f"{report.num_warps:5d} {report.num_stages:6d} {report.shared_bytes / 1024:7.0f} "
                  f"{report.registers:4d} {report.spill_bytes:5d} "
                  f"{report.matrix_instructions or '-':6s} {'; '.join(found)}", flush=True)
  failures += fp8_matmul_rows(targets)
  print(f"{failures} problem(s); {time.time() - start:.0f} s")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
