"""Speculative decoding with an EAGLE-3 head (models/eagle3.py, engine/mtp_drafter.py): the model's captured layer
inputs are its layers' inputs; the head's layer is EAGLE-3's (a float64 numpy reference written from the format's
description); outputs are plain decoding's; each draft is the head's greedy guess computed from scratch; a head that
guesses right is accepted through prefix hits, copy-on-write, preemption and the host tier; both checkpoint formats
load; what does not fit is refused by name."""
from __future__ import annotations

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import ConfigKeyError, EngineConfig
from engine.request import SamplingParams
from models import eagle3, eagle3_train, llama
from models.config import ConfigError, LlamaConfig
from models.gguf_loader import CheckpointError
from dense_reference import pad_rows
from test_draft_model import (_run, _same, disk_tier_keeps_the_drafters_kv, drafts_are_from_scratch,  # noqa: F401
                              proposed, right_drafts_are_accepted)
from test_engine import SMALL, _prompts, tokenizer  # noqa: F401

EAGLE = {"speculative.method": "eagle3", "speculative.num_tokens": 3, "debug_checks": True}


def _target(tokenizer, num_layers: int, seed: int) -> tuple[LlamaConfig, dict]:
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16, max_position=1024)
    return cfg, llama.init_params(cfg, jax.random.key(seed), scale=0.5)


def _head_config(cfg: LlamaConfig, draft_vocab: int, aux: tuple[int, ...], **layer) -> eagle3.Eagle3Config:
    head = dataclasses.replace(cfg, num_layers=1, vocab_size=draft_vocab, attn_input_size=2 * cfg.hidden_size,
                               **layer)
    return eagle3.Eagle3Config(head, aux, norm_before_residual=False)


@pytest.fixture(scope="module")
def random_head(tokenizer):
    """A random 8-layer Llama over SmolLM2's vocabulary and a random EAGLE-3 head for it reading layers 2, 4 and 5
    (the default for 8 layers), its draft vocabulary 4,096 of the model's tokens."""
    cfg, params = _target(tokenizer, 8, seed=0)
    ecfg = _head_config(cfg, 4096, eagle3.default_aux_layers(8), num_kv_heads=4)
    head = eagle3.init_params(ecfg, jax.random.key(1), scale=0.5)
    rng = np.random.default_rng(0)
    vocab_ids = np.sort(rng.choice(tokenizer.vocab_size, 4096, replace=False))
    head["d2t"] = jnp.asarray(vocab_ids - np.arange(4096), jnp.int32)
    return (cfg, params, tokenizer), (ecfg, head)


@pytest.fixture(scope="module")
def bigram(tokenizer):
    """A one-layer model whose next token is a function of its last one and a head that computes the same function
    (scripts/bench.py `synthetic_eagle3`: its hidden state's norm zero, its attention carrying each position's own
    embedding through, then the model's MLP, final norm and LM head). Its guess after token t is the model's, so
    every greedy draft is accepted, and a draft that read the wrong K/V or rows would miss."""
    from scripts.bench import synthetic_eagle3

    cfg, params, head = synthetic_eagle3(*_target(tokenizer, 1, seed=2), "right")
    return (cfg, params, tokenizer), head


def _captured(params, cfg, ids, aux) -> jax.Array:
    """The model's captured rows [T, len(aux) x hidden] by `llama._decoder`'s capture, dense attention
    (`eagle3_train.target_rows`, on ids padded to 64 rows: causal, so earlier rows are unchanged)."""
    run = jax.jit(eagle3_train.target_rows, static_argnums=(1, 3))
    return run(params, cfg, pad_rows(jnp.asarray(ids, jnp.int32)), aux)[0][: len(ids)]


def _dense_drafts(model, head_model, ids: list[int], k: int) -> list[int]:
    """The head's k greedy guesses after `ids`, from scratch: the model's captured rows through fc, paired with the
    token after each, the head's layer over those pairs, then chained on its own output and guess."""
    cfg, params, _ = model
    ecfg, head = head_model
    hidden = list(eagle3.hidden_rows(head, _captured(params, cfg, ids, ecfg.aux_layers))[:-1])
    tokens = list(ids[1:])
    out = []
    for _ in range(k):
        n = len(tokens)
        rows = jax.jit(eagle3.forward_dense, static_argnums=2)(params, head, ecfg, pad_rows(jnp.asarray(tokens)),
                                                               pad_rows(jnp.stack(hidden)))
        last = rows[n - 1 : n]
        guess = int(eagle3.guesses(head, ecfg, last)[0])
        out.append(guess)
        hidden.append(last[0])
        tokens.append(guess)
    return out


def _dense_next(model, head_model, ids: list[int]):
    """-> next_tokens(path): the head's (log probabilities, tokens) over its draft vocabulary after `ids` and `path`,
    from scratch (`_dense_drafts` with the path's tokens in place of its guesses), for `draft_trees.reference_tree`."""
    cfg, params, _ = model
    ecfg, head = head_model
    captured = list(eagle3.hidden_rows(head, _captured(params, cfg, ids, ecfg.aux_layers))[:-1])
    run = jax.jit(eagle3.forward_dense, static_argnums=2)
    d2t = np.asarray(head["d2t"])

    def next_tokens(path):
        hidden, tokens, last = list(captured), list(ids[1:]), None
        for token in [None, *path]:  # (the rows after ids, then after each of the path's tokens)
            if token is not None:
                hidden.append(last[0])
                tokens.append(token)
            n = len(tokens)
            last = run(params, head, ecfg, pad_rows(jnp.asarray(tokens)), pad_rows(jnp.stack(hidden)))[n - 1 : n]
        logits = np.asarray(llama.compute_logits(head, ecfg.layer, last)[0], np.float64)
        logits -= logits.max()
        return logits - np.log(np.exp(logits).sum()), np.arange(len(logits)) + d2t

    return next_tokens


def test_captured_rows_are_the_layers_inputs(random_head):
    """Layer j's captured row is the decoder's output after its first j layers alone (0: the embedding), in the
    order asked, repeats included."""
    (cfg, params, _), _ = random_head
    ids = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 40))
    aux = (5, 0, 2, 5)
    got = np.asarray(_captured(params, cfg, ids, aux)).reshape(len(ids), len(aux), cfg.hidden_size)
    for n, j in enumerate(aux):
        if j == 0:
            want = llama.embed_tokens(params, jnp.asarray(ids))
        else:
            first = dataclasses.replace(cfg, num_layers=j)
            cut = {**params, "layers": {k: v[:j] for k, v in params["layers"].items()}}
            want = llama.decoder_dense(cut, first, jnp.asarray(ids, jnp.int32))
        want = np.asarray(want)  # (float32 sums in other orders: to 1e-4 of the rows' scale, which grows with depth)
        np.testing.assert_allclose(got[:, n], want, rtol=0, atol=1e-4 * np.abs(want).max())


def _numpy_head(head: dict, ecfg: eagle3.Eagle3Config, embeds: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """EAGLE-3's layer in float64 numpy, from its description (vLLM's `llama_eagle3`): attention over
    [input_layernorm(e), hidden_norm(h)] with RoPE, the residual starting from h, post_attention_layernorm, a SiLU
    MLP; rows before the final norm."""
    cfg = ecfg.layer
    w = {k: np.asarray(v, np.float64)[0] for k, v in head["layers"].items()}

    def norm(x, g):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + cfg.rms_norm_eps) * g

    def rope(x):  # [T, heads, D], rotate-half
        d = x.shape[-1]
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
        ang = np.arange(x.shape[0])[:, None] * inv[None]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    t, hd = embeds.shape[0], cfg.head_dim
    x = np.concatenate([norm(embeds, w["attn_norm"]), norm(hidden, np.asarray(head["hnorm"], np.float64))], -1)
    q = rope((x @ w["wq"]).reshape(t, cfg.num_heads, hd))
    k = rope((x @ w["wk"]).reshape(t, cfg.num_kv_heads, hd))
    v = (x @ w["wv"]).reshape(t, cfg.num_kv_heads, hd)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    o = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(t, -1) @ w["wo"]
    x = hidden + o
    m = norm(x, w["mlp_norm"])
    g = m @ w["w_gate"]
    return x + (g / (1 + np.exp(-g)) * (m @ w["w_up"])) @ w["w_down"]


def test_the_heads_layer_is_eagle3s(random_head):
    """`eagle3.forward_dense` (the engine's layer code) against the numpy reference on fresh random pairs."""
    (_, params, _), (ecfg, head) = random_head
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 4096, 24), jnp.int32)
    hidden = jnp.asarray(rng.normal(size=(24, ecfg.layer.hidden_size)), jnp.float32)
    got = eagle3.forward_dense(params, head, ecfg, tokens, hidden)
    embeds = np.asarray(llama.embed_tokens(params, tokens), np.float64)
    want = _numpy_head(head, ecfg, embeds, np.asarray(hidden, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())  # float32's sums


def test_a_head_that_guesses_right_is_always_accepted(bigram, tokenizer):
    right_drafts_are_accepted(EAGLE, *bigram, tokenizer, seed=31)


def test_drafts_are_the_heads_greedy_guesses(random_head, tokenizer, proposed):
    drafts_are_from_scratch(EAGLE, *random_head, _dense_drafts, tokenizer, proposed, seed=32)


def test_tree_drafts_are_the_heads_top_k_trees(bigram, tokenizer, proposed):
    """speculative.topk = 3 with the right-guessing head, requests sampling from their 3 likeliest tokens: the draws
    off the tree's first branch are kept (their K/V moved), and every tree is `draft_trees.reference_tree` of the
    head's rounds from scratch, those after such a step too (the head's next round reads the row of the node the
    draws led to); outputs are plain decoding's (seeded)."""
    from engine import draft_trees, speculative

    model, head = bigram
    prompts = _prompts(tokenizer, random.Random(35))[:16]
    params = [SamplingParams(temperature=1.0, top_k=3, seed=i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    config = EngineConfig().replace(**{**SMALL, **EAGLE, "speculative.topk": 3, "cache.num_pages": 16,
                                       "cache.host_num_pages": 48})
    plain, _ = _run(config.replace(**{"speculative.method": "none", "speculative.topk": 1}), model, None, prompts,
                    params)
    spec, stats = _run(config, model, head, prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["spec_branch_tokens"] > 0.2 * stats["spec_accepted_tokens"] > 0
    trees = [(tokens, t) for tokens, t in proposed if isinstance(t, speculative.DraftTree)]
    assert len(trees) > 30
    for tokens, drafted in random.Random(0).sample(trees, 10):
        want = draft_trees.reference_tree(_dense_next(model, head, tokens), 3, drafted.height, len(drafted))
        assert drafted == want, (tokens, drafted, want)


@pytest.mark.parametrize("which", ["bigram", "random_head"])
def test_every_sampling_mode_is_unchanged(which, request, tokenizer):
    """Every sampling mode (greedy, seeded sampling with filters, logprobs, stops inside accepted runs, min_tokens,
    penalties counting the drafts) with a pool small enough to preempt: plain decoding's outputs, with the
    right-guessing head's drafts both accepted and rejected and with a random head's."""
    from test_engine import _repetitive_params

    model, head = request.getfixturevalue(which)
    prompts = _prompts(tokenizer, random.Random(33))[:22]
    params = _repetitive_params(random.Random(34), tokenizer, len(prompts))
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), model, None, prompts, params)
    spec, stats = _run(EngineConfig().replace(**{**SMALL, **EAGLE, "cache.num_pages": 16}), model, head, prompts,
                       params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["spec_draft_tokens"] > 0
    if which == "bigram":
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


@pytest.mark.parametrize("topk", [1, 3])
def test_pallas_interpret_and_warmup(bigram, topk):
    """On the Pallas backend every draft of the right-guessing head is accepted, with xla's outputs (a tree's first
    branch: its rounds' masks in the decode kernel); warmup compiles the head's extend of every token bucket and its
    rounds of every row bucket, and serving compiles nothing more."""
    from engine.llm import LLM

    model, head = bigram
    prompts = [([100 + i, 7, 8, 9, 10 + i], None) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 3
    config = EngineConfig().replace(**{**SMALL, **EAGLE, "cache.num_pages": 32, "scheduler.max_running": 4,
                                       "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32],
                                       "speculative.topk": topk})
    plain, _ = _run(config.replace(**{"speculative.method": "none", "speculative.topk": 1}), model, None, prompts,
                    params)
    spec, stats = _run(config.replace(**{"attention.backend": "pallas_interpret"}), model, head, prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    if topk == 1:
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    else:  # the first branch kept each step
        assert stats["spec_branch_tokens"] == 0 < stats["spec_accepted_tokens"]
    llm = LLM(config.replace(**{"warmup": True}), progress=False, model=model, draft=head)
    runner = llm.engine.runner
    compiled = runner._mtp_extend._cache_size(), runner._mtp_propose._cache_size()
    assert compiled == (len(runner.token_buckets), len(runner.draft_buckets))
    llm.generate([p for p, _ in prompts], params[0])
    assert (runner._mtp_extend._cache_size(), runner._mtp_propose._cache_size()) == compiled


def test_tensor_parallel_splits_the_head_as_the_model(bigram, random_head, tokenizer):
    """The model and the head split over 2 devices, the head's K/V by head as the model's: plain decoding's tokens,
    every draft of the right-guessing head accepted; its trees too (speculative.topk)."""
    from test_draft_model import split_model_whole_drafter

    prompts = _prompts(tokenizer, random.Random(35))[:12]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 16})
    for (model, head), topk in ((bigram, 1), (random_head, 1), (bigram, 2)):
        plain, _ = _run(base, model, None, prompts, params)
        stats = split_model_whole_drafter(base.replace(**{**EAGLE, "parallel.tensor": 2, "speculative.topk": topk}),
                                          model, head, prompts, params, plain, drafter_split=True)
        if model is bigram[0] and topk == 1:
            assert stats["spec_accepted_tokens"] >= 0.99 * stats["spec_draft_tokens"]
        elif model is bigram[0]:  # most of a tree's first branch (the greedy path may be outscored and left out)
            assert stats["spec_accepted_tokens"] >= 0.75 * stats["spec_draft_tokens"] / topk


def test_disk_tier_keeps_the_heads_kv(bigram, tokenizer, tmp_path):
    disk_tier_keeps_the_drafters_kv(EAGLE, *bigram, tokenizer, tmp_path, seed=36)


def test_sleep_keeps_the_head(bigram):
    from test_draft_model import sleep_keeps_the_drafter

    sleep_keeps_the_drafter(EAGLE, *bigram)


# ------------------------------------------------------------------------------------------------- checkpoints
LAYER_HF = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
            "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
            "w_down": "mlp.down_proj.weight"}


def _write_head(path, cfg: LlamaConfig, ecfg: eagle3.Eagle3Config, head: dict, fmt: str, name_aux: bool,
                embed: np.ndarray | None = None, dtype=np.float32) -> None:
    """The head as a checkpoint of format `fmt`: "eagle3" (EAGLE-3's own: `midlayer.`, a Llama config.json with
    draft_vocab_size and eagle_config) or "speculators" (`layers.0.`, transformer_layer_config); torch orientation.
    `name_aux`: the config names the captured layers (else the default is meant)."""
    from safetensors.numpy import save_file

    layer = ecfg.layer
    llama_config = {"model_type": "llama", "hidden_size": layer.hidden_size, "intermediate_size": layer.intermediate_size,
                    "num_attention_heads": layer.num_heads, "num_key_value_heads": layer.num_kv_heads,
                    "head_dim": layer.head_dim, "rms_norm_eps": layer.rms_norm_eps, "rope_theta": layer.rope_theta,
                    "vocab_size": cfg.vocab_size, "max_position_embeddings": 2048, "hidden_act": "silu",
                    "num_hidden_layers": 1}
    aux = {"eagle_aux_hidden_state_layer_ids": list(ecfg.aux_layers)} if name_aux else {}
    if fmt == "eagle3":
        config = {**llama_config, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": layer.vocab_size,
                  "target_hidden_size": cfg.hidden_size, "eagle_config": aux}
        prefix = "midlayer."
    else:
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                  "transformer_layer_config": llama_config, "draft_vocab_size": layer.vocab_size,
                  "norm_before_residual": ecfg.norm_before_residual, **aux}
        prefix = "layers.0."
    w = {k: np.asarray(v) for k, v in head["layers"].items()}
    tensors = {prefix + n: (w[k][0].T if w[k].ndim == 3 else w[k][0]) for k, n in LAYER_HF.items()}
    tensors |= {prefix + "hidden_norm.weight": np.asarray(head["hnorm"]), "fc.weight": np.asarray(head["fc"]).T,
                "norm.weight": np.asarray(head["final_norm"]), "lm_head.weight": np.asarray(head["lm_head"]).T}
    tensors = {k: np.ascontiguousarray(v, dtype) for k, v in tensors.items()}
    tensors["d2t"] = np.asarray(head["d2t"], np.int64)
    tensors["t2d"] = np.zeros(cfg.vocab_size, bool)
    if embed is not None:
        tensors["embed_tokens.weight"] = np.asarray(embed, dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoints_load_in_both_formats(random_head, tokenizer, tmp_path, proposed):
    """EAGLE-3's own format (layers named, float16, an embedding of its own) and speculators' (the default layers,
    float32) read back as written; the engine given the directory drafts the loaded head's from-scratch guesses, with
    plain decoding's outputs."""
    model, (ecfg, head) = random_head
    cfg = model[0]
    rng = np.random.default_rng(3)
    own_embed = (rng.normal(size=(cfg.vocab_size, cfg.hidden_size)) * 0.5).astype(np.float32)
    named = dataclasses.replace(ecfg, aux_layers=(1, 3, 6))
    _write_head(tmp_path / "eagle3", cfg, named, head, "eagle3", name_aux=True, embed=own_embed, dtype=np.float16)
    _write_head(tmp_path / "speculators", cfg, ecfg, head, "speculators", name_aux=False)
    loaded = {fmt: eagle3.load_eagle3(str(tmp_path / fmt), cfg) for fmt in ("eagle3", "speculators")}
    got_cfg, got = loaded["eagle3"]
    assert got_cfg == named
    np.testing.assert_allclose(got["embed"], own_embed, rtol=1e-3, atol=1e-3)
    for key in ("wq", "wo", "w_down", "attn_norm"):
        np.testing.assert_allclose(got["layers"][key], head["layers"][key], rtol=1e-3, atol=1e-3)
    got_cfg, got = loaded["speculators"]
    assert got_cfg == ecfg and jax.tree.structure(got) == jax.tree.structure(head)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(head)):
        np.testing.assert_array_equal(a, b)

    prompts = _prompts(tokenizer, random.Random(37))[:10]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), model, None, prompts, params)
    for fmt, head_model in loaded.items():
        proposed.clear()
        config = EngineConfig().replace(**{**SMALL, **EAGLE, "cache.num_pages": 64,
                                           "speculative.model": str(tmp_path / fmt)})
        spec, stats = _run(config, model, None, prompts, params)
        for a, b in zip(plain, spec):
            _same(a, b)
        assert stats["spec_draft_tokens"] > 0
        for tokens, drafted in random.Random(1).sample(proposed, 8):
            assert _dense_drafts(model, head_model, tokens, len(drafted)) == drafted


def test_refusals(random_head, tokenizer, tmp_path):
    """eagle3 without a head, a GGUF file as the head, a head for another width, captured layers the model does not
    have, an EAGLE-1/2 head, weights as a torch pickle, an fc that reads another number of them, a missing tensor, and
    a d2t outside the vocabulary are refused by name."""
    from engine.llm import LLM
    from safetensors.numpy import load_file, save_file
    from test_engine import SMOLLM2

    model, (ecfg, head) = random_head
    cfg = model[0]
    base = EngineConfig().replace(**{**SMALL, **EAGLE, "cache.num_pages": 32})
    with pytest.raises(ConfigKeyError, match="needs speculative.model"):
        LLM(base, progress=False, model=model)
    with pytest.raises(CheckpointError, match="read from an HF checkpoint directory"):
        eagle3.load_eagle3(SMOLLM2, cfg)
    _write_head(tmp_path / "ok", cfg, ecfg, head, "eagle3", name_aux=True)
    raw = json.loads((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ConfigError, match="reads hidden states of size 96"):
        eagle3.eagle3_config({**raw, "target_hidden_size": 96}, cfg)
    with pytest.raises(ConfigError, match="layer 8 is not one of the model's 8"):
        eagle3.eagle3_config({**raw, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 4, 8]}}, cfg)
    with pytest.raises(ConfigError, match="EAGLE-1/2 style head"):
        eagle3.eagle3_config({**raw, "eagle_config": {"use_aux_hidden_state": False}}, cfg)

    def broken(name, edit_config=None, edit_tensors=None):
        d = tmp_path / name
        _write_head(d, cfg, ecfg, head, "eagle3", name_aux=True)
        if edit_config:
            (d / "config.json").write_text(json.dumps(edit_config(json.loads((d / "config.json").read_text()))))
        if edit_tensors:
            tensors = load_file(str(d / "model.safetensors"))
            save_file(edit_tensors(tensors), str(d / "model.safetensors"))
        return str(d)

    pickled = broken("pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="write them once as safetensors"):
        eagle3.load_eagle3(pickled, cfg)
    four = broken("four", edit_config=lambda c: {**c, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3, 4]}})
    with pytest.raises(CheckpointError, match="fc reads one hidden state per"):
        eagle3.load_eagle3(four, cfg)
    no_head = broken("no_head", edit_tensors=lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is not in the checkpoint"):
        eagle3.load_eagle3(no_head, cfg)
    far = broken("far", edit_tensors=lambda t: {**t, "d2t": t["d2t"] + cfg.vocab_size})
    with pytest.raises(CheckpointError, match="d2t maps draft ids outside the model's vocabulary"):
        eagle3.load_eagle3(far, cfg)


# ------------------------------------------------------------------------------------------------- training
def test_training_rounds_are_drafting_rounds(random_head):
    """Round r of the training-time test at row i (`eagle3_train.round_outputs`) is what drafting from position i
    computes in its r-th round: the head from scratch over the pairs of positions 0..i, then its own outputs paired
    with the sequence's next tokens (`eagle3.forward_dense`'s last row)."""
    (cfg, params, _), (ecfg, head) = random_head
    t = 24
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, t), jnp.int32)
    aux, _ = eagle3_train.target_rows(params, cfg, tokens, ecfg.aux_layers)
    outs = eagle3_train.round_outputs(head, params, ecfg, aux, tokens, 3)
    hidden = eagle3.hidden_rows(head, aux)
    for i in (0, 7, 19):
        rows, toks = list(hidden[: i + 1]), list(tokens[1 : i + 2])
        for r in range(1, 4):
            want = eagle3.forward_dense(params, head, ecfg, jnp.asarray(toks), jnp.stack(rows))[-1]
            np.testing.assert_allclose(outs[r - 1][i], want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
            rows.append(want)
            toks.append(tokens[i + r + 1])


def test_a_trained_head_drafts_the_model(tokenizer, tmp_path):
    """scripts/train_eagle3.py's training on a model whose next token is a function of its last (learnable from a few
    dozen answers): the held-out guesses are mostly the model's choices (a head before training: almost never), the
    head written in EAGLE-3's format loads, and the engine accepts most of its drafts, with plain decoding's
    outputs."""
    from engine.llm import LLM
    from scripts.train_eagle3 import save_head, train_head

    cfg, params = _target(tokenizer, 4, seed=5)
    params["layers"]["wo"] = jnp.zeros_like(params["layers"]["wo"])
    model = (cfg, params, tokenizer)
    llm = LLM(EngineConfig().replace(**{**SMALL, "cache.num_pages": 128}), progress=False, model=model)
    rng = random.Random(6)
    prompts = [[rng.randrange(1000, 20000) for _ in range(8)] for _ in range(48)]
    kwargs = dict(max_tokens=40, seq_len=48, draft_vocab=512, batch=8, lr=3e-3, eval_fraction=0.25, progress=False)
    _, _, untrained = train_head(llm, prompts, steps=0, **kwargs)
    ecfg, head, accuracy = train_head(llm, prompts, steps=150, **kwargs)
    assert untrained[0] < 0.1 and accuracy[0] > 0.5 and accuracy[2] > 0.4, (untrained, accuracy)
    save_head(str(tmp_path / "head"), cfg, ecfg, head)
    loaded = eagle3.load_eagle3(str(tmp_path / "head"), cfg)[0]  # (its context: the model's, here the engine's)
    assert loaded == dataclasses.replace(ecfg, layer=dataclasses.replace(ecfg.layer, max_position=cfg.max_position))
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = LLM(EngineConfig().replace(**{**SMALL, **EAGLE, "cache.num_pages": 128,
                                         "speculative.model": str(tmp_path / "head")}), progress=False, model=model)
    assert [o.token_ids for o in spec.generate(prompts[:16], greedy)] == \
        [o.token_ids for o in llm.generate(prompts[:16], greedy)]
    stats = spec.engine.stats()
    assert stats["spec_accepted_tokens"] > 0.5 * stats["spec_draft_tokens"] > 0
