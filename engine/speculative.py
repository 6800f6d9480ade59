"""Draft tokens for speculative decoding by n-gram lookup, and their verification.

Proposal (`NgramIndex`, with `propose_ngram` its reference): the sequence's last n tokens (n from
`ngram_max` down to `ngram_min`) are looked up earlier in the same sequence (prompt and output); the
tokens that followed their latest occurrence are the draft. No draft model, no extra weights: it pays where the output repeats text it
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
    """The reference proposal (numpy, a full scan; `NgramIndex` is the incremental one the scheduler uses): find the
    latest earlier occurrence of the longest suffix n-gram of `tokens` (ngram_max >= n >= ngram_min) and copy `k`
    tokens from just after it. The copy may run into the tokens it is producing (as LZ77's does), so text that
    repeats with a short period yields whole drafts. [] when no suffix of those lengths occurs earlier."""
    ids = np.asarray(tokens, np.int64)
    size = len(ids)
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        # Windows over ids[:-1] end before the last token: each has a follower, and the suffix itself is excluded.
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[size - n :]).all(axis=1))
        if len(hits):
            return _copy(ids.tolist(), int(hits[-1]) + n, k)
    return []


def _copy(ids: Seq[int], start: int, k: int) -> list[int]:
    """k tokens copied from ids[start:], continuing into the copy itself past the end."""
    out: list[int] = []
    for j in range(k):
        p = start + j
        out.append(ids[p] if p < len(ids) else out[p - len(ids)])
    return out


class NgramIndex:
    """Where each n-gram (ngram_min <= n <= ngram_max) of a sequence last ended, kept up to date as tokens are
    appended: a proposal costs O(ngram_max) lookups instead of a scan of the whole sequence. Same proposals as
    `propose_ngram`."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> the position just after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _last

    def propose(self, tokens: Seq[int], k: int) -> list[int]:
        size = len(tokens)
        # Index the n-grams that end before the last token (the suffix itself must not match itself).
        for end in range(self._indexed + 1, size):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._last[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, size - 1)
        for n in range(min(self.ngram_max, size - 1), self.ngram_min - 1, -1):
            start = self._last.get(tuple(tokens[size - n :]))
            if start is not None:
                return _copy(tokens, start, k)
        return []


MAX_PAUSE = 16  # steps a sequence whose drafts keep missing waits at most before drafting again


def pause_after(misses: int) -> int:
    """Steps to skip drafting after `misses` verifications in a row accepted nothing: none after one, then 2, 4, 8,
    16. A wrong draft costs its verification positions; text that stopped repeating stops paying for them."""
    return 0 if misses < 2 else min(MAX_PAUSE, 1 << (misses - 1))


def accepted(draft: Seq[int], sampled: Seq[int]) -> int:
    """How many draft tokens a verification step keeps: `sampled[j]` is the token sampled after the chunk's
    j-th position ([last token, *draft]), so draft[j] stands while it equals sampled[j]."""
    n = 0
    while n < len(draft) and draft[n] == sampled[n]:
        n += 1
    return n
