"""Draft tokens for speculative decoding by n-gram lookup, and their verification.

Proposal (`propose_ngram`): the sequence's last n tokens (n from `ngram_max` down to `ngram_min`) are
looked up earlier in the same sequence (prompt and output); the tokens that followed a recent
occurrence are the draft. No draft model, no extra weights: it pays where the output repeats text it
has seen (quoting, extraction, editing, code, long chat histories).

Verification (`accepted`): the step feeds [last token, d_1 .. d_k] and samples a token t_j at each of
the k + 1 positions exactly as plain decoding would sample the token at that output index (same
logits, same per-request key for that index). Draft d_j is kept while it equals t_{j-1}; the first
mismatch ends the run and t_j there is the correction. Because a draft here is a single token, not a
distribution, this exact-match test accepts d with probability p(d), the same as rejection sampling,
and every emitted token is the one plain decoding would have emitted: speculation changes how many
tokens a step yields, never which tokens (greedy or seeded sampling).
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np


def propose_ngram(tokens: Seq[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the longest suffix n-gram of `tokens`
    (ngram_max >= n >= ngram_min): the latest occurrence with k tokens after it, else the latest (in a text
    that repeats with a short period the latest is right behind the suffix and has few followers).
    [] when no suffix of those lengths occurs earlier."""
    ids = np.asarray(tokens, np.int64)
    size = len(ids)
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        # Windows over ids[:-1] end before the last token: each has a follower, and the suffix itself is excluded.
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[size - n :]).all(axis=1))
        if len(hits):
            full = hits[hits + n + k <= size]  # occurrences followed by k tokens: the latest of them, else the latest
            start = int(full[-1] if len(full) else hits[-1]) + n
            return ids[start : start + k].tolist()
    return []


def accepted(draft: Seq[int], sampled: Seq[int]) -> int:
    """How many draft tokens a verification step keeps: `sampled[j]` is the token sampled after the chunk's
    j-th position ([last token, *draft]), so draft[j] stands while it equals sampled[j]."""
    n = 0
    while n < len(draft) and draft[n] == sampled[n]:
        n += 1
    return n
