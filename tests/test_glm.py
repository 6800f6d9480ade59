"""GLM-4 (`glm`: GLM-4-9B-chat-hf) and GLM-4-0414 (`glm4`, also GLM-Z1): half of each head turned by RoPE in interleaved
pairs, q/k/v biases, gate and up fused; glm4 norms the attention's and the MLP's outputs too. HF checkpoints and
glm4 GGUFs in llama.cpp's layout, against transformers."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import LlamaConfig
from models.loader import load_weights
from models.safetensors_loader import rope_pair_rows
from test_gguf_rope import _write_llama_gguf
from test_models import _engine_greedy_is_transformers, _hf_checkpoint_parity
from test_archs import _assert_same_config, _gguf_renamed
import fresh

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def test_configs_read_as_transformers_builds_the_models():
    """transformers' defaults where config.json is silent (half of each head turned, q/k/v biases), the four norms of
    glm4, and parameter counts equal to transformers'."""
    import transformers

    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0}
    for arch, model_class, config_class in (("glm", transformers.GlmForCausalLM, transformers.GlmConfig),
                                            ("glm4", transformers.Glm4ForCausalLM, transformers.Glm4Config)):
        cfg = LlamaConfig.from_hf_config({**base, "model_type": arch})
        assert (cfg.rotary_dim, cfg.attention_bias, cfg.attention_out_bias) == (4, True, False)
        assert cfg.sandwich_norms == (arch == "glm4") and cfg.pre_norms
        model = model_class(config_class(**base))
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert LlamaConfig.from_hf_config({**base, "model_type": "glm4", "partial_rotary_factor": 1.0}).rotary_dim == 8


def test_rope_pair_rows_turn_interleaved_pairs_into_halves():
    """Each head's RoPE rows from interleaved pairs to halves, the rows around them kept: q . k is unchanged when both
    are reordered alike, and rotate-half RoPE on the reordered rows is interleaved RoPE on the stored ones."""
    rng = fresh.rng()
    heads, head_dim, start, rope = 3, 10, 2, 6
    w = rng.normal(size=(heads * head_dim, 5))
    got = rope_pair_rows(w, heads, start, rope).reshape(heads, head_dim, 5)
    stored = w.reshape(heads, head_dim, 5)
    np.testing.assert_array_equal(got[:, :start], stored[:, :start])
    np.testing.assert_array_equal(got[:, start + rope:], stored[:, start + rope:])
    np.testing.assert_array_equal(got[:, start:start + rope // 2], stored[:, start:start + rope:2])
    np.testing.assert_array_equal(got[:, start + rope // 2:start + rope], stored[:, start + 1:start + rope:2])
    np.testing.assert_array_equal(rope_pair_rows(w[:, 0], heads, start, rope), got[..., 0].reshape(-1))  # a bias

    # RoPE at position 3 turning pairs (x[2j], x[2j+1]) by angle p * f_j == rotate-half RoPE on the reordered vector
    x, freqs = rng.normal(size=rope), 1.0 / (10000 ** (np.arange(0, rope, 2) / rope))
    cos, sin = np.cos(3 * freqs), np.sin(3 * freqs)
    turned = np.empty(rope)
    turned[0::2], turned[1::2] = x[0::2] * cos - x[1::2] * sin, x[1::2] * cos + x[0::2] * sin
    halves = rope_pair_rows(x, 1, 0, rope)
    a, b = halves[: rope // 2], halves[rope // 2:]
    np.testing.assert_allclose(np.concatenate([a * cos - b * sin, b * cos + a * sin]), rope_pair_rows(turned, 1, 0, rope))


def _hf_model(arch: str):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    if arch == "glm":
        return transformers.GlmForCausalLM(transformers.GlmConfig(**TINY)).eval()
    return transformers.Glm4ForCausalLM(transformers.Glm4Config(**TINY)).eval()


def _glm4_gguf_tensors(sd: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """A GLM-4-0414 state dict under llama.cpp's names, as its converter writes it: rows as HF has them (llama.cpp turns
    glm4's pairs as they are), gate and up fused in ffn_up, the output norms post_attention_norm and post_ffw_norm."""
    return _gguf_renamed(sd, cfg, (
        ("attn_norm", "input_layernorm"), ("post_attention_norm", "post_self_attn_layernorm"),
        ("ffn_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_mlp_layernorm"), ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
        ("ffn_up", "mlp.gate_up_proj"), ("ffn_down", "mlp.down_proj")))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["glm", "glm4"])
def test_checkpoint_and_gguf_match_transformers_and_serve(arch, tmp_path):
    """A tiny random checkpoint (biases and norms perturbed too): logits within 1e-4 of transformers'; the same rows
    turned as rotate-half pairs without the reordering would not match; glm4 as a GGUF in llama.cpp's layout gives the
    same config and logits; through the engine (paged KV, prefix hits), transformers' argmax at every step."""
    model = _hf_model(arch)
    cfg, params, ids, _ = _hf_checkpoint_parity(model, tmp_path, 40, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == arch and cfg.rotary_dim == 8 and cfg.sandwich_norms == (arch == "glm4")
    tokens = jnp.asarray(ids, jnp.int32)
    logits = llama.forward_dense(params, cfg, tokens)
    # The pairs reordering matters: undone on q and its bias (their last axis: each head's rows), the logits move.
    order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2), np.arange(8, cfg.head_dim)])
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    for key in ("wq", "bq"):
        x = layers[key]
        layers[key] = x.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)[..., np.argsort(order)].reshape(x.shape)
    unordered = llama.forward_dense({**params, "layers": layers}, cfg, tokens)
    assert float(jnp.abs(unordered - logits).max()) > 1e-3

    if arch == "glm4":
        from safetensors.numpy import load_file

        sd = load_file(str(tmp_path / "model.safetensors"))
        _write_llama_gguf(tmp_path / "m.gguf", cfg, _glm4_gguf_tensors(sd, cfg), arch="glm4",
                          rope_dimension_count=cfg.rotary_dim)
        gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
        _assert_same_config(gguf_cfg, cfg)
        got = llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(logits), atol=1e-5, rtol=1e-5)

    _engine_greedy_is_transformers(model, cfg, params)
