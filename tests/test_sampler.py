"""The device sampler against numpy: filters keep exactly the allowed tokens, penalties, the drawn
distribution, and a row's draw does not depend on what the other rows of the batch ask for."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from engine import sampler
from engine.request import RequestError, SamplingParams
import fresh

V = 64


def _inputs(params: list[SamplingParams], seeds: list[int], steps: list[int], outputs=None, prompts=None, vocab=V):
    outputs = outputs or [[] for _ in params]
    prompts = prompts or [[] for _ in params]
    rows = [(p, seed, step, prompt, out) for p, seed, step, prompt, out in zip(params, seeds, steps, prompts, outputs)]
    return sampler.build_inputs(rows, len(rows), vocab, use_penalties=any(p.uses_penalties for p in params))


def _sample(logits, s_in, **flags):
    flags = {"use_penalties": False, "use_filters": False, "num_top_logprobs": 0, **flags}
    return [np.asarray(a) for a in sampler.sample(np.asarray(logits, np.float32), s_in, **flags)]


def _allowed(logits: np.ndarray, p: SamplingParams) -> set[int]:
    """numpy reference of top-k / top-p / min-p over one row of logits (already free of penalties)."""
    scaled = logits / p.temperature
    order = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = np.ones(len(order), bool)
    if p.top_k:
        keep[p.top_k:] = False
    if p.top_p < 1:  # 1: no nucleus (the mass before a far-tail token may round to 1)
        keep &= (np.cumsum(probs) - probs) < p.top_p
    keep &= probs >= p.min_p * probs[0]
    keep[0] = True
    return set(order[keep].tolist())


def test_a_rows_draw_does_not_depend_on_the_other_rows_filters():
    """Row 0 (plain temperature) draws the same token whether row 1 uses top-k (the filtered code path) or not."""
    rng = np.random.default_rng(0)
    plain, filtered = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3)
    for seed in range(40):
        logits = rng.normal(size=(2, V)) * 2
        alone = _sample(logits, _inputs([plain, plain], [seed, 7], [seed, 0]))[0][0]
        beside = _sample(logits, _inputs([plain, filtered], [seed, 7], [seed, 0]), use_filters=True)[0][0]
        assert alone == beside


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05),
])
def test_filters_keep_exactly_the_allowed_tokens(params):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, V)) * 3
    allowed = _allowed(logits[0], params)
    n = 512
    tokens = _sample(np.repeat(logits, n, 0), _inputs([params] * n, list(range(n)), [0] * n), use_filters=True)[0]
    drawn = set(tokens.tolist())
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 2)  # more than the argmax gets drawn when more is allowed


def test_filters_over_the_most_likely_tokens_equal_the_whole_sort():
    """The filter mask ranked over each row's few most likely tokens (when every filtered row's kept run ends among
    them) equals the mask over the whole sorted vocabulary, and the numpy reference; a batch where one row's kept run
    does not fit takes the whole sort; rows without filters keep everything. Fresh random rows each run."""
    rng = fresh.rng()
    vocab, candidates = 512, 16
    fitting = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3),
               SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_p=0.9, min_p=0.1),
               SamplingParams(temperature=1.0, min_p=0.3), SamplingParams(temperature=1.0, top_k=8, top_p=0.95)]
    anything = fitting + [SamplingParams(temperature=1.0, top_k=candidates), SamplingParams(temperature=1.0, top_k=40)]
    fitted = unfitted = 0
    for batch in range(12):  # even: peaked rows, short kept runs (they fit); odd: anything, rows flat to peaked
        pool = anything if batch % 2 else fitting
        params = [pool[j] for j in rng.integers(len(pool), size=6)]
        scale = rng.choice([0.5, 3.0, 8.0], size=(6, 1)) if batch % 2 else 8.0
        logits = rng.normal(size=(6, vocab)) * scale
        x, s_in = jnp.asarray(logits, jnp.float32), _inputs(params, [0] * 6, [0] * 6, vocab=vocab)
        few = np.asarray(sampler._filter_mask(x, s_in, candidates))
        np.testing.assert_array_equal(few, np.asarray(sampler._filter_mask(x, s_in, vocab)))
        allowed = [_allowed(row, p) if p.uses_filters else set(range(vocab)) for row, p in zip(logits, params)]
        assert [set(np.flatnonzero(m).tolist()) for m in few] == allowed
        fits = all(len(a) < candidates for a, p in zip(allowed, params) if p.uses_filters)
        fitted += fits
        unfitted += not fits
    assert fitted and unfitted  # both paths ran


def test_draws_follow_the_softmax_and_seeds_reproduce():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 8)).astype(np.float32)
    p = SamplingParams(temperature=0.7)
    n = 4096
    s_in = _inputs([p] * n, list(range(n)), [3] * n, vocab=8)
    tokens = _sample(np.repeat(logits, n, 0), s_in)[0]
    again = _sample(np.repeat(logits, n, 0), s_in)[0]
    probs = np.exp(logits[0] / 0.7 - (logits[0] / 0.7).max())
    probs /= probs.sum()
    freq = np.bincount(tokens, minlength=8) / n
    assert np.abs(freq - probs).max() < 0.03
    np.testing.assert_array_equal(tokens, again)


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_raw_models():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, V)) * 2
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=2), SamplingParams(temperature=0)]
    s_in = _inputs(params, [1, 2, 3], [0, 0, 0])
    for flags in ({"greedy_only": True}, {"use_filters": True}, {}):
        tokens, lps, top_ids, top_lps = _sample(logits, s_in, num_top_logprobs=4, **flags)
        np.testing.assert_array_equal(tokens, logits.argmax(-1))
        ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        np.testing.assert_allclose(lps, ref[np.arange(3), tokens], atol=1e-5)
        np.testing.assert_array_equal(top_ids, np.argsort(-ref, -1)[:, :4])
        np.testing.assert_allclose(top_lps, np.sort(ref, -1)[:, ::-1][:, :4], atol=1e-5)


def test_processed_logprobs_are_the_distribution_each_token_was_drawn_from():
    """logprobs_mode (vLLM's): the same draws in every mode; processed logprobs (and top logprobs) are the log-softmax
    of each row's logits after its bias, penalties, temperature and filters (a greedy row's at temperature 1, no
    filters), raw and processed logits the values before the log-softmax."""
    rng = fresh.rng()
    logits = (rng.standard_normal((5, V)) * 3).astype(np.float32)
    params = [SamplingParams(temperature=0.7, top_k=5, seed=1), SamplingParams(temperature=1.3, top_p=0.8),
              SamplingParams(temperature=0, logit_bias={3: 2.5}), SamplingParams(temperature=0.9, min_p=0.1,
                                                                                  frequency_penalty=0.5),
              SamplingParams(temperature=1.0, repetition_penalty=1.3, logit_bias={7: -4.0})]
    outputs = [[], [], [], [2, 2, 9], [4]]
    s_in = _inputs(params, [11, 12, 13, 14, 15], [0, 1, 2, 3, 4], outputs=outputs, prompts=[[], [], [], [], [1, 5]])
    flags = {"use_penalties": True, "use_filters": True, "num_top_logprobs": 3}
    runs = {mode: _sample(logits, s_in, logprobs_mode=mode, **flags) for mode in sampler.LOGPROBS_MODES}
    tokens = runs["raw_logprobs"][0]
    for mode, (t, lps, top_ids, top_lps) in runs.items():
        np.testing.assert_array_equal(t, tokens)
    for i, (p, row) in enumerate(zip(params, logits.astype(np.float64))):
        row = row.copy()
        for t, b in p.logit_bias:
            row[t] += b
        counts = np.bincount(outputs[i], minlength=V)
        row -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
        seen = np.isin(np.arange(V), outputs[i] + ([1, 5] if i == 4 else []))
        if p.repetition_penalty != 1:
            row = np.where(seen, np.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        if p.temperature > 0:
            allowed = _allowed(row, p)
            row = np.where(np.isin(np.arange(V), list(allowed)), row / p.temperature, -np.inf)
        processed = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        assert tokens[i] in np.flatnonzero(np.isfinite(processed))
        np.testing.assert_allclose(runs["processed_logprobs"][1][i], processed[tokens[i]], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(runs["processed_logprobs"][2][i], np.argsort(-processed, kind="stable")[:3])
        np.testing.assert_allclose(runs["processed_logits"][1][i], row[tokens[i]], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(runs["raw_logits"][1][i], logits[i, tokens[i]], rtol=1e-6)
        raw = logits[i] - np.log(np.exp(logits[i].astype(np.float64)).sum())
        np.testing.assert_allclose(runs["raw_logprobs"][1][i], raw[tokens[i]], atol=1e-5)
    greedy = _sample(logits[2:3], _inputs(params[2:3], [0], [0]), greedy_only=True, logprobs_mode="processed_logprobs")
    biased = logits[2].astype(np.float64) + 2.5 * (np.arange(V) == 3)
    np.testing.assert_allclose(greedy[1][0], biased[greedy[0][0]] - np.log(np.exp(biased).sum()), atol=1e-5)


def test_penalties_match_the_openai_and_hf_definitions():
    """presence/frequency (OpenAI: subtract per generated token) and repetition (HF/CTRL: divide positive logits,
    multiply negative ones, over prompt and output tokens), checked through greedy choices."""
    logits = np.zeros((1, V), np.float32)
    logits[0, :4] = [3.0, 2.9, 2.8, -0.1]
    # Token 0 generated twice: 3.0 - 0.05 - 2 x 0.1 = 2.75 < 2.9, so token 1 wins.
    p = SamplingParams(temperature=0, presence_penalty=0.05, frequency_penalty=0.1)
    out = _sample(logits, _inputs([p], [0], [2], outputs=[[0, 0]]), use_penalties=True)[0]
    assert out[0] == 1
    # Repetition 1.2: 3.0 / 1.2 = 2.5 < 2.8, so token 2 wins when 0 and 1 were in the prompt.
    p = SamplingParams(temperature=0, repetition_penalty=1.2)
    out = _sample(logits, _inputs([p], [0], [0], prompts=[[0, 1]]), use_penalties=True)[0]
    assert out[0] == 2
    # A negative logit is multiplied (dividing would raise it): -0.1 x 1.2 = -0.12 < -0.11.
    logits2 = np.full((1, V), -1.0, np.float32)
    logits2[0, 5:7] = [-0.1, -0.11]
    out = _sample(logits2, _inputs([p], [0], [0], prompts=[[5]]), use_penalties=True)[0]
    assert out[0] == 6


def test_logit_bias_and_min_tokens():
    """logit_bias adds to the named logits (-100 bans, +100 forces); before min_tokens no end token or stop id
    can be drawn, after it they can; rows without entries are untouched."""
    logits = np.zeros((3, V), np.float32)
    logits[:, 7] = 5.0  # the argmax everywhere
    params = [SamplingParams(temperature=0, logit_bias={7: -100, 9: 3.0}),
              SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=(11,)),
              SamplingParams(temperature=0)]
    out = _sample(logits, sampler.build_inputs([(p, 0, 0, [], []) for p in params], 3, V, False, eos_ids=frozenset({7})))[0]
    assert list(out) == [9, int(np.argmax(np.where(np.isin(np.arange(V), [7, 11]), -np.inf, logits[1]))), 7]
    after = sampler.build_inputs([(params[1], 0, 4, [], [1, 2, 3, 4])], 1, V, False, eos_ids=frozenset({7}))
    assert after.bias_ids is None and _sample(logits[1:2], after)[0][0] == 7
    plain = sampler.build_inputs([(params[2], 0, 0, [], [])], 1, V, False)
    assert plain.bias_ids is None
    with pytest.raises(RequestError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(RequestError, match="logit_bias must map"):
        SamplingParams(logit_bias={"x": 1})
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_sampler_bench_runs():
    """scripts/sampler_bench.py (docs/benchmarks.md) runs both paths on both kinds of rows and finds their masks
    equal (it asserts so)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent.parent / "scripts" / "sampler_bench.py"
    out = subprocess.run([sys.executable, str(script), "--vocab", "4096", "--repeats", "1"], check=True,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("peaked", "flat"))]
    assert [r[0] for r in rows] == ["peaked", "flat"] and all(r[-1].endswith("x") for r in rows), out
