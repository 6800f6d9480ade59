"""Pallas (Triton backend) kernel for ragged paged attention: prefill chunks and decodes together.

Grid (num_q_blocks, Hkv). A query block is up to `block_q` consecutive new tokens of ONE
sequence; every sequence starts a new block, so a static count of
    num_q_blocks = (T + min(S, T) * (block_q - 1)) // block_q
always suffices (each non-empty sequence wastes less than one block). Blocks past the last one in
use are empty programs that loop zero times.

Tile packing (GQA): the G = Hq // Hkv query heads sharing a kv head are packed with the block's
tokens into one [rows, D] tile, rows = block_q * Gp (Gp = G rounded up to a power of two; row
r is token r // Gp, head r % Gp). One kv head's pages are then read once for all its q heads and
all tokens of the block, and the dots have M = rows >= 16 as Triton requires. The packing and
unpacking are jnp gathers outside the kernel (O(T * Hq * D), small next to the KV traffic).

Stacked cache: k/v_pages are [L, Hkv, P, ps, D] (every layer, the engine's `lax.scan` carry) and
the layer is an int32 scalar input; each program's BlockSpec covers all layers of its kv head and
the kernel loads k_ref[layer, page_ids], so one layer is read in place (Triton refs are global
memory; nothing is sliced or copied). A per-layer cache [Hkv, P, ps, D] is viewed as L = 1.

KV loop: tiles of `block_kv` positions = `pages_per_tile` pages gathered through the page table
(k_ref[page_ids] with a vector of page ids). The loop runs over tiles
    [window_start(first row) // block_kv, cdiv(last row's position + 1, block_kv))
so tiles past the causal limit of the block's last row and tiles wholly before the sliding window
of its first row are never loaded. Inside a tile a positional mask handles the diagonal, the
window edge and kv_len. Online softmax in float32 with a finite mask value: a row that has seen
only masked scores carries a junk (m, l) that is wiped (alpha = exp(mask - real) = 0) as soon as
it meets its first visible score, and every real row sees at least its own position.

Per-row limits (kv_limits, Gemma 3's bidirectional image tokens): row r sees up to its own limit
(>= its position) instead of its position. The limits are packed into a [rows] input like the q
tile, and the loop's end is the block's largest limit + 1 (a per-block scalar computed outside);
the window still starts from each row's position, and the unmasked interior (tiles ending at or
before the first row's position) is unchanged since no limit is below its position. Without
limits those inputs and code are absent.

Draft-tree masks (tree speculative decoding): bit b of a row's mask hides position row_pos - 1 - b, and with a
window the row counts back from row_pos - popcount(mask) (reference.row_tree_masks, computed outside). The masks,
and with a window the popcounts, are packed into [rows] inputs like the limits. A mask may hide positions down to
row_pos - 32 >= first_pos - 32, so the unmasked interior ends before the lowest position a mask of the block hides
(tree_blocks: a per-block scalar, computed outside with clz; first_pos + 1 as without masks when the block's masks
are all zero, so that zero masks run the very same tiles unmasked), and with a window the loop starts from the
block's lowest row_pos - popcount (another per-block scalar). Without masks those inputs and code are absent.

Attention sinks (gpt-oss): one learned logit per q head joins every row's softmax with no value.
The online softmax starts from it, m = sink and l = exp(sink - sink) = 1 with acc = 0, instead of
from the mask value; each row reads its own head's sink from a small [programs, rows] input laid
out like the q tile. Without sinks that input and code are absent.

Latent cache (DeepSeek's multi-head latent attention, absorbed; `reference.latent_dims`): K pages
[.., Dk] hold each position's RoPE key, V pages [.., Dv] its latent, and q is [T, Hq, Dk + Dv]. A
position's key is its K and V rows together, its value the V row, so a tile's scores are two dots
on power-of-two widths, q[:, :Dk] K^T + q[:, Dk:] V^T (Dk + Dv = 576 is no Triton tile), the V tile
then serves both dots, and the output is Dv wide. With Hkv = 1 the GQA group is every q head (16
to 128), more than one tile's rows: the group is cut into programs of `block_h` heads, each a
"virtual" kv head reading its real kv head's pages (grid (num_q_blocks, Hkv * Gp / block_h)).
"""
from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_quant
from pallas_kernels.reference import (TREE_MASK_BITS, QueryBlocks, latent_dims, query_blocks, row_kv_limits,
                                      row_tree_masks, tree_visible)

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a, b: int):
  """Ceil division of non-negative traced ints (lax.div lowers to a plain Triton divide)."""
  return lax.div(a + (b - 1), b)


def kv_tile(page_size: int, block_kv: int) -> tuple[int, int]:
  """(pages_per_tile, block_kv) with block_kv >= 16, a whole number of power-of-two pages."""
  if page_size & (page_size - 1):
    raise ValueError(f"the pallas backend needs a power-of-two page_size, got {page_size}")
  block_kv = max(block_kv, page_size, 16)
  return block_kv // page_size, block_kv


def offsets_wrap(elements: int, itemsize: int) -> bool:
  """Whether the Triton lowering's element offsets into an array of `elements` items of `itemsize` bytes wrap
  (check_offsets)."""
  return elements > 2**31 and elements * itemsize <= 2**32


def check_offsets(*arrays) -> None:
  """Refuses, by name, arrays the Triton lowering would index wrongly. JAX's Pallas Triton lowering
  computes element offsets in signed 32 bits unless the whole array passes 2**32 BYTES (jax 0.10 and
  0.11, pallas/triton/lowering.py: `full_size > 2**32`), so a 1-byte array of more than 2**31 and at
  most 2**32 elements (an 8-bit cache of 2 to 4 GiB per K or V array) wraps to negative offsets: reads of other memory,
  writes outside the cache. Seen on an H200: the int8 decode of 64 x 32k over 2 layers (exactly 4 GiB)
  was off by 0.45. The engine sizes its cache around this (engine/kv_plan.py)."""
  for array in arrays:
    elements = math.prod(array.shape)
    if offsets_wrap(elements, jnp.dtype(array.dtype).itemsize):
      raise ValueError(
          f"a {jnp.dtype(array.dtype).name} cache array of {elements} elements {tuple(array.shape)}: the Pallas "
          f"Triton lowering indexes 1-byte arrays of over 2**31 to 2**32 elements with 32-bit offsets that wrap; make "
          f"it smaller (under 2 GiB) or larger (over 4 GiB), e.g. with cache.memory_gb or cache.num_pages")


def stacked_cache(k_pages, v_pages, layer, k_scales=None, v_scales=None):
  """The kernels' cache view: (k_pages, v_pages [L, Hkv, P, ps, D], layer [1] int32, scales).

  layer None: k/v_pages are one layer, [Hkv, P, ps, D], viewed as L = 1 (a free reshape).
  Otherwise they are stacked, [L, Hkv, P, ps, D], and layer is an int32 scalar in [0, L); the
  caller decides what an out-of-range layer does (attention clamps, like a jnp gather).
  scales: None, or (k_scales, v_scales) [L, Hkv, P, ps] of an 8-bit cache (kv_quant), viewed alike.
  """
  if kv_quant.is_quantized(k_pages.dtype) != (k_scales is not None):
    raise ValueError(f"k/v_scales go with an 8-bit cache and only with one; pages are {k_pages.dtype}")
  check_offsets(k_pages, v_pages)
  scales = None if k_scales is None else (k_scales, v_scales)
  if layer is None:
    if k_pages.ndim != 4:
      raise ValueError(f"per-layer pages must be [Hkv, P, ps, D], got {k_pages.shape}; "
                       "pass layer= for a stacked cache")
    scales = scales and (k_scales[None], v_scales[None])
    return k_pages[None], v_pages[None], jnp.zeros((1,), jnp.int32), scales
  if k_pages.ndim != 5:
    raise ValueError(f"with layer=, pages must be stacked [L, Hkv, P, ps, D], got {k_pages.shape}")
  return k_pages, v_pages, jnp.asarray(layer, jnp.int32).reshape(1), scales


def scale_specs(scales, page_spec: pl.BlockSpec) -> list[pl.BlockSpec]:
  """BlockSpecs of (k_scales, v_scales) matching the pages' spec minus D; [] for a full-precision cache."""
  if scales is None:
    return []
  block = page_spec.block_shape[:-1]
  index_map = page_spec.index_map
  spec = pl.BlockSpec(block, lambda *idx: index_map(*idx)[:-1])
  return [spec, spec]


def pack_rows(qg, row_tokens):
  """[T, NH, block_h, D] (_group_heads) -> [NH, NB, block_q * block_h, D] tiles; row_tokens
  [NB, block_q] are token ids of qg. Tile row r is token r // block_h, head r % block_h."""
  _, num_head_blocks, block_h, head_dim = qg.shape
  num_blocks, block_q = row_tokens.shape
  return qg[row_tokens].transpose(2, 0, 1, 3, 4).reshape(
      num_head_blocks, num_blocks, block_q * block_h, head_dim)


def attend_kv_tile(q, k_ref, v_ref, pages_ref, layer, tile, carry, *, visible, pages_per_tile: int,
                   sm_scale: float, soft_cap: float | None, scale_refs=None, q_latent=None):
  """One online-softmax step of q [rows, Dk] over KV tile `tile` of a sequence (a fori_loop body).

  pages_ref holds the sequence's page-table row; k_ref [L, P, ps, Dk], v_ref [L, P, ps, Dv] one kv
  head's pages of every layer; visible(kv_pos [block_kv]) -> bool mask broadcastable to [rows,
  block_kv], or None for a tile every row sees whole (no mask computed). carry is (acc [rows, Dv],
  running max m [rows], running sum l [rows]), all float32.
  scale_refs: None, or (k_scales, v_scales) [L, P, ps] of an 8-bit cache: a key's scale multiplies
  its score column and a value's scale its probability column (kv_quant), so the 8-bit tile only
  converts to q's dtype. q_latent [rows, Dv]: a latent cache, whose keys are the K and V rows
  together: the scores are q K^T + q_latent V^T (each part times its own row's scale).
  """
  acc, m, l = carry
  block_kv = pages_per_tile * k_ref.shape[2]
  page_ids = pages_ref[pl.ds(tile * pages_per_tile, pages_per_tile)]    # [ppt]
  k = kv_quant.to_compute(k_ref[layer, page_ids], q.dtype).reshape(block_kv, k_ref.shape[-1])  # [block_kv, Dk]
  v = kv_quant.to_compute(v_ref[layer, page_ids], q.dtype).reshape(block_kv, v_ref.shape[-1])  # [block_kv, Dv]
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)               # [rows, block_kv]
  if scale_refs is not None:
    k_scale = scale_refs[0][layer, page_ids].reshape(block_kv)           # [block_kv] float32
    v_scale = scale_refs[1][layer, page_ids].reshape(block_kv)
    s = s * k_scale[None, :]
  if q_latent is not None:  # the key's latent part: the V tile serves both dots
    s_latent = jnp.dot(q_latent, v.T, preferred_element_type=jnp.float32)
    s = s + (s_latent if scale_refs is None else s_latent * v_scale[None, :])
  s = s * sm_scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  if visible is not None:  # None: a tile every row sees whole (walk_tiles)
    kv_pos = tile * block_kv + jnp.arange(block_kv, dtype=jnp.int32)    # [block_kv]
    s = jnp.where(visible(kv_pos), s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))                            # [rows]
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])                                       # [rows, block_kv]
  l = alpha * l + jnp.sum(p, axis=1)
  if scale_refs is not None:
    p = p * v_scale[None, :]
  acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc, m_new, l


def walk_tiles(body, lo, hi, carry, *, full_lo, full_hi):
  """Runs body(tile, carry, masked=...) over KV tiles [lo, hi). Tiles in [full_lo, full_hi), which every
  row sees whole (before the causal diagonal, inside the window), go through an unmasked loop; the
  edge tiles before and after it get the mask. Masking costs a compare and select per score, which
  the interior of a long prefix (nearly every tile) skips. full_hi=None: one masked loop (a latent
  cache's tile, at the register limit, spills with three loops)."""
  if full_hi is None:
    return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
  mid_lo = jnp.clip(full_lo, lo, hi)
  mid_hi = jnp.clip(full_hi, mid_lo, hi)
  carry = lax.fori_loop(lo, mid_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(mid_hi, hi, functools.partial(body, masked=True), carry)


def _group_heads(q, num_kv_heads: int, block_h: int):
  """[T, Hq, D] -> [T, Hkv * Gp // block_h, block_h, D]: each kv head's q-head group zero-padded to
  Gp heads (a power of two) and cut into head blocks of block_h (a power of two <= Gp), one per
  program; head block b reads kv head b // (Gp // block_h)."""
  num_tokens, num_q_heads, head_dim = q.shape
  group = num_q_heads // num_kv_heads
  group_padded = next_pow2(group)
  if block_h & (block_h - 1) or not 0 < block_h <= group_padded:
    raise ValueError(f"block_h={block_h} must be a power of two <= {group_padded} (the padded GQA group)")
  qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_padded - group), (0, 0)))
  return qg.reshape(num_tokens, -1, block_h, head_dim)


def _ungroup_heads(o, num_q_heads: int, num_kv_heads: int):
  """[T, Hkv * Gp // block_h, block_h, D] -> [T, Hq, D], _group_heads undone (padding heads dropped)."""
  num_tokens, _, _, head_dim = o.shape
  o = o.reshape(num_tokens, num_kv_heads, -1, head_dim)
  return o[:, :, :num_q_heads // num_kv_heads].reshape(num_tokens, num_q_heads, head_dim)


def kv_head_of(head_block, num_head_splits: int):
  """The kv head that head-block program `head_block` reads, in an index map (which sees program
  ids only), when each kv head's group is cut into num_head_splits head blocks."""
  return head_block if num_head_splits == 1 else lax.div(head_block, num_head_splits)


def _prefill_kernel(
    # Per-block scalars (squeezed [NB] arrays).
    first_pos_ref,   # []   absolute position of the block's first token
    num_rows_ref,    # []   real tokens in the block (0: empty program)
    kv_len_ref,      # []   the sequence's KV length
    pages_ref,       # [max_pages_padded] the sequence's page-table row
    layer_ref,       # []   the layer to read
    window_ref,      # []   the sliding window (read only when has_window)
    chunk_ref,       # []   the attention chunk (read only when has_chunk)
    q_ref,           # [rows, Dk] (a latent cache: q's first Dk columns, the RoPE part)
    k_ref,           # [L, P, ps, Dk] this kv head's pages, every layer
    v_ref,           # [L, P, ps, Dv] (Dv = Dk unless latent)
    *refs,           # [q_latent [rows, Dv] (latent),] [sinks [rows] (has_sinks),] [kv_end [] (the
                     # block's largest limit + 1), limits [rows] (has_limits),] [interior_end [], tree masks
                     # [rows][, window_first [], window shifts [rows] (has_window or has_chunk)] (has_tree:
                     # tree_blocks),]
                     # [k_scales, v_scales ([L, P, ps], an 8-bit cache's),] o_ref [rows, Dv]
    sm_scale: float, soft_cap: float | None, has_window: bool, has_sinks: bool, has_limits: bool,
    has_tree: bool, latent: bool, block_h: int, pages_per_tile: int, has_chunk: bool = False):
  q_latent = None
  if latent:
    q_latent_ref, *refs = refs
    q_latent = q_latent_ref[...]                                          # [rows, Dv]
  if has_sinks:
    sinks_ref, *refs = refs
  if has_limits:
    kv_end_ref, limits_ref, *refs = refs
  if has_tree:
    interior_end_ref, tree_ref, *refs = refs
    if has_window or has_chunk:  # (both count back from a tree row's depth)
      window_first_ref, shift_ref, *refs = refs
  *scale_refs, o_ref = refs
  rows, v_dim = o_ref.shape
  page_size = k_ref.shape[2]
  block_kv = pages_per_tile * page_size
  layer = layer_ref[()]
  first_pos = first_pos_ref[()]
  num_rows = num_rows_ref[()]
  kv_len = kv_len_ref[()]

  q = q_ref[...]                                                          # [rows, Dk]
  row_pos = first_pos + lax.div(jnp.arange(rows, dtype=jnp.int32), block_h)  # [rows]
  if has_limits:  # each row's last visible position (>= row_pos); -1 on rows past num_rows
    row_limit = limits_ref[...]                                           # [rows]
    kv_end = kv_end_ref[()]                                               # 0 for an empty block
  else:
    row_limit = row_pos
    kv_end = jnp.where(num_rows > 0, first_pos + num_rows, 0)  # causal limit of the last row
  window_pos, window_first = row_pos, first_pos  # where each row's window, and the block's first, counts back from
  if has_tree:  # 0 on rows past num_rows
    tree_mask = tree_ref[...]                                             # [rows]
    if has_window or has_chunk:
      window_pos = row_pos - shift_ref[...]
      window_first = window_first_ref[()]                                 # the block's lowest window_pos
  kv_start = jnp.int32(0)
  if has_window:
    window = window_ref[()]
    kv_start = jnp.maximum(window_first - window + 1, 0)
  if has_chunk:  # (the block's lowest row's chunk starts first)
    chunk = chunk_ref[()]
    kv_start = jnp.maximum(kv_start, lax.div(window_first, chunk) * chunk)
  tile_lo = lax.div(kv_start, block_kv)
  tile_hi = _cdiv(kv_end, block_kv)

  def visible(kv_pos):                                                    # [rows, block_kv]
    mask = (kv_pos[None, :] <= row_limit[:, None]) & (kv_pos[None, :] < kv_len)
    if has_window:
      mask &= kv_pos[None, :] > window_pos[:, None] - window
    if has_chunk:
      mask &= kv_pos[None, :] >= (lax.div(window_pos, chunk) * chunk)[:, None]
    if has_tree:
      mask &= tree_visible(tree_mask[:, None], row_pos[:, None] - 1 - kv_pos[None, :])
    return mask

  def body(tile, carry, *, masked):
    return attend_kv_tile(q, k_ref, v_ref, pages_ref, layer, tile, carry,
                          visible=visible if masked else None, pages_per_tile=pages_per_tile,
                          sm_scale=sm_scale, soft_cap=soft_cap, scale_refs=scale_refs or None,
                          q_latent=q_latent)

  # Whole tiles: those ending at or before the first row's position (so before kv_len too, and
  # within every row's limit; with tree masks, before the lowest position a mask of the block hides) and,
  # with a window, starting inside the last row's window (a tree row's window only reaches further back).
  if latent:
    full_hi = None
  elif has_tree:
    full_hi = lax.div(interior_end_ref[()], block_kv)
  else:
    full_hi = lax.div(first_pos + 1, block_kv)
  full_lo = _cdiv(jnp.maximum(first_pos + num_rows - window, 0), block_kv) if has_window else tile_lo
  if has_chunk:  # ... and inside the last row's chunk
    full_lo = jnp.maximum(full_lo, _cdiv(lax.div(jnp.maximum(first_pos + num_rows - 1, 0), chunk) * chunk,
                                         block_kv))

  if has_sinks:  # the sink as a first, value-less score: m = sink, l = exp(sink - sink)
    m0, l0 = sinks_ref[...], jnp.ones((rows,), jnp.float32)
  else:
    m0, l0 = jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32)
  init = (jnp.zeros((rows, v_dim), jnp.float32), m0, l0)
  acc, _, l = walk_tiles(body, tile_lo, tile_hi, init, full_lo=full_lo, full_hi=full_hi)
  l = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def hopper_target() -> bool:
  """Whether the kernels are built for a Hopper GPU (H100, H200, H800, H20, GH200: 227 KB of shared
  memory a block, wgmma): the chip of the abstract mesh lowered for (gpu_compile's cross-compiles),
  else the default device's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  kind = device.device_kind if device is not None else jax.devices()[0].device_kind
  return re.search(r"\bG?H(100|200|800|20)\b", kind) is not None


def default_block_sizes(group: int, head_dim: int, itemsize: int, *,
                        hopper: bool = False) -> tuple[int, int, int]:
  """(block_q tokens, block_kv positions, num_stages) for the prefill kernel.

  bf16, D <= 128: ~128-row tiles (each loaded K/V byte then feeds ~rows FLOPs, see
  docs/kernels.md). The q tile is kept at ~32 KB, so D = 256 and float32 get proportionally fewer
  rows, but never under 64: Hopper's wgmma takes M >= 64 per warpgroup, and a 32-row tile falls
  back to the older mma instructions (scripts/kernel_compile_check.py checks both). A K or V tile
  per pipeline stage: <= 32 KB over 3 stages on Hopper (bf16 D = 128: 128 positions; on an H200,
  2,048 tokens over an 8k prefix took 1.06 ms against 1.30 ms with 64 positions over 2 stages,
  docs/kernels.md), else <= 16 KB over 2 (MI300's 64 KB of LDS, an A100's 163 KB).
  """
  target_rows = max(64, min(128, 32768 // (head_dim * itemsize)))
  group_padded = next_pow2(group)
  block_q = next_pow2(max(1, target_rows // group_padded))
  if hopper:  # sm90 binaries of every default shape fit (<= 192 KB) unspilled: tests/test_kernels_compile.py
    return block_q, max(16, min(128, 32768 // (head_dim * itemsize))), 3
  return block_q, max(16, min(64, 16384 // (head_dim * itemsize))), 2


def latent_block_sizes(group: int, itemsize: int) -> tuple[int, int, int]:
  """(block_q tokens, block_h q heads, block_kv positions) for the prefill kernel on a latent cache
  (DeepSeek: Dk = 64, Dv = 512), whose [rows, Dv] float32 accumulator bounds the tile.

  16-bit: 64 rows (Hopper's wgmma needs M >= 64), whole tokens' groups when the group fits (4
  tokens x 16 heads at DeepSeek-V3 TP 8), else 64 heads of one token (the group cut over programs:
  2 at V3's 128 heads), against 16 KV positions: 8 warps hold the accumulator in 128 registers a
  thread (sm90: 196 in all, 245 with a window and soft cap, 108 KB of shared memory; MI300: 233, 64
  KB). 32 positions
  still fit Hopper (255 registers) but spill on MI300, and a 64-row float32 q tile does not fit
  beside its accumulator: float32 runs 16 rows (mma.sync, no wgmma). scripts/kernel_compile_check.py
  and docs/kernels.md have the numbers.
  """
  rows = 64 if itemsize <= 2 else 16
  block_h = min(next_pow2(group), rows)
  return rows // block_h, block_h, 16


def window_input(sliding_window) -> tuple[bool, jax.Array]:
  """(has_window, window as an int32 [1] kernel input) for a sliding window given as None, an
  int, or a traced int32 scalar (a per-layer window, e.g. Gemma 3's windowed and global layers); an
  attention chunk alike (Llama 4's chunked layers, a chunk past any context on its global ones)."""
  if sliding_window is None:
    return False, jnp.zeros((1,), jnp.int32)
  return True, jnp.asarray(sliding_window, jnp.int32).reshape(1)


def sink_rows(sinks, num_kv_heads: int, block_h: int, rows: int) -> jax.Array:
  """sinks [Hq] -> [Hkv * Gp // block_h, rows] float32 laid out like the q tiles (_group_heads,
  pack_rows): row r of head block b holds q head b * block_h + r % block_h's sink of the padded
  group (0 for the padding heads)."""
  sinks = jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, -1)
  sinks = jnp.pad(sinks, ((0, 0), (0, next_pow2(sinks.shape[1]) - sinks.shape[1])))
  return jnp.tile(sinks.reshape(-1, block_h), (1, rows // block_h))


def block_rows(values, blocks: QueryBlocks, fill: int) -> jax.Array:
  """Per-row values [T] -> [NB, block_q]: each block's tokens' values, `fill` past the block's real rows."""
  block_q = blocks.row_tokens.shape[1]
  real = jnp.arange(block_q, dtype=jnp.int32) < blocks.num_rows[:, None]
  return jnp.where(real, values[blocks.row_tokens], fill)


def limit_rows(limits, blocks: QueryBlocks, block_h: int) -> tuple[jax.Array, jax.Array]:
  """Row limits [T] (row_kv_limits) -> (kv_end [NB], limits [NB, rows]) laid out like the q tiles (pack_rows): tile
  row r holds token r // block_h's limit, -1 past the block's real rows; kv_end is the block's largest limit + 1,
  the end of its KV loop (0 for an empty block)."""
  block_limits = block_rows(limits, blocks, -1)                              # [NB, block_q]
  return block_limits.max(axis=1) + 1, jnp.repeat(block_limits, block_h, axis=1)


def tree_blocks(tree, blocks: QueryBlocks, block_h: int, has_window: bool) -> list[jax.Array]:
  """(masks, window shifts) [T] (row_tree_masks) -> [interior_end [NB], masks [NB, rows]] and, with a window (or
  a chunk), [.., window_first [NB], shifts [NB, rows]]. The [NB, rows] values are laid out like the q tiles (pack_rows): tile
  row r holds token r // block_h's, 0 past the block's real rows. interior_end: every row of the block sees every
  position below it (as far as the masks go): the lowest position a mask of the block hides, pos - 1 - its highest
  set bit = pos - 32 + clz(mask), else first_pos + 1 (the causal interior's end: no mask hides anything). window_first:
  the block's lowest window position, pos - shift (first_pos when no mask hides anything)."""
  masks, shifts = tree
  masks = block_rows(masks, blocks, 0)                                       # [NB, block_q]
  row_pos = blocks.first_pos[:, None] + jnp.arange(masks.shape[1], dtype=jnp.int32)
  lowest_hidden = jnp.where(masks != 0, row_pos - TREE_MASK_BITS + lax.clz(masks), row_pos + 1)
  packed = [jnp.maximum(lowest_hidden.min(axis=1), 0), jnp.repeat(masks, block_h, axis=1)]
  if has_window:  # rows past num_rows (shift 0) sit after the real ones
    shifts = block_rows(shifts, blocks, 0)
    packed += [(row_pos - shifts).min(axis=1), jnp.repeat(shifts, block_h, axis=1)]
  return packed


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | jax.Array | None = None,
                           soft_cap: float | None = None, interpret: bool = False,
                           layer: jax.Array | None = None, block_q: int | None = None,
                           block_kv: int | None = None, block_h: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None, k_scales=None,
                           v_scales=None, sinks: jax.Array | None = None,
                           kv_limits: jax.Array | None = None, tree_masks: jax.Array | None = None,
                           attention_chunk: int | jax.Array | None = None) -> jax.Array:
  """Pallas ragged paged attention (contract: pallas_kernels.ragged_paged_attention). block_h: q
  heads per program (a power of two <= the padded GQA group; by default the whole group, or
  latent_block_sizes' share of a latent cache's); the group is cut over Gp / block_h programs."""
  latent = latent_dims(q, k_pages, v_pages)
  k_pages, v_pages, layer, scales = stacked_cache(k_pages, v_pages, layer, k_scales, v_scales)
  layer = jnp.clip(layer, 0, k_pages.shape[0] - 1)
  num_tokens, num_q_heads, head_dim = q.shape
  num_layers, num_kv_heads, num_pages, page_size, k_dim = k_pages.shape
  v_dim = v_pages.shape[-1]
  max_pages_per_seq = page_indices.shape[1]
  group = num_q_heads // num_kv_heads
  group_padded = next_pow2(group)
  # Tiles are sized by what they hold after conversion (an 8-bit tile becomes q's dtype).
  itemsize = max(jnp.dtype(k_pages.dtype).itemsize, jnp.dtype(q.dtype).itemsize)
  if latent:
    default_q, default_h, default_kv = latent_block_sizes(group, itemsize)
    default_stages = 2
    if block_h and not block_q:
      default_q = max(1, default_q * default_h // block_h)
  else:
    # 8-bit pages keep the smaller tiles on Hopper too: their scales and conversions spill the larger ones
    # (8 bytes at Llama-3-8B's heads with a window and soft cap, tests/test_kernels_compile.py).
    default_q, default_kv, default_stages = default_block_sizes(
        group, head_dim, itemsize, hopper=not interpret and scales is None and hopper_target())
    default_h = group_padded
  block_h = block_h or default_h
  num_stages = num_stages or default_stages
  block_q = next_pow2(block_q or default_q)
  pages_per_tile, block_kv = kv_tile(page_size, block_kv or default_kv)
  rows = block_q * block_h  # a tile: block_q tokens x block_h q heads of one kv head
  num_head_splits = group_padded // block_h
  if num_warps is None:
    # The accumulator [rows, Dv] and the scores [rows, block_kv] stay in registers (float32) for
    # the whole KV loop: past 16K of them, 4 warps spill (scripts/kernel_compile_check.py); a latent
    # tile's two q tiles too, even at 16 rows.
    num_warps = 8 if latent or rows * (v_dim + block_kv) >= 16384 else 4

  # --- Query blocks -> sequences (all jnp, no host sync). ----------------------------------
  blocks = query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens, block_q)
  num_blocks = blocks.seq.shape[0]
  # Page-table rows per block, padded to whole tiles; out-of-range ids clamped (masked anyway).
  max_pages_padded = -(-max_pages_per_seq // pages_per_tile) * pages_per_tile
  block_pages = jnp.pad(page_indices, ((0, 0), (0, max_pages_padded - max_pages_per_seq)))
  block_pages = jnp.clip(block_pages[blocks.seq], 0, num_pages - 1).astype(jnp.int32)

  # --- Pack (tokens x q heads of one head block) into tiles. -------------------------------
  q_tiles = pack_rows(_group_heads(q, num_kv_heads, block_h), blocks.row_tokens)  # [NH, NB, rows, D]
  num_head_blocks = q_tiles.shape[0]
  # A latent cache's q: the RoPE part against K, the latent part against V (two power-of-two dots).
  q_tiles = [q_tiles[..., :k_dim], q_tiles[..., k_dim:]] if latent else [q_tiles]

  has_window, window = window_input(sliding_window)
  has_chunk, chunk = window_input(attention_chunk)
  has_sinks = sinks is not None
  sinks = [sink_rows(sinks, num_kv_heads, block_h, rows)] if has_sinks else []
  sink_specs = [pl.BlockSpec((None, rows), lambda i, h: (h, 0))] if has_sinks else []
  has_limits = kv_limits is not None
  has_tree = tree_masks is not None
  kernel = functools.partial(
      _prefill_kernel, sm_scale=sm_scale, soft_cap=soft_cap, has_window=has_window,
      has_sinks=has_sinks, has_limits=has_limits, has_tree=has_tree, latent=latent, block_h=block_h,
      pages_per_tile=pages_per_tile, has_chunk=has_chunk)
  scalar_spec = pl.BlockSpec((None,), lambda i, h: (i,))
  limits, limit_specs = [], []
  if has_limits:  # per block: its loop's end and each tile row's limit (every head block reads the same)
    limits = limit_rows(row_kv_limits(kv_limits, cu_q_lens, kv_lens, num_seqs, num_tokens), blocks, block_h)
    limit_specs = [scalar_spec, pl.BlockSpec((None, rows), lambda i, h: (i, 0))]
  trees, tree_specs = [], []
  if has_tree:  # per block: the interior's end and each tile row's mask; with a window, its start and row shifts
    trees = tree_blocks(row_tree_masks(tree_masks, cu_q_lens, kv_lens, num_seqs, num_tokens), blocks, block_h,
                        has_window or has_chunk)
    tree_specs = [scalar_spec, pl.BlockSpec((None, rows), lambda i, h: (i, 0))] * (1 + (has_window or has_chunk))
  k_spec, v_spec = (pl.BlockSpec((num_layers, None, num_pages, page_size, dim),
                                 lambda i, h: (0, kv_head_of(h, num_head_splits), 0, 0, 0))
                    for dim in (k_dim, v_dim))
  tile_specs = [pl.BlockSpec((None, None, rows, t.shape[-1]), lambda i, h: (h, i, 0, 0)) for t in q_tiles]
  out_spec = pl.BlockSpec((None, None, rows, v_dim), lambda i, h: (h, i, 0, 0))
  o_tiles = pl.pallas_call(
      kernel,
      grid=(num_blocks, num_head_blocks),
      in_specs=[scalar_spec, scalar_spec, scalar_spec,
                pl.BlockSpec((None, max_pages_padded), lambda i, h: (i, 0)),
                pl.BlockSpec((None,), lambda i, h: (0,)), pl.BlockSpec((None,), lambda i, h: (0,)),
                pl.BlockSpec((None,), lambda i, h: (0,)), tile_specs[0], k_spec, v_spec, *tile_specs[1:], *sink_specs, *limit_specs,
                *tree_specs, *scale_specs(scales, k_spec)],
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((num_head_blocks, num_blocks, rows, v_dim), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="ragged_paged_attention",
  )(blocks.first_pos, blocks.num_rows, blocks.kv_len, block_pages, layer, window, chunk, q_tiles[0],
    k_pages, v_pages, *q_tiles[1:], *sinks, *limits, *trees, *(scales or ()))

  # --- Unpack: row t is token slot token_slot[t] of block token_block[t]. ------------------
  o = o_tiles.reshape(num_head_blocks, num_blocks, block_q, block_h, v_dim)
  o = o[:, blocks.token_block, blocks.token_slot]                          # [NH, T, block_h, Dv]
  return _ungroup_heads(o.transpose(1, 0, 2, 3), num_q_heads, num_kv_heads)
