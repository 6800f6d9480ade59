"""Architectures a few config fields away from Llama's, as HF checkpoints and GGUFs in llama.cpp's layout, against
transformers: OLMo 2 / 3 (norms after attention and the MLP only, q/k norms over whole projections; OLMo 3's windowed
layers), EXAONE 4 (OLMo 2's norms with per-head q/k norms; windowed layers with RoPE around global ones without),
Granite (embedding, attention, residual and logit multipliers; Granite MoE's experts, fused gate/up, and shared
expert), Seed-OSS (q/k/v and o biases), ERNIE 4.5 (RoPE on interleaved pairs, tied embeddings), Arcee and Apertus (MLPs without a gate: up -> relu^2 or xIELU -> down) and
Cohere / Cohere 2 (one LayerNorm before attention and the MLP both, whose
outputs join the stream together; RoPE on interleaved pairs; Cohere 2's windowed layers with RoPE around global ones
without)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import LlamaConfig
from models.errors import ConfigError
from models.loader import load_weights
from test_gguf_rope import _llama_cpp_tensors, _write_llama_gguf
from test_models import _engine_greedy_is_transformers, _hf_checkpoint_parity
import fresh

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.2,
        "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}
GRANITE = dict(embedding_multiplier=12.0, attention_multiplier=0.09, residual_multiplier=0.22, logits_scaling=8.0)


def _hf_model(arch: str):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    if arch == "olmo2":
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY, num_hidden_layers=3)).eval()
    if arch == "olmo3":  # windowed layers 0-2 (8 tokens), global layer 3 with YaRN; RoPE unscaled on the windowed ones
        rope = {"full_attention": YARN, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        return transformers.Olmo3ForCausalLM(transformers.Olmo3Config(
            **TINY, num_hidden_layers=4, sliding_window=8, rope_parameters=rope)).eval()
    if arch == "exaone4":  # windowed layers 0-2 (8 tokens) with Llama 3 RoPE scaling, global layer 3 without RoPE
        return transformers.Exaone4ForCausalLM(transformers.Exaone4Config(
            **TINY, num_hidden_layers=4, sliding_window=8, sliding_window_pattern=4, rope_parameters=LLAMA3)).eval()
    if arch == "arcee":
        return transformers.ArceeForCausalLM(transformers.ArceeConfig(**TINY, num_hidden_layers=3, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})).eval()
    if arch == "apertus":  # xIELU's per-layer scalars perturbed with the weights
        return transformers.ApertusForCausalLM(transformers.ApertusConfig(
            **TINY, num_hidden_layers=3, rope_parameters=LLAMA3, dtype=torch.float32)).eval()
    if arch == "ernie4_5":  # RoPE on interleaved pairs, tied embeddings
        return transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**TINY, num_hidden_layers=3, head_dim=24)).eval()
    if arch == "seed_oss":
        return transformers.SeedOssForCausalLM(transformers.SeedOssConfig(
            **TINY, num_hidden_layers=3, head_dim=24, attention_out_bias=True)).eval()
    if arch == "cohere":
        return transformers.CohereForCausalLM(transformers.CohereConfig(**TINY, num_hidden_layers=3, logit_scale=0.25)).eval()
    if arch == "cohere2":  # windowed layers 0-2 (8 tokens), global layer 3 without RoPE
        return transformers.Cohere2ForCausalLM(transformers.Cohere2Config(
            **TINY, num_hidden_layers=4, sliding_window=8, logit_scale=0.25)).eval()
    if arch == "granitemoehybrid":  # Granite 4.0 Micro's kind: attention layers only, the shared MLP the MLP
        return transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(
            **TINY, num_hidden_layers=3, layer_types=["attention"] * 3, num_local_experts=0,
            shared_intermediate_size=40, position_embedding_type="rope", **GRANITE)).eval()
    if arch == "granitemoe":
        return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
            **TINY, num_hidden_layers=3, attention_bias=True, num_local_experts=4, num_experts_per_tok=2, **GRANITE)).eval()
    if arch == "granitemoeshared":
        return transformers.GraniteMoeSharedForCausalLM(transformers.GraniteMoeSharedConfig(
            **TINY, num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=40,
            **GRANITE)).eval()
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **TINY, num_hidden_layers=3, attention_bias=True, **GRANITE)).eval()


def test_configs_read_as_transformers_builds_the_models():
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    olmo2 = LlamaConfig.from_hf_config({**base, "model_type": "olmo2"})
    assert (olmo2.pre_norms, olmo2.sandwich_norms, olmo2.qk_norm, olmo2.qk_norm_whole) == (False, True, True, True)
    assert olmo2.qk_norm_sizes == (32, 16) and olmo2.sliding_window is None
    olmo3 = LlamaConfig.from_hf_config({**base, "model_type": "olmo3", "sliding_window": 16,
                                        "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                                                         "original_max_position_embeddings": 64}})
    assert olmo3.sliding_layers == (True, True, True, False) * 2 and olmo3.sliding_window == 16
    assert olmo3.rope_theta == olmo3.rope_local_theta == 500_000.0  # transformers' default; windowed layers unscaled
    assert olmo3.rope_scaling.rope_type == "yarn" and olmo3.rope_attention_factor(local=True) == 1.0
    granite = LlamaConfig.from_hf_config({**base, "model_type": "granite", "attention_bias": True, **GRANITE})
    assert (granite.embed_scale, granite.sm_scale, granite.residual_multiplier, granite.logits_scaling) == (
        12.0, 0.09, 0.22, 8.0)
    assert granite.attention_bias and granite.attention_out_bias
    shared = LlamaConfig.from_hf_config({**base, "model_type": "granitemoeshared", "num_local_experts": 4,
                                         "num_experts_per_tok": 2, "shared_intermediate_size": 40, **GRANITE})
    assert (shared.num_experts, shared.moe_intermediate_size, shared.norm_topk_prob) == (4, 64, True)
    assert (shared.shared_expert_intermediate_size, shared.shared_expert_gate, shared.embed_scale) == (40, False, 12.0)
    exaone = LlamaConfig.from_hf_config({**base, "model_type": "exaone4", "sliding_window": 16,
                                         "sliding_window_pattern": "LLLG"})
    assert exaone.sliding_layers == exaone.rope_layers == (True, True, True, False) * 2  # no RoPE on the global ones
    assert (exaone.pre_norms, exaone.sandwich_norms, exaone.qk_norm, exaone.qk_norm_whole) == (False, True, True, False)
    unwindowed = LlamaConfig.from_hf_config({**base, "model_type": "exaone4", "sliding_window": None})
    assert unwindowed.sliding_window is None and unwindowed.sliding_layers == unwindowed.rope_layers == ()
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        LlamaConfig.from_hf_config({**base, "model_type": "exaone4", "sliding_window": 16, "sliding_window_pattern": "LX"})
    seed = LlamaConfig.from_hf_config({**base, "model_type": "seed_oss", "attention_out_bias": True})
    assert seed.attention_bias and seed.attention_out_bias  # q/k/v biases unless told otherwise, o's where told
    cohere2 = LlamaConfig.from_hf_config({**base, "model_type": "cohere2", "sliding_window": 16, "logit_scale": 0.25})
    assert cohere2.sliding_layers == cohere2.rope_layers == (True, True, True, False) * 2
    assert (cohere2.parallel_block, cohere2.norm_kind, cohere2.logits_scaling, cohere2.tie_word_embeddings) == (
        True, "layer", 4.0, True)
    granite4 = {**base, "model_type": "granitemoehybrid", "layer_types": ["attention"] * 8, "num_local_experts": 0,
                "shared_intermediate_size": 40}
    assert LlamaConfig.from_hf_config(granite4).rope_layers == (False,) * 8  # NoPE unless position_embedding_type: rope
    assert LlamaConfig.from_hf_config({**granite4, "position_embedding_type": "rope"}).rope_layers == ()
    hybrid = LlamaConfig.from_hf_config({**granite4, "layer_types": ["mamba"] * 7 + ["attention"], "mamba_n_heads": 4})
    assert hybrid.linear_kind == "mamba2" and hybrid.num_kv_layers == 1  # Granite 4.0-H: tests/test_gated_delta.py
    with pytest.raises(ConfigError, match="mamba_d_head"):  # transformers' default 128 heads do not divide 2 x 32
        LlamaConfig.from_hf_config({**granite4, "layer_types": ["mamba"] * 7 + ["attention"]})
    with pytest.raises(ConfigError, match="use_qk_norm"):
        LlamaConfig.from_hf_config({**base, "model_type": "cohere", "use_qk_norm": True})
    with pytest.raises(ConfigError, match="mlp_bias"):
        LlamaConfig.from_hf_config({**base, "model_type": "granite", "mlp_bias": True})
    with pytest.raises(ConfigError, match="pre_norms=False needs sandwich_norms"):
        LlamaConfig(architecture="olmo2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4, pre_norms=False)
    # parameter counts as transformers' (q/k norms of a whole projection, no pre-norms; Granite's output bias)
    import transformers

    moe = {"num_local_experts": 4, "num_experts_per_tok": 2}
    for arch, hf_config, extra in (("olmo2", transformers.Olmo2Config, {}),
                                   ("granite", transformers.GraniteConfig, {"attention_bias": True}),
                                   ("granitemoe", transformers.GraniteMoeConfig, moe),
                                   ("exaone4", transformers.Exaone4Config, {"sliding_window": 16}),
                                   ("seed_oss", transformers.SeedOssConfig, {"head_dim": 8}),
                                   ("cohere", transformers.CohereConfig, {}),
                                   ("arcee", transformers.ArceeConfig, {}),
                                   ("apertus", transformers.ApertusConfig, {}),
                                   ("granitemoehybrid", transformers.GraniteMoeHybridConfig,
                                    {"layer_types": ["attention"] * 8, "shared_intermediate_size": 40, "mamba_n_heads": 8,
                                     **moe}),
                                   ("cohere2", transformers.Cohere2Config, {"sliding_window": 16}),
                                   ("ernie4_5", transformers.Ernie4_5Config, {}),  # (head_dim 128 where unsaid)
                                   ("granitemoeshared", transformers.GraniteMoeSharedConfig,
                                    {**moe, "shared_intermediate_size": 40})):
        cfg = {**base, "model_type": arch, **extra}
        model = getattr(transformers, hf_config.__name__.replace("Config", "ForCausalLM"))(
            hf_config(**{k: v for k, v in cfg.items() if k != "model_type"}))
        assert LlamaConfig.from_hf_config(cfg).num_params() == sum(p.numel() for p in model.parameters())


def _permuted(x: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows (or a bias) as llama.cpp's Llama converter writes them, for its interleaved RoPE."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _gguf_renamed(sd: dict[str, np.ndarray], cfg: LlamaConfig, pairs) -> dict[str, np.ndarray]:
    """An HF state dict's tensors under llama.cpp's names, as they are: the embeddings, the final norm and the head
    (unless tied), and in each layer each (GGUF name, HF name) pair's weight and bias where the state dict has them."""
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        for ours, theirs in pairs:
            for kind in ("weight", "bias"):
                if f"model.layers.{i}.{theirs}.{kind}" in sd:
                    out[f"blk.{i}.{ours}.{kind}"] = sd[f"model.layers.{i}.{theirs}.{kind}"]
    return out


def _gguf_tensors(sd: dict[str, np.ndarray], cfg: LlamaConfig, arch: str) -> dict[str, np.ndarray]:
    """An HF state dict under llama.cpp's names: olmo2's (its rows as HF has them, norms after attention and the MLP)
    or granite's (Llama's, Q/K rows and biases permuted)."""
    if arch in ("granitemoe", "granitemoeshared"):
        return _granite_moe_gguf_tensors(sd, cfg)
    if arch == "arcee":  # Llama's converter: Q/K rows permuted; no ffn_gate
        out = _gguf_renamed(sd, cfg, (
            ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"), ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")))
        for i in range(cfg.num_layers):
            out[f"blk.{i}.attn_q.weight"] = _permuted(sd[f"model.layers.{i}.self_attn.q_proj.weight"], cfg.num_heads)
            out[f"blk.{i}.attn_k.weight"] = _permuted(sd[f"model.layers.{i}.self_attn.k_proj.weight"], cfg.num_kv_heads)
        return out
    if arch in ("seed_oss", "cohere", "cohere2", "ernie4_5"):  # Llama's names, rows as HF has them (their converters
        # leave them)
        return _gguf_renamed(sd, cfg, (
            ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"), ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")))
    if arch == "granite":
        out = _llama_cpp_tensors(sd, cfg)

        for i in range(cfg.num_layers):
            hf, blk = f"model.layers.{i}.self_attn.", f"blk.{i}."
            out[blk + "attn_q.bias"] = _permuted(sd[hf + "q_proj.bias"], cfg.num_heads)
            out[blk + "attn_k.bias"] = _permuted(sd[hf + "k_proj.bias"], cfg.num_kv_heads)
            out[blk + "attn_v.bias"] = sd[hf + "v_proj.bias"]
            out[blk + "attn_output.bias"] = sd[hf + "o_proj.bias"]
        return out
    return _gguf_renamed(sd, cfg, (
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
        ("post_attention_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
        ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")))


def _granite_moe_gguf_tensors(sd: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """A Granite MoE state dict as llama.cpp's converter writes it: Llama's names with Q/K rows (and biases) permuted,
    each `input_linear` cut into gate and up (the experts' ffn_gate_exps / ffn_up_exps, the shared expert's
    ffn_gate_shexp / ffn_up_shexp), the router ffn_gate_inp."""

    out = _gguf_renamed(sd, cfg, (
        ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate_inp", "block_sparse_moe.router.layer"),
        ("ffn_down_exps", "block_sparse_moe.output_linear"), ("ffn_down_shexp", "shared_mlp.output_linear")))
    for i in range(cfg.num_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
                out[f"{blk}attn_{ours}.{kind}"] = _permuted(sd[f"{hf}self_attn.{ours}_proj.{kind}"], heads)
        gate, up = np.split(sd[hf + "block_sparse_moe.input_linear.weight"], 2, axis=-2)
        out[blk + "ffn_gate_exps.weight"], out[blk + "ffn_up_exps.weight"] = gate, up
        if hf + "shared_mlp.input_linear.weight" in sd:
            gate, up = np.split(sd[hf + "shared_mlp.input_linear.weight"], 2, axis=-2)
            out[blk + "ffn_gate_shexp.weight"], out[blk + "ffn_up_shexp.weight"] = gate, up
    return out


def _gguf_meta(cfg: LlamaConfig, arch: str) -> dict:
    """What llama.cpp's converter writes beyond a Llama's: Granite's multipliers as scales; OLMo 3's window, its
    pattern and YaRN (HF's attention_factor as attn_factor)."""
    if arch == "arcee":
        import gguf

        s = cfg.rope_scaling
        return dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=s.factor,
                    rope_scaling_orig_ctx_len=s.original_max_position)
    if "cohere" in arch:
        return dict(logit_scale=1.0 / cfg.logits_scaling, layer_norm_eps=cfg.rms_norm_eps,
                    **({"sliding_window": cfg.sliding_window} if cfg.sliding_window else {}))
    if "granite" in arch:
        experts = dict(expert_count=cfg.num_experts, expert_used_count=cfg.num_experts_per_tok) if cfg.num_experts else {}
        if cfg.shared_expert_intermediate_size:
            experts["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
        return dict(embedding_scale=cfg.embed_scale, attention_scale=cfg.attention_multiplier,
                    residual_scale=cfg.residual_multiplier, logit_scale=cfg.logits_scaling, **experts)
    if arch == "olmo3":
        import gguf

        s = cfg.rope_scaling
        return dict(sliding_window=cfg.sliding_window, sliding_window_pattern=list(cfg.sliding_layers),
                    rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=s.factor,
                    rope_scaling_attn_factors=s.attention_factor, rope_scaling_orig_ctx_len=s.original_max_position)
    return {}


def _assert_same_config(got: LlamaConfig, want: LlamaConfig):
    """Field by field, floats as GGUF's float32 metadata keeps them."""

    def same(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, float) and isinstance(b, float):
            return bool(np.isclose(a, b, rtol=1e-6, atol=0))
        return a == b

    got, want = got.to_dict(), want.to_dict()
    assert [k for k in want if not same(got[k], want[k])] == []


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["olmo2", "olmo3", "exaone4", "granite", "granitemoe", "granitemoeshared",
                                  "granitemoehybrid", "seed_oss", "arcee", "apertus", "cohere", "cohere2", "ernie4_5"])
def test_checkpoint_and_gguf_match_transformers_and_serve(arch, tmp_path):
    """A tiny random checkpoint: logits within 1e-4 of transformers' (Granite's multipliers each move them; OLMo 3's
    windowed layers keep RoPE unscaled); a GGUF in llama.cpp's layout gives the same config and logits; through the engine
    (paged KV, prefix hits, OLMo 3's windows shorter than the prompts), transformers' argmax at every step."""
    import dataclasses

    model = _hf_model(arch)
    cfg, params, ids, _ = _hf_checkpoint_parity(model, tmp_path, 40,
                                                lambda n: 0.3 if "norm" in n or "act_fn" in n else 0.05)
    assert cfg.architecture == arch
    tokens = jnp.asarray(ids, jnp.int32)
    logits = llama.forward_dense(params, cfg, tokens)
    if "granite" in arch:  # each multiplier moves the logits past the parity tolerance (1e-4): parity checks them all
        for name, value in dict(residual_multiplier=1.0, logits_scaling=1.0, attention_multiplier=None,
                                embed_scale=1.0).items():
            other = llama.forward_dense(params, dataclasses.replace(cfg, **{name: value}), tokens)
            assert float(jnp.abs(other - logits).max()) > 2e-4, name
    if arch in ("granitemoehybrid", "apertus"):  # (llama.cpp writes attention-only Granite 4.0 models as granite /
        # granitemoe; its apertus GGUFs keep xIELU's scalars as metadata, not read here)
        _engine_greedy_is_transformers(model, cfg, params)
        return
    if arch == "exaone4":  # RoPE on the windowed layers would differ on the global one
        assert cfg.sliding_layers == cfg.rope_layers == (True, True, True, False)
        everywhere = llama.forward_dense(params, dataclasses.replace(cfg, rope_layers=()), tokens)
        assert float(jnp.abs(everywhere - logits).max()) > 1e-3
        _engine_greedy_is_transformers(model, cfg, params)
        return  # (no exaone4 GGUF is read: llama.cpp's loader fixes the 32B's window pattern by its layer count)
    if arch == "olmo3":
        assert cfg.sliding_layers == (True, True, True, False) and cfg.rope_scaling.rope_type == "yarn"
        unscaled = llama.forward_dense(params, dataclasses.replace(cfg, rope_local_theta=None), tokens)
        assert float(jnp.abs(unscaled - logits).max()) > 1e-3  # YaRN on the windowed layers too would differ

    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    # (as llama.cpp names them)
    gguf_arch = {"olmo3": "olmo2", "granitemoeshared": "granitemoe", "cohere": "command-r"}.get(arch, arch)
    _write_llama_gguf(tmp_path / "m.gguf", cfg, _gguf_tensors(sd, cfg, arch), arch=gguf_arch,
                      **_gguf_meta(cfg, arch))
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    got = llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits), atol=1e-5, rtol=1e-5)

    _engine_greedy_is_transformers(model, cfg, params)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_mistral3_checkpoints_serve_their_language_model(tie, tmp_path):
    """A Mistral3ForConditionalGeneration checkpoint (Mistral Small 3.1 / 3.2, Magistral, Devstral: Pixtral and a
    projector in front of a Mistral) is served for text: its language model's config (the head tied or not as the whole
    model's config says) and weights under `language_model.` (the head at the top, or tied), logits within 1e-4 of
    transformers' on text, and through the engine its argmax at every step."""
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    text = dict(model_type="mistral", **TINY, num_hidden_layers=2, head_dim=16)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
    model = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=210, tie_word_embeddings=tie)).eval()
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 40, lambda n: 0.3 if "norm" in n else 0.05)
    assert (cfg.architecture, cfg.tie_word_embeddings, cfg.num_layers) == ("mistral", tie, 2)
    _engine_greedy_is_transformers(model, cfg, params)


SMOOTHING_CASES = {  # what SmoothQuant may fold its divisions into, by layer layout: (config fields, weights it changes)
    # OLMo: no norms before the projections, so only w_down's inputs (into w_up's columns)
    "olmo2": (dict(qk_norm=True, qk_norm_whole=True, sandwich_norms=True, pre_norms=False), ["w_down", "w_up"]),
    # Cohere: one norm before attention and the MLP, one factor for all five projections (two would change the forward)
    "cohere": (dict(parallel_block=True, norm_kind="layer", tie_word_embeddings=True, logits_scaling=4.0),
               ["attn_norm", "w_down", "w_gate", "w_up", "wk", "wq", "wv"]),
    # Arcee: w_down reads relu(up)^2, so up's columns are divided by sqrt(s) (by s, as when gated, would change it)
    "arcee": (dict(gated_mlp=False, hidden_act="relu2"), ["attn_norm", "mlp_norm", "w_down", "w_up", "wk", "wq", "wv"]),
    # Apertus: xIELU(up / s) is no multiple of xIELU(up): w_down's inputs (and xIELU's scalars) left alone
    "apertus": (dict(gated_mlp=False, hidden_act="xielu", qk_norm=True), ["attn_norm", "mlp_norm", "w_up", "wk", "wq", "wv"]),
}


@pytest.mark.parametrize("arch", list(SMOOTHING_CASES))
def test_smoothquant_folds_only_where_the_forward_is_kept(arch):
    """w8a8's SmoothQuant divides inputs into the norms before q/k/v and gate/up, and w_down's into w_up, each layout
    as far as it can (SMOOTHING_CASES); the weights it changes are those, and the float forward is unchanged."""
    from models import quant

    fields, changed_keys = SMOOTHING_CASES[arch]
    cfg = LlamaConfig(architecture=arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, **fields)
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(fresh.seed())))
    if arch == "apertus":  # xIELU's scalars as trained ones look (random ones could make it anything)
        params["layers"] |= {"xielu_alpha_p": np.full((2, 1), 0.5, np.float32),
                             "xielu_alpha_n": np.full((2, 1), 0.2, np.float32),
                             "xielu_beta": np.full((2,), 0.5, np.float32), "xielu_eps": np.full((2,), -1e-6, np.float32)}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 24), jnp.int32)
    smoothed = quant.smooth_params(params, jax.tree.map(np.asarray, llama.activation_amax(params, cfg, ids)))
    changed = [k for k in params["layers"] if not np.array_equal(params["layers"][k], smoothed["layers"][k])]
    assert sorted(changed) == changed_keys
    want, got = (np.asarray(llama.forward_dense(p, cfg, ids)) for p in (params, smoothed))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
