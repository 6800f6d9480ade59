"""Draft tokens for speculative decoding by n-gram lookup, and their verification.

Proposal (`NgramIndex`, with `propose_ngram` its reference): the sequence's last n tokens (n from
`ngram_max` down to `ngram_min`) are looked up earlier in the same sequence (prompt and output); the
tokens that followed their latest occurrence are the draft. No draft model, no extra weights: it pays where the output repeats text it
has seen (quoting, extraction, editing, code, long chat histories).

Verification (`accepted_path`): the step feeds [last token, d_1 .. d_k] and samples a token t_j at each of
the k + 1 positions exactly as plain decoding would sample the token at that output index (same
logits, same per-request key for that index). Draft d_j is kept while it equals t_{j-1}; the first
mismatch ends the run and t_j there is the correction. Because a draft here is a single token, not a
distribution, this exact-match test accepts d with probability p(d), the same as rejection sampling,
and every emitted token is the one plain decoding would have emitted: speculation changes how many
tokens a step yields, never which tokens (greedy or seeded sampling).

Draft trees (`NgramIndex.propose_tree`, with `propose_ngram_tree` its reference; `speculative.ngram_branches` > 1):
the continuations after several earlier occurrences, one per distinct next token, merged where they share a
prefix. The step verifies every node at once, each attending only to its ancestors (an attention mask per row,
`tree_masks`), and `accepted_path` walks down from the root while some child holds the token sampled at its
parent: the same exact-match rule along one root-to-leaf path, so outputs are still plain decoding's.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

import numpy as np

# Most draft nodes of one tree: a row's mask (`tree_masks`) has one bit per position it may skip before it
# (SpeculativeConfig.draft_nodes bounds the head rows with it).
MAX_TREE_NODES = 32
# The methods whose drafts a model computes on the device before the step, into slots the scheduler reserves
DRAFTERS = ("draft_model", "mtp", "eagle3")


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """Draft tokens as a tree over the sequence's last token (node 0). Node j + 1 holds tokens[j]; its parent is node
    parents[j] (< j + 1). Nodes are in depth-first preorder with each node's first child first, so the first branch
    (the one a chain proposal would make) is nodes 1, 2, .. in a row, and every ancestor comes before its
    descendants. A chain of k tokens: parents (0, 1, .., k - 1)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    @staticmethod
    def chain(tokens: Seq[int] = ()) -> "DraftTree":
        return DraftTree(tuple(tokens), tuple(range(len(tokens))))

    @staticmethod
    def slots(levels: int, nodes: int) -> "DraftTree":
        """Slots a drafter fills before the step (engine.draft_trees): `nodes` tokens, `levels` deep at most (its
        `height`); their tokens are placeholders."""
        return DraftTree((0,) * nodes, tuple(range(levels)) + (0,) * (nodes - levels))

    @staticmethod
    def preorder(tokens: Seq[int], parents: Seq[int]) -> "DraftTree":
        """Nodes numbered 1.. in the order they were taken (node j + 1 holds tokens[j] and hangs from parents[j], 0 the
        root, a parent taken before its children), renumbered depth-first with each node's children in the order
        taken."""
        kids: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
        for node, parent in enumerate(parents, 1):
            kids[parent].append(node)
        order, stack = [], kids[0][::-1]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(kids[node]))
        new = {old: i + 1 for i, old in enumerate(order)}
        new[0] = 0
        return DraftTree(tuple(tokens[n - 1] for n in order), tuple(new[parents[n - 1]] for n in order))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == j for j, p in enumerate(self.parents))

    @property
    def height(self) -> int:
        """The deepest node's depth (0 for an empty tree)."""
        return max(map(self.depth, range(len(self.tokens) + 1)))

    def depth(self, node: int) -> int:
        """Edges from the root to `node` (0 for the root)."""
        d = 0
        while node:
            node, d = self.parents[node - 1], d + 1
        return d

    def path(self, node: int) -> list[int]:
        """The nodes from depth 1 down to `node`, inclusive ([] for the root)."""
        out = []
        while node:
            out.append(node)
            node = self.parents[node - 1]
        return out[::-1]

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` that holds `token`, if any."""
        return next((j + 1 for j, (t, p) in enumerate(zip(self.tokens, self.parents)) if p == node and t == token),
                    None)

    def leaves(self) -> list[int]:
        """The nodes no other node hangs from, in order (a chain's last; none for an empty tree)."""
        return sorted(set(range(1, len(self.tokens) + 1)) - set(self.parents))

    def branches(self) -> list[list[int]]:
        """Each root-to-leaf path's tokens, in leaf order (`build_tree` of them is this tree)."""
        return [[self.tokens[n - 1] for n in self.path(leaf)] for leaf in self.leaves()]

    def masks(self) -> list[int]:
        """Each node's attention mask over the nodes before it: bit b of node i's set when node i - 1 - b is not one
        of its ancestors (int32 values, node 0 first; 0 for a chain)."""
        out = [0]
        for i in range(1, len(self.tokens) + 1):
            ancestors = set(self.path(i)[:-1])
            bits = sum(1 << (i - 1 - j) for j in range(1, i) if j not in ancestors)
            out.append(bits - (1 << 32) if bits >= 1 << 31 else bits)
        return out


def accepted_path(tree: DraftTree, sampled: Seq[int]) -> list[int]:
    """The draft nodes a verification step keeps: from the root, the child holding the token sampled at its parent
    (`sampled[n]`: the token sampled after node n), while there is one. A chain keeps its drafts while each equals
    the token sampled before it: the first mismatch ends the run, and the token sampled there corrects it."""
    path, node = [], 0
    while True:
        child = tree.child(node, sampled[node])
        if child is None:
            return path
        path.append(child)
        node = child


def build_tree(branches: Seq[Seq[int]], max_nodes: int) -> DraftTree:
    """The trie of `branches` (first one first), as a DraftTree of at most `max_nodes` nodes: a branch that no longer
    fits is cut where the budget ends."""
    children: list[dict[int, int]] = [{}]  # node -> {token: child}, in insertion order
    tokens: list[int] = []
    parents: list[int] = []
    for branch in branches:
        node = 0
        for t in branch:
            child = children[node].get(t)
            if child is None:
                if len(tokens) == max_nodes:
                    break
                tokens.append(t)
                parents.append(node)
                children.append({})
                child = children[node][t] = len(tokens)
            node = child
    return DraftTree.preorder(tokens, parents)  # (children in insertion order: the first branch stays nodes 1, 2, ..)


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


def propose_ngram_tree(tokens: Seq[int], k: int, ngram_min: int, ngram_max: int, branches: int,
                       max_nodes: int) -> DraftTree:
    """The reference tree proposal (numpy, full scans): for each suffix n-gram of `tokens`, longest first, its earlier
    occurrences latest first, one per distinct next token, at most `branches` of them per n-gram; each gives the k
    tokens after it (`_copy`). The first `branches` such continuations form the tree (`build_tree`), whose first
    branch is therefore `propose_ngram`'s chain."""
    ids = np.asarray(tokens, np.int64)
    size = len(ids)
    found: list[list[int]] = []
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[size - n :]).all(axis=1))[::-1]  # latest first
        seen: set[int] = set()
        for start in (int(h) + n for h in hits):
            if int(ids[start]) in seen or len(seen) == branches:
                continue
            seen.add(int(ids[start]))
            found.append(_copy(ids.tolist(), start, k))
    return build_tree(found[:branches], max_nodes)


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
    `propose_ngram`. With `branches` > 1 it also keeps, per n-gram, where it last ended before each of up to
    `branches` distinct next tokens (the most recent ones), for `propose_tree` (same trees as `propose_ngram_tree`)."""

    def __init__(self, ngram_min: int, ngram_max: int, branches: int = 1):
        self.ngram_min, self.ngram_max, self.branches = ngram_min, ngram_max, branches
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> the position just after its latest occurrence
        # n-gram -> {next token: the position just after its latest occurrence before it}, least recent first
        self._alts: dict[tuple[int, ...], dict[int, int]] = {}
        self._indexed = 0  # n-grams ending before this position are in _last

    def _index(self, tokens: Seq[int]) -> None:
        """Indexes the n-grams that end before the last token (the suffix itself must not match itself)."""
        size = len(tokens)
        for end in range(self._indexed + 1, size):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                gram = tuple(tokens[end - n : end])
                self._last[gram] = end
                if self.branches > 1:
                    alts = self._alts.setdefault(gram, {})
                    alts.pop(tokens[end], None)
                    alts[tokens[end]] = end
                    if len(alts) > self.branches:
                        del alts[next(iter(alts))]
        self._indexed = max(self._indexed, size - 1)

    def propose(self, tokens: Seq[int], k: int) -> list[int]:
        self._index(tokens)
        size = len(tokens)
        for n in range(min(self.ngram_max, size - 1), self.ngram_min - 1, -1):
            start = self._last.get(tuple(tokens[size - n :]))
            if start is not None:
                return _copy(tokens, start, k)
        return []

    def propose_tree(self, tokens: Seq[int], k: int, max_nodes: int) -> DraftTree:
        """Up to `branches` continuations of k tokens, from the longest matching suffix n-gram down, merged into a
        tree of at most `max_nodes` nodes (`propose_ngram_tree`)."""
        self._index(tokens)
        size = len(tokens)
        found: list[list[int]] = []
        for n in range(min(self.ngram_max, size - 1), self.ngram_min - 1, -1):
            alts = self._alts.get(tuple(tokens[size - n :]), {})
            found += [_copy(tokens, start, k) for start in reversed(alts.values())]
            if len(found) >= self.branches:
                break
        return build_tree(found[: self.branches], max_nodes)


MAX_PAUSE = 16  # steps a sequence whose drafts keep missing waits at most before drafting again


def pause_after(misses: int) -> int:
    """Steps to skip drafting after `misses` verifications in a row accepted nothing: none after one, then 2, 4, 8,
    16. A wrong draft costs its verification positions; text that stopped repeating stops paying for them."""
    return 0 if misses < 2 else min(MAX_PAUSE, 1 << (misses - 1))
