"""DeepSeek Sparse Attention (pallas_kernels/indexed_attention.py): the paged step's top-k latent attention against
a float64 numpy one on fresh random ragged batches, and its dense one-sequence form against the paged one."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import indexed_attention, kv_quant, testing
import fresh

ROPE, INDEX, LATENT = 8, 16, 32  # a cached K vector: RoPE key and indexer key; V: the latent


def _batch(rng, seqs, page_size: int, dtype=np.float32):
    """A ragged batch of `seqs` (q_len, kv_len) over a latent cache whose K pages hold [RoPE key, indexer key], with
    each row's indexer query and head weights; garbage past every sequence's length and in padding rows."""
    batch = testing.random_ragged_batch(rng, seqs, num_q_heads=4, num_kv_heads=1, head_dim=ROPE + INDEX + LATENT,
                                        page_size=page_size, num_tokens=sum(q for q, _ in seqs) + 3,
                                        max_seqs=len(seqs) + 1, latent_dims=(ROPE + INDEX, LATENT), dtype=dtype)
    q = np.concatenate([batch.q[..., :ROPE], batch.q[..., ROPE + INDEX:]], axis=-1)  # [T, H, R + C]
    t = q.shape[0]
    index_q = rng.standard_normal((t, 8, INDEX)).astype(np.float32)
    index_w = rng.standard_normal((t, 8)).astype(np.float32)
    return batch, q, index_q, index_w


def _f64(batch, q, index_q, index_w, *, sm_scale: float, top_k: int, k_pages=None, v_pages=None) -> np.ndarray:
    """Per row: the indexer's score of every position it sees, the top_k best (ties to the earlier position), softmax
    attention over those keys ([RoPE key, latent]) and values (latents); float64. [valid rows, H, C]."""
    k_pages = np.asarray(batch.k_pages if k_pages is None else k_pages, np.float64)[0]
    v_pages = np.asarray(batch.v_pages if v_pages is None else v_pages, np.float64)[0]
    ps = k_pages.shape[1]
    out = np.zeros((batch.num_valid_tokens, q.shape[1], LATENT))
    positions = testing.row_positions(batch)
    for s in range(int(batch.num_seqs[0])):
        kv_len = int(batch.kv_lens[s])
        pages = batch.page_indices[s, : -(-kv_len // ps)]
        keys = k_pages[pages].reshape(-1, ROPE + INDEX)[:kv_len]
        latents = v_pages[pages].reshape(-1, LATENT)[:kv_len]
        for t in range(int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])):
            seen = positions[t] + 1
            dots = np.einsum("hd,jd->hj", index_q[t].astype(np.float64), keys[:seen, ROPE:])
            scores = np.einsum("h,hj->j", index_w[t].astype(np.float64), np.maximum(dots, 0))
            chosen = np.argsort(-scores, kind="stable")[:top_k]
            key = np.concatenate([keys[chosen, :ROPE], latents[chosen]], axis=-1)
            logits = np.einsum("hd,kd->hk", np.asarray(q[t], np.float64), key) * sm_scale
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[t] = (p / p.sum(-1, keepdims=True)) @ latents[chosen]
    return out


# (q_len, kv_len): decodes and chunks in one batch, lengths off page multiples, contexts below and above top_k
SEQS = [(1, 1), (1, 37), (5, 5), (17, 30), (1, 9), (12, 61), (3, 8)]


@pytest.mark.parametrize("top_k", [1, 6, 16, 200])
@pytest.mark.parametrize("page_size", [4, 8])
def test_paged_sparse_attention_is_float64_top_k_attention(top_k, page_size):
    """Fresh random ragged batches (shuffled page tables, garbage past every length and in padding rows): within
    1e-5 of float64 numpy; padding rows are zeros; query blocks and KV blocks of other sizes give the same."""
    rng = fresh.rng()
    batch, q, index_q, index_w = _batch(rng, SEQS, page_size)
    want = _f64(batch, q, index_q, index_w, sm_scale=0.2, top_k=top_k)
    args = (q, index_q, index_w, batch.k_pages, batch.v_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
            batch.num_seqs)
    for block_q, pages_per_block in ((None, None), (1, 1), (4, 3)):
        got = np.asarray(jax.jit(lambda *a: indexed_attention.paged_indexed_attention(
            *a, sm_scale=0.2, top_k=top_k, block_q=block_q, pages_per_block=pages_per_block))(*args))
        np.testing.assert_allclose(got[: batch.num_valid_tokens], want, **testing.tolerances(np.float32))
        assert not got[batch.num_valid_tokens:].any()


def test_every_layer_in_place_and_an_8_bit_cache():
    """Pages of every layer read in place (`layer`), and an int8 cache (its per-vector scales): the float64 top-k
    attention of the dequantized vectors, to 1e-5."""
    rng = fresh.rng()
    batch, q, index_q, index_w = _batch(rng, SEQS, 8)
    pages = {}
    for name in ("k_pages", "v_pages"):
        x = jnp.asarray(getattr(batch, name))
        values, scales = kv_quant.quantize(x, jnp.int8)
        pages[name] = (values, scales, np.asarray(kv_quant.to_compute(values, jnp.float32) * scales[..., None]))
    stacked = {name: tuple(jnp.stack([jnp.zeros_like(a), a]) for a in pages[name][:2]) for name in pages}
    got = indexed_attention.paged_indexed_attention(
        q, index_q, index_w, stacked["k_pages"][0], stacked["v_pages"][0], batch.kv_lens, batch.page_indices,
        batch.cu_q_lens, batch.num_seqs, sm_scale=0.2, top_k=6, layer=jnp.int32(1), k_scales=stacked["k_pages"][1],
        v_scales=stacked["v_pages"][1])
    want = _f64(batch, q, index_q, index_w, sm_scale=0.2, top_k=6, k_pages=pages["k_pages"][2],
                v_pages=pages["v_pages"][2])
    np.testing.assert_allclose(np.asarray(got)[: batch.num_valid_tokens], want, **testing.tolerances(np.float32))


def test_dense_form_is_the_paged_one_of_a_whole_sequence():
    """The dense reference forward's attention (one sequence, no cache) equals the paged step's over that sequence
    as one chunk; with top_k past its length it is plain causal latent attention."""
    from models.llama import dense_causal_attention

    rng = fresh.rng()
    batch, q, index_q, index_w = _batch(rng, [(29, 29)], 4)
    k = np.asarray(batch.k_pages[0])[batch.page_indices[0, :8]].reshape(-1, ROPE + INDEX)[:29][:, None]
    v = np.asarray(batch.v_pages[0])[batch.page_indices[0, :8]].reshape(-1, LATENT)[:29][:, None]
    for top_k in (5, 29):
        dense = indexed_attention.dense_indexed_attention(q[:29], k, v, index_q[:29], index_w[:29], sm_scale=0.2,
                                                          top_k=top_k)
        paged = indexed_attention.paged_indexed_attention(
            q, index_q, index_w, batch.k_pages, batch.v_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
            batch.num_seqs, sm_scale=0.2, top_k=top_k)
        np.testing.assert_allclose(np.asarray(dense), np.asarray(paged)[:29], rtol=1e-5, atol=1e-5)
    causal = dense_causal_attention(q[:29], k[..., :ROPE], v, sm_scale=0.2)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(causal), rtol=1e-5, atol=1e-5)


def test_bench_runs_both_sides(capsys):
    """scripts/sparse_attention_bench.py at tiny shapes, bfloat16, dense attention on the Pallas kernel (interpret):
    a row of both times for every case."""
    from scripts import sparse_attention_bench

    assert sparse_attention_bench.main(["--quick", "--dtype", "bfloat16", "--backend", "pallas_interpret"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("decode", "chunk"))]
    assert len(rows) == 3 and all(float(row[-3]) > 0 and float(row[-2]) > 0 for row in rows)
