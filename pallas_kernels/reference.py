"""Plain-jnp ragged paged attention and KV write: the `xla` backend.

This is the reference every Pallas kernel is tested against, and also what the engine runs on CPU,
so it is written flash-style and walks the same grid as the kernel: a loop over the query blocks
in use, and for each a `lax.while_loop` over its own KV blocks (a few pages each), with an online
softmax in float32. Nothing of size [T, max_context] is ever materialised; trip counts are dynamic,
so only T (the number of query rows) is a static shape, context length never causes a recompile,
and padding rows, empty sequence slots and tiles past the causal limit cost nothing.

Layout (one layer):
  q:            [T, Hq, D]       all sequences' new tokens back to back
  k/v_pages:    [Hkv, P, ps, D]  P pages of ps tokens each (latent attention: k [.., Dk], v [.., Dv],
                                 D = Dk + Dv; see ragged_paged_attention)
  kv_lens:      [S] int32        KV length of each sequence, new tokens included
  page_indices: [S, max_pages]   int32 page ids of each sequence, in order
  cu_q_lens:    [S + 1] int32    cumulative query lengths
  num_seqs:     [1] int32        sequences at index >= num_seqs are padding
  kv_limits:    [T] int32        optional: each row's last visible KV position (>= its own; None: causal)
  tree_masks:   [T] int32        optional: bit b set: the row skips KV position pos - 1 - b (a draft tree's
                                 other branches; None: causal)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import kv_quant

# Default tile sizes (tuning knobs only; see ragged_paged_attention). The loops run one tile at a
# time, which suits a CPU; on an accelerator (where this path is only the kernels' reference) larger
# KV tiles keep the number of sequential iterations down.
_BLOCK_KV_TOKENS_CPU = 256
_BLOCK_KV_TOKENS_ACCELERATOR = 2048
_MAX_QUERY_BLOCK = 64


def bucket_of(ends: jax.Array, values: jax.Array) -> jax.Array:
  """For sorted `ends`, how many are <= each of `values` (`jnp.searchsorted(ends, values, side="right")`), int32.

  The binary search is unrolled (log2(len(ends) + 1) steps written out, fused by XLA): searchsorted's default
  method is a loop that compiles to a while loop, and on a GPU XLA runs a while loop from the host, launching its
  kernels one iteration at a time (and reading its predicate back, unless it knows the trip count), here in the
  prologue of every attention call of every layer. Used wherever the kernels' wrappers map rows or tiles to
  their owners (tests/test_kernels.py checks that no loop is left outside the kernels)."""
  return jnp.searchsorted(ends, values, side="right", method="scan_unrolled").astype(jnp.int32)


def token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens: int):
  """Per query row: its sequence, absolute position, and whether it is a real token.

  Returns (seq_ids [T] int32, positions [T] int32, valid [T] bool). Padding rows get
  seq_id clamped into range, position -1 and valid False.
  """
  num_seqs_max = kv_lens.shape[0]
  t = jnp.arange(num_tokens, dtype=jnp.int32)                        # [T]
  num_valid_tokens = cu_q_lens[num_seqs[0]]
  valid = t < num_valid_tokens                                       # [T]
  # Sequence s owns rows [cu_q_lens[s], cu_q_lens[s+1]); empty sequences own none.
  seq_ids = bucket_of(cu_q_lens[1:], t)
  seq_ids = jnp.minimum(seq_ids, num_seqs_max - 1)                   # [T]
  q_start = cu_q_lens[seq_ids]
  q_len = cu_q_lens[seq_ids + 1] - q_start
  positions = kv_lens[seq_ids] - q_len + (t - q_start)               # [T]
  positions = jnp.where(valid, positions, -1)
  return seq_ids, positions, valid


def row_kv_limits(kv_limits, cu_q_lens, kv_lens, num_seqs, num_tokens: int) -> jax.Array:
  """kv_limits [T] (the last KV position each row of q may attend to) clamped into each real row's
  [pos, kv_len - 1]; -1 for padding rows. [T] int32.

  A limit is never below its row's position (the contract), and the clamp makes that so for any input; the upper
  clamp keeps a limit past the sequence's KV (e.g. an image cut by a chunk boundary) off unwritten slots, so that
  every backend's range ends inside the sequence without a kv_len mask.
  """
  kv_limits = jnp.asarray(kv_limits)
  if kv_limits.shape != (num_tokens,):
    raise ValueError(f"kv_limits must be [T] = [{num_tokens}], one per row of q; got {kv_limits.shape}")
  seq_ids, positions, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  limits = jnp.minimum(jnp.maximum(kv_limits.astype(jnp.int32), positions), kv_lens[seq_ids] - 1)
  return jnp.where(valid, limits, -1)


# Bits of a tree mask: row t may skip any of the TREE_MASK_BITS positions just before its own.
TREE_MASK_BITS = 32


def row_tree_masks(tree_masks, cu_q_lens, kv_lens, num_seqs, num_tokens: int) -> tuple[jax.Array, jax.Array]:
  """tree_masks [T] (bit b set: the row does not see KV position pos - 1 - b) -> (masks, window shifts), both [T]
  int32 and 0 on padding rows. A row's window shift is the popcount of its mask, the positions it skips: its window
  counts back from pos - shift (its depth in the draft tree) instead of from pos."""
  tree_masks = jnp.asarray(tree_masks)
  if tree_masks.shape != (num_tokens,):
    raise ValueError(f"tree_masks must be [T] = [{num_tokens}], one per row of q; got {tree_masks.shape}")
  _, _, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  masks = jnp.where(valid, tree_masks.astype(jnp.int32), 0)
  return masks, lax.population_count(masks)


def tree_visible(masks, distance):
  """Whether a row with tree mask `masks` sees the KV position `distance + 1` before its own (int32 arrays that
  broadcast): False only where 0 <= distance < TREE_MASK_BITS and bit `distance` of the mask is set. Elementwise
  int ops only, as the Pallas kernels call it; the shift is clamped into [0, 31] (a shift by >= 32 is undefined)."""
  clamped = jnp.clip(distance, 0, TREE_MASK_BITS - 1)
  return ((jnp.right_shift(masks, clamped) & 1) == 0) | (clamped != distance)


class QueryBlocks(NamedTuple):
  """Query rows grouped into blocks of up to block_q consecutive tokens of ONE sequence.

  NB = num_query_blocks(T, S, block_q) is static; blocks past the last one in use have 0 rows.
  """
  seq: jax.Array          # [NB] int32 sequence of each block (clamped into range)
  first_pos: jax.Array    # [NB] int32 absolute position of the block's first token
  num_rows: jax.Array     # [NB] int32 real tokens in the block
  kv_len: jax.Array       # [NB] int32 the sequence's KV length
  row_tokens: jax.Array   # [NB, block_q] int32 row of q for each block row (clamped)
  token_block: jax.Array  # [T] int32 block holding each query row
  token_slot: jax.Array   # [T] int32 its index within the block


def num_query_blocks(num_tokens: int, max_seqs: int, block_q: int) -> int:
  """Static bound: every non-empty sequence wastes less than one block."""
  return (num_tokens + min(max_seqs, num_tokens) * (block_q - 1)) // block_q


def query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens: int, block_q: int,
                 seq_mask: jax.Array | None = None) -> QueryBlocks:
  """Maps query blocks to sequences with jnp only (cumsum, an unrolled binary search), no host round trip.

  Blocks in use come first, in sequence order. With `seq_mask` ([S] bool), only the sequences it
  selects get blocks; the token_block / token_slot of the others' rows are meaningless.
  """
  max_seqs = kv_lens.shape[0]
  num_blocks = num_query_blocks(num_tokens, max_seqs, block_q)
  seq_live = jnp.arange(max_seqs) < num_seqs[0]
  if seq_mask is not None:
    seq_live &= seq_mask
  q_lens = jnp.where(seq_live, cu_q_lens[1:] - cu_q_lens[:-1], 0)        # [S]
  seq_num_blocks = (q_lens + block_q - 1) // block_q                       # [S]
  seq_block_end = jnp.cumsum(seq_num_blocks)                               # [S]
  seq_block_start = seq_block_end - seq_num_blocks
  b = jnp.arange(num_blocks, dtype=jnp.int32)
  block_seq = jnp.minimum(bucket_of(seq_block_end, b), max_seqs - 1)
  block_offset = (b - seq_block_start[block_seq]) * block_q                # offset in the chunk
  num_rows = jnp.clip(q_lens[block_seq] - block_offset, 0, block_q)
  num_rows = jnp.where(b < seq_block_end[-1], num_rows, 0)
  kv_len = kv_lens[block_seq]
  first_pos = kv_len - q_lens[block_seq] + block_offset
  row_tokens = cu_q_lens[block_seq][:, None] + block_offset[:, None] + jnp.arange(block_q)
  # Row t of sequence s sits in block seq_block_start[s] + (t - cu[s]) // block_q.
  seq_ids, _, _ = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  local = jnp.arange(num_tokens) - cu_q_lens[seq_ids]
  token_block = jnp.clip(seq_block_start[seq_ids] + local // block_q, 0, num_blocks - 1)
  i32 = lambda x: x.astype(jnp.int32)
  return QueryBlocks(
      seq=i32(block_seq), first_pos=i32(first_pos), num_rows=i32(num_rows), kv_len=i32(kv_len),
      row_tokens=i32(jnp.clip(row_tokens, 0, num_tokens - 1)),
      token_block=i32(token_block), token_slot=i32(local % block_q))


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | jax.Array | None = None,
                           soft_cap: float | None = None, pages_per_block: int | None = None,
                           block_q: int | None = None, layer: jax.Array | None = None,
                           k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                           sinks: jax.Array | None = None, kv_limits: jax.Array | None = None,
                           tree_masks: jax.Array | None = None,
                           attention_chunk: int | jax.Array | None = None) -> jax.Array:
  """Causal attention of every new token over its own sequence's paged KV. Returns [T, Hq, D].

  Latent attention (DeepSeek's MLA, absorbed; models/llama.py `_mla_qkv`): k_pages [.., Dk] and
  v_pages [.., Dv] narrower than q's D = Dk + Dv. A position's key is then its k and v vectors
  together ([RoPE key, latent]) and its value the v vector alone (the latent): the cache holds each
  latent once. Returns [T, Hq, Dv].

  With `layer` (int32 scalar), k/v_pages hold every layer, [L, Hkv, P, ps, D], and layer `layer`
  is read in place: the gather indexes the layer, nothing of a whole layer is sliced out.
  k/v_scales ([.., Hkv, P, ps] float32, like the pages without D): the pages are an 8-bit cache
  (pallas_kernels/kv_quant.py), each gathered vector scaled by its own factor. sinks ([Hq]
  float32): one more logit per q head in every row's softmax, with no value; the online softmax
  starts from it (m = sink, l = 1) instead of from nothing.

  Row i of sequence s sits at position kv_lens[s] - q_len + i and sees KV positions
  [max(0, pos - sliding_window + 1), pos]; with `attention_chunk` (Llama 4's chunked layers; an int, or a traced
  int32 scalar per layer) not before its chunk's first, (pos // attention_chunk) * attention_chunk. Padding rows
  produce zeros. kv_limits ([T] int32, e.g. Gemma 3's
  bidirectional image tokens): row t sees up to kv_limits[t] instead of pos (row_kv_limits: clamped into
  [pos, kv_len - 1]); the window still starts from pos. tree_masks ([T] int32, a draft tree's rows): bit b set hides
  position pos - 1 - b from row t, and its window counts back from pos - popcount (row_tree_masks).

  Work is done one query block at a time, like one program of the Pallas kernel's grid: a
  `fori_loop` over the blocks in use (a dynamic count, so padding rows and empty sequence slots
  cost nothing), and inside it a `while_loop` over that block's own KV blocks, from the first one
  its sliding window reaches to the last one its causal limit reaches (tiles past the diagonal are
  never visited). A KV block is gathered straight into [Hkv, block_len, D] (no transpose) and
  every dot is batched over KV heads with the GQA group packed into the rows.

  Two passes share that loop: sequences with at least `block_q // 8` (and >= 2) new tokens run in
  tiles of `block_q` tokens ([block_q * G, D] x [D, block_len] matmuls, each KV block read once
  per tile); the others (decodes) run token by token, so a decode in a mixed batch never pays for
  a tile of padding rows. block_q (default 64) and pages_per_block (default 256 tokens' worth on
  CPU, 2,048 on accelerators) are tuning knobs only.
  """
  q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
      jnp.asarray, (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs))
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape[-4:]
  latent_dims(q, k_pages, v_pages)
  max_pages_per_seq = page_indices.shape[1]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  block_q = max(1, min(block_q or _MAX_QUERY_BLOCK, num_tokens))
  if pages_per_block is None:
    cpu = jax.default_backend() == "cpu"
    block_kv = _BLOCK_KV_TOKENS_CPU if cpu else _BLOCK_KV_TOKENS_ACCELERATOR
    pages_per_block = max(1, block_kv // page_size)
  pages_per_block = min(pages_per_block, max_pages_per_seq)
  if layer is None:  # one layer: view it as a stack of one
    k_pages, v_pages, layer = k_pages[None], v_pages[None], jnp.int32(0)
    if k_scales is not None:
      k_scales, v_scales = k_scales[None], v_scales[None]
  qs = (q.astype(jnp.float32) * sm_scale).reshape(
      num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
  if sinks is not None:
    sinks = jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, num_q_heads // num_kv_heads)
  if kv_limits is not None:
    kv_limits = row_kv_limits(kv_limits, cu_q_lens, kv_lens, num_seqs, num_tokens)
  if tree_masks is not None:
    tree_masks = row_tree_masks(tree_masks, cu_q_lens, kv_lens, num_seqs, num_tokens)
  attend = functools.partial(
      _attend_blocks, qs, k_pages, v_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
      pages_per_block=pages_per_block, sliding_window=sliding_window, soft_cap=soft_cap,
      scales=None if k_scales is None else (k_scales, v_scales), sinks=sinks, kv_limits=kv_limits,
      tree_masks=tree_masks, chunk=attention_chunk)
  if block_q == 1:
    out = attend(1, None)
  else:
    live = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    tiled = q_lens >= max(2, block_q // 8)                             # [S]
    seq_ids, _, _ = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.where(tiled[seq_ids][:, None, None, None], attend(block_q, tiled), attend(1, ~tiled))
  return out.reshape(num_tokens, num_q_heads, v_pages.shape[-1]).astype(q.dtype)


def latent_dims(q, k_pages, v_pages) -> bool:
  """Whether the pages are a latent cache (k and v narrower than q, together as wide); ValueError
  for widths that fit neither layout."""
  dq, dk, dv = q.shape[-1], k_pages.shape[-1], v_pages.shape[-1]
  if dk == dq == dv:
    return False
  if dk + dv == dq:
    return True
  raise ValueError(f"q is {dq} wide, k and v pages {dk} and {dv}: they must all be equal, or k + v = q "
                   "(latent attention)")


def _attend_blocks(qs, k_pages, v_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                   block_q: int, seq_mask, *, pages_per_block: int, sliding_window, soft_cap, scales=None,
                   sinks=None, kv_limits=None, tree_masks=None, chunk=None):
  """Attention of the rows of the sequences in seq_mask, in query blocks of block_q tokens.

  qs: [T, Hkv, G, D] scaled float32 queries; k/v_pages: [L, Hkv, P, ps, D] (or a latent cache's
  Dk and Dv wide); scales: None or (k_scales, v_scales) [L, Hkv, P, ps] of an 8-bit cache; sinks:
  None or [Hkv, G] float32; kv_limits: None or [T] int32 clamped (row_kv_limits), each row's last
  visible position; tree_masks: None or (masks, window shifts) [T] int32 (row_tree_masks). Returns [T, Hkv, G, Dv]
  (rows of other sequences are meaningless).
  """
  num_tokens, num_kv_heads, group, head_dim = qs.shape
  k_dim, v_dim = k_pages.shape[-1], v_pages.shape[-1]
  latent = k_dim != head_dim
  num_pages, page_size = k_pages.shape[2], k_pages.shape[3]
  max_pages_per_seq = page_indices.shape[1]
  blocks = query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens, block_q, seq_mask)
  num_q_blocks = blocks.seq.shape[0]
  rows = block_q * group                    # a block's (token, q head) rows, token-major
  block_len = pages_per_block * page_size
  # q tiles [NB, Hkv, rows, D].
  q_tiles = qs[blocks.row_tokens].transpose(0, 2, 1, 3, 4).reshape(
      num_q_blocks, num_kv_heads, rows, head_dim)
  heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None]
  slot = jnp.arange(block_q, dtype=jnp.int32)
  num_used = jnp.sum(blocks.num_rows > 0)   # blocks in use come first

  def one_block(i, out):
    first, num_rows = blocks.first_pos[i], blocks.num_rows[i]
    real = slot < num_rows
    row_pos = jnp.repeat(jnp.where(real, first + slot, -1), group)   # [rows]
    window_pos, window_first = row_pos, first   # where each row's window, and the block's first, counts back from
    if tree_masks is not None:
      row_tree = jnp.repeat(jnp.where(real, tree_masks[0][blocks.row_tokens[i]], 0), group)
      shift = jnp.where(real, tree_masks[1][blocks.row_tokens[i]], 0)            # [block_q]
      window_pos = row_pos - jnp.repeat(shift, group)
      window_first = jnp.min(jnp.where(real, first + slot - shift, first))
    if kv_limits is None:
      row_limit, kv_end = row_pos, first + num_rows
    else:  # limits >= positions: the block ends after its largest
      row_limit = jnp.repeat(jnp.where(slot < num_rows, kv_limits[blocks.row_tokens[i]], -1), group)
      kv_end = jnp.max(row_limit) + 1
    end_kv_block = (kv_end + block_len - 1) // block_len
    if sliding_window is None:
      first_kv_block = jnp.int32(0)
    else:
      first_kv_block = jnp.maximum(window_first - sliding_window + 1, 0) // block_len
    if chunk is not None:  # (the block's first row's chunk starts first)
      first_kv_block = jnp.maximum(first_kv_block, window_first // chunk * chunk // block_len)
    page_row = page_indices[blocks.seq[i]]
    q_tile = q_tiles[i]                                                # [Hkv, rows, D]

    def kv_step(carry):
      b, m, l, acc = carry
      # Columns past the table are masked by position below; clamping them is harmless.
      cols = jnp.minimum(b * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32),
                         max_pages_per_seq - 1)
      page_ids = jnp.clip(page_row[cols], 0, num_pages - 1)[None, :]
      k = kv_quant.to_compute(k_pages[layer, heads, page_ids], jnp.float32).reshape(num_kv_heads, block_len, k_dim)
      v = kv_quant.to_compute(v_pages[layer, heads, page_ids], jnp.float32).reshape(num_kv_heads, block_len, v_dim)
      if scales is not None:
        k = k * scales[0][layer, heads, page_ids].reshape(num_kv_heads, block_len, 1)
        v = v * scales[1][layer, heads, page_ids].reshape(num_kv_heads, block_len, 1)
      if latent:  # the key: the RoPE key and the latent together
        k = jnp.concatenate([k, v], axis=-1)
      s = jnp.einsum("krd,kbd->krb", q_tile, k,
                     preferred_element_type=jnp.float32)             # [Hkv, rows, block_len]
      if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
      kv_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)
      mask = kv_pos <= row_limit[:, None]                            # [rows, block_len]
      if sliding_window is not None:
        mask &= kv_pos > window_pos[:, None] - sliding_window
      if chunk is not None:
        mask &= kv_pos >= window_pos[:, None] // chunk * chunk
      if tree_masks is not None:
        mask &= tree_visible(row_tree[:, None], row_pos[:, None] - 1 - kv_pos)
      s = jnp.where(mask, s, -jnp.inf)
      # Online softmax; a row with nothing visible yet keeps m = -inf and contributes zeros.
      m_new = jnp.maximum(m, s.max(axis=-1))                         # [Hkv, rows]
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(axis=-1)
      pv = jnp.einsum("krb,kbd->krd", p, v, preferred_element_type=jnp.float32)
      return b + 1, m_new, l, alpha[..., None] * acc + pv

    if sinks is None:
      m0 = jnp.full((num_kv_heads, rows), -jnp.inf, jnp.float32)
      l0 = jnp.zeros((num_kv_heads, rows), jnp.float32)
    else:  # the sink as a first, value-less score: m = sink, l = exp(sink - sink)
      m0 = jnp.tile(sinks, (1, block_q))                               # row r: q head r % G
      l0 = jnp.ones((num_kv_heads, rows), jnp.float32)
    init = (first_kv_block, m0, l0, jnp.zeros((num_kv_heads, rows, v_dim), jnp.float32))
    _, _, l, acc = lax.while_loop(lambda c: c[0] < end_kv_block, kv_step, init)
    tile = acc / jnp.where(l == 0.0, 1.0, l)[..., None]                # [Hkv, rows, Dv]
    return lax.dynamic_update_slice(out, tile[None], (i, 0, 0, 0))

  out = lax.fori_loop(0, num_used, one_block,
                      jnp.zeros((num_q_blocks, num_kv_heads, rows, v_dim), jnp.float32))
  # Row t of q is token slot token_slot[t] of block token_block[t].
  out = out.reshape(num_q_blocks, num_kv_heads, block_q, group, v_dim)
  return out[blocks.token_block, :, blocks.token_slot]                 # [T, Hkv, G, Dv]


def write_kv(k_pages, v_pages, k, v, slot_mapping, layer: jax.Array | None = None,
             k_scales: jax.Array | None = None, v_scales: jax.Array | None = None):
  """Scatter new K/V rows ([T, Hkv, D]) into their slots; negative slots are padding and skipped.

  slot = page * page_size + offset. With `layer`, the pages hold every layer ([L, Hkv, P, ps, D])
  and only layer `layer` is written. Returns the updated (k_pages, v_pages); under jit with the
  pages donated (or carried through a loop), XLA performs the scatter in place.

  An 8-bit cache (int8 / uint8-stored float8_e4m3fn pages, kv_quant) needs k/v_scales ([.., Hkv, P, ps] float32): each row
  is quantized (kv_quant.quantize), its values and scale written, and the result is
  (k_pages, v_pages, k_scales, v_scales).
  """
  num_pages, page_size = k_pages.shape[-3:-1]
  # Negative slots would wrap around; send them to page num_pages (out of range) so that
  # mode="drop" skips them.
  slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
  page, offset = slots // page_size, slots % page_size

  def scatter(pages, new):
    # NOTE: index the pages in their own [.., Hkv, P, ps, D] shape. A reshape to flat slots
    # first made XLA copy the whole (donated) cache at every write when Hkv == 1.
    # new: [T, Hkv(, D)] in the array's dtype (kv_quant.to_store).
    if layer is None:
      return pages.at[:, page, offset].set(jnp.moveaxis(new, 1, 0), mode="drop")
    # A scalar layer and [T] page/offset around a slice index as [T, Hkv(, D)].
    return pages.at[layer, :, page, offset].set(new, mode="drop")

  quantized = kv_quant.is_quantized(k_pages.dtype)
  if quantized != (k_scales is not None):
    raise ValueError(f"k/v_scales go with an 8-bit cache and only with one; pages are {k_pages.dtype}")
  caches = (k_pages, v_pages, k_scales, v_scales) if quantized else (k_pages, v_pages)
  return tuple(map(scatter, caches, kv_quant.to_store(k, v, k_pages.dtype)))
