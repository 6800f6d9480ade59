"""Pallas (Triton backend) matmuls against 8-bit weights read as stored: x [M, K] @ W [K, N] where W is an FP8
checkpoint's e4m3 values with a float32 scale per block of `block` x `block` weights (the layout
`model.quantization: fp8` keeps: DeepSeek-V3/R1, the "-FP8" models; models/quant.py), and the grouped form for
experts (`grouped_scaled_matmul`: those blocks, or int8 / e4m3 experts with a scale per output feature).

Why a kernel: XLA's reference path (`block_fp8_matmul_reference`) dequantizes a layer's weight into the activations'
dtype and then runs a GEMM; unless XLA fuses that into the GEMM it writes and reads two bytes a weight beside the
one it stores, which at decode (M small, the weights' bytes are the time) costs up to 5x the bytes of the e4m3 read
alone. Here the weight never leaves its e4m3 byte in memory: each program converts its tiles on the fly.

Grid (cdiv(M, bm), N / bn): program (i, j) owns output rows [i bm, (i + 1) bm) and columns [j bn, (j + 1) bn), with
bn = the weight block's width, so one block scale covers each weight tile it reads. It walks K one weight block at a
time (a `fori_loop` over K / block steps): the [bm, block] activation tile and the [block, bn] e4m3 tile, the latter
converted to the activations' dtype, one tensor-core dot into a float32 [bm, bn] accumulator, times that block's
scale. bm follows M (16 for decode batches up to 16, up to 64 for prefill chunks) so a decode step does not compute
64 rows of padding. Rows past M are zero padding (the wrapper pads, then drops them).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import bucket_of


def block_fp8_matmul_reference(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
  """x [M, K] @ (values [K, N] e4m3 times the scale of their block, scales [K / bk, N / bn]) -> [M, N] in x's dtype,
  float32 sums: the weight dequantized into x's dtype first (XLA's path)."""
  from models import quant

  w = quant.dequantize_fp8_blocks(values, scales, x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _fp8_matmul_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int):
  # x_ref [bm, K] (this program's rows), w_ref [K, bn] e4m3 (its columns), s_ref [K / block_k] (their blocks'
  # scales), o_ref [bm, bn].
  num_k = x_ref.shape[1] // block_k

  def body(kb, acc):
    x = x_ref[:, pl.ds(kb * block_k, block_k)]
    w = w_ref[pl.ds(kb * block_k, block_k), :].astype(x.dtype)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32) * s_ref[kb]

  acc = lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def supported(device: jax.Device) -> bool:
  """Whether the compiled kernel runs on `device`: Triton converts e4m3 on NVIDIA from compute capability 8.9 (Ada,
  Hopper; an A100's sm80 fails to compile it) and on AMD's MI300 series (CDNA3)."""
  capability = getattr(device, "compute_capability", None)
  if capability:
    return tuple(int(part) for part in str(capability).split(".")[:2]) >= (8, 9)
  return "MI3" in device.device_kind


def tileable(values_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> bool:
  """Whether weights [K, N] with block scales [K / bk, N / bn] suit the kernel: blocks that tile both dims, powers of
  two >= 16 wide (its tiles)."""
  (k, n), (kb, nb) = values_shape[-2:], scales_shape[-2:]
  return all(size % blocks == 0 and size // blocks >= 16 and not (size // blocks) & (size // blocks - 1)
             for size, blocks in ((k, kb), (n, nb)))


def row_block(m: int) -> int:
  """Rows per program for M rows: the smallest power of two >= M, at least 16 (the tensor cores' smallest tile) and
  at most 64."""
  return min(64, max(16, 1 << max(0, (m - 1).bit_length())))


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages", "out_dtype"))
def block_fp8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, *, interpret: bool = False,
                     num_warps: int | None = None, num_stages: int = 2, out_dtype=None) -> jax.Array:
  """x [M, K] (bfloat16 or float32) @ FP8 block-scaled weights -> [M, N] in x's dtype (or `out_dtype`: float32 for
  partial sums that are reduced across devices); the same contract as `block_fp8_matmul_reference`. The weight blocks must tile K and N (an FP8 checkpoint's kept weights do:
  `safetensors_loader._kept_fp8`) and be powers of two >= 16 wide. num_warps: 8 for 64-row tiles (4 spend ~166
  registers a thread on sm90 and ~216 VGPRs on gfx942; 8 halve that), 4 below; 2 stages of K tiles in flight (at 64
  rows 80 KB of shared memory on sm90 and 32 KB of an MI300's 64 KB LDS, which 3 stages would fill;
  scripts/kernel_compile_check.py)."""
  (m, k), (k_w, n) = x.shape, values.shape
  if k_w != k or not tileable(values.shape, scales.shape):
    raise ValueError(f"x {x.shape} @ weights {values.shape} with block scales {scales.shape}: the blocks must tile "
                     "both dims in powers of two >= 16")
  if m == 0:
    return jnp.zeros((0, n), out_dtype or x.dtype)
  block_k, block_n = k // scales.shape[0], n // scales.shape[1]
  bm = row_block(m)
  num_warps = num_warps or (8 if bm >= 64 else 4)
  padded = -(-m // bm) * bm
  x = jnp.pad(x, ((0, padded - m), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_fp8_matmul_kernel, block_k=block_k),
      grid=(padded // bm, n // block_n),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
                pl.BlockSpec((scales.shape[0], None), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded, n), out_dtype or x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="block_fp8_matmul",
  )(x, values, scales.astype(jnp.float32))
  return out[:m]


def _grouped_kernel(expert_ref, x_ref, w_ref, s_ref, o_ref, *, block_k: int, block_n: int, per_column: bool):
  # expert_ref [] (this row tile's expert, -1: an empty tile), x_ref [bm, K] (its rows, grouped by expert and padded
  # per expert to whole tiles), w_ref [E, K, N] 8-bit (every expert: only this one's columns are read), s_ref
  # [E, K / block_k, N / block_n] (a scale per block) or [E, N] (`per_column`: a scale per output feature, applied
  # after the K loop), o_ref [bm, block_n].
  expert, j = expert_ref[()], pl.program_id(1)
  num_k = x_ref.shape[1] // block_k

  @pl.when(expert >= 0)
  def _():
    def body(kb, acc):
      x = x_ref[:, pl.ds(kb * block_k, block_k)]
      w = w_ref[expert, pl.ds(kb * block_k, block_k), pl.ds(j * block_n, block_n)].astype(x.dtype)
      part = jnp.dot(x, w, preferred_element_type=jnp.float32)
      return acc + (part if per_column else part * s_ref[expert, kb, j])

    acc = lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.float32))
    if per_column:
      acc = acc * s_ref[expert, pl.ds(j * block_n, block_n)][None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _tile(size: int) -> int | None:
  """The widest power-of-two tile (16 to 128) that divides `size`, None if none does."""
  return next((t for t in (128, 64, 32, 16) if size % t == 0), None)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages", "out_dtype"))
def grouped_scaled_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, group_sizes: jax.Array, *,
                          interpret: bool = False, num_warps: int | None = None, num_stages: int = 2,
                          out_dtype=None) -> jax.Array:
  """Rows x [R, K] grouped by expert (group_sizes [E] rows each, in expert order, as `moe.grouped_moe` sorts them) @
  each group's expert of 8-bit weights values [E, K, N] -> [R, N] in x's dtype (or `out_dtype`): what
  `jax.lax.ragged_dot(x, dequantized weights, group_sizes)` computes, reading only the experts that have rows. The
  weights: an FP8 checkpoint's e4m3 with scales [E, K / bk, N / bn] per block (`grouped_tileable`), or int8 / e4m3
  with scales [E, N] per output feature (models/quant.py's int8 and fp8 experts).

  The rows are laid out in tiles of bm rows, each expert's padded to whole tiles (at most cdiv(R, bm) + min(R, E)
  tiles), each tile knowing its expert (-1: unused, skipped); grid (tiles, N / bn) runs the dense kernel's K loop on
  its expert's 8-bit tiles; the rows come back in their order. bm follows the rows per expert on average (16 at
  decode, up to 64)."""
  (r, k), (num_experts, k_w, n) = x.shape, values.shape
  per_column = scales.ndim == 2
  if k_w != k or not grouped_tileable(values.shape, scales.shape):
    raise ValueError(f"x {x.shape} @ experts {values.shape} with scales {scales.shape}: the kernel's tiles need "
                     "blocks (or, with a scale per output feature, dims) in powers of two >= 16")
  if values.size >= 2**31:
    raise ValueError(f"experts {values.shape}: {values.size} weights, past the kernel's int32 offsets (2^31); split "
                     "them over devices (parallel.tensor)")
  if r == 0:
    return jnp.zeros((0, n), out_dtype or x.dtype)
  block_k, block_n = (_tile(k), _tile(n)) if per_column else (k // scales.shape[-2], n // scales.shape[-1])
  bm = row_block(-(-r // num_experts))
  num_warps = num_warps or (8 if bm >= 64 else 4)
  num_tiles = -(-r // bm) + min(r, num_experts)
  sizes = group_sizes.astype(jnp.int32)
  tiles_per_expert = -(-sizes // bm)
  first_tile = jnp.cumsum(tiles_per_expert) - tiles_per_expert  # [E]
  starts = jnp.cumsum(sizes) - sizes  # each expert's first row in x
  expert_of_row = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), sizes, total_repeat_length=r)
  slot = first_tile[expert_of_row] * bm + jnp.arange(r, dtype=jnp.int32) - starts[expert_of_row]  # [R]
  tiles = jnp.zeros((num_tiles * bm, k), x.dtype).at[slot].set(x)
  tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
  owner = bucket_of(jnp.cumsum(tiles_per_expert), tile_ids)
  tile_expert = jnp.where(owner < num_experts, owner, -1)
  out = pl.pallas_call(
      functools.partial(_grouped_kernel, block_k=block_k, block_n=block_n, per_column=per_column),
      grid=(num_tiles, n // block_n),
      in_specs=[pl.BlockSpec((None,), lambda i, j: (i,)),
                pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec(values.shape, lambda i, j: (0,) * values.ndim),
                pl.BlockSpec(scales.shape, lambda i, j: (0,) * scales.ndim)],
      out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((num_tiles * bm, n), out_dtype or x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="grouped_scaled_matmul",
  )(tile_expert, tiles, values, scales.astype(jnp.float32))
  return out[slot]


def grouped_tileable(values_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> bool:
  """Whether experts [E, K, N] with these scales suit the grouped kernel: block scales [E, K / bk, N / bn] in blocks
  `tileable` takes, or scales [E, N] per output feature with K and N multiples of 16."""
  if len(scales_shape) == 2:
    return _tile(values_shape[-2]) is not None and _tile(values_shape[-1]) is not None
  return tileable(values_shape, scales_shape)
