"""A request's fixed token rules (`allowed_token_ids`, `bad_words`) as rows of the sampler's token bitmask.

The bitmask is the one structured outputs fill (`engine.structured`): [rows, ceil(vocab / 32)] int32, token t
allowed when bit t % 32 of word t // 32 is set. Rules narrow a row further, after the grammar's mask, and never
empty it: allowed ids the grammar refuses all leave the grammar's row; bans that would leave nothing are not made.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from engine.request import RequestError, SamplingParams
from engine.structured import mask_words


class TokenRules:
    """`allowed`: the bitmask row of the allowed ids (None: all); `bad_words`: token sequences whose last token is
    banned wherever the history (the output so far) ends with the rest (a one-token word: everywhere)."""

    def __init__(self, allowed: np.ndarray | None, bad_words: Sequence[tuple[int, ...]]):
        self.allowed = allowed
        self.bad_words = tuple(bad_words)

    @classmethod
    def of(cls, params: SamplingParams, encode: Callable[[str], list[int]], vocab_size: int) -> TokenRules | None:
        """The request's rules (None without any); RequestError names an id outside the vocabulary."""
        if params.allowed_token_ids is None and not params.bad_words:
            return None
        allowed = None
        if params.allowed_token_ids is not None:
            ids = np.array(params.allowed_token_ids, np.int64)
            if ids[0] < 0 or ids[-1] >= vocab_size:
                bad = ids[0] if ids[0] < 0 else ids[-1]
                raise RequestError(f"allowed_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")
            allowed = bitmask(ids, vocab_size)
        words = set()
        for word in params.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                if ids := tuple(encode(text)):
                    words.add(ids)
        return cls(allowed, sorted(words))

    @property
    def needs_history(self) -> bool:
        """The rows depend on the tokens generated so far (the step before must have completed)."""
        return any(len(w) > 1 for w in self.bad_words)

    def apply(self, mask: np.ndarray, rows: Sequence[int], history: list[int], draft: Sequence[int] = ()) -> None:
        """Narrows mask rows `rows` in place: rows[j] samples after `history` + draft[:j]."""
        words = mask.view(np.uint32)
        for j, row in enumerate(rows):
            if self.allowed is not None and (narrowed := words[row] & self.allowed.view(np.uint32)).any():
                words[row] = narrowed
            if not self.bad_words:
                continue
            before = words[row].copy()
            tail = history + list(draft[:j]) if j else history
            for w in self.bad_words:
                if len(w) == 1 or (len(tail) >= len(w) - 1 and tail[len(tail) - len(w) + 1:] == list(w[:-1])):
                    words[row, w[-1] >> 5] &= np.uint32(~(1 << (w[-1] & 31)) & 0xFFFFFFFF)
            if not words[row].any():
                words[row] = before


def bitmask(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """[ceil(vocab / 32)] int32 with the bits of `ids` set."""
    words = np.zeros(mask_words(vocab_size), np.uint32)
    np.bitwise_or.at(words, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return words.view(np.int32)
