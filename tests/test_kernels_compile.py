"""The Pallas kernels compiled to GPU machine code on this (GPU-less) machine with the `triton`
package: H100/H200 (sm90) and MI300 (gfx942) binaries at the engine's default tiles fit in shared
memory, spill no registers, and run their dots on the matrix units (prefill on Hopper's wgmma).
The negative cases show that the checks see an oversized tile and a spilling kernel."""
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_kernel, gpu_compile, ragged_kernel

pytest.importorskip("triton")

SHAPES = [("llama3-8b", "bfloat16"), ("smollm2-135m", "float32"), ("smollm2-135m", "bfloat16"),
          ("gemma3-270m", "bfloat16"), ("gemma3-270m", "float32")]


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_default_tiles_compile_without_spills(shape, dtype, target):
  target = gpu_compile.TARGETS[target]
  # Gemma 3 runs with a per-layer (traced) window; the others with the heaviest static variant.
  window = dict(traced_window=True) if shape.startswith("gemma") else dict(sliding_window=512)
  modules = gpu_compile.engine_kernels(*gpu_compile.HEAD_SHAPES[shape], jnp.dtype(dtype),
                                       target=target, soft_cap=30.0, **window)
  assert set(modules) == {"prefill", "decode", "write_kv"}
  for kind, module in modules.items():
    report = gpu_compile.compile_module(module, target)
    assert report.fits, (kind, report)
    assert report.spill_bytes == 0, (kind, report)
    assert 0 < report.registers <= target.max_registers, (kind, report)
    if kind == "write_kv":
      assert report.shared_bytes == 0 and not report.matrix_instructions, report
    else:
      want = {"sm90": "HGMMA" if kind == "prefill" else "HMMA", "gfx942": "MFMA"}[target.name]
      assert report.matrix_instructions == want, (kind, report)


@pytest.mark.parametrize("shape,kv_dtype", [("llama3-8b", "int8"), ("gemma3-270m", "float8_e4m3fn"),
                                            ("deepseek-v3-tp8", "int8")])
def test_quantized_cache_kernels_compile(shape, kv_dtype):
  """8-bit caches (pallas_kernels/kv_quant.py) at the default tiles: no spills and wgmma prefill on
  Hopper. On MI300 they compile and fit, but the 8-bit -> bfloat16 conversions spill a few hundred
  bytes at these tiles (docs/kernels.md)."""
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    modules = gpu_compile.engine_kernels(*gpu_compile.HEAD_SHAPES[shape], jnp.dtype(jnp.bfloat16),
                                         target=target, soft_cap=30.0, sliding_window=512,
                                         kv_dtype=jnp.dtype(kv_dtype))
    for kind, module in modules.items():
      report = gpu_compile.compile_module(module, target)
      assert report.fits, (kind, report)
      if target.name == "sm90":
        assert report.spill_bytes == 0, (kind, report)
        assert report.matrix_instructions == {"prefill": "HGMMA", "decode": "HMMA", "write_kv": ""}[kind]


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
@pytest.mark.parametrize("shape,dtype", [("deepseek-v3-tp8", "bfloat16"), ("deepseek-v3", "bfloat16"),
                                         ("deepseek-v3", "float32")])
def test_latent_cache_kernels_compile(shape, dtype, target):
  """DeepSeek-V3's latent cache (a 64-wide RoPE key and a 512-wide latent per token on one kv head) at the default
  latent tiles: 16 q heads (tensor parallel 8) and 128 (one device, the group cut over 2 programs of 64 heads).
  Within shared memory, no spills; bfloat16 prefill on wgmma, and decode too once its tile has 64 rows (128 heads);
  float32 runs 16-row tiles on mma.sync."""
  target = gpu_compile.TARGETS[target]
  num_q_heads, num_kv_heads, dims = gpu_compile.HEAD_SHAPES[shape]
  modules = gpu_compile.engine_kernels(num_q_heads, num_kv_heads, dims, jnp.dtype(dtype), target=target)
  wgmma = {"prefill": dtype == "bfloat16", "decode": dtype == "bfloat16" and num_q_heads >= 64}
  for kind, module in modules.items():
    report = gpu_compile.compile_module(module, target)
    assert report.fits and report.spill_bytes == 0, (kind, report)
    assert 0 < report.registers <= target.max_registers, (kind, report)
    if kind != "write_kv":
      want = {"sm90": "HGMMA" if wgmma[kind] else "HMMA", "gfx942": "MFMA"}[target.name]
      assert report.matrix_instructions == want, (kind, report)


def test_sinks_kernels_compile():
  """gpt-oss heads (64 q, 8 kv, head_dim 64) with attention sinks (the prefill kernel's [rows]
  input) and a per-layer window, bf16: no spills, prefill on wgmma on Hopper, MFMA on MI300."""
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    modules = gpu_compile.engine_kernels(64, 8, 64, jnp.dtype(jnp.bfloat16), target=target,
                                         traced_window=True, sinks=True)
    for kind, module in modules.items():
      report = gpu_compile.compile_module(module, target)
      assert report.fits and report.spill_bytes == 0, (kind, report)
      if kind != "write_kv":
        want = {"sm90": "HGMMA" if kind == "prefill" else "HMMA", "gfx942": "MFMA"}[target.name]
        assert report.matrix_instructions == want, (kind, report)


@pytest.mark.parametrize("shape", ["gemma3-4b", "gemma3-270m"])
def test_kv_limits_kernels_compile(shape):
  """Gemma 3's steps with image rows: both attention kernels with per-row KV limits (the prefill kernel's [rows]
  input, the decode kernel's per-row scalar) and a per-layer window, bf16: no spills, prefill on wgmma on Hopper,
  MFMA on MI300."""
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    modules = gpu_compile.engine_kernels(*gpu_compile.HEAD_SHAPES[shape], jnp.dtype(jnp.bfloat16), target=target,
                                         traced_window=True, kv_limits=True)
    for kind in ("prefill", "decode"):
      report = gpu_compile.compile_module(modules[kind], target)
      assert report.fits and report.spill_bytes == 0, (kind, report)
      want = {"sm90": "HGMMA" if kind == "prefill" else "HMMA", "gfx942": "MFMA"}[target.name]
      assert report.matrix_instructions == want, (kind, report)


@pytest.mark.parametrize("trees", [False, True])
def test_attention_chunk_kernels_compile(trees):
  """Llama 4 Scout's heads on 4 devices (10 q, 2 kv of 128) with a traced attention chunk per layer (and draft
  trees, whose shifts come with it), bf16: both attention kernels fit, prefill on wgmma on Hopper, MFMA on MI300,
  nothing spilled but by the decode kernel with trees on sm90, where ptxas holds it to 128 registers and spills 16
  bytes (docs/kernels.md, "Known limitations")."""
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    modules = gpu_compile.engine_kernels(*gpu_compile.HEAD_SHAPES["llama4-scout-tp4"], jnp.dtype(jnp.bfloat16),
                                         target=target, attention_chunk=True, tree_masks=trees)
    for kind in ("prefill", "decode"):
      report = gpu_compile.compile_module(modules[kind], target)
      spills = 16 if trees and kind == "decode" and target.name == "sm90" else 0
      assert report.fits and report.spill_bytes <= spills, (kind, report)
      want = {"sm90": "HGMMA" if kind == "prefill" else "HMMA", "gfx942": "MFMA"}[target.name]
      assert report.matrix_instructions == want, (kind, report)


def _prefill_module(num_q_heads, num_kv_heads, head_dim, dtype, **tiles):
  pages = jax.ShapeDtypeStruct((num_kv_heads, 64, 16, head_dim), dtype)
  fn = functools.partial(ragged_kernel.ragged_paged_attention, sm_scale=0.1, sliding_window=512,
                         soft_cap=30.0, **tiles)
  [module] = gpu_compile.triton_modules(
      fn, jax.ShapeDtypeStruct((128, num_q_heads, head_dim), dtype), pages, pages,
      jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((4, 16), jnp.int32),
      jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
  return module


@pytest.mark.parametrize("m,e,k,n", [(1, 0, 7168, 1536), (64, 0, 7168, 18432), (2048, 0, 16384, 7168),
                                     (8, 256, 7168, 256), (16384, 256, 256, 7168), (64, 128, 2048, -768)],
                         ids=["decode-wq_a", "batch-mlp", "prefill-wo", "decode-experts", "prefill-experts",
                              "int8-experts-per-feature"])
def test_fp8_block_matmul_compiles(m, e, k, n):
  """pallas_kernels/fp8_matmul.py at DeepSeek-V3's shapes (bfloat16 rows against e4m3 weights in 128 x 128 blocks;
  the grouped kernel over 256 experts, one device's share of 8) with its default launch: no spills, within shared
  memory, on the matrix units (wgmma from 64-row tiles on Hopper); A100's sm80 cannot convert e4m3 in Triton, which
  is why the engine keeps XLA's path there (fp8_matmul.supported). n < 0: int8 experts of |n| outputs with a scale
  per output feature (Qwen3-30B-A3B's under model.quantization int8), which sm80 compiles too."""
  from pallas_kernels.fp8_matmul import block_fp8_matmul, grouped_scaled_matmul

  experts, per_feature, n = (e,) if e else (), n < 0, abs(n)
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
          jax.ShapeDtypeStruct((*experts, k, n), jnp.int8 if per_feature else jnp.float8_e4m3fn),
          jax.ShapeDtypeStruct((*experts, n) if per_feature else (*experts, k // 128, n // 128), jnp.float32),
          *([jax.ShapeDtypeStruct((e,), jnp.int32)] if e else []))
  kernel = grouped_scaled_matmul if e else block_fp8_matmul
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    [module] = gpu_compile.triton_modules(kernel, *args, target=target)
    report = gpu_compile.compile_module(module, target)
    assert report.fits and report.spill_bytes == 0 and 0 < report.registers <= target.max_registers, report
    want = {"sm90": "HGMMA" if m // (e or 1) >= 64 else "HMMA", "gfx942": "MFMA"}[target.name]
    assert report.matrix_instructions == want, report
  if m == 1 or per_feature:
    sm80 = gpu_compile.TARGETS["sm80"]
    [module] = gpu_compile.triton_modules(kernel, *args, target=sm80)
    if per_feature:
      assert gpu_compile.compile_module(module, sm80).matrix_instructions == "HMMA"
    else:
      with pytest.raises(Exception):
        gpu_compile.compile_module(module, sm80)


def test_oversized_tile_is_reported():
  """64 rows x D=256 against 256 KV positions, pipelined, needs far more than Hopper's 227 KB (one query head: the
  smallest such tile compiles in seconds)."""
  module = _prefill_module(1, 1, 256, jnp.bfloat16, block_q=64, block_kv=256, num_warps=4)
  report = gpu_compile.compile_module(module, gpu_compile.TARGETS["sm90"])
  assert not report.fits and report.shared_bytes > 227 * 1024, report


def test_register_spills_are_reported():
  """Llama-3-8B heads at the default 128x64 tile but 4 warps: float32 accumulators spill."""
  module = _prefill_module(32, 8, 128, jnp.bfloat16, num_warps=4)
  assert module.num_warps == 4
  report = gpu_compile.compile_module(module, gpu_compile.TARGETS["sm90"])
  assert report.spill_bytes > 0, report


def test_module_and_target_platforms_must_agree():
  module = _prefill_module(4, 2, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="lowered for sm90, not gfx942"):
    gpu_compile.compile_module(module, gpu_compile.TARGETS["gfx942"])


def _kernel_bench():
  spec = importlib.util.spec_from_file_location(
      "kernel_bench", pathlib.Path(__file__).parent.parent / "scripts" / "kernel_bench.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tuning_sweep_configs_compile_without_spills():
  """Every launch configuration gpu_check.sh sweeps (kernel_bench.py --tune) is viable on sm90,
  so the rare GPU minutes never go to a kernel that cannot run or spills."""
  bench = _kernel_bench()
  target = gpu_compile.TARGETS["sm90"]
  hq, hkv, d, dtype = 32, 8, 128, jnp.bfloat16
  pages = jax.ShapeDtypeStruct((2, hkv, 1024, 16, d), dtype)

  def shapes(num_tokens, num_seqs):
    return (jax.ShapeDtypeStruct((num_tokens, hq, d), dtype), pages, pages,
            jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs, 64), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))

  layer = jax.ShapeDtypeStruct((), jnp.int32)
  runs = [(functools.partial(ragged_kernel.ragged_paged_attention, block_q=bq, block_kv=bkv,
                             num_warps=w, num_stages=s), shapes(2048, 1))
          for bq, bkv, w, s in bench.TUNE_PREFILL]
  runs += [(functools.partial(decode_kernel.decode_attention, block_kv=bkv, num_warps=w,
                              num_stages=s), shapes(64, 64)) for bkv, w, s in bench.TUNE_DECODE]
  for kernel, args in runs:
    [module] = gpu_compile.triton_modules(functools.partial(kernel, sm_scale=0.1), *args,
                                          layer=layer, target=target)
    report = gpu_compile.compile_module(module, target)
    assert report.fits and report.spill_bytes == 0, (kernel.keywords, report)


def _linear_scan_module(delta, num_heads, k_dim, v_dim, target, **tiles):
  from pallas_kernels import linear_scan

  num_tokens, num_seqs = 2048, 8
  rows = lambda width: jax.ShapeDtypeStruct((num_tokens, num_heads, width), jnp.bfloat16)  # noqa: E731
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  f32 = jax.ShapeDtypeStruct((num_tokens, num_heads), jnp.float32)
  states = jax.ShapeDtypeStruct((num_seqs, num_heads, k_dim, v_dim), jnp.float32)
  fn = functools.partial(linear_scan.gated_delta_chunks, delta=delta, **tiles)
  [module] = gpu_compile.triton_modules(fn, rows(k_dim), rows(k_dim), rows(v_dim), f32, f32, states,
                                        i32(num_seqs + 1), i32(num_seqs), i32(num_seqs), i32(num_seqs), target=target)
  return gpu_compile.compile_module(module, target)


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
@pytest.mark.parametrize("delta,k_dim,v_dim", [(True, 128, 128), (False, 128, 64)], ids=["qwen3.5", "granite4-h"])
def test_linear_scan_kernel_compiles_without_spills(delta, k_dim, v_dim, target):
  """The linear attention prefill kernel (pallas_kernels/linear_scan.py) at its default tile, bfloat16 q/k/v as the
  engine passes them on a GPU: Qwen3.5's gated delta rule (128 x 128 state per value head) and Granite 4.0-H's
  Mamba-2 update (state 128 x head 64). Its dots on the matrix units (Hopper's wgmma)."""
  target = gpu_compile.TARGETS[target]
  report = _linear_scan_module(delta, 32, k_dim, v_dim, target)
  assert report.fits and report.spill_bytes == 0, report
  assert report.matrix_instructions == {"sm90": "HGMMA", "gfx942": "MFMA"}[target.name], report


def test_linear_scan_tuning_sweep_compiles_without_spills():
  """Every tile scripts/linear_scan_bench.py --tune times, at both of its shapes, on sm90: no GPU time to failures."""
  import importlib

  bench = importlib.import_module("scripts.linear_scan_bench")
  for delta, num_heads, k_dim, v_dim in bench.SHAPES.values():
    for chunk, block_v, num_warps in bench.TUNE:
      report = _linear_scan_module(delta, num_heads, k_dim, v_dim, gpu_compile.TARGETS["sm90"], chunk=chunk,
                                   block_v=block_v, num_warps=num_warps)
      assert report.fits and report.spill_bytes == 0, (chunk, block_v, num_warps, report)
