"""Speculative decoding with a checkpoint's multi-token-prediction layer (models/mtp.py, engine/mtp_drafter.py):
outputs are plain decoding's; each draft is the layer's greedy guess computed from scratch by a dense reference; a
layer that guesses right is accepted through prefix hits, copy-on-write, preemption and the host tier; the loaders
read the layer of GLM-4.5, DeepSeek-V3 and Qwen3.5 checkpoints."""
from __future__ import annotations

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import ConfigKeyError, EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams, StructuredOutput
from models import llama, mtp
from models.config import LlamaConfig
from dense_reference import pad_rows
import fresh
from test_draft_model import (_run, _same, disk_tier_keeps_the_drafters_kv, drafts_are_from_scratch,  # noqa: F401
                              proposed, right_drafts_are_accepted, sleep_keeps_the_drafter,
                              split_model_whole_drafter)
from test_engine import SMALL, _prompts, _repetitive_params, tokenizer  # noqa: F401

MTP = {"speculative.method": "mtp", "speculative.num_tokens": 3, "debug_checks": True}


@pytest.fixture(scope="module")
def glm_model(tokenizer):
    """A random GLM-4.5-style model (dense here) over SmolLM2's vocabulary, and a random MTP layer for it."""
    cfg = LlamaConfig(architecture="glm4_moe", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    mcfg = mtp.mtp_config(cfg)
    return (cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tokenizer), \
        (mcfg, mtp.init_params(mcfg, jax.random.key(1), scale=0.5))


@pytest.fixture(scope="module")
def bigram(tokenizer):
    """A model whose attention adds nothing (wo = 0: each next token a function of the last one alone) and an MTP layer
    that is its copy reading the embedding alone (eh_proj = [I; 0], embedding rows of RMS 1): the layer's guess after
    token t is the model's, so every greedy draft is accepted, whichever K/V and rows the drafter reads wrongly
    would show as misses."""
    cfg = LlamaConfig(architecture="glm4_moe", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=1, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    params = llama.init_params(cfg, jax.random.key(2), scale=0.5)
    embed = params["embed"]
    params["embed"] = embed / jnp.sqrt(jnp.mean(embed**2, axis=-1, keepdims=True))
    params["layers"]["wo"] = jnp.zeros_like(params["layers"]["wo"])
    mcfg = mtp.mtp_config(cfg)
    h = cfg.hidden_size
    layer = {"layers": params["layers"], "final_norm": params["final_norm"], "enorm": jnp.ones(h), "hnorm": jnp.ones(h),
             "eh_proj": jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))])}
    return (cfg, params, tokenizer), (mcfg, layer)


def _dense_drafts(model, layer, ids: list[int], k: int) -> list[int]:
    """The layer's k greedy guesses after `ids`, from scratch: the model's hidden rows (after its final norm) paired
    with the token after each, the layer over those pairs, then chained on its own output and guess. (Both references
    are causal and run on inputs padded to 64 rows: `dense_reference.pad_rows`.)"""
    cfg, params, _ = model
    mcfg, mparams = layer
    x = jax.jit(llama.decoder_dense, static_argnums=1)(params, cfg, pad_rows(jnp.asarray(ids, jnp.int32)))[: len(ids)]
    hidden = list(llama.final_hidden(params, cfg, x)[:-1])
    tokens = list(ids[1:])
    out = []
    for _ in range(k):
        n = len(tokens)
        rows = jax.jit(mtp.forward_dense, static_argnums=2)(params, mparams, mcfg, pad_rows(jnp.asarray(tokens)),
                                                            pad_rows(jnp.stack(hidden)))
        last = rows[n - 1 : n]
        guess = int(mtp.logits(params, mparams, mcfg, last)[0].argmax())
        out.append(guess)
        hidden.append(mtp.chained(params, mparams, mcfg, last)[0])
        tokens.append(guess)
    return out


def test_a_layer_that_guesses_right_is_always_accepted(bigram, tokenizer):
    right_drafts_are_accepted(MTP, *bigram, tokenizer, seed=21)


def test_drafts_are_the_layers_greedy_guesses(glm_model, tokenizer, proposed):
    drafts_are_from_scratch(MTP, *glm_model, _dense_drafts, tokenizer, proposed, seed=22)


def _hf_with_mtp(kind: str, path) -> None:
    """A tiny random HF checkpoint of `kind` whose last layer becomes its MTP layer, saved at `path` with the module's
    other weights (drawn around their roles: norms near 1, or near 0 where the model stores w of 1 + w) under the
    names the published checkpoints use."""
    import json

    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    from test_deepseek import _hf_deepseek
    from test_gated_delta import TINY
    from test_moe import _hf_moe

    if kind == "glm4_moe":
        model = _hf_moe("glm4_moe")
    elif kind in ("deepseek_v3", "deepseek_v32"):
        model = _hf_deepseek(kind.removeprefix("deepseek_"))
    elif kind == "glm_moe_dsa":  # GLM-5: V3.2's layers, the indexer's RoPE in interleaved pairs
        model = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(
            vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, num_experts_per_tok=3, n_routed_experts=8,
            moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, index_topk=8, index_n_heads=32,
            index_head_dim=16)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:  # two linear attention layers, then attention twice: the last becomes the MTP layer
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
            **TINY, layer_types=["linear_attention"] * 2 + ["full_attention"] * 2)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tensors = load_file(f"{path}/model.safetensors")
    with open(f"{path}/config.json") as f:
        raw = json.load(f)
    n, h = raw["num_hidden_layers"] - 1, raw["hidden_size"]
    rng = fresh.rng()
    norm = (lambda: rng.normal(0, 0.2, h).astype(np.float32)) if kind == "qwen3_5" else \
        (lambda: rng.normal(1, 0.2, h).astype(np.float32))
    proj = rng.normal(0, 0.1, (h, 2 * h)).astype(np.float32)
    raw["num_hidden_layers"] = n
    if kind == "qwen3_5":
        tensors = {k.replace(f"model.layers.{n}.", "mtp.layers.0."): v for k, v in tensors.items()}
        tensors.update({"mtp.fc.weight": proj, "mtp.pre_fc_norm_embedding.weight": norm(),
                        "mtp.pre_fc_norm_hidden.weight": norm(), "mtp.norm.weight": norm()})
        raw["layer_types"] = raw["layer_types"][:n]
        raw["mtp_num_hidden_layers"] = 1
    else:
        base = f"model.layers.{n}."
        tensors.update({base + "enorm.weight": norm(), base + "hnorm.weight": norm(), base + "eh_proj.weight": proj,
                        base + "shared_head.norm.weight": norm(), base + "shared_head.head.weight":
                        tensors["lm_head.weight"], base + "embed_tokens.weight": tensors["model.embed_tokens.weight"]})
        raw["num_nextn_predict_layers"] = 1
        if "first_k_dense_replace" in raw:
            raw.pop("mlp_layer_types", None)  # (transformers 5 writes the per-layer list; ours is read from the count)
    save_file(tensors, f"{path}/model.safetensors")
    with open(f"{path}/config.json", "w") as f:
        json.dump(raw, f)
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["glm4_moe", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "qwen3_5"])
def test_checkpoints_mtp_layer_drafts(kind, tokenizer, tmp_path, proposed):
    """A checkpoint's MTP layer is read as stored (its decoder layer's weights are the model's layer of that kind's,
    its norms and projection as written; GLM-4.5's from the GGUF file llama.cpp's converter writes too), and through
    the engine its drafts are its greedy guesses computed from
    scratch, with the outputs of plain decoding (GLM-4.5: GQA and experts; DeepSeek-V3: latent attention; V3.2: its
    sparse attention's indexer too; Qwen3.5: gated attention beside linear attention layers, whose states rejected
    drafts roll back)."""
    pytest.importorskip("transformers")
    from models.loader import load_weights

    tensors = _hf_with_mtp(kind, tmp_path)
    cfg, params = load_weights(str(tmp_path))
    mcfg, layer = mtp.load_mtp(str(tmp_path), cfg)
    base = f"model.layers.{cfg.num_layers}." if kind != "qwen3_5" else "mtp."
    plus = 1.0 if kind == "qwen3_5" else 0.0  # Qwen's norms are stored as w of 1 + w
    np.testing.assert_array_equal(layer["eh_proj"], tensors[base + ("fc" if kind == "qwen3_5" else "eh_proj") + ".weight"].T)
    np.testing.assert_array_equal(layer["enorm"], tensors[base + ("pre_fc_norm_embedding" if kind == "qwen3_5" else "enorm")
                                                          + ".weight"] + plus)
    np.testing.assert_array_equal(layer["final_norm"], tensors[base + ("norm" if kind == "qwen3_5" else "shared_head.norm")
                                                               + ".weight"] + plus)
    assert mcfg.layer.num_layers == 1 and not mcfg.layer.linear_layers and mcfg.mask_first == (kind != "qwen3_5")
    wo = tensors[(base + "layers.0." if kind == "qwen3_5" else base) + "self_attn.o_proj.weight"]
    np.testing.assert_array_equal(layer["layers"]["wo"][0], wo.T)
    if kind == "glm4_moe":  # llama.cpp's converter keeps the layer as the trailing block: the same weights
        from test_moe import _write_gguf_like_llama_cpp

        _write_gguf_like_llama_cpp(tmp_path, cfg, tmp_path / "model.gguf", "glm4moe")
        gguf_cfg, gguf_layer = mtp.load_mtp(str(tmp_path / "model.gguf"), load_weights(str(tmp_path / "model.gguf"))[0])
        assert gguf_cfg.layer.num_experts == cfg.num_experts
        jax.tree.map(np.testing.assert_array_equal, gguf_layer, layer)
    rng = random.Random(0)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(30)]
    prompts = [(system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 12))], None)
               for _ in range(6)]
    params_ = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
    options = {"warmup": False, "cache.page_size": 8, "scheduler.max_batch_tokens": 32, "scheduler.max_running": 4,
               "model.max_model_len": 96, "cache.num_pages": 40}
    model = (cfg, params, tokenizer)
    plain, _ = _run(EngineConfig().replace(**options), model, None, prompts, params_)
    spec, stats = _run(EngineConfig().replace(**{**options, **MTP}), model, (mcfg, layer), prompts, params_)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert len(proposed) > 10 and stats["spec_draft_tokens"] > 0 and stats["cached_prompt_tokens"] > 0
    for tokens, drafted in proposed[:: len(proposed) // 10]:
        assert _dense_drafts((cfg, jax.device_put(params), None), (mcfg, jax.device_put(layer)), tokens,
                             len(drafted)) == drafted


@pytest.mark.parametrize("which,topk", [("bigram", 1), ("glm_model", 1), ("bigram", 3)])
def test_every_sampling_mode_is_unchanged(which, topk, request, tokenizer):
    """Every sampling mode (greedy, seeded sampling with filters, logprobs, stops inside accepted runs, min_tokens,
    penalties counting the drafts) with a pool small enough to preempt: plain decoding's outputs, with the
    right-guessing layer's drafts both accepted and rejected (the requests' biases and sampling move the model off its
    greedy guesses) and with a random layer's; and the right-guessing layer's trees (speculative.topk)."""
    model, layer = request.getfixturevalue(which)
    prompts = _prompts(tokenizer, random.Random(23))[:22]
    params = _repetitive_params(random.Random(24), tokenizer, len(prompts))
    plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), model, None, prompts, params)
    spec, stats = _run(EngineConfig().replace(**{**SMALL, **MTP, "cache.num_pages": 16, "speculative.topk": topk}),
                       model, layer, prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["num_preemptions"] > 0 and stats["spec_draft_tokens"] > 0
    if which == "bigram":
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_structured_outputs(glm_model, bigram):
    """Grammars (regex, choice, JSON schema) beside free requests: drafts cut where the grammar stops accepting them,
    plain decoding's outputs."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}
    constraints = [StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), StructuredOutput(choice=("yes", "no", "maybe")),
                   StructuredOutput(json=schema), None]
    prompts = [([100 + i, 200 + i, 300], None) for i in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=24, structured=constraints[i % 4]) for i in range(8)]
    for model, layer in (glm_model, bigram):
        plain, _ = _run(EngineConfig().replace(**{**SMALL, "cache.num_pages": 64}), model, None, prompts, params)
        spec, stats = _run(EngineConfig().replace(**{**SMALL, **MTP, "cache.num_pages": 64}), model, layer, prompts,
                           params)
        for a, b in zip(plain, spec):
            _same(a, b)
        assert stats["spec_draft_tokens"] > 0


def test_pallas_interpret_and_warmup(bigram, glm_model):
    """On the Pallas backend (the layer's rounds on the decode kernel, its extend on the step's kernel) every draft of
    the right-guessing layer is accepted, with xla's outputs; warmup compiles the extend of every token bucket and the
    rounds of every row bucket, and serving compiles nothing more."""
    model, layer = bigram
    prompts = [([100 + i, 7, 8, 9, 10 + i], None) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 3
    config = EngineConfig().replace(**{**SMALL, **MTP, "cache.num_pages": 32, "scheduler.max_running": 4,
                                       "scheduler.max_batch_tokens": 32})
    plain, _ = _run(config.replace(**{"speculative.method": "none"}), model, None, prompts, params)
    spec, stats = _run(config.replace(**{"attention.backend": "pallas_interpret"}), model, layer, prompts, params)
    for a, b in zip(plain, spec):
        _same(a, b)
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    llm = LLM(config.replace(**{"warmup": True}), progress=False, model=glm_model[0], draft=glm_model[1])
    runner = llm.engine.runner
    compiled = runner._mtp_extend._cache_size(), runner._mtp_propose._cache_size()
    assert compiled == (len(runner.token_buckets), len(runner.draft_buckets))
    llm.generate([p for p, _ in prompts], params[0])
    assert (runner._mtp_extend._cache_size(), runner._mtp_propose._cache_size()) == compiled


def test_tensor_parallel_splits_the_layer_as_the_model(bigram, glm_model, tokenizer):
    """The model and its MTP layer split over 2 devices (4 for the random layer: its 2 KV heads repeated), the layer's
    K/V by head as the model's: plain decoding's tokens, every draft of the right-guessing layer accepted."""
    prompts = _prompts(tokenizer, random.Random(25))[:12]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 16})
    for (model, layer), tp in ((bigram, 2), (glm_model, 4)):
        plain, _ = _run(base, model, None, prompts, params)
        stats = split_model_whole_drafter(base.replace(**{**MTP, "parallel.tensor": tp}), model, layer, prompts,
                                          params, plain, drafter_split=True)
        if model is bigram[0]:
            assert stats["spec_accepted_tokens"] >= 0.99 * stats["spec_draft_tokens"]


def test_disk_tier_keeps_the_layers_kv(bigram, tokenizer, tmp_path):
    disk_tier_keeps_the_drafters_kv(MTP, *bigram, tokenizer, tmp_path, seed=26)


def test_sleep_keeps_the_layer(bigram):
    sleep_keeps_the_drafter(MTP, *bigram)


def test_refusals(bigram, tokenizer, tmp_path):
    """A model without an MTP layer this engine reads, a GGUF file without one, and an HF checkpoint whose config
    declares none are refused by name."""
    from models.gguf_loader import CheckpointError
    from test_engine import SMOLLM2

    base = EngineConfig().replace(**{**SMALL, **MTP, "cache.num_pages": 32})
    cfg = dataclasses.replace(bigram[0][0], architecture="llama")
    with pytest.raises(ConfigKeyError, match="carry no multi-token-prediction layer"):
        LLM(base, progress=False, model=(cfg, bigram[0][1], tokenizer))
    with pytest.raises(CheckpointError, match="carries no multi-token-prediction layer"):
        mtp.load_mtp(SMOLLM2, bigram[0][0])
    (tmp_path / "config.json").write_text('{"model_type": "glm4_moe"}')
    with pytest.raises(CheckpointError, match="declares no multi-token-prediction layer"):
        mtp.load_mtp(str(tmp_path), bigram[0][0])
