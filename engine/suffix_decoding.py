"""Suffix decoding (`speculative.method: suffix`; vLLM's `suffix`, after SuffixDecoding, Oliaro et al. 2024): drafts
from what earlier requests wrote, not only from the sequence itself.

Agents, tool loops, retries and parallel samples write the same things again and again: a tool call's JSON, a file's
code quoted once more, the same answer to the same question. An n-gram lookup in the sequence's own tokens
(engine.speculative) sees none of what other requests wrote. Here two indexes are looked up:

- the sequence's own tokens (prompt and output so far; `Sequence.draft_index`), and
- the outputs of the replica's recent requests, finished (the last `suffix_max_cached_requests`) and running, those of
  its namespace only (`cache_salt`, adapter: a salted request's text never steers another's drafts or its timing).

Each index keeps, for every `ngram_min`-token n-gram, where it ended (`SuffixIndex`). A proposal takes the latest
`MAX_MATCHES` places where the sequence's last `ngram_min` tokens occur, measures how far back each agrees with the
sequence (up to `suffix_max_depth` tokens: the match length), and counts what followed them. For a match length m the
places agreeing at least m tokens back vote: a continuation's probability is the share of those places that went on
with it, and a token after it the share of those that went on with that token in turn (the frequency statistics of a
suffix tree over the texts). `grow` takes the likeliest nodes first, while their probability is at least
`suffix_min_prob`, up to m * `suffix_spec_factor` nodes (a longer match earns a longer draft) and the step's node
budget; a tree where `suffix_trees` (the default) allows, else the likeliest path. Every match length that changes the
voting set is tried, in both indexes, and the tree whose probabilities sum highest (its expected accepted tokens) is
the draft. Verification is the n-gram method's, so outputs are plain decoding's (engine.speculative).

`reference_tree` is the slow reference: every place in every text, every match length, an explicit count trie.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from typing import Sequence as Seq

from engine.request import Sequence, Status
from engine.speculative import DraftTree

MAX_MATCHES = 128  # the latest places of a sequence's last ngram_min tokens a proposal looks at, per index
_END_BITS = 32  # an index entry packs (segment << _END_BITS) | end


def _entry(text: Seq[int], seg: int, end: int, k: int) -> tuple[int, int]:
    """The index's key for the k-gram of segment `seg` ending before `end` (its hash), and the entry (packed)."""
    return hash(tuple(text[end - k : end])), seg << _END_BITS | end


class SuffixIndex:
    """Token texts (segments, by an int id) and, for every `key_len`-token n-gram in them, where it ended, kept as
    texts grow. A dropped segment's entries go lazily (skipped, then compacted once they are half the index)."""

    def __init__(self, key_len: int):
        self.key_len = key_len
        self.segments: dict[int, list[int]] = {}
        self._ends: dict[int, int | list[int]] = {}  # hash of an n-gram -> its packed ends, oldest first
        self._indexed: dict[int, int] = {}  # segment -> n-grams ending at or before this position are in _ends
        self._entries = 0
        self._stale = 0  # entries of dropped segments
        self.num_tokens = 0  # in its segments

    def extend(self, seg: int, tokens: Seq[int], hold: int = 0) -> None:
        """Appends `tokens` to segment `seg` (a new one if unknown) and indexes its n-grams, all but those ending in
        its last `hold` tokens (a sequence's own text: its last n-gram must not match itself)."""
        text = self.segments.setdefault(seg, [])
        text += tokens
        self.num_tokens += len(tokens)
        k, done = self.key_len, self._indexed.get(seg, self.key_len - 1)
        for end in range(done + 1, len(text) - hold + 1):
            key, packed = _entry(text, seg, end, k)
            ends = self._ends.get(key)
            if ends is None:
                self._ends[key] = packed
            elif isinstance(ends, int):
                self._ends[key] = [ends, packed]
            else:
                ends.append(packed)
            self._entries += 1
        self._indexed[seg] = max(done, len(text) - hold)

    def truncate(self, seg: int, length: int) -> None:
        """Cuts segment `seg` to `length` tokens (an output cut back at a stop string); its entries past that go now,
        so that it may grow again."""
        text = self.segments[seg]
        if length >= len(text):
            return
        k, kept = self.key_len, max(length, self.key_len - 1)
        for end in range(kept + 1, self._indexed[seg] + 1):
            key, packed = _entry(text, seg, end, k)
            ends = self._ends[key]
            if isinstance(ends, int):
                del self._ends[key]
            else:
                ends.remove(packed)
                if len(ends) == 1:
                    self._ends[key] = ends[0]
            self._entries -= 1
        self._indexed[seg] = min(self._indexed[seg], kept)
        self.num_tokens -= len(text) - length
        del text[length:]

    def drop(self, seg: int) -> None:
        text = self.segments.pop(seg, None)
        if text is not None:
            self.num_tokens -= len(text)
            self._stale += max(0, self._indexed.pop(seg) - self.key_len + 1)
            self._compact_if_stale()

    def _compact_if_stale(self) -> None:
        if self._stale * 2 <= self._entries:
            return
        kept: dict[int, int | list[int]] = {}
        for key, ends in self._ends.items():
            live = [p for p in ([ends] if isinstance(ends, int) else ends) if self._live(p)]
            if live:
                kept[key] = live[0] if len(live) == 1 else live
        self._ends = kept
        self._entries = sum(1 if isinstance(e, int) else len(e) for e in kept.values())
        self._stale = 0

    def _live(self, packed: int) -> bool:
        return packed >> _END_BITS in self.segments

    def matches(self, pattern: Seq[int], max_len: int, skip: int = -1,
                limit: int = MAX_MATCHES) -> list[tuple[int, list[int], int, int]]:
        """(segment, its tokens, end, match length) for the latest `limit` places where the last `key_len` tokens of
        `pattern` end, newest first, outside segment `skip`: the match length is how many tokens before `end` equal
        the pattern's last ones (at most `max_len`)."""
        k = self.key_len
        if len(pattern) < k:
            return []
        ends = self._ends.get(hash(tuple(pattern[-k:])))
        if ends is None:
            return []
        out = []
        for packed in ([ends] if isinstance(ends, int) else reversed(ends)):
            seg, end = packed >> _END_BITS, packed & ((1 << _END_BITS) - 1)
            text = self.segments.get(seg)
            if seg == skip or text is None:
                continue
            longest, n = min(max_len, end, len(pattern)), 0
            while n < longest and text[end - 1 - n] == pattern[-1 - n]:
                n += 1
            if n >= k:  # (not an n-gram of equal hash)
                out.append((seg, text, end, n))
                if len(out) == limit:
                    break
        return out


def grow(rows: Seq[tuple[Seq[int], int]], budget: int, max_depth: int, min_prob: float,
         chain: bool = False) -> tuple[float, DraftTree]:
    """The draft from the continuations of `rows` ((text, end): a place whose text goes on at `end`): the likeliest
    nodes first, at most `budget` of them and `max_depth` deep, each with probability at least `min_prob`, and the
    sum of their probabilities. A node's probability is its parent's times the share of the parent's places that go
    on with its token (the root's: every row, those that end there too). `chain`: only each node's likeliest child
    (the likeliest path). Ties go to the token seen first (rows are newest first)."""
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    heap: list = []
    order = itertools.count()

    def offer(node: int, places, prob: float, depth: int) -> None:
        if depth >= max_depth:
            return
        groups: dict[int, list] = {}
        for text, end in places:
            if end + depth < len(text):
                groups.setdefault(text[end + depth], []).append((text, end))
        kids = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # (stable)
        for token, group in kids[:1] if chain else kids:
            heapq.heappush(heap, (-prob * len(group) / len(places), next(order), node, token, group, depth + 1))

    if rows:
        offer(0, rows, 1.0, 0)
    while heap and len(tokens) < budget:
        neg, _, parent, token, group, depth = heapq.heappop(heap)
        if -neg < min_prob:
            break  # every other one is at most as likely
        tokens.append(token)
        parents.append(parent)
        probs.append(-neg)
        offer(len(tokens), group, -neg, depth)
    return sum(probs), DraftTree.preorder(tokens, parents)  # (children in the order taken: likeliest first)


def best_draft(found: Seq[tuple[Seq[int], int, int]], budget: int, max_depth: int, min_prob: float,
               spec_factor: float, chain: bool = False) -> tuple[float, DraftTree]:
    """The likeliest draft over the match lengths of `found` ((text, end, match length)): for each length m that
    some place reaches, the places reaching at least m vote (`grow`) on a draft of at most m * spec_factor nodes; the
    highest sum of probabilities wins (ties: the longer match)."""
    best = (0.0, DraftTree.chain())
    for m in sorted({n for _, _, n in found}, reverse=True):
        rows = [(text, end) for text, end, n in found if n >= m]
        got = grow(rows, min(budget, max(1, int(m * spec_factor))), max_depth, min_prob, chain)
        if got[0] > best[0] + 1e-9:  # (sums that differ only by rounding are a tie)
            best = got
    return best


def reference_tree(texts: Seq[tuple[Seq[int], int]], pattern: Seq[int], key_len: int, max_len: int, budget: int,
                   max_depth: int, min_prob: float, spec_factor: float) -> tuple[float, dict]:
    """The slow reference of one index's proposal: every place in `texts` ((text, the last end a place may have: the
    sequence's own text, or a running request's, one before its end), every match length from `max_len` down to
    `key_len`, a count trie per length (count[path]: places matching m tokens back whose continuation starts with
    `path`). Returns the best sum of probabilities (as `best_draft` with trees) and, for the length that gave it,
    every node's probability (root-to-node token path -> probability), for checking the tree itself."""
    best, nodes = 0.0, {}
    for m in range(min(max_len, len(pattern)), key_len - 1, -1):
        places = [(t, end) for t, last in texts for end in range(m, last + 1)
                  if list(t[end - m : end]) == list(pattern[-m:])]
        if not places:
            continue
        count = collections.Counter()
        for text, end in places:
            for d in range(1, min(max_depth, len(text) - end) + 1):
                count[tuple(text[end : end + d])] += 1
        prob = {}
        for path in sorted(count, key=len):
            parent = prob[path[:-1]] if len(path) > 1 else 1.0
            prob[path] = parent * count[path] / (count[path[:-1]] if len(path) > 1 else len(places))
        take = sorted((p for p in prob.values() if p >= min_prob), reverse=True)
        total = sum(take[: min(budget, max(1, int(m * spec_factor)))])
        if total > best + 1e-9:
            best, nodes = total, prob
    return best, nodes


class SuffixCache:
    """The replica's index of its requests' outputs (`SuffixIndex` per namespace), kept up to date from the running
    sequences (`sync`, each step), and the proposals (`propose`)."""

    def __init__(self, key_len: int, max_depth: int, max_cached: int, spec_factor: float, min_prob: float,
                 trees: bool):
        self.key_len, self.max_depth, self.max_cached = key_len, max_depth, max_cached
        self.spec_factor, self.min_prob, self.trees = spec_factor, min_prob, trees
        self.indexes: dict[str | None, SuffixIndex] = {}  # namespace -> its outputs
        self._open: dict[int, tuple[Sequence, int]] = {}  # id(sequence) -> (it, its segment), while it runs or waits
        self._open_segs: set[int] = set()
        self._closed: collections.deque[tuple[SuffixIndex, int]] = collections.deque()  # finished, oldest first
        self._ids = itertools.count()

    @property
    def num_tokens(self) -> int:
        """Output tokens held, running and finished."""
        return sum(index.num_tokens for index in self.indexes.values())

    def sync(self, running: Seq[Sequence]) -> None:
        """Adds the running sequences' new output tokens (a finished one's, cut at a stop string, once more: it then
        joins the finished, the oldest beyond `max_cached` dropped)."""
        if not self.max_cached:
            return
        for seq in running:
            if id(seq) not in self._open:
                self._open[id(seq)] = (seq, next(self._ids))
                self._open_segs.add(self._open[id(seq)][1])
        for key, (seq, seg) in list(self._open.items()):
            index = self.indexes.setdefault(seq.namespace, SuffixIndex(self.key_len))
            text = index.segments.get(seg, ())
            known = seq.output_ids
            if known and known[-1] < 0:  # a placeholder (the step in flight) ends it
                known = known[: next(i for i, t in enumerate(known) if t < 0)]
            if len(known) < len(text):
                index.truncate(seg, len(known))
            elif len(known) > len(text) or seg not in index.segments:
                index.extend(seg, known[len(text) :])
            if seq.status is Status.FINISHED:
                del self._open[key]
                self._open_segs.discard(seg)
                self._closed.append((index, seg))
                while len(self._closed) > self.max_cached:
                    old, old_seg = self._closed.popleft()
                    old.drop(old_seg)

    def reset(self) -> None:
        """Forgets the finished outputs (the running ones' stay)."""
        while self._closed:
            index, seg = self._closed.popleft()
            index.drop(seg)

    def propose(self, seq: Sequence, budget: int, max_depth: int, chain: bool = False) -> DraftTree:
        """The draft for `seq`: at most `budget` nodes, `max_depth` deep, a chain if `chain` or not `trees`."""
        chain = chain or not self.trees
        own = seq.draft_index
        if own is None:
            own = seq.draft_index = SuffixIndex(self.key_len)
        text = own.segments.get(0, ())
        own.extend(0, seq.token_slice(len(text), seq.num_tokens), hold=1)
        pattern = own.segments[0][-self.max_depth :]
        args = (budget, max_depth, self.min_prob, self.spec_factor, chain)
        found = [(t, end, n) for _, t, end, n in own.matches(pattern, self.max_depth)]
        best = best_draft(found, *args)
        index = self.indexes.get(seq.namespace)
        if index is not None:
            seg = self._open.get(id(seq), (None, -1))[1]
            # (a running request's text that ends at the match has not said what comes next yet: no vote)
            found = [(t, end, n) for s, t, end, n in index.matches(pattern, self.max_depth, skip=seg)
                     if end < len(t) or s not in self._open_segs]
            theirs = best_draft(found, *args)
            if theirs[0] > best[0]:
                best = theirs
        return best[1]
