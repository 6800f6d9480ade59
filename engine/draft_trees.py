"""Draft trees from a drafter's likeliest tokens (`speculative.topk` > 1 with `draft_model`, `mtp` or `eagle3`):
SGLang's EAGLE top-k trees, for any drafter the engine runs on the device.

A drafter's greedy chain (engine/draft_model.py, engine/mtp_drafter.py) is lost at its first wrong guess. A tree
keeps alternatives: the first level holds the drafter's `topk` likeliest first tokens; each further round runs the
drafter once over the `topk` likeliest paths so far (the beams, a row each), takes each one's `topk` likeliest next
tokens, and keeps the `topk` likeliest of those `topk`^2 paths (a path's score: the sum of its tokens' log
probabilities under the drafter) as the next round's beams. Every path scored is a candidate; the step verifies the
`nodes` best (a path's score never exceeds its parent's, so they form a tree), in depth-first order with each node's
likeliest child first (`select_tree`), and keeps the branch the model samples (engine/speculative.py): outputs are
plain decoding's whatever the drafter guesses.

Where the beams' K/V goes: round s (1 .. levels - 1) writes each beam's drafter K/V into the slots of the draft
positions the step will verify (it writes them again), beam b at offset (s - 1) * topk + b from the round's `base`
(the row's first written position), while its RoPE position is base + s - 1, its depth. Each beam attends to the
prefix and to its own ancestors' slots only: an attention mask per row (`tree_masks`, one bit for each of the 32
positions before it), so a round needs (levels - 1) * topk <= 32 slots (SpeculativeConfig checks it) and at most
as many as the row's draft slots (fewer slots: fewer levels).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from engine import speculative
from models import llama

NEG_INF = float("-inf")


def top_tokens(logits: jax.Array, k: int, vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    """([N, k] log probabilities, [N, k] int32 tokens) of each row's k likeliest tokens (the first `vocab` columns)."""
    logits = logits[:, :vocab] if vocab is not None else logits
    logp, tokens = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return logp, tokens.astype(jnp.int32)


def candidates(num_levels: int, topk: int) -> int:
    """Paths a tree's rounds score: topk at the first level, topk^2 at each further one."""
    return topk + (num_levels - 1) * topk * topk


def tree_rounds(first, round_fn: Callable, state, kv, *, topk: int, num_levels: int, base, counts, depths, pages,
                page_size: int):
    """The rounds of a draft tree for n rows on the device.

    first: ([n, topk] log probabilities, [n, topk] tokens) of the first level. state: [n, ...] what the first round's
    beams go on from (each row's, for all its beams). round_fn(tokens [n*topk], state [n*topk, ...], inputs
    (llama.ModelInputs, a row per beam), kv) -> ((log probabilities, tokens) [n*topk, topk] of each beam's likeliest
    next tokens, state [n*topk, ...] a beam's children go on from, kv). base: [n] the slot of the first beam of round
    1 (module docstring); counts: [n] the row's draft slots (0: none); depths: [n] its most levels.
    Returns ((tokens, parents, scores) [n, candidates] each: a candidate's parent is a candidate's index, -1 for the
    root; -inf scores the paths a row may not take), kv)."""
    n, k = base.shape[0], topk
    size = candidates(num_levels, k)
    levels = jnp.minimum(jnp.minimum(depths, num_levels), 1 + counts // k)  # (levels - 1) * k slots fit
    logp, tok = first
    score0 = jnp.where((levels > 0)[:, None], logp, NEG_INF)
    cand_tok = jnp.zeros((n, size), jnp.int32).at[:, :k].set(tok)
    cand_par = jnp.full((n, size), -1, jnp.int32)
    cand_score = jnp.full((n, size), NEG_INF, jnp.float32).at[:, :k].set(score0)
    beams = (tok, score0, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k)), jnp.zeros((n, k), jnp.uint32),
             jnp.repeat(state[:, None], k, axis=1))
    rows = jnp.arange(n * k, dtype=jnp.int32)
    bits = jnp.arange(32, dtype=jnp.uint32)
    page_rows = jnp.repeat(pages, k, axis=0)

    def one(s, carry):
        (b_tok, b_score, b_cand, b_anc, b_state), (c_tok, c_par, c_score), kv = carry
        offset = (s - 1) * k + jnp.arange(k, dtype=jnp.int32)  # [k]: each beam's slot after base
        pos = base[:, None] + offset[None]  # [n, k]
        write = (s < levels)[:, None]
        slots = jnp.where(write, jnp.take_along_axis(pages, pos // page_size, axis=1) * page_size + pos % page_size, -1)
        # mask bit i hides the position i + 1 before the beam's own: the offsets before it that are not its ancestors
        before = offset[None, :, None] - 1 - bits.astype(jnp.int32)[None, None]  # [1, k, 32]
        ancestor = (b_anc[:, :, None] >> jnp.maximum(before, 0).astype(jnp.uint32)) & 1
        hidden = (before >= 0) & (ancestor == 0)
        masks = jnp.sum(jnp.where(hidden, jnp.uint32(1) << bits, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)
        inputs = llama.ModelInputs(
            tokens=b_tok.reshape(-1), positions=jnp.broadcast_to(base[:, None] + s - 1, (n, k)).reshape(-1),
            slot_mapping=slots.reshape(-1), kv_lens=(pos + 1).reshape(-1), page_indices=page_rows,
            cu_q_lens=jnp.arange(n * k + 1, dtype=jnp.int32), num_seqs=jnp.full((1,), n * k, jnp.int32),
            logits_indices=rows, tree_masks=jax.lax.bitcast_convert_type(masks, jnp.int32).reshape(-1))
        (logp, tok), new_state, kv = round_fn(b_tok.reshape(-1), b_state.reshape(n * k, *b_state.shape[2:]), inputs, kv)
        scores = jnp.where(write[..., None], b_score[..., None] + logp.reshape(n, k, k), NEG_INF).reshape(n, k * k)
        tok = tok.reshape(n, k * k)
        first_index = k + (s - 1) * k * k
        c_tok = jax.lax.dynamic_update_slice(c_tok, tok, (0, first_index))
        c_par = jax.lax.dynamic_update_slice(c_par, jnp.repeat(b_cand, k, axis=1), (0, first_index))
        c_score = jax.lax.dynamic_update_slice(c_score, scores, (0, first_index))
        b_score, best = jax.lax.top_k(scores, k)  # the next round's beams
        parent = best // k
        new_state = new_state.reshape(n, k, *new_state.shape[1:])
        beams = (jnp.take_along_axis(tok, best, axis=1), b_score, first_index + best,
                 jnp.take_along_axis(b_anc | (jnp.uint32(1) << offset.astype(jnp.uint32))[None], parent, axis=1),
                 jnp.take_along_axis(new_state, parent.reshape(n, k, *([1] * (new_state.ndim - 2))), axis=1))
        return beams, (c_tok, c_par, c_score), kv

    cands = (cand_tok, cand_par, cand_score)
    if num_levels > 1:  # (a loop of no rounds is still traced, its slices past the first level's candidates)
        _, cands, kv = jax.lax.fori_loop(1, num_levels, one, (beams, cands, kv))
    return cands, kv


def _depths(parents: np.ndarray) -> np.ndarray:
    """Each candidate's depth (0: the first level) from its parent's index (-1: the root; a parent comes first)."""
    depth = np.zeros(len(parents), np.int64)
    for c, p in enumerate(parents.tolist()):
        depth[c] = 0 if p < 0 else depth[p] + 1
    return depth


def select_tree(tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray, nodes: int) -> speculative.DraftTree:
    """The `nodes` best-scored candidates of one row (`tree_rounds`' outputs), each with its parent (ties: the
    shallower first), as a DraftTree in depth-first order, each node's likeliest child first."""
    order = np.lexsort((np.arange(len(tokens)), _depths(parents), -scores.astype(np.float64)))
    kept: list[int] = []
    chosen: set[int] = set()
    for c in order.tolist():
        if len(kept) == nodes or scores[c] == NEG_INF:
            break
        if parents[c] < 0 or parents[c] in chosen:
            chosen.add(c)
            kept.append(c)
    node = {c: i + 1 for i, c in enumerate(kept)}  # (score order: a parent before its children)
    return speculative.DraftTree.preorder([int(tokens[c]) for c in kept], [node.get(int(parents[c]), 0) for c in kept])


def best_path(tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray) -> speculative.DraftTree:
    """A chain from one row's candidates, for a sequence that drafts chains only (images: their M-RoPE positions
    follow the chunk): the best-scored path of the deepest level reached."""
    best, key = -1, (-1, NEG_INF)
    for c, depth in enumerate(_depths(parents).tolist()):
        if scores[c] != NEG_INF and (depth, scores[c]) > key:
            best, key = c, (depth, scores[c])
    path = []
    while best >= 0:
        path.append(int(tokens[best]))
        best = int(parents[best])
    return speculative.DraftTree.chain(path[::-1])


def reference_tree(next_tokens: Callable, topk: int, num_levels: int, nodes: int) -> speculative.DraftTree:
    """The tree `tree_rounds` and `select_tree` build, one path at a time (tests' reference): next_tokens(path) ->
    (log probabilities, tokens) of every token that may follow the sequence and `path`, a token list."""
    def top(path):
        logp, tokens = (np.asarray(a) for a in next_tokens(path))
        best = np.argsort(-logp, kind="stable")[:topk]  # (ties: the lower index, as lax.top_k)
        return logp[best], tokens[best]

    logp, tokens = top([])
    cands = [(int(t), -1, float(lp)) for lp, t in zip(logp, tokens)]  # (token, parent, score)
    paths = [[int(t)] for t in tokens]
    beams = list(range(topk))
    for _ in range(1, num_levels):
        first = len(cands)
        for b in beams:
            logp, tokens = top(paths[b])
            for lp, t in zip(logp, tokens):
                cands.append((int(t), b, cands[b][2] + float(lp)))
                paths.append(paths[b] + [int(t)])
        scores = np.array([c[2] for c in cands[first:]], np.float32)
        beams = [first + int(i) for i in np.argsort(-scores, kind="stable")[:topk]]
    tokens, parents, scores = (np.array(column) for column in zip(*cands))
    return select_tree(tokens, parents, scores.astype(np.float32), nodes)
