"""Suffix decoding (`speculative.method: suffix`, engine/suffix_decoding.py): the index and proposals against their slow
references on fresh random texts, and in the scheduler (the fake runner of test_scheduler.py) drafts from other
requests' outputs, finished or running, within a namespace only, outputs always plain decoding's."""
from __future__ import annotations

import random

import pytest

import fresh
from engine.config import ConfigKeyError, SpeculativeConfig
from engine.speculative import DraftTree
from engine.suffix_decoding import SuffixIndex, best_draft, grow, reference_tree
from test_scheduler import make, run_all, seq


def _random_case(rng: random.Random):
    vocab = rng.choice([2, 3, 5])
    texts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(1, 4))]
    own = [rng.randrange(vocab) for _ in range(rng.randrange(2, 40))]
    knobs = dict(key_len=rng.choice([1, 2, 3]), max_len=rng.choice([3, 6, 24]), budget=rng.choice([1, 4, 8, 32]),
                 max_depth=rng.choice([1, 3, 8]), min_prob=rng.choice([0.0, 0.1, 0.3]),
                 spec_factor=rng.choice([0.5, 1.0, 2.0]))
    return texts, own, knobs


def _tree_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    return [tuple(tree.tokens[n - 1] for n in tree.path(node)) for node in range(1, len(tree) + 1)]


@pytest.mark.parametrize("case", range(4))
def test_proposals_are_the_slow_references(case):
    """Each index (a sequence's own text, indexed as it grows, its last n-gram left out; other requests' texts) gives
    the best sum of probabilities the reference's explicit count tries give, over every match length; the tree holds
    exactly the likeliest nodes of that length's trie (none likelier left out, every one at least min_prob), each
    parent before its children and the likeliest child first."""
    rng = random.Random(fresh.seed())
    for _ in range(100):
        texts, own, k = _random_case(rng)
        others = SuffixIndex(k["key_len"])
        for i, text in enumerate(texts):
            cut = rng.randrange(len(text) + 1)  # texts grow in pieces
            others.extend(i, text[:cut])
            others.extend(i, text[cut:])
        mine = SuffixIndex(k["key_len"])
        cut = rng.randrange(len(own) + 1)
        mine.extend(0, own[:cut], hold=1)
        mine.extend(0, own[cut:], hold=1)
        pattern = own[-k["max_len"] :]
        for index, ref_texts in ((mine, [(own, len(own) - 1)]), (others, [(t, len(t)) for t in texts])):
            found = [(t, end, n) for _, t, end, n in index.matches(pattern, k["max_len"], limit=10**9)]
            score, tree = best_draft(found, k["budget"], k["max_depth"], k["min_prob"], k["spec_factor"])
            want, probs = reference_tree(ref_texts, pattern, **k)
            assert score == pytest.approx(want, abs=1e-9)
            paths = _tree_paths(tree)
            assert sum(probs[p] for p in paths) == pytest.approx(score, abs=1e-9)
            assert all(probs[p] >= k["min_prob"] for p in paths) and len(tree) <= k["budget"]
            left_out = [q for p, q in probs.items() if p not in paths and (len(p) == 1 or p[:-1] in paths)]
            assert not paths or not left_out or max(left_out) <= min(probs[p] for p in paths) + 1e-12
            for node, path in enumerate(paths, 1):
                siblings = [q for q in paths if len(q) == len(path) and q[:-1] == path[:-1]]
                if len(path) > 1:
                    assert tree.parents[node - 1] < node
                assert probs[siblings[0]] >= probs[path] - 1e-12  # the likeliest child comes first


def test_chains_follow_the_likeliest_child():
    """`chain`: from the root, the child most places go on with, while its probability reaches min_prob."""
    texts = [[7, 1, 2, 5], [7, 1, 2, 5, 6], [7, 1, 3], [7, 1, 2, 4]]
    rows = [(t, 1) for t in texts]  # all go on after "7"
    score, tree = grow(rows, budget=8, max_depth=8, min_prob=0.3, chain=True)
    assert tree == DraftTree.chain([1, 2, 5])  # 1 (4/4), 2 (3/4), 5 (2/4); then 6 (1/4) is under 0.3
    assert score == pytest.approx(1 + 0.75 + 0.5)
    score, tree = grow(rows, budget=8, max_depth=8, min_prob=0.2)
    assert sorted(_tree_paths(tree)) == [(1,), (1, 2), (1, 2, 4), (1, 2, 5), (1, 2, 5, 6), (1, 3)]
    assert tree.tokens[:3] == (1, 2, 5)  # the first branch is the chain


def test_index_drops_and_cuts_segments_and_compacts():
    """A dropped segment's places are never matched again, nor places past a segment cut back (a stop string), and
    the index compacts once half its entries are stale; the latest places come first, `limit` of them."""
    index = SuffixIndex(2)
    for seg in range(6):
        index.extend(seg, [1, 2, 3, seg + 10] * 3)
    assert {s for s, *_ in index.matches([9, 1, 2], 24)} == set(range(6))
    assert [(s, end) for s, _, end, _ in index.matches([9, 1, 2], 24, limit=4)] == [(5, 10), (5, 6), (5, 2), (4, 10)]
    for seg in range(4):
        index.drop(seg)
    assert {s for s, *_ in index.matches([9, 1, 2], 24)} == {4, 5}
    assert index._entries == sum(len(t) - 1 for t in index.segments.values())  # compacted
    index.truncate(5, 5)  # [1, 2, 3, 15, 1]
    assert [(s, end) for s, _, end, _ in index.matches([9, 1, 2], 24) if s == 5] == [(5, 2)]
    assert index.matches([3, 15, 1], 24)[0][:1] == (5,) and index.matches([3, 15, 1], 24)[0][2:] == (5, 3)
    assert index.num_tokens == 12 + 5 == sum(map(len, index.segments.values()))
    assert index._entries == 11 + 4
    index.extend(5, [2, 3])  # it grows again: each place once
    assert [(s, end) for s, _, end, _ in index.matches([9, 1, 2], 24) if s == 5] == [(5, 6), (5, 2)]


def test_cache_votes_only_with_what_came_next_and_drafts_as_long_as_the_match_earns():
    """SuffixCache.propose over hand-made requests: a running request's text that ends where the pattern does has not
    said what comes next (no vote), nor has the sequence's own last n-gram; a match of m tokens drafts at most
    m * suffix_spec_factor nodes."""
    from engine.request import SamplingParams, Sequence, Status
    from engine.suffix_decoding import SuffixCache

    def request(rid, prompt, output, status=Status.RUNNING):
        s = Sequence(rid, list(prompt), SamplingParams(max_tokens=100))
        s.output_ids, s.status = list(output), status
        return s

    def cache(factor=1.0, min_prob=0.6):
        return SuffixCache(key_len=2, max_depth=24, max_cached=10, spec_factor=factor, min_prob=min_prob, trees=True)

    done = request("done", [1], [7, 8, 40, 41, 42, 43, 44], Status.FINISHED)
    ahead = request("ahead", [2], [9, 9, 7, 8])  # running, at the same place: it has not written what follows
    mine = request("mine", [3, 3], [7, 8])
    c = cache()
    c.sync([done, ahead, mine])
    assert c.propose(mine, budget=8, max_depth=8).tokens == (40, 41)  # 2 tokens matched: 2 drafted, both sure
    c = cache(factor=2.0)
    c.sync([done, ahead, mine])
    assert c.propose(mine, budget=8, max_depth=8).tokens == (40, 41, 42, 43)
    assert c.propose(mine, budget=3, max_depth=2).tokens == (40, 41)
    # Its own text: "5 6 9 5 6" goes on after its first "5 6" with 9; its last "5 6" has nothing after it yet
    alone = request("alone", [5, 6, 9, 5], [6])
    assert cache().propose(alone, budget=8, max_depth=8).tokens == (9, 5)


def test_config_refuses_bad_suffix_settings():
    for bad, word in ((dict(suffix_max_depth=1, ngram_min=2), "suffix_max_depth"),
                      (dict(suffix_max_cached_requests=-1), "suffix_max_cached_requests"),
                      (dict(suffix_spec_factor=0.0), "suffix_spec_factor"), (dict(suffix_min_prob=1.0), "suffix_min_prob"),
                      (dict(num_tokens=33), "num_tokens"), (dict(ngram_branches=2), "ngram_branches")):
        with pytest.raises(ConfigKeyError, match=word):
            SpeculativeConfig(method="suffix", **bad)
    assert SpeculativeConfig(method="suffix", num_tokens=40, suffix_trees=False).draft_nodes == 40
    assert SpeculativeConfig(method="suffix", num_tokens=16).trees


def _scrambler(ids: tuple[int, ...]) -> int:
    """A fake model whose text never repeats itself within a request (a token determined by the last three), so a
    sequence's own tokens rarely predict it, but the same prompt always gets the same answer."""
    return hash(ids[-3:]) % 1000 + 3


def _steps(spec: SpeculativeConfig, batches: list[list], **kw) -> tuple[dict, list[int], object, object]:
    """Runs each batch of sequences to the end, one after the other, on one scheduler: outputs, steps per batch, the
    scheduler and its fake runner."""
    sched, runner = make(num_pages=512, spec=spec, model=_scrambler, max_model_len=512, **kw)
    outs, steps = {}, []
    for batch in batches:
        plans = []
        outs.update(run_all(sched, runner, batch, on_plan=plans.append))
        steps.append(len(plans))
    return outs, steps, sched, runner


def test_a_request_drafts_from_an_earlier_requests_output():
    """The second request of a prompt is drafted from the first one's output: the same tokens (plain decoding's) in
    about a fifth of the steps. Not with the cache off (suffix_max_cached_requests 0: its own tokens only), nor across
    namespaces (a cache_salt's or adapter's requests never draft from another's), nor after a reset."""
    prompt = [5, 6, 7, 8, 9]
    spec = SpeculativeConfig(method="suffix", num_tokens=8)
    batch = lambda name, ns=None: [seq(name, prompt, max_tokens=60, namespace=ns)]  # noqa: E731
    plain, plain_steps, *_ = _steps(SpeculativeConfig(), [batch("a"), batch("b")])
    outs, steps, sched, runner = _steps(spec, [batch("a"), batch("b")])
    assert outs == plain and plain_steps == [60, 60]
    assert steps[0] >= 55 and steps[1] <= 15, steps  # (the first step of each prefills)
    sched.suffix.sync([])  # (the last request's last tokens join at the next step)
    assert sched.suffix.num_tokens == 120
    _, steps, *_ = _steps(SpeculativeConfig(method="suffix", num_tokens=8, suffix_max_cached_requests=0),
                         [batch("a"), batch("b")])
    assert steps[1] >= 55
    outs, steps, *_ = _steps(spec, [batch("a", "salt-1"), batch("b", "salt-2"), batch("c", "salt-1")])
    assert outs["c"] == outs["b"] == plain["b"] and steps[1] >= 55 and steps[2] <= 15
    sched.suffix.reset()  # (LLMEngine.reset_prefix_cache) the finished answers are forgotten
    plans = []
    run_all(sched, runner, batch("c"), on_plan=plans.append)
    sched.suffix.sync([])
    assert len(plans) >= 55 and sched.suffix.num_tokens == 60


def test_running_requests_draft_from_each_other_and_the_oldest_outputs_go():
    """Requests running side by side see each other's tokens as they come (parallel samples of one prompt: the later
    ones are drafted from the first); only the last `suffix_max_cached_requests` finished outputs stay."""
    prompt = [5, 6, 7, 8, 9]
    spec = SpeculativeConfig(method="suffix", num_tokens=8, suffix_max_cached_requests=2)
    lead = seq("lead", prompt, max_tokens=80)
    late = [seq(f"late{i}", prompt, max_tokens=40) for i in range(3)]
    sched, runner = make(num_pages=512, spec=spec, model=_scrambler, max_model_len=512)
    sched.add(lead)
    for _ in range(45):  # the lead request is 45 tokens ahead
        plan = sched.schedule()
        sched.commit(plan, runner.run(plan))
    plans = []
    outs = run_all(sched, runner, late, on_plan=plans.append)
    assert len(set(map(tuple, outs.values()))) == 1 and lead.output_ids[:40] == outs["late0"]
    late_steps = sum(any(c.seq in late for c in p.chunks) for p in plans)
    assert late_steps <= 12, late_steps  # for 40 tokens each
    assert sched.stats.spec_accepted_tokens >= 90 and sched.stats.spec_accepted_tokens >= 0.9 * sched.stats.spec_draft_tokens
    sched.suffix.sync([])
    assert sorted(len(t) for t in sched.suffix.indexes[None].segments.values()) == [40, 80]  # two stay, late0's went
