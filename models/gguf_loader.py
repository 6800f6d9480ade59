"""GGUF checkpoints: metadata, config and weights, dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama` (and `smollm3`, `granite`, `granitemoe`, `granitehybrid`,
`nemotron_h`)
GGUFs for its interleaved RoPE; they are permuted back here so every loader hands the model the HF layout (deepseek2's
glm4's and ernie4_5's, which it leaves as HF has them, are reordered as an HF DeepSeek, GLM-4 or ERNIE checkpoint's are; the linear
layers' tensors of qwen35, qwen35moe, qwen3next and granitehybrid as HF has them: `_linear_tensor`).
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Callable

import numpy as np

import ml_dtypes

from models.config import ConfigError, LlamaConfig
from models.quant import EXPERTS, EXPONENT_SUFFIX, MX_GROUP
from models.weights import assemble, layers_of


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit its config; the message names the file."""


GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
    "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias", "bv": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight", "post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
    "bo": "blk.{i}.attn_output.bias",  # (Granite, OLMo with attention biases)
}
ROPE_FREQS = "rope_freqs.weight"  # LlamaConfig.rope_freq_factors, read with the config
# phi3's LongRoPE divisors (RopeScaling short_factor, long_factor), read with the config.
ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
# Mixture-of-experts layers: each layer's experts stored together ([E, out, in]); Qwen2-MoE's shared expert and its
# gate (a vector) under `shexp`.
GGUF_MOE_NAMES = {
    **GGUF_NAMES,
    "router": "blk.{i}.ffn_gate_inp.weight", "moe_gate": "blk.{i}.ffn_gate_exps.weight",
    "moe_up": "blk.{i}.ffn_up_exps.weight", "moe_down": "blk.{i}.ffn_down_exps.weight",
    "w_gate": "blk.{i}.ffn_gate_shexp.weight", "w_up": "blk.{i}.ffn_up_shexp.weight",
    "w_down": "blk.{i}.ffn_down_shexp.weight", "shared_gate": "blk.{i}.ffn_gate_inp_shexp.weight",
}
# gpt-oss: biases on every projection and expert, a sink per head; its pre-MLP norm is called post_attention_norm.
GGUF_GPT_OSS_NAMES = {k: v for k, v in GGUF_MOE_NAMES.items() if "shexp" not in v} | {
    "mlp_norm": "blk.{i}.post_attention_norm.weight", "bo": "blk.{i}.attn_output.bias",
    "sinks": "blk.{i}.attn_sinks.weight", "router_bias": "blk.{i}.ffn_gate_inp.bias",
    "moe_gate_bias": "blk.{i}.ffn_gate_exps.bias", "moe_up_bias": "blk.{i}.ffn_up_exps.bias",
    "moe_down_bias": "blk.{i}.ffn_down_exps.bias",
}
# GLM-4.5 (glm4moe): the first layers' dense MLP under the dense names, the experts' shared ones (no gate) under
# `shexp`, the router's correction bias `exp_probs_b` (llama.cpp's converter renames e_score_correction_bias to
# e_score_correction.bias), the pre-MLP norm called post_attention_norm. Q/K rows as HF has them (NeoX RoPE).
GGUF_GLM4_MOE_NAMES = {k: v for k, v in GGUF_MOE_NAMES.items() if k != "shared_gate"} | {
    "mlp_norm": "blk.{i}.post_attention_norm.weight", "router_score_bias": "blk.{i}.exp_probs_b.bias",
    "dense_gate": GGUF_NAMES["w_gate"], "dense_up": GGUF_NAMES["w_up"], "dense_down": GGUF_NAMES["w_down"],
}
# MiniMax-M2 (minimax-m2): experts stacked as Mixtral's, no shared expert, the router's correction bias exp_probs_b;
# q/k norms over whole projections (attn_q_norm [q_size]); Q/K rows as HF has them (NeoX RoPE on rope.dimension_count).
GGUF_MINIMAX_M2_NAMES = {k: v for k, v in GGUF_MOE_NAMES.items() if "shexp" not in v} | {
    "router_score_bias": "blk.{i}.exp_probs_b.bias"}
# dots.llm1 (dots1) and ERNIE 4.5 (ernie4_5-moe): GLM-4.5's experts, dense layers and correction bias, the pre-MLP
# norm ffn_norm as Llama's.
GGUF_DOTS1_NAMES = GGUF_GLM4_MOE_NAMES | {"mlp_norm": GGUF_NAMES["mlp_norm"]}
# DeepSeek-V2/V3, Kimi K2 (deepseek2): experts as GLM-4.5's (V2 without the correction bias), the pre-MLP norm ffn_norm,
# latent attention (weights.MLA_KEYS) with each tensor's rows as HF has them: queries attn_q or attn_q_a / attn_q_a_norm
# / attn_q_b (per head [nope, rope]), attn_kv_a_mqa ([latent, rope]), the latent's up-projection attn_kv_b as in older
# files, or split per head as the converter now writes it: attn_k_b [heads, latent, nope] (transposed), attn_v_b
# [heads, v, latent] (`_join_kv_b`). llama.cpp turns interleaved RoPE pairs of those rows (its NORM mode), as
# DeepSeek does, so they are reordered at load as an HF checkpoint's are (safetensors_loader.mla_rope_rows).
GGUF_DEEPSEEK2_NAMES = {k: v for k, v in GGUF_GLM4_MOE_NAMES.items()
                        if k not in ("wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm")} | {
    "mlp_norm": GGUF_NAMES["mlp_norm"], "wq_a": "blk.{i}.attn_q_a.weight", "q_a_norm": "blk.{i}.attn_q_a_norm.weight",
    "wq_b": "blk.{i}.attn_q_b.weight", "wkv_a": "blk.{i}.attn_kv_a_mqa.weight",
    "kv_a_norm": "blk.{i}.attn_kv_a_norm.weight", "wkv_b": "blk.{i}.attn_kv_b.weight",
}
GGUF_DEEPSEEK2_SPLIT_KV_NAMES = GGUF_DEEPSEEK2_NAMES | {"wkv_b": "blk.{i}.attn_k_b.weight"}  # attn_v_b read beside it
# GLM-5 (glm-dsa): deepseek2's layout and each layer's sparse attention indexer, rows as HF has them (its RoPE turns
# interleaved pairs, reordered at load as an HF checkpoint's are: safetensors_loader.index_rope_rows).
GGUF_INDEXER_NAMES = {"index_wq": "blk.{i}.indexer.attn_q_b.weight", "index_wk": "blk.{i}.indexer.attn_k.weight",
                      "index_k_norm": "blk.{i}.indexer.k_norm.weight", "index_k_norm_bias": "blk.{i}.indexer.k_norm.bias",
                      "index_weights": "blk.{i}.indexer.proj.weight"}

# Llama 4 (llama4), as llama.cpp's converter writes it (Llama4Model): the experts' fused gate_up cut into
# ffn_gate_exps and ffn_up_exps, down transposed to ffn_down_exps ([E, out, in] all), the shared expert under `shexp`
# (ungated), the interleaved dense layers' MLP under the dense names; q/k rows as HF has them (undo_permute off: its
# RoPE turns interleaved pairs, reordered at load as an HF checkpoint's are).
GGUF_LLAMA4_NAMES = {k: v for k, v in GGUF_MOE_NAMES.items() if k != "shared_gate"} | {
    "dense_gate": GGUF_NAMES["w_gate"], "dense_up": GGUF_NAMES["w_up"], "dense_down": GGUF_NAMES["w_down"]}

# Phi-3: gate and up fused in ffn_up (gate rows first, as llama.cpp's SwiGLU reads them), q/k/v fused in attn_qkv
# (some files keep attn_q/k/v apart); cut apart at load (weights.FUSED).
GGUF_PHI3_NAMES = {k: v for k, v in GGUF_NAMES.items() if k not in ("w_gate", "w_up")} | {
    "w_gate_up": "blk.{i}.ffn_up.weight"}
GGUF_PHI3_QKV_NAMES = {k: v for k, v in GGUF_PHI3_NAMES.items() if k not in ("wq", "wk", "wv")} | {
    "wqkv": "blk.{i}.attn_qkv.weight"}

# Granite MoE (granitemoe, also granitemoeshared's files): experts as Mixtral's GGUFs hold them (the converter cuts
# input_linear into ffn_gate_exps and ffn_up_exps), the shared expert's gate and up likewise under `shexp`, ungated.
GGUF_GRANITE_MOE_NAMES = {k: v for k, v in GGUF_MOE_NAMES.items() if k != "shared_gate"}
# GLM-4-0414 (glm4): gate and up fused in ffn_up as Phi-3's, the attention's output norm post_attention_norm, the
# MLP's post_ffw_norm; q/k rows (and biases) as HF has them, RoPE in interleaved pairs (llama.cpp's NORM mode),
# reordered at load as an HF checkpoint's are (safetensors_loader.interleaved_rope_rows).
GGUF_GLM4_NAMES = GGUF_PHI3_NAMES


# Qwen3.5 (qwen35, qwen35moe) and Qwen3-Next (qwen3next), as llama.cpp's converter writes them (Qwen3NextModel, and
# Qwen3_5TextModel / Qwen3_5MoeTextModel over it): the pre-MLP norm post_attention_norm; each Gated DeltaNet layer's
# q/k/v projection attn_qkv, output gate attn_gate, b ssm_beta, a ssm_alpha, convolution ssm_conv1d ([conv_dim, K]),
# dt bias ssm_dt.bias, decay rate ssm_a (-exp(A_log): its log is taken back at load), norm ssm_norm, output ssm_out.
# Qwen3.5's value heads are reordered in every one of those (`_grouped_value_heads`). Qwen3-Next's b and a stay in one
# tensor, ssm_ba, rows grouped by key head as HF's in_proj_ba; its q/k/v/z as Qwen3.5's (attn_qkv, attn_gate: the
# converter regroups in_proj_qkvz), or in older files in one tensor, ssm_in, grouped by key head as HF's in_proj_qkvz;
# both regrouped at load as an HF checkpoint's are (safetensors_loader.qwen3_next_rows). The norms of the residual
# stream and of q/k hold 1 + w (the converter adds the 1), as the model multiplies by them. Attention as Qwen3's, q's
# rows each head's query then its gate, as HF has them (NeoX RoPE: not permuted).
GGUF_GATED_DELTA_NAMES = {
    "mlp_norm": "blk.{i}.post_attention_norm.weight", "gdn_qkv": "blk.{i}.attn_qkv.weight",
    "gdn_z": "blk.{i}.attn_gate.weight", "gdn_b": "blk.{i}.ssm_beta.weight", "gdn_a": "blk.{i}.ssm_alpha.weight",
    "gdn_conv": "blk.{i}.ssm_conv1d.weight", "gdn_dt_bias": "blk.{i}.ssm_dt.bias", "gdn_a_log": "blk.{i}.ssm_a",
    "gdn_norm": "blk.{i}.ssm_norm.weight", "gdn_out": "blk.{i}.ssm_out.weight",
}
GGUF_QWEN35_NAMES = GGUF_NAMES | GGUF_GATED_DELTA_NAMES
GGUF_QWEN35_MOE_NAMES = GGUF_MOE_NAMES | GGUF_GATED_DELTA_NAMES
GGUF_QWEN3_NEXT_NAMES = {k: v for k, v in GGUF_QWEN35_MOE_NAMES.items() if k not in ("gdn_b", "gdn_a")} | {
    "gdn_ba": "blk.{i}.ssm_ba.weight"}
GGUF_QWEN3_NEXT_LEGACY_NAMES = {k: v for k, v in GGUF_QWEN3_NEXT_NAMES.items() if k not in ("gdn_qkv", "gdn_z")} | {
    "gdn_qkvz": "blk.{i}.ssm_in.weight"}

# Granite 4.0-H (granitehybrid), as llama.cpp's converter writes it (GraniteHybridModel over Mamba2Model and
# GraniteMoeModel): Granite's attention (Q/K rows permuted as Llama's) and MLP or experts (GGUF_GRANITE_MOE_NAMES; the
# shared MLP under the dense names where there are no experts), each Mamba-2 layer's in_proj as ssm_in (rows z, x B C,
# dt, as HF's: weights.FUSED["mamba_in"]), convolution ssm_conv1d ([conv_dim, K], with its bias), dt bias ssm_dt.bias,
# ssm_a = -exp(A_log) and ssm_d ([heads, 1]), norm ssm_norm ([groups, inner / groups]), output ssm_out.
GGUF_MAMBA2_NAMES = {
    "mamba_in": "blk.{i}.ssm_in.weight", "gdn_conv": "blk.{i}.ssm_conv1d.weight",
    "gdn_conv_bias": "blk.{i}.ssm_conv1d.bias", "gdn_dt_bias": "blk.{i}.ssm_dt.bias", "gdn_a_log": "blk.{i}.ssm_a",
    "gdn_d": "blk.{i}.ssm_d", "gdn_norm": "blk.{i}.ssm_norm.weight", "gdn_out": "blk.{i}.ssm_out.weight",
}


# Nemotron-H (nemotron_h, nemotron_h_moe), as llama.cpp's converter writes it (NemotronHModel over GraniteHybridModel):
# a block each `blk.{b}` behind its norm `attn_norm`, Mamba-2 as Granite 4.0-H's, attention's Q/K rows permuted as
# Llama's, the MLP ffn_up / ffn_down, or the experts stacked (ffn_up_exps, ffn_down_exps; no gate), the router
# ffn_gate_inp and its correction bias exp_probs_b, the shared expert *_shexp; named here by layer and block kind as
# safetensors_loader.NEMOTRON_H_NAMES are (`nemotron_h_renamed`, prefix "blk.").
GGUF_NEMOTRON_H_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.mixer_block.attn_norm.weight", "mlp_norm": "blk.{i}.mlp_block.attn_norm.weight",
    **{k: v.replace("blk.{i}.", "blk.{i}.mixer_block.") for k, v in GGUF_MAMBA2_NAMES.items()},
    **{k: f"blk.{{i}}.mixer_block.attn_{n}.weight"
       for k, n in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "output"))},
    "w_up": "blk.{i}.mlp_block.ffn_up.weight", "w_down": "blk.{i}.mlp_block.ffn_down.weight"}
GGUF_NEMOTRON_H_MOE_NAMES = GGUF_NEMOTRON_H_NAMES | {
    "router": "blk.{i}.mlp_block.ffn_gate_inp.weight", "router_score_bias": "blk.{i}.mlp_block.exp_probs_b.bias",
    "moe_up": "blk.{i}.mlp_block.ffn_up_exps.weight", "moe_down": "blk.{i}.mlp_block.ffn_down_exps.weight",
    "w_up": "blk.{i}.mlp_block.ffn_up_shexp.weight", "w_down": "blk.{i}.mlp_block.ffn_down_shexp.weight",
    "latent_down": "blk.{i}.mlp_block.ffn_latent_down.weight", "latent_up": "blk.{i}.mlp_block.ffn_latent_up.weight"}


# LFM2 (lfm2), as llama.cpp's converter writes it (LFM2Model): Llama's names, the final norm token_embd_norm (HF's
# embedding_norm), the short convolution layers' in_proj / conv ([hidden, K]) / out_proj under `shortconv`; q/k rows as
# HF has them (NeoX RoPE).
GGUF_LFM2_NAMES = GGUF_NAMES | {
    "final_norm": "token_embd_norm.weight", "gdn_qkv": "blk.{i}.shortconv.in_proj.weight",
    "gdn_conv": "blk.{i}.shortconv.conv.weight", "gdn_out": "blk.{i}.shortconv.out_proj.weight"}
# LFM2-MoE (lfm2moe, LFM2MoeModel): LFM2's layers, the first layers' MLP under the dense names, then the experts stacked
# (ffn_*_exps), the router ffn_gate_inp and its expert bias exp_probs_b (the converter's `expert_bias.bias`); no shared
# expert.
GGUF_LFM2_MOE_NAMES = {k: v for k, v in GGUF_LFM2_NAMES.items() if k not in ("w_gate", "w_up", "w_down")} | {
    "router": GGUF_MOE_NAMES["router"], "moe_gate": GGUF_MOE_NAMES["moe_gate"], "moe_up": GGUF_MOE_NAMES["moe_up"],
    "moe_down": GGUF_MOE_NAMES["moe_down"], "router_score_bias": "blk.{i}.exp_probs_b.bias",
    "dense_gate": GGUF_NAMES["w_gate"], "dense_up": GGUF_NAMES["w_up"], "dense_down": GGUF_NAMES["w_down"]}


# Command R (command-r) and Cohere 2 (cohere2): one norm per layer, attn_norm, before attention and the MLP both; q/k
# rows as HF has them (llama.cpp turns their pairs in NORM mode), reordered at load as GLM-4's are.
GGUF_COHERE_NAMES = {k: v for k, v in GGUF_NAMES.items() if k != "mlp_norm"}


def gguf_names(cfg: LlamaConfig, tensor_names) -> dict[str, str]:
    """The GGUF tensor names of a file's weights (our key, or a fused one, -> name, `{i}` the layer)."""
    if cfg.architecture == "gpt_oss":
        return GGUF_GPT_OSS_NAMES
    if cfg.architecture == "glm4_moe":
        return GGUF_GLM4_MOE_NAMES
    if cfg.architecture == "minimax_m2":
        return GGUF_MINIMAX_M2_NAMES
    if cfg.architecture in ("dots1", "ernie4_5_moe"):
        return GGUF_DOTS1_NAMES
    if cfg.mla:
        names = GGUF_DEEPSEEK2_NAMES if "blk.0.attn_kv_b.weight" in tensor_names else GGUF_DEEPSEEK2_SPLIT_KV_NAMES
        return names | GGUF_INDEXER_NAMES if cfg.index_topk else names
    if cfg.architecture in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
        names = GGUF_QWEN35_MOE_NAMES if cfg.num_experts else GGUF_QWEN35_NAMES
        if cfg.architecture == "qwen3_next":
            legacy = f"blk.{cfg.linear_layers.index(True)}.ssm_in.weight" in tensor_names
            names = GGUF_QWEN3_NEXT_LEGACY_NAMES if legacy else GGUF_QWEN3_NEXT_NAMES
        if "blk.0.ffn_gate_up_exps.weight" in tensor_names:  # the converter's --fuse-gate-up-exps: gate rows first
            names = {k: v for k, v in names.items() if k not in ("moe_gate", "moe_up")} | {
                "moe_gate_up": "blk.{i}.ffn_gate_up_exps.weight"}
        return names
    if cfg.architecture == "lfm2":
        return GGUF_LFM2_MOE_NAMES if cfg.num_experts else GGUF_LFM2_NAMES
    if cfg.architecture == "granitemoehybrid":
        return (GGUF_GRANITE_MOE_NAMES if cfg.num_experts else GGUF_NAMES) | GGUF_MAMBA2_NAMES
    if cfg.architecture == "nemotron_h":
        return GGUF_NEMOTRON_H_MOE_NAMES if cfg.num_experts else GGUF_NEMOTRON_H_NAMES
    if cfg.architecture in ("granitemoe", "granitemoeshared"):  # a shared expert, if any, ungated
        return GGUF_GRANITE_MOE_NAMES
    if cfg.architecture == "llama4":
        return GGUF_LLAMA4_NAMES
    if cfg.num_experts:
        return GGUF_MOE_NAMES
    if cfg.architecture == "glm4":
        return GGUF_GLM4_NAMES
    if cfg.parallel_block:
        return GGUF_COHERE_NAMES
    if cfg.architecture == "phi3":
        return GGUF_PHI3_QKV_NAMES if "blk.0.attn_qkv.weight" in tensor_names else GGUF_PHI3_NAMES
    return GGUF_NAMES


# The architectures whose converter is (or derives from) Llama's, which permutes Q/K rows and biases: Mixtral's too,
# SmolLM3's, Granite's (Granite 4.0-H's attention layers: GraniteHybridModel's undo_permute), Arcee's; olmo2's and the
# NeoX-RoPE ones leave rows as HF has them.
LLAMA_PERMUTED = ("llama", "smollm3", "granite", "granitemoe", "granitehybrid", "arcee", "nemotron_h", "nemotron_h_moe")


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [out, in] (torch orientation)."""
    out = w.shape[0]
    return w.reshape(num_heads, out // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _grouped_value_heads(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """A qwen35 / qwen35moe linear layer's tensor with its value heads in HF's order. llama.cpp's converter
    (_LinearAttentionVReorderBase) moves value head g * r + j (key head g's j-th of r) to j * key_heads + g, so that its
    graphs repeat q and k by tiling; this moves it back, along the value heads' axis: the V rows of gdn_qkv and
    gdn_conv ([conv_dim, K] as stored), the rows of gdn_z, gdn_b, gdn_a, the entries of gdn_dt_bias and gdn_a_log, the
    columns of gdn_out."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if hk == hv or key not in ("gdn_qkv", "gdn_conv", "gdn_z", "gdn_out", "gdn_b", "gdn_a", "gdn_dt_bias", "gdn_a_log"):
        return arr  # (the converter leaves them alone; gdn_norm is one head's)
    width = cfg.linear_value_head_dim if key in ("gdn_qkv", "gdn_conv", "gdn_z", "gdn_out") else 1
    start = 2 * hk * cfg.linear_key_head_dim if key in ("gdn_qkv", "gdn_conv") else 0
    axis = 1 if key == "gdn_out" else 0
    rows = np.moveaxis(arr, axis, 0)
    v = rows[start:]
    v = v.reshape(hv // hk, hk, width, *v.shape[1:]).swapaxes(0, 1).reshape(v.shape)  # [r, hk, d] -> [hk, r, d]
    return np.moveaxis(np.concatenate([rows[:start], v]), 0, axis)


def _linear_tensor(cfg: LlamaConfig, key: str, arr: np.ndarray, name: str, path: str) -> np.ndarray:
    """A linear layer's tensor (GGUF_GATED_DELTA_NAMES, GGUF_MAMBA2_NAMES) as weights.assemble reads an HF
    checkpoint's (safetensors_loader._from_hf)."""
    from models.safetensors_loader import qwen3_next_rows  # (that module imports this one)

    if cfg.architecture in ("qwen3_5", "qwen3_5_moe"):
        arr = _grouped_value_heads(cfg, key, arr)
    if key == "gdn_a_log":  # ssm_a = -exp(A_log); float64's log gives A_log back to within float32's rounding
        if not np.all(arr < 0):
            raise CheckpointError(f"{path}: tensor {name!r} must be negative (llama.cpp's -exp(A_log))")
        return np.log(-arr.astype(np.float64)).astype(np.float32).reshape(-1)  # (Mamba-2's: [heads, 1])
    if key in ("gdn_d", "gdn_norm"):  # Mamba-2's [heads, 1] and [groups, inner / groups]
        return arr.reshape(-1)
    if key == "gdn_conv":  # [conv_dim, K] -> [K, conv_dim]
        return arr.T
    if key in ("gdn_qkvz", "gdn_ba"):
        return qwen3_next_rows(cfg, key, arr)
    return arr


def _join_kv_b(k_b: np.ndarray, v_b: np.ndarray, path: str) -> np.ndarray:
    """The latent's up-projection as HF stores it ([heads x (nope + v), latent]) from llama.cpp's split one: k_b
    [heads, latent, nope] (each head's key rows transposed) and v_b [heads, v, latent]."""
    heads, rank = k_b.shape[0], k_b.shape[1]
    if v_b.shape[0] != heads or v_b.shape[2] != rank:
        raise CheckpointError(f"{path}: attn_k_b {k_b.shape} and attn_v_b {v_b.shape} do not share heads and latent")
    return np.concatenate([np.swapaxes(k_b, 1, 2), v_b], axis=1).reshape(-1, rank)


def dequantized(path: str, tensors: dict, name: str) -> np.ndarray:
    """Tensor `name` of a GGUF file's `tensors` (read_gguf's) as float32 in its shape, whatever its type; a missing
    tensor, an unsupported type or a size its shape does not hold is refused by name."""
    import gguf

    if name not in tensors:
        raise CheckpointError(f"{path}: missing tensor {name!r}")
    t = tensors[name]
    try:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # a plain view: memmap slices cost
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported GGUF type {t.tensor_type.name}") from e
    if arr.size != int(np.prod(t.shape)):
        raise CheckpointError(f"{path}: tensor {name!r} holds {arr.size} values, its shape {t.shape} needs "
                              f"{np.prod(t.shape)}")
    return arr.reshape(t.shape).astype(np.float32, copy=False)


def load_gguf(path: str, dtype: Any = np.float32, mxfp4_experts: bool = False) -> tuple[LlamaConfig, dict]:
    """Reads config and weights (numpy arrays of `dtype`) from a GGUF file. mxfp4_experts: experts stored as MXFP4
    (gpt-oss files) stay in it, as `model.quantization: mxfp4` holds them (`_mxfp4_experts`), never passing through
    `dtype`."""
    meta, tensors = read_gguf(path)

    def get(name: str) -> np.ndarray:
        return dequantized(path, tensors, name)

    arch = meta.get("general.architecture")
    if f"{arch}.vocab_size" not in meta and "token_embd.weight" in tensors:
        meta[f"{arch}.vocab_size"] = int(tensors["token_embd.weight"].shape[0])  # [vocab, hidden]
    # Part of the config, not weights: llama.cpp's per-frequency RoPE divisors (Llama 3.1+ scaling, phi3's LongRoPE).
    rope_freqs = get(ROPE_FREQS) if ROPE_FREQS in tensors else None
    longrope = tuple(get(name) for name in ROPE_FACTORS) if any(name in tensors for name in ROPE_FACTORS) else None
    try:
        cfg = LlamaConfig.from_gguf_metadata(meta, set(tensors), source=path, rope_freqs=rope_freqs,
                                             longrope_factors=longrope)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model metadata ({e})") from e

    if cfg.architecture == "nemotron_h":  # (its blocks named as the layers they make)
        from models.safetensors_loader import nemotron_h_renamed  # (that module imports this one)

        renamed = nemotron_h_renamed(cfg, prefix="blk.")
        tensors = {renamed(name): t for name, t in tensors.items()}
    read = tensor_reader(path, arch, cfg, tensors)
    names = gguf_names(cfg, tensors)
    packed = mxfp4_experts and cfg.num_experts and all(
        tensors[names[key].format(i=i)].tensor_type.name == "MXFP4" for key in EXPERTS for i in layers_of(cfg, key)
        if names[key].format(i=i) in tensors)
    params = assemble(cfg, names, read, dtype, skip=frozenset(EXPERTS) if packed else frozenset())
    if packed:
        params["layers"].update(_mxfp4_experts(cfg, names, tensors, path))
    return cfg, params


def tensor_reader(path: str, arch: str, cfg: LlamaConfig, tensors: dict) -> Callable[[str, str], np.ndarray]:
    """read(key, name): tensor `name` of a GGUF file (`arch`: its general.architecture) as `weights.assemble` reads our
    weight `key` (llama.cpp's row orders undone, DeepSeek's split latent projection joined)."""
    from models.safetensors_loader import (INDEX_ROPE_KEYS, INTERLEAVED_ROPE,  # (that module imports this one)
                                           index_rope_rows, interleaved_rope_rows, mla_rope_rows)

    def get(name: str) -> np.ndarray:
        return dequantized(path, tensors, name)

    def read(key: str, name: str) -> np.ndarray:
        if key == "wkv_b" and name.endswith(".attn_k_b.weight"):
            arr = _join_kv_b(get(name), get(name.replace(".attn_k_b.", ".attn_v_b.")), path)
        else:
            arr = get(name)
        if key == "router_score_bias":  # (ERNIE 4.5's converter keeps its [1, E] shape)
            arr = arr.reshape(-1)
        if arch in LLAMA_PERMUTED and key in ("wq", "wk", "bq", "bk"):
            arr = _unpermute(arr, cfg.num_heads if key in ("wq", "bq") else cfg.num_kv_heads)
        if cfg.mla and key in ("wq", "wq_b", "wkv_a"):
            arr = mla_rope_rows(cfg, key, arr)
        if cfg.index_rope_interleaved and key in INDEX_ROPE_KEYS:
            arr = index_rope_rows(cfg, key, arr)
        if cfg.linear_layers and key.startswith("gdn_"):
            arr = _linear_tensor(cfg, key, arr, name, path)
        if cfg.architecture in INTERLEAVED_ROPE and key in ("wq", "wk", "bq", "bk"):  # pairs turned
            arr = interleaved_rope_rows(cfg, key, arr)
        return arr.reshape(1, -1) if key == "shared_gate" else arr  # a vector: the [out = 1, in] matrix

    return read


def _mxfp4_experts(cfg: LlamaConfig, names: dict[str, str], tensors: dict, path: str) -> dict[str, np.ndarray]:
    """A file's MXFP4 experts in quant's mxfp4 layout: codes [L, E, in, out] uint4, exponents [L, E, in / 32, out],
    L the expert layers (`layers_of`: GLM-4.5's first layers are dense).
    ggml's block: its exponent byte (the same E8M0 bias), then 16 bytes whose low nibbles are the first 16 codes and
    high nibbles the last 16 (codes index the same e2m1 values; ggml keeps them doubled, with the scale halved)."""
    out: dict[str, np.ndarray] = {}
    for key in EXPERTS:
        layers = layers_of(cfg, key)
        for n, i in enumerate(layers):
            name = names[key].format(i=i)
            if name not in tensors:
                raise CheckpointError(f"{path}: missing tensor {name!r}")
            t = tensors[name]
            blocks = np.asarray(t.data).reshape(*t.shape[:-1], t.shape[-1] // MX_GROUP, 1 + MX_GROUP // 2)
            qs = blocks[..., 1:]
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(t.shape)  # [E, out, in]
            for arr, suffix in ((codes, ""), (blocks[..., 0], EXPONENT_SUFFIX)):
                arr = np.swapaxes(arr, -1, -2)
                if n == 0:
                    out[key + suffix] = np.empty((len(layers), *arr.shape), ml_dtypes.uint4 if not suffix else np.uint8)
                out[key + suffix][n] = arr
    return out


# ----------------------------------------------------------------------------------------------------------
# The file's header and tensor directory

_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}  # fmt: skip  # GGUFValueType -> dtype; 8 is STRING, 9 is ARRAY
_GGUF_STRING, _GGUF_ARRAY, _GGUF_BOOL = 8, 9, 7
_DEFAULT_ALIGNMENT = 32
# Types the `gguf` package hands to its dequantizer as typed arrays; every other type is block-quantized bytes.
_PLAIN_TYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: `data` is a read-only view of its bytes in the mapped file, typed and shaped as
    `gguf.quants.dequantize` takes it (float types as floats, block-quantized types as rows of bytes)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # slowest-varying first, as numpy has it (GGUF lists dims fastest first)
    data: np.ndarray


def read_gguf(path: str, tensors: bool = True) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors by name) of a GGUF file, read from its header; tensor data stays in the mapped file.

    NOTE: gguf.GGUFReader builds a numpy view per element of every metadata array: ~10 s for Gemma 3's
    262k-token vocabulary on every load (~50 s when transformers reads it). This walks the same header
    directly (~0.5 s) and leaves dequantizing to the `gguf` package; a test checks both read the same.
    """
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    buf = np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    raw = memoryview(buf)
    if bytes(raw[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a readable GGUF file (no GGUF magic)")
    if len(buf) < 24:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated header)")
    version, num_tensors, num_kv = struct.unpack_from("<IQQ", raw, 4)
    if version not in (2, 3):
        order = " (a big-endian file)" if version > 0xFFFF and version & 0xFFFF == 0 else ""
        raise CheckpointError(f"{path}: unsupported GGUF version {version}{order} (readable: 2, 3, little-endian)")
    pos = 24

    def read_str() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + n
        if pos > len(buf):
            raise ValueError("a string runs past the end of the file")
        return bytes(raw[pos - n : pos]).decode("utf-8", errors="replace")

    def read_value(vtype: int):
        nonlocal pos
        if vtype == _GGUF_STRING:
            return read_str()
        if vtype == _GGUF_ARRAY:
            itype, count = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            if itype in _GGUF_SCALARS:
                dtype = np.dtype(_GGUF_SCALARS[itype])
                items = np.frombuffer(raw, dtype, count, pos).tolist()
                pos += count * dtype.itemsize
                return [bool(x) for x in items] if itype == _GGUF_BOOL else items
            return [read_value(itype) for _ in range(count)]
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"value type {vtype} at byte {pos}")
        dtype = np.dtype(_GGUF_SCALARS[vtype])
        value = np.frombuffer(raw, dtype, 1, pos)[0].item()
        pos += dtype.itemsize
        return bool(value) if vtype == _GGUF_BOOL else value

    meta: dict[str, Any] = {}
    infos = []
    try:
        for _ in range(num_kv):
            key = read_str()
            (vtype,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            meta[key] = read_value(vtype)
        for _ in range(num_tensors if tensors else 0):
            name = read_str()
            (n_dims,) = struct.unpack_from("<I", raw, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", raw, pos + 4)
            tensor_type, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, tensor_type, offset))
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt header: {e})") from e
    if "tokenizer.ggml.precompiled_charsmap" in meta:
        meta["tokenizer.ggml.precompiled_charsmap"] = bytes(meta["tokenizer.ggml.precompiled_charsmap"])

    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise CheckpointError(f"{path}: not a readable GGUF file (general.alignment {alignment!r})")
    data_start = -(-pos // alignment) * alignment
    out: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in infos:
        try:
            tensor_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown GGUF type {type_id}") from None
        shape = tuple(int(d) for d in reversed(dims))
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        count = int(np.prod(shape))
        num_bytes = count * type_size // block
        start = data_start + offset
        if name in out or start + num_bytes > len(buf) or count % block:
            raise CheckpointError(f"{path}: tensor {name!r} is duplicated, truncated or misshapen")
        if tensor_type.name in _PLAIN_TYPES:
            data = buf[start : start + num_bytes].view(_PLAIN_TYPES[tensor_type.name]).reshape(shape)
        else:  # rows of blocks, as bytes
            data = buf[start : start + num_bytes].reshape(gguf.quant_shape_to_byte_shape(shape, tensor_type))
        out[name] = GGUFTensor(name, tensor_type, shape, data)
    return meta, out

