"""Plain-jnp ragged paged attention and KV write: the `xla` backend.

This is the reference every Pallas kernel is tested against, and also what the engine runs on CPU,
so it is written flash-style: a `lax.while_loop` over KV blocks (a few pages each) up to the
longest KV length in the batch, with an online softmax in float32. Nothing of size
[T, max_context] is ever materialised; the trip count is dynamic, so only T (the number of query
rows) is a static shape and context length never causes a recompile.

Layout (one layer):
  q:            [T, Hq, D]       all sequences' new tokens back to back
  k/v_pages:    [Hkv, P, ps, D]  P pages of ps tokens each
  kv_lens:      [S] int32        KV length of each sequence, new tokens included
  page_indices: [S, max_pages]   int32 page ids of each sequence, in order
  cu_q_lens:    [S + 1] int32    cumulative query lengths
  num_seqs:     [1] int32        sequences at index >= num_seqs are padding
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Query blocks x KV positions gathered per loop iteration: bounds the [NB, Hkv, block, D] gather.
_GATHER_BUDGET = 8192
_MAX_BLOCK_LEN = 512
_MAX_QUERY_BLOCK = 16


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
  seq_ids = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
  seq_ids = jnp.minimum(seq_ids, num_seqs_max - 1)                   # [T]
  q_start = cu_q_lens[seq_ids]
  q_len = cu_q_lens[seq_ids + 1] - q_start
  positions = kv_lens[seq_ids] - q_len + (t - q_start)               # [T]
  positions = jnp.where(valid, positions, -1)
  return seq_ids, positions, valid


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


def query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens: int, block_q: int) -> QueryBlocks:
  """Maps query blocks to sequences with jnp only (cumsum/searchsorted), no host round trip."""
  max_seqs = kv_lens.shape[0]
  num_blocks = num_query_blocks(num_tokens, max_seqs, block_q)
  seq_live = jnp.arange(max_seqs) < num_seqs[0]
  q_lens = jnp.where(seq_live, cu_q_lens[1:] - cu_q_lens[:-1], 0)        # [S]
  seq_num_blocks = (q_lens + block_q - 1) // block_q                       # [S]
  seq_block_end = jnp.cumsum(seq_num_blocks)                               # [S]
  seq_block_start = seq_block_end - seq_num_blocks
  b = jnp.arange(num_blocks, dtype=jnp.int32)
  block_seq = jnp.minimum(jnp.searchsorted(seq_block_end, b, side="right"), max_seqs - 1)
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


def _pages_per_block(num_blocks: int, page_size: int, max_pages_per_seq: int) -> int:
  """Static KV block size in pages: large for decode batches, small for long prefills."""
  block_len = _MAX_BLOCK_LEN
  while block_len > page_size and num_blocks * block_len > _GATHER_BUDGET:
    block_len //= 2
  return max(1, min(block_len // page_size, max_pages_per_seq))


def _query_block_len(num_tokens: int, max_seqs: int) -> int:
  """Tokens per query block: 1 for decode-sized buckets, up to 16 when T >> S (prefill)."""
  block_q = 1
  while block_q < _MAX_QUERY_BLOCK and 2 * block_q * max_seqs <= num_tokens:
    block_q *= 2
  return block_q


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, pages_per_block: int | None = None,
                           block_q: int | None = None, layer: jax.Array | None = None) -> jax.Array:
  """Causal attention of every new token over its own sequence's paged KV. Returns [T, Hq, D].

  With `layer` (int32 scalar), k/v_pages hold every layer, [L, Hkv, P, ps, D], and layer `layer`
  is read in place: the gather indexes the layer, nothing of a whole layer is sliced out.

  Row i of sequence s sits at position kv_lens[s] - q_len + i and sees KV positions
  [max(0, pos - sliding_window + 1), pos]. Padding rows produce zeros.

  Query rows are processed in blocks of block_q consecutive tokens of one sequence (the same
  grouping as the Pallas kernel); block_q = 1 (decode buckets, T <= 2S) is plain row-by-row
  attention, larger blocks (T >> S) share each gathered KV block among block_q tokens and turn
  the dots into [block_q * G, D] x [D, block_len] matmuls, ~10x faster on CPU for prefill.
  pages_per_block and block_q are tuning knobs only.
  """
  q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
      jnp.asarray, (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs))
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape[-4:]
  max_seqs, max_pages_per_seq = page_indices.shape
  group = num_q_heads // num_kv_heads
  if num_q_heads % num_kv_heads:
    raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  block_q = block_q or _query_block_len(num_tokens, max_seqs)
  blocks = query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens, block_q)
  num_q_blocks = blocks.seq.shape[0]
  rows = block_q * group                    # a block's (token, q head) rows, token-major
  if pages_per_block is None:
    pages_per_block = _pages_per_block(num_q_blocks, page_size, max_pages_per_seq)
  block_len = pages_per_block * page_size

  # Row positions [NB, rows]; rows past a block's real tokens get -1 (they see nothing).
  slot = jnp.arange(block_q, dtype=jnp.int32)
  token_pos = jnp.where(slot < blocks.num_rows[:, None], blocks.first_pos[:, None] + slot, -1)
  row_pos = jnp.repeat(token_pos, group, axis=1)                     # [NB, rows]
  page_rows = page_indices[blocks.seq]                               # [NB, max_pages]
  # q tiles scaled once, in float32: [T, Hq, D] -> [NB, Hkv, rows, D].
  qs = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
  q_tiles = qs[blocks.row_tokens].transpose(0, 2, 1, 3, 4).reshape(
      num_q_blocks, num_kv_heads, rows, head_dim)

  # KV blocks to visit: from the first block any row's window reaches to the last one any row needs.
  end_pos = jnp.max(row_pos) + 1
  num_kv_blocks = (end_pos + block_len - 1) // block_len
  if sliding_window is None:
    first_kv_block = jnp.int32(0)
  else:
    lo = jnp.maximum(row_pos - sliding_window + 1, 0)
    first_kv_block = jnp.min(jnp.where(row_pos >= 0, lo, end_pos)) // block_len
  first_kv_block = jnp.minimum(first_kv_block, num_kv_blocks)

  def body(carry):
    b, m, l, acc = carry
    # Page ids of KV block b for every query block: [NB, ppb]; out-of-table columns are masked
    # by position below, so clamping them to the last column is harmless.
    cols = b * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
    cols = jnp.minimum(cols, max_pages_per_seq - 1)
    page_ids = jnp.clip(page_rows[:, cols], 0, num_pages - 1)
    # Gather -> [NB, Hkv, block_len, D].
    if layer is None:  # [Hkv, NB, ppb, ps, D]
      k = k_pages[:, page_ids].transpose(1, 0, 2, 3, 4)
      v = v_pages[:, page_ids].transpose(1, 0, 2, 3, 4)
    else:  # a scalar layer and [NB, ppb] ids around a slice index as [NB, ppb, Hkv, ps, D]
      k = k_pages[layer, :, page_ids].transpose(0, 2, 1, 3, 4)
      v = v_pages[layer, :, page_ids].transpose(0, 2, 1, 3, 4)
    k = k.reshape(num_q_blocks, num_kv_heads, block_len, head_dim).astype(jnp.float32)
    v = v.reshape(num_q_blocks, num_kv_heads, block_len, head_dim).astype(jnp.float32)
    s = jnp.einsum("nkrd,nkbd->nkrb", q_tiles, k,
                   preferred_element_type=jnp.float32)               # [NB, Hkv, rows, block_len]
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)  # [block_len]
    mask = kv_pos <= row_pos[..., None]                              # [NB, rows, block_len]
    if sliding_window is not None:
      mask &= kv_pos > row_pos[..., None] - sliding_window
    s = jnp.where(mask[:, None], s, -jnp.inf)
    # Online softmax; a row with nothing visible yet keeps m = -inf and contributes zeros.
    m_new = jnp.maximum(m, s.max(axis=-1))                           # [NB, Hkv, rows]
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])                               # [NB, Hkv, rows, block_len]
    alpha = jnp.exp(m - m_safe)                                      # [NB, Hkv, rows]
    l = alpha * l + p.sum(axis=-1)
    pv = jnp.einsum("nkrb,nkbd->nkrd", p, v, preferred_element_type=jnp.float32)
    acc = alpha[..., None] * acc + pv                                # [NB, Hkv, rows, D]
    return b + 1, m_new, l, acc

  stats_shape = (num_q_blocks, num_kv_heads, rows)
  init = (first_kv_block,
          jnp.full(stats_shape, -jnp.inf, jnp.float32),
          jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros((*stats_shape, head_dim), jnp.float32))
  _, _, l, acc = lax.while_loop(lambda c: c[0] < num_kv_blocks, body, init)
  out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]                 # [NB, Hkv, rows, D]
  # Row t of q is token slot token_slot[t] of block token_block[t].
  out = out.reshape(num_q_blocks, num_kv_heads, block_q, group, head_dim)
  out = out[blocks.token_block, :, blocks.token_slot]                # [T, Hkv, G, D]
  return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def write_kv(k_pages, v_pages, k, v, slot_mapping, layer: jax.Array | None = None):
  """Scatter new K/V rows ([T, Hkv, D]) into their slots; negative slots are padding and skipped.

  slot = page * page_size + offset. With `layer`, the pages hold every layer ([L, Hkv, P, ps, D])
  and only layer `layer` is written. Returns the updated (k_pages, v_pages); under jit with the
  pages donated (or carried through a loop), XLA performs the scatter in place.
  """
  num_kv_heads, num_pages, page_size, head_dim = k_pages.shape[-4:]
  num_slots = num_pages * page_size
  # Negative indices would wrap around; send them out of range so mode="drop" skips them.
  slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

  def scatter(pages, new):
    new = new.astype(pages.dtype)                                    # [T, Hkv, D]
    if layer is None:
      flat = pages.reshape(num_kv_heads, num_slots, head_dim)
      flat = flat.at[:, slots].set(new.transpose(1, 0, 2), mode="drop")
    else:  # a scalar layer and [T] slots around a slice index as [T, Hkv, D]
      flat = pages.reshape(pages.shape[0], num_kv_heads, num_slots, head_dim)
      flat = flat.at[layer, :, slots].set(new, mode="drop")
    return flat.reshape(pages.shape)

  return scatter(k_pages, k), scatter(v_pages, v)
