"""Pallas (Triton backend) split-KV decode kernel: one program per (row, kv head, KV split).

Decode is memory bound and has little parallelism per sequence (one query token), so a small
batch would leave most SMs idle if one program walked a whole long context. Each query row's
visible KV range [window start, pos] is cut into `num_splits` contiguous runs of tiles; program
(t, h, i) walks run i and writes an unnormalised partial (acc [rows, D], running max m and sum l,
all float32). A jnp epilogue merges the partials by log-sum-exp:
    M = max_i m_i,   out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i.
Runs are sized per row at run time (cdiv(num_tiles, num_splits) tiles), so short rows leave the
trailing programs empty (zero trips, m = mask value, l = 0: they drop out of the merge).
Attention sinks (gpt-oss, one value-less logit per q head) join the merge only, as one more
partial with m = sink, l = 1, acc = 0; the programs never see them.

Every row is handled independently from its own position, so the kernel is correct for any
ragged batch; it is only efficient when each sequence has one new token (the caller's
`decode_only` hint), since a chunk's rows would each re-read the KV. With per-row limits
(kv_limits, Gemma 3's bidirectional image tokens) a row's range ends at its limit instead of its
position (one more per-row scalar input); the window still starts from its position. Draft-tree masks
(tree speculative decoding) are one more per-row scalar, the mask, whose set bits b hide positions pos - 1 - b,
and with a window a second, the mask's popcount: the row's window counts back from pos - popcount.

Stacked cache: as in the ragged kernel, k/v_pages are [L, Hkv, P, ps, D] and the kernel reads
k_ref[layer, page_ids] (layer an int32 scalar input), in place.

Tile: the Gp (G rounded up to a power of two) q heads of one kv head, zero-padded to >= 16 rows
for Triton's dot; a group larger than `block_h` heads (a latent cache's 16 to 128 q heads on one
kv head) is cut over programs of block_h heads, grid (T, Hkv * Gp / block_h, num_splits).

Latent cache (DeepSeek's MLA, see ragged_kernel): q's RoPE part [rows, Dk] is dotted with the K
tile and its latent part [rows, Dv] with the V tile, which is also the value tile; the partials
are Dv wide.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_kernel import (MASK_VALUE, _cdiv, _group_heads, attend_kv_tile, kv_head_of, kv_tile,
                                          next_pow2, scale_specs, stacked_cache, window_input)
from pallas_kernels.reference import latent_dims, row_kv_limits, row_tree_masks, token_metadata, tree_visible


def _decode_kernel(
    pos_ref,     # []   absolute position of this row (-1: padding row)
    pages_ref,   # [max_pages_padded] the row's sequence's page-table row
    layer_ref,   # []   the layer to read
    window_ref,  # []   the sliding window (read only when has_window)
    chunk_ref,   # []   the attention chunk (read only when has_chunk)
    q_ref,       # [rows, Dk] (a latent cache: q's RoPE part)
    k_ref,       # [L, P, ps, Dk] this kv head's pages, every layer
    v_ref,       # [L, P, ps, Dv] (Dv = Dk unless latent)
    *refs,       # [q_latent [rows, Dv] (latent),] [limit [] (has_limit: the row's last visible position,
                 # in [pos, kv_len), -1 for padding),] [tree mask [][, window shift [] (has_window or
                 # has_chunk)]
                 # (has_tree: 0 for padding),] [k_scales, v_scales ([L, P, ps], an 8-bit cache's),]
                 # then the outputs: acc [rows, Dv] float32 unnormalised, m [rows], l [rows] float32
    sm_scale: float, soft_cap: float | None, has_window: bool, has_limit: bool, has_tree: bool, latent: bool,
    pages_per_tile: int, num_splits: int, has_chunk: bool = False):
  q_latent = None
  if latent:
    q_latent_ref, *refs = refs
    q_latent = q_latent_ref[...]                                        # [rows, Dv]
  if has_limit:
    limit_ref, *refs = refs
  if has_tree:
    tree_ref, *refs = refs
    if has_window or has_chunk:  # (both count back from a tree row's depth)
      shift_ref, *refs = refs
  *scale_refs, acc_ref, m_ref, l_ref = refs
  rows, v_dim = acc_ref.shape
  page_size = k_ref.shape[2]
  block_kv = pages_per_tile * page_size
  split = pl.program_id(2)
  layer = layer_ref[()]
  pos = pos_ref[()]
  limit = limit_ref[()] if has_limit else pos       # the last visible position

  window_pos = pos                                  # where the window counts back from
  if has_tree:
    tree_mask = tree_ref[()]
    if has_window or has_chunk:
      window_pos = pos - shift_ref[()]

  kv_end = limit + 1                                # 0 for padding rows
  kv_start = jnp.int32(0)
  if has_window:
    window = window_ref[()]
    kv_start = jnp.maximum(window_pos - window + 1, 0)
  if has_chunk:
    chunk = chunk_ref[()]
    chunk_start = lax.div(jnp.maximum(window_pos, 0), chunk) * chunk
    kv_start = jnp.maximum(kv_start, chunk_start)
  first_tile = lax.div(kv_start, block_kv)
  num_tiles = jnp.maximum(_cdiv(kv_end, block_kv) - first_tile, 0)
  tiles_per_split = _cdiv(num_tiles, num_splits)
  tile_lo = first_tile + split * tiles_per_split
  tile_hi = jnp.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

  q = q_ref[...]                                                        # [rows, Dk]

  def visible(kv_pos):                                                  # [1, block_kv]
    mask = kv_pos <= limit
    if has_window:
      mask &= kv_pos > window_pos - window
    if has_chunk:
      mask &= kv_pos >= chunk_start
    if has_tree:
      mask &= tree_visible(tree_mask, pos - 1 - kv_pos)
    return mask[None, :]

  # Every tile is masked: the unmasked interior loop that pays off in the prefill kernel (walk_tiles)
  # measured no faster here at batch 64 x 8k and slower with 128-position tiles over 3 stages (an
  # H200, docs/kernels.md): a decode tile's mask is [1, block_kv] broadcast over few rows.
  body = functools.partial(attend_kv_tile, q, k_ref, v_ref, pages_ref, layer, visible=visible,
                           pages_per_tile=pages_per_tile, sm_scale=sm_scale, soft_cap=soft_cap,
                           scale_refs=scale_refs or None, q_latent=q_latent)

  init = (jnp.zeros((rows, v_dim), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(tile_lo, jnp.maximum(tile_lo, tile_hi), body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def default_num_splits(num_tokens: int, num_kv_heads: int, target_programs: int = 256,
                       max_splits: int = 16) -> int:
  """Enough KV splits that rows x kv heads x splits fills a large GPU (~2 programs per SM)."""
  return max(1, min(max_splits, next_pow2(-(-target_programs // (num_tokens * num_kv_heads)))))


def latent_block_sizes(group: int, itemsize: int) -> tuple[int, int]:
  """(block_h q heads, block_kv positions) for the decode kernel on a latent cache (DeepSeek: Dk =
  64, Dv = 512). 16-bit: up to 64 heads a program (DeepSeek-V3's 128 on one device: 2 programs
  per row, wgmma on Hopper) against 16 positions, or 16 heads (V3 at TP 8, V2-Lite) against 32;
  float32: 16 heads against 16. 8 warps, no spills on sm90 and MI300 (docs/kernels.md)."""
  if itemsize > 2:
    return min(next_pow2(group), 16), 16
  block_h = min(next_pow2(group), 64)
  return block_h, max(16, 512 // max(16, block_h))


def decode_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                     sm_scale: float, sliding_window: int | jax.Array | None = None,
                     soft_cap: float | None = None, interpret: bool = False,
                     layer: jax.Array | None = None, block_kv: int | None = None,
                     block_h: int | None = None, num_splits: int | None = None,
                     num_warps: int | None = None, num_stages: int = 2, k_scales=None, v_scales=None,
                     sinks: jax.Array | None = None, kv_limits: jax.Array | None = None,
                     tree_masks: jax.Array | None = None,
                     attention_chunk: int | jax.Array | None = None) -> jax.Array:
  """Split-KV Pallas attention, one query row at a time. Same contract as ragged_paged_attention.
  block_h: q heads per program (a power of two <= the padded GQA group; by default the whole
  group, or latent_block_sizes' share of a latent cache's)."""
  latent = latent_dims(q, k_pages, v_pages)
  k_pages, v_pages, layer, scales = stacked_cache(k_pages, v_pages, layer, k_scales, v_scales)
  layer = jnp.clip(layer, 0, k_pages.shape[0] - 1)
  num_tokens, num_q_heads, head_dim = q.shape
  num_layers, num_kv_heads, num_pages, page_size, k_dim = k_pages.shape
  v_dim = v_pages.shape[-1]
  max_pages_per_seq = page_indices.shape[1]
  group_padded = next_pow2(num_q_heads // num_kv_heads)
  itemsize = max(jnp.dtype(k_pages.dtype).itemsize, jnp.dtype(q.dtype).itemsize)  # 8-bit tiles convert to q's
  if latent:
    default_h, default_kv = latent_block_sizes(num_q_heads // num_kv_heads, itemsize)
  else:
    # K and V tiles of <= 16 KB each per pipeline stage: 64 positions for bf16 D=128 (on an H200,
    # batch 64 x 8k context: 0.92 ms against 1.25 ms with 128, docs/kernels.md "Launch configurations").
    default_h, default_kv = group_padded, max(16, min(128, 16384 // (head_dim * itemsize)))
  block_h = block_h or default_h
  pages_per_tile, block_kv = kv_tile(page_size, block_kv or default_kv)
  num_head_splits = group_padded // block_h
  # Splits fill a GPU's SMs; interpreted on a CPU each program costs a copy of its inputs, so one split (the merge
  # of several is tested with num_splits given).
  num_splits = num_splits or (1 if interpret else default_num_splits(num_tokens, num_kv_heads * num_head_splits))
  rows = max(16, block_h)  # the head block, zero rows up to Triton's 16-row minimum
  if num_warps is None:
    # With head_dim 256 the [16, D] accumulator and q tile push 4 warps past 255 registers
    # (spills); below that 4 warps fit (~230 for D=128 bf16; scripts/kernel_compile_check.py).
    # A latent tile (a [rows, 512] accumulator, two q tiles) takes 8 too.
    num_warps = 8 if latent or head_dim >= 256 else 4

  seq_ids, positions, _ = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  max_pages_padded = -(-max_pages_per_seq // pages_per_tile) * pages_per_tile
  row_pages = jnp.pad(page_indices, ((0, 0), (0, max_pages_padded - max_pages_per_seq)))
  row_pages = jnp.clip(row_pages[seq_ids], 0, num_pages - 1).astype(jnp.int32)  # [T, maxpp]

  # [T, Hq, D] -> [T, NH, rows, D]: head blocks of block_h heads, zero rows up to `rows`.
  qg = _group_heads(q, num_kv_heads, block_h)
  num_head_blocks = qg.shape[1]
  q_tiles = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - block_h), (0, 0)))
  # A latent cache's q: the RoPE part against K, the latent part against V (two power-of-two dots).
  q_tiles = [q_tiles[..., :k_dim], q_tiles[..., k_dim:]] if latent else [q_tiles]

  has_window, window = window_input(sliding_window)
  has_chunk, chunk = window_input(attention_chunk)
  has_limit = kv_limits is not None
  row_spec = pl.BlockSpec((None,), lambda t, h, i: (t,))
  limits = [row_kv_limits(kv_limits, cu_q_lens, kv_lens, num_seqs, num_tokens)] if has_limit else []
  limit_specs = [row_spec] if has_limit else []
  has_tree = tree_masks is not None
  trees = []  # each row's mask and, with a window, its window shift
  if has_tree:
    shifted = has_window or has_chunk  # (a tree row's window and chunk count from its depth)
    trees = list(row_tree_masks(tree_masks, cu_q_lens, kv_lens, num_seqs, num_tokens)[:1 + shifted])
  kernel = functools.partial(
      _decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap, has_window=has_window, has_limit=has_limit,
      has_tree=has_tree, latent=latent, pages_per_tile=pages_per_tile, num_splits=num_splits, has_chunk=has_chunk)
  k_spec, v_spec = (pl.BlockSpec((num_layers, None, num_pages, page_size, dim),
                                 lambda t, h, i: (0, kv_head_of(h, num_head_splits), 0, 0, 0))
                    for dim in (k_dim, v_dim))
  tile_specs = [pl.BlockSpec((None, None, rows, t.shape[-1]), lambda t, h, i: (t, h, 0, 0)) for t in q_tiles]
  partial_shape = (num_splits, num_tokens, num_head_blocks, rows)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(num_tokens, num_head_blocks, num_splits),
      in_specs=[row_spec,
                pl.BlockSpec((None, max_pages_padded), lambda t, h, i: (t, 0)),
                pl.BlockSpec((None,), lambda t, h, i: (0,)), pl.BlockSpec((None,), lambda t, h, i: (0,)),
                pl.BlockSpec((None,), lambda t, h, i: (0,)), tile_specs[0], k_spec, v_spec, *tile_specs[1:],
                *limit_specs, *[row_spec] * len(trees), *scale_specs(scales, k_spec)],
      out_specs=[pl.BlockSpec((None, None, None, rows, v_dim), lambda t, h, i: (i, t, h, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda t, h, i: (i, t, h, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda t, h, i: (i, t, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((*partial_shape, v_dim), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="ragged_paged_decode_attention",
  )(positions.astype(jnp.int32), row_pages, layer, window, chunk, q_tiles[0], k_pages, v_pages, *q_tiles[1:],
    *limits, *trees, *(scales or ()))

  # Log-sum-exp merge of the splits: [splits, T, NH, block_h(, Dv)] -> [T, Hq(, Dv)].
  def q_heads(x):  # [splits, T, NH, rows(, Dv)] -> [splits, T, Hq(, Dv)]: the real q heads
    x = x[:, :, :, :block_h].reshape(num_splits, num_tokens, num_kv_heads, group_padded, *x.shape[4:])
    return x[:, :, :, :num_q_heads // num_kv_heads].reshape(num_splits, num_tokens, num_q_heads, *x.shape[4:])

  return merge_splits(q_heads(acc), q_heads(m), q_heads(l), sinks).astype(q.dtype)  # [T, Hq, Dv]


def merge_splits(acc, m, l, sinks=None):
  """The log-sum-exp merge of the KV splits' partials: acc [splits, T, Hq, Dv], m, l [splits, T, Hq] float32 ->
  [T, Hq, Dv] float32. sinks [Hq] (or None): one more partial each, m = sink, l = exp(sink - sink) = 1, acc = 0."""
  m_max = m.max(axis=0)
  if sinks is not None:
    sinks = jnp.asarray(sinks, jnp.float32).reshape(m.shape[-1])
    m_max = jnp.maximum(m_max, sinks)
  w = jnp.exp(m - m_max)                                                 # empty splits -> 0
  l_sum = (w * l).sum(axis=0)
  if sinks is not None:
    l_sum += jnp.exp(sinks - m_max)
  return (w[..., None] * acc).sum(axis=0) / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]
