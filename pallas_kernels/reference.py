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

import jax
import jax.numpy as jnp
from jax import lax

# Rows x KV positions gathered per loop iteration: bounds the [T, Hkv, block, D] gather.
_GATHER_BUDGET = 8192
_MAX_BLOCK_LEN = 512


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


def _pages_per_block(num_tokens: int, page_size: int, max_pages_per_seq: int) -> int:
  """Static KV block size in pages: large for decode batches, small for long prefills."""
  block_len = _MAX_BLOCK_LEN
  while block_len > page_size and num_tokens * block_len > _GATHER_BUDGET:
    block_len //= 2
  return max(1, min(block_len // page_size, max_pages_per_seq))


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None,
                           pages_per_block: int | None = None,
                           layer: jax.Array | None = None) -> jax.Array:
  """Causal attention of every new token over its own sequence's paged KV. Returns [T, Hq, D].

  With `layer` (int32 scalar), k/v_pages hold every layer, [L, Hkv, P, ps, D], and layer `layer`
  is read in place (the gather indexes the layer; nothing of a whole layer is sliced out).

  Row i of sequence s sits at position kv_lens[s] - q_len + i and sees KV positions
  [max(0, pos - sliding_window + 1), pos]. Padding rows produce zeros.
  """
  q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
      jnp.asarray, (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs))
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape[-4:]
  max_pages_per_seq = page_indices.shape[1]
  group = num_q_heads // num_kv_heads
  if num_q_heads % num_kv_heads:
    raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  if pages_per_block is None:
    pages_per_block = _pages_per_block(num_tokens, page_size, max_pages_per_seq)
  block_len = pages_per_block * page_size

  seq_ids, positions, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  page_rows = page_indices[seq_ids]                                  # [T, max_pages]
  # Scale q once, in float32: [T, Hkv, G, D].
  qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)

  # KV blocks to visit: from the first block any row's window reaches to the last one any row needs.
  end_pos = jnp.max(jnp.where(valid, positions + 1, 0))
  num_blocks = (end_pos + block_len - 1) // block_len
  if sliding_window is None:
    first_block = jnp.int32(0)
  else:
    lo = jnp.maximum(positions - sliding_window + 1, 0)
    first_block = jnp.min(jnp.where(valid, lo, end_pos)) // block_len
  first_block = jnp.minimum(first_block, num_blocks)

  def body(carry):
    b, m, l, acc = carry
    # Page ids of block b for every row: [T, pages_per_block]; out-of-table columns are masked
    # by position below, so clamping them to the last column is harmless.
    cols = b * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
    cols = jnp.minimum(cols, max_pages_per_seq - 1)
    page_ids = jnp.clip(page_rows[:, cols], 0, num_pages - 1)
    # Gather: [Hkv, T, ppb, ps, D] -> [T, Hkv, block_len, D].
    if layer is None:
      # [Hkv, T, ppb, ps, D] -> [T, Hkv, block_len, D]
      k = k_pages[:, page_ids].transpose(1, 0, 2, 3, 4)
      v = v_pages[:, page_ids].transpose(1, 0, 2, 3, 4)
    else:
      # Scalar layer + [T, ppb] ids index around a slice: [T, ppb, Hkv, ps, D] -> [T, Hkv, ppb, ps, D]
      k = k_pages[layer, :, page_ids].transpose(0, 2, 1, 3, 4)
      v = v_pages[layer, :, page_ids].transpose(0, 2, 1, 3, 4)
    k = k.reshape(num_tokens, num_kv_heads, block_len, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, block_len, head_dim)
    s = jnp.einsum("tkgd,tkbd->tkgb", qg, k,
                   preferred_element_type=jnp.float32)               # [T, Hkv, G, block_len]
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)  # [block_len]
    mask = kv_pos[None, :] <= positions[:, None]                     # [T, block_len]
    if sliding_window is not None:
      mask &= kv_pos[None, :] > positions[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    # Online softmax; a row with nothing visible yet keeps m = -inf and contributes zeros.
    m_new = jnp.maximum(m, s.max(axis=-1))                           # [T, Hkv, G]
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])                               # [T, Hkv, G, block_len]
    alpha = jnp.exp(m - m_safe)                                      # [T, Hkv, G]
    l = alpha * l + p.sum(axis=-1)
    pv = jnp.einsum("tkgb,tkbd->tkgd", p, v.astype(jnp.float32),
                    preferred_element_type=jnp.float32)
    acc = alpha[..., None] * acc + pv                                # [T, Hkv, G, D]
    return b + 1, m_new, l, acc

  stats_shape = (num_tokens, num_kv_heads, group)
  init = (first_block,
          jnp.full(stats_shape, -jnp.inf, jnp.float32),
          jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros((*stats_shape, head_dim), jnp.float32))
  _, _, l, acc = lax.while_loop(lambda c: c[0] < num_blocks, body, init)
  out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
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
    else:
      # Scalar layer + [T] slots index around a slice: the update is [T, Hkv, D].
      flat = pages.reshape(pages.shape[0], num_kv_heads, num_slots, head_dim)
      flat = flat.at[layer, :, slots].set(new, mode="drop")
    return flat.reshape(pages.shape)

  return scatter(k_pages, k), scatter(v_pages, v)
