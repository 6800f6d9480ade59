"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): latent attention over the cached tokens a lightning
indexer picks for each query row.

Each layer's cache holds, beside the latent (v pages) and the RoPE key, one indexer key per token: the
k pages of such a model are [RoPE key | indexer key] (LlamaConfig.kv_dims), so every page copy, tier
and transfer moves the indexer keys with the rest and prefix hits reuse them. Row t at position pos
scores every position j <= pos of its own sequence,

    I[t, j] = sum_h w[t, h] * relu(q_I[t, h] . k_I[j])        (w carries the indexer's scales)

keeps the `top_k` best (every one while pos < top_k, where DSA is plain causal attention) and attends
to those only, a position's key being [RoPE key, latent] and its value the latent, as in
`reference.ragged_paged_attention`'s latent layout.

Plain jnp: the xla backend's path for these layers, which the Pallas backends run too (no Pallas kernel
yet). The scores are written a KV block at a time into a [rows, context] buffer (a query block's rows
of one sequence: ragged batches as the reference walks them), one `lax.top_k` picks the positions,
and the chosen K/V vectors are gathered: the attention costs top_k per row whatever the context.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import kv_quant, reference

_BLOCK_KV_TOKENS = 256
_MAX_QUERY_BLOCK = 16
# A block of rows attends by walking the context under a mask where it holds at most this many times top_k
# positions, else by gathering each row's picks: on this 2-core CPU, 16 rows at top 2,048 walked 4,096 positions in
# 0.37x the gathers' time and 16,384 in 1.38x (scripts/sparse_attention_bench.py; a GPU's crossover is not measured).
_WALK_CONTEXT = 2


def index_scores(index_q: jax.Array, index_w: jax.Array, index_k: jax.Array) -> jax.Array:
  """The indexer's scores: index_q [B, Hi, Di] (RoPE applied), index_w [B, Hi] (scales folded in),
  index_k [J, Di] -> [B, J] float32, sum_h w[b, h] relu(q[b, h] . k[j])."""
  dots = jnp.einsum("bhd,jd->bhj", index_q.astype(jnp.float32), index_k.astype(jnp.float32))
  return jnp.einsum("bh,bhj->bj", index_w.astype(jnp.float32), jax.nn.relu(dots))


def _attend_chosen(q, key, value, chosen, sm_scale):
  """q [B, H, D], key [B, K, D], value [B, K, C] (each row's own gathered vectors), chosen [B, K] bool
  -> [B, H, C] float32; a row with nothing chosen gives zeros."""
  s = jnp.einsum("bhd,bkd->bhk", q.astype(jnp.float32) * sm_scale, key)
  s = jnp.where(chosen[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))
  l = jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("bhk,bkc->bhc", p / jnp.where(l == 0.0, 1.0, l), value)


def dense_indexed_attention(q, k, v, index_q, index_w, *, sm_scale: float, top_k: int) -> jax.Array:
  """One sequence, no cache (the dense reference forward): q [T, H, R + C], k [T, 1, R + Di] (RoPE
  key, indexer key), v [T, 1, C] (latent), index_q [T, Hi, Di], index_w [T, Hi] -> [T, H, C] in q's
  dtype."""
  t, rope = q.shape[0], q.shape[-1] - v.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, index_scores(index_q, index_w, k[:, 0, rope:]), -jnp.inf)
  _, picked = lax.top_k(scores, min(top_k, t))
  chosen = jnp.zeros((t, t), bool).at[jnp.arange(t)[:, None], picked].set(True) & causal
  latent = v[:, 0].astype(jnp.float32)
  key = jnp.concatenate([k[:, 0, :rope].astype(jnp.float32), latent], axis=-1)
  out = _attend_chosen(q, jnp.broadcast_to(key, (t, *key.shape)), jnp.broadcast_to(latent, (t, *latent.shape)),
                       chosen, sm_scale)
  return out.astype(q.dtype)


def paged_indexed_attention(q, index_q, index_w, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                            sm_scale: float, top_k: int, layer: jax.Array | None = None,
                            k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                            block_q: int | None = None, pages_per_block: int | None = None) -> jax.Array:
  """DSA over paged caches, a ragged batch as `reference.ragged_paged_attention` takes it (new tokens
  already written). q [T, H, R + C]; index_q [T, Hi, Di] and index_w [T, Hi]: each row's indexer query
  and head weights; k_pages [(L,) 1, P, ps, R + Di], v_pages [(L,) 1, P, ps, C] (one KV head: a
  device's copy under tensor parallelism), `layer` read in place; k/v_scales: an 8-bit cache's.
  Returns [T, H, C] in q's dtype; padding rows give zeros.

  Sequences with at least block_q // 8 (and >= 2) new tokens run in blocks of block_q rows (default
  16), the others (decodes) a row at a time; each block scores its sequence's KV blocks up to its last
  row's position only. A row's chosen vectors are gathered (top_k per row, whatever the context), or, for a
  block of rows over a context of at most _WALK_CONTEXT x top_k positions, the choice becomes a mask over the
  context and each KV block is read once for all of them."""
  q, index_q, index_w, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
      jnp.asarray, (q, index_q, index_w, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs))
  num_tokens, num_heads, width = q.shape
  latent_dim = v_pages.shape[-1]
  rope = width - latent_dim
  if k_pages.shape[-1] <= rope or k_pages.shape[-4] != 1:
    raise ValueError(f"indexed attention needs one KV head of k pages wider than the RoPE key ({rope}): "
                     f"got k pages {k_pages.shape}")
  if layer is None:
    k_pages, v_pages, layer = k_pages[None], v_pages[None], jnp.int32(0)
    if k_scales is not None:
      k_scales, v_scales = k_scales[None], v_scales[None]
  num_pages, page_size = k_pages.shape[2], k_pages.shape[3]
  max_pages = page_indices.shape[1]
  pages_per_block = min(pages_per_block or max(1, _BLOCK_KV_TOKENS // page_size), max_pages)
  block_len = pages_per_block * page_size
  num_kv_blocks = -(-max_pages // pages_per_block)
  chosen_len = min(top_k, max_pages * page_size)
  block_q = max(1, min(block_q or _MAX_QUERY_BLOCK, num_tokens))

  def read(pages, scales, page_ids, offsets, dims):
    x = kv_quant.to_compute(pages[layer, 0, page_ids, offsets, dims], jnp.float32)  # (only those dims gathered)
    return x if scales is None else x * scales[layer, 0, page_ids, offsets][..., None]

  def _attend_masked(q_rows, mask, page_row, kv_end):
    """q_rows [rows, H, R + C] over the KV blocks up to kv_end, each position visible to the rows `mask` [rows,
    context] marks; an online softmax as the reference's. -> [rows, H, C] float32."""
    qs = q_rows.astype(jnp.float32) * sm_scale

    def kv_step(b, carry):
      m, l, acc = carry
      cols = jnp.minimum(b * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32), max_pages - 1)
      page_ids = jnp.clip(page_row[cols], 0, num_pages - 1)[:, None]
      offsets = jnp.arange(page_size, dtype=jnp.int32)[None, :]
      visible = lax.dynamic_slice_in_dim(mask, b * block_len, block_len, axis=1)   # [rows, block_len]
      latent = read(v_pages, v_scales, page_ids, offsets, slice(None)).reshape(block_len, latent_dim)
      latent = jnp.where(jnp.any(visible, axis=0)[:, None], latent, 0.0)  # (slots no row sees: never read)
      key = jnp.concatenate([read(k_pages, k_scales, page_ids, offsets, slice(0, rope)).reshape(block_len, rope),
                             latent], axis=-1)
      s = jnp.where(visible[:, None, :], jnp.einsum("rhd,bd->rhb", qs, key), -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + jnp.einsum("rhb,bc->rhc", p, latent)

    rows = q_rows.shape[0]
    init = (jnp.full((rows, num_heads), -jnp.inf, jnp.float32), jnp.zeros((rows, num_heads), jnp.float32),
            jnp.zeros((rows, num_heads, latent_dim), jnp.float32))
    _, l, acc = lax.fori_loop(0, (kv_end + block_len - 1) // block_len, kv_step, init)
    return acc / jnp.where(l == 0.0, 1.0, l)[..., None]

  def attend(rows_per_block, seq_mask):
    blocks = reference.query_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens, rows_per_block, seq_mask)
    slot = jnp.arange(rows_per_block, dtype=jnp.int32)
    positions = jnp.arange(num_kv_blocks * block_len, dtype=jnp.int32)

    def one_block(i, out):
      real = slot < blocks.num_rows[i]
      row_pos = jnp.where(real, blocks.first_pos[i] + slot, -1)
      rows = blocks.row_tokens[i]
      page_row = page_indices[blocks.seq[i]]
      iq, iw = index_q[rows], index_w[rows]

      def score_block(b, buf):
        cols = jnp.minimum(b * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32), max_pages - 1)
        page_ids = jnp.clip(page_row[cols], 0, num_pages - 1)[:, None]
        offsets = jnp.arange(page_size, dtype=jnp.int32)[None, :]
        keys = read(k_pages, k_scales, page_ids, offsets, slice(rope, None)).reshape(block_len, -1)
        return lax.dynamic_update_slice(buf, index_scores(iq, iw, keys), (0, b * block_len))

      kv_end = blocks.first_pos[i] + blocks.num_rows[i]
      scores = lax.fori_loop(0, (kv_end + block_len - 1) // block_len, score_block,
                             jnp.full((rows_per_block, positions.shape[0]), -jnp.inf, jnp.float32))
      scores = jnp.where(positions[None, :] <= row_pos[:, None], scores, -jnp.inf)
      _, picked = lax.top_k(scores, chosen_len)                               # [rows, K]
      chosen = picked <= row_pos[:, None]  # (a row seeing fewer than K positions picks some it cannot see)

      def gathered():  # each row's chosen vectors gathered: top_k of them a row, whatever the context
        page_ids = jnp.clip(page_row[jnp.minimum(picked // page_size, max_pages - 1)], 0, num_pages - 1)
        offsets = picked % page_size
        # (picks a row cannot see are zeroed: whatever their slots hold never reaches the output)
        latent = jnp.where(chosen[..., None], read(v_pages, v_scales, page_ids, offsets, slice(None)), 0.0)
        key = jnp.concatenate([read(k_pages, k_scales, page_ids, offsets, slice(0, rope)), latent], axis=-1)
        return _attend_chosen(q[rows], key, latent, chosen, sm_scale)

      def walked():  # the choice as a mask over the context, each KV block read once for all the block's rows
        mask = jnp.zeros(scores.shape, bool).at[slot[:, None], picked].set(chosen)
        return _attend_masked(q[rows], mask, page_row, kv_end)

      if rows_per_block == 1:
        o = gathered()
      else:  # a block of rows walks a context of up to _WALK_CONTEXT picks (their gathers cost more there)
        o = lax.cond(kv_end <= _WALK_CONTEXT * chosen_len, walked, gathered)
      return lax.dynamic_update_slice(out, o[None], (i, 0, 0, 0))

    num_blocks = blocks.seq.shape[0]
    out = lax.fori_loop(0, jnp.sum(blocks.num_rows > 0), one_block,
                        jnp.zeros((num_blocks, rows_per_block, num_heads, latent_dim), jnp.float32))
    return out[blocks.token_block, blocks.token_slot]                          # [T, H, C]

  if block_q == 1:
    out = attend(1, None)
  else:
    live = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    tiled = q_lens >= max(2, block_q // 8)
    seq_ids, _, _ = reference.token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.where(tiled[seq_ids][:, None, None], attend(block_q, tiled), attend(1, ~tiled))
  _, _, valid = reference.token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)

