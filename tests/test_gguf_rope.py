"""Llama 3 RoPE scaling in GGUFs: llama.cpp's converter writes it as a `rope_freqs.weight` tensor of per-frequency
divisors, not as metadata (models/config.py: LlamaConfig.rope_freq_factors). A tiny random Llama 3.1-style checkpoint
written as such a GGUF runs as the HF checkpoint and transformers do; bad divisors are refused by name; Orbax keeps
them."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import ConfigError
from models.loader import load_weights
from test_models import TINY, _hf_checkpoint_parity
import fresh

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _llama_cpp_rope_freqs(hparams: dict) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes it from a config.json
    with llama3 rope_scaling / rope_parameters: per pair, 1 (short wavelengths), factor (long ones) or the inverse of
    the ramp's multiplier, in float32.

    NOTE: the converter takes original_max_position_embeddings from config.json's top level (default 8192), not from
    rope_scaling; Meta's Llama 3.1+ configs have it only in rope_scaling, where it is 8192 too."""
    rope = hparams.get("rope_parameters") or hparams["rope_scaling"]
    base = rope.get("rope_theta", hparams.get("rope_theta", 10000.0))
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context_len = hparams.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (np.float32(old_context_len) / wavelen - np.float32(low)) / np.float32(high - low)
            factors.append(1 / ((1 - smooth) / np.float32(factor) + smooth))
    return np.asarray(factors, np.float32)


def _write_llama_gguf(path, cfg, tensors: dict[str, np.ndarray], arch: str = "llama", **meta) -> None:
    """A `llama` (or `arch`) GGUF of `cfg`'s metadata holding `tensors` (GGUF names) as they are; `meta`: more
    metadata, by GGUFWriter method (`sliding_window=8` calls add_sliding_window(8))."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for name, value in meta.items():
        getattr(w, "add_" + name)(value)
    for add, value in ((w.add_block_count, cfg.num_layers), (w.add_context_length, cfg.max_position),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_heads), (w.add_head_count_kv, cfg.num_kv_heads),
                       (w.add_rope_dimension_count, cfg.head_dim), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_vocab_size, cfg.vocab_size)):
        if add.__name__.removeprefix("add_") not in meta:  # (`meta` may say otherwise: a partial RoPE's dimension)
            add(value)
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_cpp_tensors(sd: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """A dense HF Llama state dict under llama.cpp's GGUF names, Q/K rows permuted for its RoPE (the loader undoes
    it)."""

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:  # not with tied embeddings
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            out[f"{blk}{ours}.weight"] = sd[f"{hf}{theirs}.weight"]
        out[blk + "attn_q.weight"] = permute(sd[hf + "self_attn.q_proj.weight"], cfg.num_heads)
        out[blk + "attn_k.weight"] = permute(sd[hf + "self_attn.k_proj.weight"], cfg.num_kv_heads)
    return out


def test_converter_divisors_are_the_llama3_formulas():
    """The divisors llama.cpp writes give the inverse frequencies our llama3 RopeScaling computes (float32 apart),
    on Llama 3.1's own settings and on a short original context that puts pairs on all three branches."""
    from models.config import LlamaConfig

    for head_dim, theta, rope in ((128, 500000.0, {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}),
                                  (32, 10000.0, {**LLAMA3_ROPE, "original_max_position_embeddings": 32})):
        hparams = dict(model_type="llama", vocab_size=64, hidden_size=2 * head_dim, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, rope_theta=theta, rope_scaling=rope,
                       original_max_position_embeddings=rope["original_max_position_embeddings"])
        want = LlamaConfig.from_hf_config(hparams)
        got = dataclasses.replace(want, rope_scaling=None, rope_freq_factors=tuple(_llama_cpp_rope_freqs(hparams)))
        np.testing.assert_allclose(got.rope_inv_freq(), want.rope_inv_freq(), rtol=1e-6, atol=0)
        factors = np.asarray(got.rope_freq_factors)
        assert factors[0] == 1 and factors[-1] == 8 and ((factors > 1) & (factors < 8)).any()


@pytest.mark.slow
def test_llama3_gguf_with_rope_freqs_matches_the_hf_checkpoint(tmp_path):
    """A tiny random Llama (head_dim 32: 16 pairs, 1 kept, 2 on the ramp, 13 divided by 8) pretrained for 32
    positions and stretched by Llama 3 scaling, written as llama.cpp writes it (no rope metadata, a rope_freqs
    tensor): the same logits as the HF checkpoint over 100 tokens (which match transformers' to 1e-4; measured < 1e-6).
    Without the divisors (the tensor ignored) they differ by ~0.5, inside the original context too.

    NOTE: transformers reading this GGUF drops rope_freqs.weight and runs unscaled RoPE (its logits are the unscaled
    ones, measured to 1e-6): a Llama 3.1+ GGUF is compared with its HF checkpoint, not with transformers on the GGUF."""
    import torch
    from safetensors.numpy import load_file
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(fresh.seed())
    hf_cfg = HFLlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rope_theta=1e4,
                           tie_word_embeddings=False,
                           rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 32})
    model = LlamaForCausalLM(hf_cfg).eval()

    def noise(name):  # random norms; larger q/k weights, so attention (and where RoPE puts it) matters
        return 0.1 if "norm" in name else 0.2 if "q_proj" in name or "k_proj" in name else 0

    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path / "hf", 100, noise)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.original_max_position == 32
    hparams = json.load(open(tmp_path / "hf" / "config.json"))
    hparams["original_max_position_embeddings"] = 32  # where the converter reads it (see _llama_cpp_rope_freqs)
    rope_freqs = _llama_cpp_rope_freqs(hparams)
    tensors = _llama_cpp_tensors(load_file(str(tmp_path / "hf" / "model.safetensors")), cfg)
    _write_llama_gguf(tmp_path / "m.gguf", cfg, {**tensors, "rope_freqs.weight": rope_freqs})

    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    assert gguf_cfg.rope_scaling is None and gguf_cfg.rope_freq_factors == tuple(rope_freqs.tolist())
    np.testing.assert_allclose(gguf_cfg.rope_inv_freq(), cfg.rope_inv_freq(), rtol=1e-6, atol=0)
    tokens = jnp.asarray(ids, jnp.int32)
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, tokens))
    np.testing.assert_allclose(got, np.asarray(llama.forward_dense(params, cfg, tokens)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    unscaled = dataclasses.replace(gguf_cfg, rope_freq_factors=None)
    assert np.abs(np.asarray(llama.forward_dense(gguf_params, unscaled, tokens)) - ref).max() > 0.1


@pytest.mark.parametrize("rope_freqs, message", [
    (np.ones(7, np.float32), r"'rope_freqs.weight'\) has 7 values, head_dim=16 needs 8"),
    (np.ones(16, np.float32), r"'rope_freqs.weight'\) has 16 values, head_dim=16 needs 8"),
    (np.array([1, 1, 2, 4, 0, 8, 8, 8], np.float32), r"'rope_freqs.weight'\) must be finite and > 0, got 0.0"),
    (np.array([1, 1, 2, 4, 8, -8, 8, 8], np.float32), r"'rope_freqs.weight'\) must be finite and > 0, got -8.0"),
    (np.array([1, 1, 2, 4, 8, 8, np.nan, 8], np.float32), r"'rope_freqs.weight'\) must be finite and > 0, got nan"),
])
def test_bad_rope_freqs_are_refused_by_name(tmp_path, rope_freqs, message):
    path = tmp_path / "bad.gguf"
    _write_llama_gguf(path, TINY, {"rope_freqs.weight": rope_freqs})  # the config is read before any weight
    with pytest.raises(ConfigError, match=message):
        load_weights(str(path))


def test_orbax_round_trip_keeps_the_divisors(tmp_path):
    from models.checkpoint import load_orbax, save_orbax

    factors = _llama_cpp_rope_freqs(dict(hidden_size=TINY.hidden_size, num_attention_heads=TINY.num_heads,
                                         head_dim=TINY.head_dim, rope_theta=TINY.rope_theta,
                                         rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 64},
                                         original_max_position_embeddings=64))
    cfg = dataclasses.replace(TINY, rope_freq_factors=tuple(factors.tolist()))
    assert len(set(cfg.rope_freq_factors)) > 2  # kept, divided and ramped pairs
    params = llama.init_params(cfg, jax.random.key(3))
    save_orbax(str(tmp_path / "ckpt"), cfg, jax.tree.map(np.asarray, params), "float32")
    loaded_cfg, loaded = load_orbax(str(tmp_path / "ckpt"), np.float32)
    assert loaded_cfg == cfg and hash(loaded_cfg) == hash(cfg)  # a static jit argument
    np.testing.assert_array_equal(loaded_cfg.rope_inv_freq(), cfg.rope_inv_freq())
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 40), jnp.int32)
    np.testing.assert_array_equal(np.asarray(llama.forward_dense(loaded, loaded_cfg, ids)),
                                  np.asarray(llama.forward_dense(params, cfg, ids)))
