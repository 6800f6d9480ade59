"""HF checkpoint directories: `config.json` plus `model.safetensors` or a sharded index."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

import ml_dtypes

from models.config import LlamaConfig
from models.fp4_checkpoint import fp4_method, is_fp4_weight, read_fp4_weight
from models.quant import (BLOCK_SCALE_SUFFIX, EXPERTS, EXPONENT_SUFFIX, FP8, OFFSET_SUFFIX, PROJECTIONS,
                          SCALE_SUFFIX, dequantize_mxfp4)
from models.gguf_loader import CheckpointError
from models.int_checkpoint import INT_METHODS, IntScheme, has_packed_weight, int_scheme, read_int_weight
from models.weights import JOIN, NORM_KEYS, assemble, joined, layers_of

log = logging.getLogger(__name__)

HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "score": "score.weight",  # a sequence classifier's head (LlamaConfig.num_labels)
    "attn_norm": "model.layers.{i}.input_layernorm.weight", "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias", "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias", "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight", "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight", "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "bo": "model.layers.{i}.self_attn.o_proj.bias",  # (Granite with attention_bias)
}
# The MLP of the dense layers in a model whose layers mix them with expert layers (weights.DENSE_KEYS).
DENSE_LAYER_NAMES = {"dense_gate": HF_NAMES["w_gate"], "dense_up": HF_NAMES["w_up"], "dense_down": HF_NAMES["w_down"]}
# Mixture-of-experts layers: Qwen2/3-MoE keep them under `mlp`, Mixtral under `block_sparse_moe` (w1 gate, w3 up,
# w2 down); Qwen2-MoE's shared expert takes the dense MLP's keys.
QWEN_MOE_NAMES = {
    **HF_NAMES, **DENSE_LAYER_NAMES,
    "router": "model.layers.{i}.mlp.gate.weight",
    "moe_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "moe_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "moe_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "w_gate": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shared_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",
}
# Qwen3.5: attention layers as Qwen3's (q_proj's rows each head's query then its gate), Gated DeltaNet layers under
# `linear_attn` (models/gated_delta.py). A Qwen3_5ForConditionalGeneration checkpoint keeps them under
# `model.language_model.` (`_language_model`); its vision tower and multi-token-prediction layers are not read.
QWEN3_5_NAMES = {**HF_NAMES, **{key: f"model.layers.{{i}}.linear_attn.{name}" for key, name in (
    ("gdn_qkv", "in_proj_qkv.weight"), ("gdn_z", "in_proj_z.weight"), ("gdn_b", "in_proj_b.weight"),
    ("gdn_a", "in_proj_a.weight"), ("gdn_conv", "conv1d.weight"), ("gdn_dt_bias", "dt_bias"), ("gdn_a_log", "A_log"),
    ("gdn_norm", "norm.weight"), ("gdn_out", "out_proj.weight"))}}
# Qwen3.5-MoE: Qwen3.5's layers with Qwen2-MoE's experts, shared expert and its gate.
QWEN3_5_MOE_NAMES = {**QWEN3_5_NAMES, **QWEN_MOE_NAMES}
# Qwen3-Next: Qwen3.5-MoE's layers, each linear layer's q, k, v, z in one projection and b, a in another, their rows
# grouped by key head (`qwen3_next_rows`).
QWEN3_NEXT_NAMES = {k: v for k, v in QWEN3_5_MOE_NAMES.items() if k not in ("gdn_qkv", "gdn_z", "gdn_b", "gdn_a")} | {
    "gdn_qkvz": "model.layers.{i}.linear_attn.in_proj_qkvz.weight", "gdn_ba": "model.layers.{i}.linear_attn.in_proj_ba.weight"}
MIXTRAL_NAMES = {
    **HF_NAMES,
    "router": "model.layers.{i}.block_sparse_moe.gate.weight",
    "moe_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "moe_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    "moe_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
}
# MiniMax-M2: Mixtral's experts, the router's correction bias beside the experts (`block_sparse_moe.
# e_score_correction_bias`); q/k norms over whole projections under Llama's q_norm / k_norm names.
MINIMAX_M2_NAMES = MIXTRAL_NAMES | {"router_score_bias": "model.layers.{i}.block_sparse_moe.e_score_correction_bias"}
# GLM-4.5 and DeepSeek-V3: the router's correction bias beside its weight, shared experts (one MLP) under
# `shared_experts`, the first layers dense.
GLM4_MOE_NAMES = {
    **QWEN_MOE_NAMES,
    "router_score_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "w_gate": "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
}
# ERNIE 4.5's experts: GLM-4.5's names but the correction bias ([1, E]) under `moe_statics`.
ERNIE_MOE_NAMES = GLM4_MOE_NAMES | {"router_score_bias": "model.layers.{i}.mlp.moe_statics.e_score_correction_bias"}
# DeepSeek-V2/V3: latent attention (weights.MLA_KEYS), experts as GLM-4.5's (V2 without the correction bias).
DEEPSEEK_NAMES = {k: v for k, v in GLM4_MOE_NAMES.items() if k not in ("wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm")} | {
    "wq_a": "model.layers.{i}.self_attn.q_a_proj.weight", "q_a_norm": "model.layers.{i}.self_attn.q_a_layernorm.weight",
    "wq_b": "model.layers.{i}.self_attn.q_b_proj.weight",
    "wkv_a": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_norm": "model.layers.{i}.self_attn.kv_a_layernorm.weight",
    "wkv_b": "model.layers.{i}.self_attn.kv_b_proj.weight",
}
# DeepSeek-V3.2: V3's, and each layer's sparse attention indexer (weights.INDEX_KEYS) under `self_attn.indexer`.
DEEPSEEK_V32_NAMES = DEEPSEEK_NAMES | {key: f"model.layers.{{i}}.self_attn.indexer.{name}" for key, name in (
    ("index_wq", "wq_b.weight"), ("index_wk", "wk.weight"), ("index_k_norm", "k_norm.weight"),
    ("index_k_norm_bias", "k_norm.bias"), ("index_weights", "weights_proj.weight"))}
# Llama 4: the MLP under `feed_forward` (the dense layers' there, an expert layer's shared expert under
# `shared_expert`), the router `router`, the experts stored together as [E, in, out] (gate and up fused, gate columns
# first: `_from_hf` turns them to torch orientation).
LLAMA4_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("w_gate", "w_up", "w_down")} | {
    **{f"w_{p}": f"model.layers.{{i}}.feed_forward.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{f"dense_{p}": f"model.layers.{{i}}.feed_forward.{p}_proj.weight" for p in ("gate", "up", "down")},
    "router": "model.layers.{i}.feed_forward.router.weight",
    "moe_gate_up": "model.layers.{i}.feed_forward.experts.gate_up_proj",
    "moe_down": "model.layers.{i}.feed_forward.experts.down_proj"}
# Kimi Linear: DeepSeek-V3's latent attention layers (queries projected directly) and Kimi Delta Attention layers,
# both under `self_attn` (q, k, v and their convolutions stored apart, joined here), experts and shared ones under
# `block_sparse_moe` (Mixtral's names for the experts, DeepSeek's for the router's correction bias). The dense layers'
# MLP is under `mlp`, or under `block_sparse_moe` where transformers wrote the checkpoint (`_present_names`).
_KDA = "model.layers.{i}.self_attn."
KIMI_LINEAR_NAMES = {k: v for k, v in DEEPSEEK_NAMES.items() if k not in ("wq_a", "q_a_norm", "wq_b")} | {
    "router": "model.layers.{i}.block_sparse_moe.gate.weight",
    "router_score_bias": "model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias",
    **{f"moe_{p}": f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight"
       for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))},
    **{f"w_{p}": f"model.layers.{{i}}.block_sparse_moe.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")},
    "gdn_qkv": joined(*(f"{_KDA}{x}_proj.weight" for x in "qkv")),
    "gdn_conv": joined(*(f"{_KDA}{x}_conv1d.weight" for x in "qkv")),
    **{key: _KDA + name for key, name in (
        ("gdn_fa", "f_a_proj.weight"), ("gdn_fb", "f_b_proj.weight"), ("gdn_dt_bias", "dt_bias"),
        ("gdn_a_log", "A_log"), ("gdn_b", "b_proj.weight"), ("gdn_ga", "g_a_proj.weight"),
        ("gdn_gb", "g_b_proj.weight"), ("gdn_norm", "o_norm.weight"), ("gdn_out", "o_proj.weight"))},
}
# Gemma 2 and 3 name their four norms differently (Llama's "post_attention" norm is their pre-MLP one).
GEMMA_NAMES = {
    **HF_NAMES,
    "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# OLMo 2 / 3 and EXAONE 4: no norms before attention and the MLP, one after each (`post_attention_layernorm` is not Llama's pre-MLP
# norm here).
OLMO_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("attn_norm", "mlp_norm")} | {
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# gpt-oss: every projection with a bias, a sink logit per head, experts stored together as [E, in, out] with gate and
# up fused and interleaved column by column (`_from_hf` puts them in torch orientation, gate rows then up rows), as
# bfloat16 or as MXFP4 (`<name>_blocks`, `<name>_scales`: `dequantize_mxfp4_blocks`).
GPT_OSS_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("w_gate", "w_up", "w_down")} | {
    "bo": "model.layers.{i}.self_attn.o_proj.bias", "sinks": "model.layers.{i}.self_attn.sinks",
    "router": "model.layers.{i}.mlp.router.weight", "router_bias": "model.layers.{i}.mlp.router.bias",
    "moe_gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
    "moe_gate_up_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "moe_down": "model.layers.{i}.mlp.experts.down_proj", "moe_down_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
}
# GLM-4 (glm) and GLM-4-0414 (glm4): gate and up in one tensor (weights.FUSED); glm4 norms the attention's and the
# MLP's outputs too (its `post_attention_layernorm` is Llama's pre-MLP norm).
GLM_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("w_gate", "w_up")} | {
    "w_gate_up": "model.layers.{i}.mlp.gate_up_proj.weight"}
GLM4_NAMES = GLM_NAMES | {"post_attn_norm": "model.layers.{i}.post_self_attn_layernorm.weight",
                          "post_mlp_norm": "model.layers.{i}.post_mlp_layernorm.weight"}
# Cohere (Command R, Aya Expanse) and Cohere 2 (Command R7B, Command A): one norm per layer (a LayerNorm without bias)
# before attention and the MLP both, tied embeddings.
COHERE_NAMES = {k: v for k, v in HF_NAMES.items() if k != "mlp_norm"}
# Apertus: Llama's attention with per-head q/k norms, its norms named for what they precede, an MLP without a gate
# whose xIELU activation keeps four scalars per layer (weights.XIELU_KEYS).
APERTUS_NAMES = {k: v for k, v in HF_NAMES.items() if k != "w_gate"} | {
    "attn_norm": "model.layers.{i}.attention_layernorm.weight", "mlp_norm": "model.layers.{i}.feedforward_layernorm.weight",
    "xielu_alpha_p": "model.layers.{i}.mlp.act_fn.alpha_p", "xielu_alpha_n": "model.layers.{i}.mlp.act_fn.alpha_n",
    "xielu_beta": "model.layers.{i}.mlp.act_fn.beta", "xielu_eps": "model.layers.{i}.mlp.act_fn.eps",
}
# LFM2: its norms named for what they precede (operator_norm, ffn_norm), the final one `embedding_norm`, attention's
# output `out_proj` and q/k norms `q_layernorm` / `k_layernorm`, the MLP w1 (gate) / w3 (up) / w2 (down), the short
# convolution layers under `conv` (in_proj: B, C, x; conv [hidden, 1, K]; out_proj).
LFM2_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("bq", "bk", "bv", "bo")} | {
    "final_norm": "model.embedding_norm.weight", "attn_norm": "model.layers.{i}.operator_norm.weight",
    "mlp_norm": "model.layers.{i}.ffn_norm.weight", "wo": "model.layers.{i}.self_attn.out_proj.weight",
    "q_norm": "model.layers.{i}.self_attn.q_layernorm.weight", "k_norm": "model.layers.{i}.self_attn.k_layernorm.weight",
    "w_gate": "model.layers.{i}.feed_forward.w1.weight", "w_up": "model.layers.{i}.feed_forward.w3.weight",
    "w_down": "model.layers.{i}.feed_forward.w2.weight", "gdn_qkv": "model.layers.{i}.conv.in_proj.weight",
    "gdn_conv": "model.layers.{i}.conv.conv.weight", "gdn_out": "model.layers.{i}.conv.out_proj.weight"}
# LFM2-MoE: LFM2's, the dense layers' MLP under the dense names, the experts one by one under `feed_forward.experts`
# (w1 gate, w3 up, w2 down), the router `feed_forward.gate`, its correction bias `feed_forward.expert_bias`.
LFM2_MOE_NAMES = {k: v for k, v in LFM2_NAMES.items() if k not in ("w_gate", "w_up", "w_down")} | {
    "dense_gate": LFM2_NAMES["w_gate"], "dense_up": LFM2_NAMES["w_up"], "dense_down": LFM2_NAMES["w_down"],
    "router": "model.layers.{i}.feed_forward.gate.weight",
    "router_score_bias": "model.layers.{i}.feed_forward.expert_bias",
    **{f"moe_{p}": f"model.layers.{{i}}.feed_forward.experts.{{e}}.{w}.weight"
       for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}}
# Architectures whose RoPE turns interleaved pairs: their q/k rows are reordered at load (`interleaved_rope_rows`).
INTERLEAVED_ROPE = ("glm", "glm4", "cohere", "cohere2", "ernie4_5", "ernie4_5_moe", "llama4")
# Granite MoE (granitemoe, granitemoeshared): each layer's experts stored together, gate and up fused in `input_linear`
# ([E, 2 x intermediate, hidden], gate rows first), `output_linear` the down projections; the router under
# `router.layer`; granitemoeshared's shared expert (ungated) as one MLP with gate and up fused. Granite 4.0
# (granitemoehybrid) alike, its `shared_mlp` the MLP where it has no experts, its Mamba-2 layers under `mamba`
# (in_proj's rows z, x B C, dt: `weights.FUSED["mamba_in"]`).
GRANITE_MOE_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("w_gate", "w_up", "w_down")} | {
    "router": "model.layers.{i}.block_sparse_moe.router.layer.weight",
    "moe_gate_up": "model.layers.{i}.block_sparse_moe.input_linear.weight",
    "moe_down": "model.layers.{i}.block_sparse_moe.output_linear.weight",
    "w_gate_up": "model.layers.{i}.shared_mlp.input_linear.weight",
    "w_down": "model.layers.{i}.shared_mlp.output_linear.weight",
}
GRANITE4_NAMES = GRANITE_MOE_NAMES | {key: f"model.layers.{{i}}.mamba.{name}" for key, name in (
    ("mamba_in", "in_proj.weight"), ("gdn_conv", "conv1d.weight"), ("gdn_conv_bias", "conv1d.bias"),
    ("gdn_dt_bias", "dt_bias"), ("gdn_a_log", "A_log"), ("gdn_d", "D"), ("gdn_norm", "norm.weight"),
    ("gdn_out", "out_proj.weight"))}
# Nemotron-H: blocks of one kind each, a token mixer (Mamba-2 or attention) or an MLP, under `mixer` beside its `norm`;
# a layer here is a mixer block and the MLP block after it, if any (`config.nemotron_h_layers`), so these names say
# `mixer_block` and `mlp_block` where the checkpoint numbers blocks (`nemotron_h_renamed`).
NEMOTRON_H_NAMES = {
    "embed": "backbone.embeddings.weight", "final_norm": "backbone.norm_f.weight", "lm_head": "lm_head.weight",
    "attn_norm": "backbone.layers.{i}.mixer_block.norm.weight", "mlp_norm": "backbone.layers.{i}.mlp_block.norm.weight",
    "w_up": "backbone.layers.{i}.mlp_block.mixer.up_proj.weight",
    "w_down": "backbone.layers.{i}.mlp_block.mixer.down_proj.weight",
    **{key: f"backbone.layers.{{i}}.mixer_block.mixer.{name}" for key, name in (
        ("wq", "q_proj.weight"), ("wk", "k_proj.weight"), ("wv", "v_proj.weight"), ("wo", "o_proj.weight"),
        ("mamba_in", "in_proj.weight"), ("gdn_conv", "conv1d.weight"), ("gdn_conv_bias", "conv1d.bias"),
        ("gdn_dt_bias", "dt_bias"), ("gdn_a_log", "A_log"), ("gdn_d", "D"), ("gdn_norm", "norm.weight"),
        ("gdn_out", "out_proj.weight"))}}
# Nemotron 3's expert blocks: the router `gate` (float32) with its correction bias, each expert's up and down, one
# shared expert as the dense MLP's weights; Nemotron 3 Super's projections to the experts' latent space and back.
NEMOTRON_H_MOE_NAMES = NEMOTRON_H_NAMES | {
    "router": "backbone.layers.{i}.mlp_block.mixer.gate.weight",
    "router_score_bias": "backbone.layers.{i}.mlp_block.mixer.gate.e_score_correction_bias",
    "moe_up": "backbone.layers.{i}.mlp_block.mixer.experts.{e}.up_proj.weight",
    "moe_down": "backbone.layers.{i}.mlp_block.mixer.experts.{e}.down_proj.weight",
    "w_up": "backbone.layers.{i}.mlp_block.mixer.shared_experts.up_proj.weight",
    "w_down": "backbone.layers.{i}.mlp_block.mixer.shared_experts.down_proj.weight",
    "latent_down": "backbone.layers.{i}.mlp_block.mixer.fc1_latent_proj.weight",
    "latent_up": "backbone.layers.{i}.mlp_block.mixer.fc2_latent_proj.weight"}


def nemotron_h_renamed(cfg: LlamaConfig, prefix: str = "backbone.layers.") -> Callable[[str], str]:
    """A Nemotron-H checkpoint's tensor name -> the name NEMOTRON_H_NAMES gives it (its block's layer and whether the
    block is that layer's mixer or MLP); other names (and blocks past the layers: an MTP block) as they are. `prefix`:
    the blocks' ("blk." in a GGUF file: gguf_loader.GGUF_NEMOTRON_H_NAMES)."""
    mlp = cfg.mlp_layers or (True,) * cfg.num_layers
    block_of = [(i, part) for i in range(cfg.num_layers) for part in ("mixer_block", "mlp_block")[: 1 + mlp[i]]]
    block = re.compile(re.escape(prefix) + r"(\d+)\.")

    def renamed(name: str) -> str:
        m = block.match(name)
        if m is None or int(m[1]) >= len(block_of):
            return name
        i, part = block_of[int(m[1])]
        return f"{prefix}{i}.{part}.{name[m.end():]}"

    return renamed


class _Renamed:
    """An open safetensors file whose tensors are asked for by other names (`opened_shards`' rename)."""

    def __init__(self, f, stored_name: Mapping[str, str]):
        self.f, self.stored_name = f, stored_name

    def get_tensor(self, name: str):
        return self.f.get_tensor(self.stored_name[name])

    def get_slice(self, name: str):
        return self.f.get_slice(self.stored_name[name])


# Phi-3: q/k/v in one tensor, gate and up in another, cut apart at load (weights.FUSED).
PHI3_NAMES = {k: v for k, v in HF_NAMES.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")} | {
    "wqkv": "model.layers.{i}.self_attn.qkv_proj.weight", "w_gate_up": "model.layers.{i}.mlp.gate_up_proj.weight",
}


def read_hf_config(directory: str) -> LlamaConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return LlamaConfig.from_hf_config(raw, source=path)


def _shard_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map'")
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json")


@contextlib.contextmanager
def opened_shards(directory: str, rename: Callable[[str], str] | None = None):
    """The checkpoint's safetensors files, open while the block runs: yields (tensor name -> (its file's path, the
    open file), stored(name) -> the tensor as the file holds it, a numpy array on the host). `rename`: each tensor
    goes by rename(its stored name) (Nemotron-H's blocks as layers: `nemotron_h_renamed`)."""
    import jax
    from safetensors import SafetensorError, safe_open

    _numpy_float8()
    # framework="flax" reads bfloat16 too (numpy has no bfloat16); on the host CPU, so no accelerator memory is used.
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
        host = None
    with contextlib.ExitStack() as files:
        shard_of = {}
        for path in _shard_files(directory):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            try:
                f = files.enter_context(safe_open(path, framework="flax"))
            except SafetensorError as e:
                raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
            if rename is None:
                shard_of.update(dict.fromkeys(f.keys(), (path, f)))
            else:
                stored_name = {rename(name): name for name in f.keys()}
                shard_of.update(dict.fromkeys(stored_name, (path, _Renamed(f, stored_name))))

        def stored(name: str) -> np.ndarray:
            if name not in shard_of:
                raise CheckpointError(f"{directory}: missing tensor {name!r}")
            path, f = shard_of[name]
            try:
                with jax.default_device(host):
                    return np.asarray(f.get_tensor(name))
            except SafetensorError as e:
                raise CheckpointError(f"{path}: corrupt safetensors file, tensor {name!r} ({e})") from e

        yield shard_of, stored


def load_safetensors_dir(directory: str, dtype: Any = np.float32, mxfp4_experts: bool = False,
                         keep_fp8: tuple[str, ...] = (), keep_int: tuple[int, ...] = ()) -> tuple[LlamaConfig, dict]:
    """Reads config and weights (numpy arrays of `dtype`) from an HF safetensors directory.

    mxfp4_experts: experts the checkpoint stores in MXFP4 (gpt-oss) stay in it, as `model.quantization: mxfp4` holds
    them (uint4 codes and `<name>_exponent`; models/quant.py), never passing through `dtype` (the host then holds a
    byte a weight for them, not two). keep_fp8: the FP8 layouts kept as stored, as `model.quantization: fp8` holds
    them ("block": e4m3 and `<name>_block_scale`; "channel": e4m3 and `<name>_scale`; `_kept_fp8`). keep_int: the
    bit widths of an integer checkpoint's (GPTQ, AWQ, compressed-tensors; models/int_checkpoint.py) weights kept as
    stored: 4, as `model.quantization: int4` holds them; 8, as `int8` does (`_kept_int`).

    Tensors are read one at a time, in their stored dtype, straight into the stacked arrays (`weights.assemble`): the
    host holds the weights in `dtype` plus one tensor (a 16 GB bfloat16 checkpoint no longer passes through 32 GB of
    float32). FP8 weights (DeepSeek-V3's and the Qwen3 / Llama "-FP8" checkpoints') and integer ones are dequantized
    into `dtype` as they are read (`dequantize_fp8`, `IntWeight.dequantize`)."""
    cfg = read_hf_config(directory)
    block, block_scales = _fp8_block(directory)
    scheme = int_scheme(directory)
    rename = nemotron_h_renamed(cfg) if cfg.architecture == "nemotron_h" else None  # (its blocks as layers)
    with opened_shards(directory, rename) as (shard_of, stored):
        get = tensor_reader(directory, shard_of, stored)

        def read(key: str, name: str) -> np.ndarray:
            return _from_hf(cfg, key, get(name))

        def has(name: str) -> bool:
            return name in shard_of

        names = _present_names(cfg, _language_model(hf_names(cfg), shard_of), shard_of)
        packed = (mxfp4_experts and cfg.architecture == "gpt_oss"
                  and names["moe_down"].format(i=0) + "_blocks" in shard_of)
        kept = _kept_fp8(cfg, names, shard_of, block, block_scales, keep_fp8) if keep_fp8 else {}
        kept_int = (_kept_int(cfg, names, scheme, stored, has, keep_int) if scheme is not None and keep_int
                    else {})
        params = assemble(cfg, names, read, dtype,
                          skip=frozenset(EXPERTS if packed else ()) | frozenset(kept) | frozenset(kept_int))
        if packed:
            params["layers"].update(_mxfp4_experts(cfg, names, get))
        for key, (layout, suffix) in kept.items():
            params["layers"].update(_fp8_weights(cfg, key, names[key], block if layout == "block" else None, suffix,
                                                 stored))
        for key, bits in kept_int.items():
            params["layers"].update(_int_weights(cfg, key, names[key], bits, scheme, stored, has))
        return cfg, params


def tensor_reader(directory: str, shard_of: Mapping[str, tuple], stored) -> Callable[[str], np.ndarray]:
    """get(name): a tensor of the opened shards (`opened_shards`) as floats, MXFP4, NVFP4, FP8 and integer ones
    dequantized."""
    block, block_scales = _fp8_block(directory)
    scheme = int_scheme(directory)
    fp4 = fp4_method(directory)

    def has(name: str) -> bool:
        return name in shard_of

    def get(name: str) -> np.ndarray:
        if JOIN in name:  # tensors stored apart, one weight here
            return np.concatenate([get(part) for part in name.split(JOIN)])
        if is_fp4_weight(name, fp4, has):
            return read_fp4_weight(name, fp4, stored)
        if name not in shard_of and name + "_blocks" in shard_of:  # MXFP4 (gpt-oss experts)
            return np.swapaxes(dequantize_mxfp4_blocks(get(name + "_blocks"), get(name + "_scales")), -1, -2)
        prefix = name.removesuffix(".weight")
        if scheme is not None and name != prefix and (has_packed_weight(prefix, has) or (
                has(name) and has(name + "_scale") and shard_of[name][1].get_slice(name).get_dtype() == "I8")):
            return read_int_weight(prefix, scheme, stored, has).dequantize().T
        arr = stored(name)
        if "float8" in str(arr.dtype):
            path = shard_of[name][0]
            scale = next((name + s for s in ("_scale_inv", "_scale") if name + s in shard_of), None)
            if scale is None:
                raise CheckpointError(f"{path}: tensor {name!r} is {arr.dtype} without a {name}_scale_inv or "
                                      f"{name}_scale beside it (an FP8 format this loader does not read)")
            return dequantize_fp8(arr, get(scale), block if scale.endswith(block_scales) else None, name)
        return arr

    return get


def hf_tensor(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """A stored tensor of our weight `key` as `weights.assemble` reads it (torch orientation, our row order)."""
    return _from_hf(cfg, key, arr)


def kept_int_quantization(directory: str) -> str:
    """The model.quantization that keeps an integer checkpoint's weights as stored ("int4", "int8", or "w8a8" where
    it quantizes activations to int8 too), or "none" when it is no integer checkpoint or quant keeps none of its
    layouts (they are dequantized at load)."""
    scheme = int_scheme(directory)
    if scheme is None:
        return "none"
    cfg = read_hf_config(directory)
    with opened_shards(directory) as (shard_of, stored):
        bits = set(_kept_int(cfg, hf_names(cfg), scheme, stored, shard_of.__contains__, (4, 8)).values())
    if 4 in bits:
        return "int4"
    if not bits:
        log.warning("%s: its %s integer weights are in a layout not served as stored (act-order groups, 8 bits in "
                    "groups or with zero points, 2 bits): they are dequantized into model.dtype at load "
                    "(model.quantization int4 or int8 re-quantizes them)", directory, scheme.method)
    return ("w8a8" if scheme.activations else "int8") if bits else "none"


def _int_layout(weight, bits: int) -> bool:
    """Whether an IntWeight fits the layout kept for `bits` (models/quant.py): 4-bit with contiguous groups (int4),
    or 8-bit with one symmetric scale per output feature (int8)."""
    if weight.bits != bits or weight.act_order:
        return False
    return bits == 4 or (bits == 8 and weight.symmetric and weight.scale.shape[0] == 1)


def _kept_int(cfg: LlamaConfig, names: Mapping[str, str], scheme: IntScheme, stored, has,
              keep: tuple[int, ...]) -> dict[str, int]:
    """The projections an integer checkpoint stores in a layout quant keeps (`_int_layout`) with a bit width in
    `keep` -> that width, judged by their first layer's tensor. Not latent attention's wq, wq_b and wkv_a (their RoPE
    rows are reordered at load, `mla_rope_rows`), nor fused tensors (Phi-3's); those are dequantized."""
    kept = {}
    for key in PROJECTIONS + EXPERTS:
        if key not in names or (cfg.mla and key in ("wq", "wq_b", "wkv_a")) or cfg.architecture == "gpt_oss":
            continue
        first = names[key].format(i=layers_of(cfg, key)[0], e=0).removesuffix(".weight")
        if not (has_packed_weight(first, has) or has(first + ".weight_scale")):
            continue
        if has(first + ".weight") and stored(first + ".weight").dtype != np.int8:
            continue  # e4m3 with a scale: an FP8 checkpoint's
        weight = read_int_weight(first, scheme, stored, has)
        bits = next((b for b in keep if _int_layout(weight, b)), None)
        if bits is not None:
            kept[key] = bits
    return kept


def _int_weights(cfg: LlamaConfig, key: str, name: str, bits: int, scheme: IntScheme, stored,
                 has) -> dict[str, np.ndarray]:
    """Projection `key` kept as the integer checkpoint stores it, stacked over its layers in quant's layout: 4 bits,
    uint4 values [L, (E,) in, out] with float32 `<key>_scale` and `<key>_offset` [L, (E,) groups, out]; 8 bits, int8
    values with `<key>_scale` [L, (E,) out]."""
    out: dict[str, np.ndarray] = {}

    def one(tensor: str) -> tuple[np.ndarray, ...]:
        weight = read_int_weight(tensor.removesuffix(".weight"), scheme, stored, has)
        if not _int_layout(weight, bits):
            raise CheckpointError(f"tensor {tensor!r}: a {weight.bits}-bit weight"
                                  f"{' in act-order groups' if weight.act_order else ''} where the first layer's is "
                                  f"kept in {bits} bits; model.quantization: none dequantizes every layer")
        if bits == 4:
            return weight.q.astype(ml_dtypes.uint4), weight.scale, weight.offset
        return weight.signed_int8(), weight.scale[0]

    layers = layers_of(cfg, key)
    for n, i in enumerate(layers):
        if "{e}" in name:
            parts = [one(name.format(i=i, e=e)) for e in range(cfg.num_experts)]
            arrays = tuple(np.stack([p[j] for p in parts]) for j in range(len(parts[0])))
        else:
            arrays = one(name.format(i=i))
        suffixes = ("", SCALE_SUFFIX, OFFSET_SUFFIX)[: len(arrays)]
        for suffix, arr in zip(suffixes, arrays):
            if n == 0:
                out[key + suffix] = np.empty((len(layers), *arr.shape), arr.dtype)
            if out[key + suffix].shape[1:] != arr.shape:
                raise CheckpointError(f"tensor {name.format(i=i, e=0)!r}: its {key + suffix} has shape {arr.shape}, "
                                      f"layer {layers[0]}'s {out[key + suffix].shape[1:]}")
            out[key + suffix][n] = arr
    return out


def _kept_fp8(cfg: LlamaConfig, names: Mapping[str, str], shard_of: Mapping[str, tuple], block: tuple[int, int],
              block_scales: tuple[str, ...], keep: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """The projections an FP8 checkpoint stores in e4m3 that can be kept so -> (their layout, their scales' suffix):
    "block" (a scale per block of `block` weights, both dims whole blocks; scales named with a suffix in
    `block_scales`) or "channel" (compressed-tensors' scale per output row, or one for the tensor), where the layout
    is in `keep`. Not wkv_a (its RoPE rows move across blocks, `mla_rope_rows`), nor a query
    projection whose heads' RoPE rows straddle two blocks; those are dequantized."""
    rows, cols = block
    kept = {}
    for key in PROJECTIONS + EXPERTS:
        if key not in names or key == "wkv_a":
            continue
        first = names[key].format(i=layers_of(cfg, key)[0], e=0)
        tensor = shard_of[first][1].get_slice(first) if first in shard_of else None
        if tensor is None or tensor.get_dtype() != "F8_E4M3":
            continue
        suffix = next((s for s in ("_scale_inv", "_scale") if first + s in shard_of), None)
        if suffix in block_scales:
            out, fan_in = tensor.get_shape()[-2:]
            whole = out % rows == 0 and fan_in % cols == 0 and (not cfg.mla or key not in ("wq", "wq_b") or all(
                start // rows == (start + cfg.qk_rope_head_dim - 1) // rows
                for start in range(cfg.qk_nope_head_dim, out, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)))
            layout = "block" if whole else None
        else:
            layout = "channel" if suffix else None
        if layout in keep:
            kept[key] = (layout, suffix)
    return kept


def _fp8_weights(cfg: LlamaConfig, key: str, name: str, block: tuple[int, int] | None, scale_suffix: str,
                 stored) -> dict[str, np.ndarray]:
    """Projection `key` kept in e4m3 as the checkpoint stores it (its scales in `<tensor><scale_suffix>`), stacked
    over its layers in quant's layout: values [L, (E,) in, out] with `<key>_block_scale` [L, (E,) in / cols, out /
    rows] (`block` (rows, cols)) or `<key>_scale` [L, (E,) out]. `stored(name)` reads a tensor as stored."""
    out: dict[str, np.ndarray] = {}
    suffix = BLOCK_SCALE_SUFFIX if block is not None else SCALE_SUFFIX

    def one(tensor: str) -> tuple[np.ndarray, np.ndarray]:  # [out, in] e4m3 -> ([in, out], its scales transposed)
        w = stored(tensor)
        if w.dtype != FP8:
            raise CheckpointError(f"tensor {tensor!r} is {w.dtype}, where the first layer's is e4m3: a checkpoint with "
                                  "FP8 and float layers in one projection is not read as FP8 (model.quantization: none "
                                  "dequantizes it)")
        scale = _fp8_scale(w, stored(tensor + scale_suffix), block, tensor)
        if cfg.mla and key in ("wq", "wq_b"):  # RoPE rows reordered within their blocks (`_kept_fp8`)
            w = mla_rope_rows(cfg, key, w)
        return w.T, scale.T if block is not None else scale

    for n, i in enumerate(layers_of(cfg, key)):
        if "{e}" in name:
            parts = [one(name.format(i=i, e=e)) for e in range(cfg.num_experts)]
            w, scale = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        else:
            w, scale = one(name.format(i=i))
        if n == 0:
            count = len(layers_of(cfg, key))
            out[key], out[key + suffix] = np.empty((count, *w.shape), FP8), np.empty((count, *scale.shape), np.float32)
        out[key][n], out[key + suffix][n] = w, scale
    return out


def _mxfp4_experts(cfg: LlamaConfig, names: Mapping[str, str], get) -> dict[str, np.ndarray]:
    """gpt-oss's MXFP4 experts as quant's mxfp4 layout: codes [L, E, in, out] uint4, exponents [L, E, in / 32, out],
    gate and up apart (the checkpoint interleaves their rows). `get(name)` reads a stored tensor."""
    out: dict[str, np.ndarray] = {}

    def put(key: str, i: int, codes: np.ndarray, exponents: np.ndarray) -> None:  # [E, out, in], [E, out, in / 32]
        for name, arr in ((key, codes.swapaxes(-1, -2)), (key + EXPONENT_SUFFIX, exponents.swapaxes(-1, -2))):
            if i == 0:
                out[name] = np.empty((cfg.num_layers, *arr.shape), ml_dtypes.uint4 if name == key else np.uint8)
            out[name][i] = arr

    for i in range(cfg.num_layers):
        for fused, parts in (("moe_gate_up", ("moe_gate", "moe_up")), ("moe_down", ("moe_down",))):
            name = names[fused].format(i=i)
            codes, scales = mxfp4_codes(get(name + "_blocks")), np.asarray(get(name + "_scales"), np.uint8)  # [E, out, in]
            if len(parts) == 2:  # rows interleaved gate, up: cut apart
                for j, part in enumerate(parts):
                    put(part, i, codes[:, j::2], scales[:, j::2])
            else:
                put(parts[0], i, codes, scales)
    return out


def hf_names(cfg: LlamaConfig) -> dict[str, str]:
    """The HF tensor names of an architecture's weights (our key, or a fused one, -> name, `{i}` the layer, `{e}` the
    expert)."""
    if cfg.index_topk:
        return DEEPSEEK_V32_NAMES
    return {"mixtral": MIXTRAL_NAMES, "qwen2_moe": QWEN_MOE_NAMES, "qwen3_moe": QWEN_MOE_NAMES, "phi3": PHI3_NAMES,
            "gpt_oss": GPT_OSS_NAMES, "glm4_moe": GLM4_MOE_NAMES, "deepseek_v2": DEEPSEEK_NAMES,
            "deepseek_v3": DEEPSEEK_NAMES, "olmo2": OLMO_NAMES, "olmo3": OLMO_NAMES, "exaone4": OLMO_NAMES, "glm": GLM_NAMES,
            "glm4": GLM4_NAMES, "cohere": COHERE_NAMES, "cohere2": COHERE_NAMES, "granitemoe": GRANITE_MOE_NAMES, "granitemoeshared": GRANITE_MOE_NAMES,
            "granitemoehybrid": GRANITE4_NAMES, "apertus": APERTUS_NAMES, "qwen3_5": QWEN3_5_NAMES,
            "qwen3_5_moe": QWEN3_5_MOE_NAMES, "qwen3_next": QWEN3_NEXT_NAMES, "minimax_m2": MINIMAX_M2_NAMES,
            "olmoe": QWEN_MOE_NAMES, "nemotron_h": NEMOTRON_H_MOE_NAMES if cfg.num_experts else NEMOTRON_H_NAMES,
            "dots1": GLM4_MOE_NAMES, "ernie4_5_moe": ERNIE_MOE_NAMES,
            "lfm2": LFM2_MOE_NAMES if cfg.num_experts else LFM2_NAMES, "kimi_linear": KIMI_LINEAR_NAMES,
            "llama4": LLAMA4_NAMES}.get(
        cfg.architecture, GEMMA_NAMES if cfg.architecture in ("gemma2", "gemma3") else HF_NAMES)


def _language_model(names: dict[str, str], shard_of: Mapping[str, Any]) -> dict[str, str]:
    """The name table of a multimodal checkpoint's language model (`model.language_model.` where a text-only one has
    `model.`: Qwen3.5's, LLaVA's since transformers 4.52; `language_model.` before everything: older LLaVA
    checkpoints', and Mistral 3's with its head at the top), or `names` as they are."""
    if names["embed"] in shard_of:
        return names
    if "model.language_model.embed_tokens.weight" in shard_of:
        return {k: v.replace("model.", "model.language_model.", 1) if v.startswith("model.") else v
                for k, v in names.items()}
    if "language_model." + names["embed"] in shard_of:  # (the head beside it, or at the top as Mistral 3's writes it)
        return {k: v if k == "lm_head" and "language_model." + v not in shard_of else "language_model." + v
                for k, v in names.items()}
    return names


def _present_names(cfg: LlamaConfig, names: dict[str, str], shard_of: Mapping[str, Any]) -> dict[str, str]:
    """`names` where the checkpoint has them: Kimi Linear's dense layers' MLP, which its own checkpoints keep under
    `mlp` and transformers writes under `block_sparse_moe`; a Kimi K2.5 language model's layers, which transformers
    (5.25) writes as `blocks` (its vision tower's rename undone on every layer) where K2.5's checkpoints, and
    transformers reading either, have `layers`."""
    first = names.get("attn_norm", "").format(i=0)
    if first and first not in shard_of and first.replace(".layers.", ".blocks.") in shard_of:
        names = {k: v.replace(".layers.", ".blocks.") for k, v in names.items()}
    dense = [i for i, moe in enumerate(cfg.moe_layers) if not moe]
    if cfg.architecture != "kimi_linear" or not dense or names["dense_gate"].format(i=dense[0]) in shard_of:
        return names
    return names | {k: names[k].replace(".mlp.", ".block_sparse_moe.") for k in ("dense_gate", "dense_up", "dense_down")}


def _from_hf(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """A stored tensor as `weights.assemble` reads it (torch orientation)."""
    # NOTE: HF Gemma norms compute x * (1 + w); the model multiplies by its norm weights as is
    # (llama.cpp's GGUFs store 1 + w too).
    if cfg.architecture in ("gemma2", "gemma3", "qwen3_5", "qwen3_5_moe", "qwen3_next") and key in NORM_KEYS:
        return arr.astype(np.float32) + 1.0
    if key == "gdn_conv":  # [conv_dim, 1, K] -> [K, conv_dim]
        return arr[:, 0, :].T
    if key == "gdn_a_log" and cfg.linear_kind == "kda":  # [1, 1, H, 1] -> [H]
        return arr.reshape(-1)
    if key in ("gdn_qkvz", "gdn_ba"):
        return qwen3_next_rows(cfg, key, arr)
    if cfg.mla and key in ("wq", "wq_b", "wkv_a"):
        return mla_rope_rows(cfg, key, arr)
    if cfg.index_rope_interleaved and key in INDEX_ROPE_KEYS:
        return index_rope_rows(cfg, key, arr)
    if cfg.architecture == "ernie4_5_moe" and key == "router_score_bias":  # [1, E] -> [E]
        return arr.reshape(-1)
    if cfg.architecture in INTERLEAVED_ROPE and key in ("wq", "wk", "bq", "bk"):
        return interleaved_rope_rows(cfg, key, arr)
    if cfg.architecture in ("gpt_oss", "llama4") and key in ("moe_gate_up", "moe_down"):
        arr = np.swapaxes(arr, -1, -2)  # [E, in, out] -> [E, out, in]
    if cfg.architecture == "gpt_oss" and key in ("moe_gate_up", "moe_gate_up_bias"):
        rows = -2 if key == "moe_gate_up" else -1  # gate and up interleaved -> gate rows, then up rows
        arr = np.concatenate([arr.take(range(0, arr.shape[rows], 2), axis=rows),
                              arr.take(range(1, arr.shape[rows], 2), axis=rows)], axis=rows)
    return arr


def qwen3_next_rows(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """Qwen3-Next's fused rows, per key head [q, k, its value heads' v, their z] (in_proj_qkvz) or [their b, their a]
    (in_proj_ba), regrouped as Qwen3.5's: [every q, every k, every v, every z] and [every b, every a]."""
    hk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // hk
    sizes = ((cfg.linear_key_head_dim,) * 2 + (r * cfg.linear_value_head_dim,) * 2 if key == "gdn_qkvz" else (r, r))
    groups = arr.reshape(hk, sum(sizes), arr.shape[-1])
    return np.concatenate([part.reshape(-1, arr.shape[-1])
                           for part in np.split(groups, np.cumsum(sizes)[:-1], axis=1)])


def rope_pair_rows(arr: np.ndarray, num_heads: int, start: int, rope_dim: int) -> np.ndarray:
    """A projection's rows (or a bias) of `num_heads` heads, each head's RoPE rows [start, start + rope_dim) reordered
    from interleaved pairs to halves (each pair's two rows become row j and row j + rope_dim / 2), as the model's
    rotate-half RoPE turns them; the scores are unchanged where q and k are reordered alike."""
    pairs = start + np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
    heads = arr.reshape(num_heads, -1, *arr.shape[1:])
    order = np.concatenate([np.arange(start), pairs, np.arange(start + rope_dim, heads.shape[1])])
    return heads[:, order].reshape(arr.shape)


def interleaved_rope_rows(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """q or k rows (weight or bias) of a model that turns each head's first rotary_dim dims in interleaved pairs
    (GLM-4, Cohere), as the model's rotate-half RoPE turns them."""
    return rope_pair_rows(arr, cfg.num_heads if key in ("wq", "bq") else cfg.num_kv_heads, 0, cfg.rotary_dim)


# Sparse attention's indexer tensors whose rows follow its RoPE dims' order (GLM-5's are interleaved pairs).
INDEX_ROPE_KEYS = ("index_wq", "index_wk", "index_k_norm", "index_k_norm_bias")


def index_rope_rows(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """An indexer's query rows (every head's) or key rows, or its key norm's weight or bias (a LayerNorm is blind to
    the order of its dims: they follow the key's rows), with the first qk_rope_head_dim in rotate-half order, where
    the checkpoint's indexer turns interleaved pairs (GLM-5)."""
    return rope_pair_rows(arr, cfg.index_num_heads if key == "index_wq" else 1, 0, cfg.qk_rope_head_dim)


def mla_rope_rows(cfg: LlamaConfig, key: str, arr: np.ndarray) -> np.ndarray:
    """A DeepSeek checkpoint's query projection (wq or wq_b: [heads x (nope + rope), in]) or latent projection (wkv_a:
    [latent + rope, in]) with the RoPE rows as `_mla_qkv` reads them: turned by rotate-half, where DeepSeek turns
    interleaved pairs (each pair's two rows become row j and row j + rope / 2; the scores are unchanged, q and k
    being reordered alike), and wkv_a's RoPE rows first."""
    rope_dim, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    if key == "wkv_a":
        return np.concatenate([rope_pair_rows(arr[cfg.kv_lora_rank:], 1, 0, rope_dim), arr[: cfg.kv_lora_rank]])
    return rope_pair_rows(arr, cfg.num_heads, nope, rope_dim)


def _numpy_float8() -> None:
    """safetensors builds an F8_E4M3 / F8_E5M2 tensor with numpy's dtype of that name, which numpy lacks: name
    ml_dtypes' (jax's own float8 types) there, once."""
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if name not in np.__dict__:
            setattr(np, name, getattr(ml_dtypes, name))


# a checkpoint's quantization_config.quant_method we read (modelopt: NVIDIA ModelOpt's FP8 and NVFP4)
QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors", "modelopt", *INT_METHODS)


def _fp8_block(directory: str) -> tuple[tuple[int, int], tuple[str, ...]]:
    """The [rows, cols] of weight the FP8 block scales cover, and the suffixes of the scale tensors that hold a scale
    per block: config.json's quantization_config.weight_block_size (transformers' "fp8" method, DeepSeek-V3's layout:
    `<weight>_scale_inv`), or compressed-tensors' `block_structure` for its "block" strategy (`<weight>_scale`, which
    otherwise holds a scale per row or one per tensor); 128 x 128 where it says none. A quantization method the loader
    does not read is a CheckpointError naming it."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        quant = json.load(f).get("quantization_config") or {}
    if quant and quant.get("quant_method") not in QUANT_METHODS:
        raise CheckpointError(f"{path}: quantization_config.quant_method={quant.get('quant_method')!r} is not supported "
                              f"({', '.join(QUANT_METHODS)})")
    weights = [(g.get("weights") or {}) for g in (quant.get("config_groups") or {}).values()]
    blocked = next((w for w in weights if w.get("strategy") == "block"), None)
    rows, cols = quant.get("weight_block_size") or (blocked or {}).get("block_structure") or (128, 128)
    return (int(rows), int(cols)), ("_scale_inv", "_scale") if blocked else ("_scale_inv",)


def _fp8_scale(w: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None, name: str) -> np.ndarray:
    """An FP8 weight's scales checked against its shape [out, in], float32: [ceil(out / rows), ceil(in / cols)] for
    a scale per block (`block` given), else [out] (a scale per row, or the tensor's one repeated)."""
    scale = np.asarray(scale, np.float32)
    if block is not None:
        rows, cols = block
        want = (-(-w.shape[0] // rows), -(-w.shape[1] // cols))
        if scale.shape != want:
            raise CheckpointError(f"{name}'s block scales have shape {scale.shape}; {name} {w.shape} in blocks of "
                                  f"{rows} x {cols} needs {want}")
        return scale
    if scale.size not in (1, w.shape[0]):
        raise CheckpointError(f"{name}_scale has shape {scale.shape}; {name} {w.shape} needs one per row or one")
    return np.broadcast_to(scale.reshape(-1), (w.shape[0],))


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None, name: str) -> np.ndarray:
    """An FP8 (e4m3) weight [out, in] times its scales -> float32: a scale per block of [rows, cols] weights
    (`<name>_scale_inv` [ceil(out / rows), ceil(in / cols)], DeepSeek-V3's; `block` given), or per output row or
    one for the tensor (`<name>_scale`, compressed-tensors' [out, 1] or [])."""
    scale = _fp8_scale(w, scale, block, name)
    w = np.asarray(w).astype(np.float32)
    if block is None:
        return w * scale[:, None]
    rows, cols = block
    return w * np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[: w.shape[0], : w.shape[1]]


def mxfp4_codes(blocks: np.ndarray) -> np.ndarray:
    """An HF checkpoint's MXFP4 blocks [..., G, 16] uint8, two e2m1 codes a byte (low nibble first) -> the codes
    [..., G * 32] uint8."""
    blocks = np.asarray(blocks, np.uint8)
    return np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-2], -1)


def dequantize_mxfp4_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OCP MXFP4 (gpt-oss's experts): blocks [..., G, 16] uint8 (`mxfp4_codes`) and scales [..., G] uint8, a power of
    two per 32 values (exponent + 127) -> float32 [..., G * 32], the values `quant.dequantize_mxfp4` reads from them."""
    scales = np.asarray(scales, np.uint8)
    if np.shape(blocks)[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {np.shape(blocks)} and scales {scales.shape} do not match")
    # quant's layout groups along axis -2 ([..., in, out]); the checkpoint's along the last axis
    return np.swapaxes(dequantize_mxfp4(np.swapaxes(mxfp4_codes(blocks), -1, -2), np.swapaxes(scales, -1, -2)), -1, -2)


def params_from_state_dict(cfg: LlamaConfig, tensors: Mapping[str, Any], dtype: Any = np.float32) -> dict:
    """An HF-named state dict (name -> numpy or JAX array, torch orientation) -> the model's weight pytree. Names it
    does not need are ignored; a missing one is a CheckpointError naming it. (Nemotron-H's blocks, under `backbone.`
    as its checkpoints have them or `model.` as transformers holds them, its experts stacked, named as the layers they
    make and the experts one by one.)"""
    if cfg.architecture == "nemotron_h":
        renamed, split = nemotron_h_renamed(cfg), {}
        for k, v in tensors.items():
            k = renamed("backbone." + k.removeprefix("model.") if k.startswith("model.") else k)
            if k.endswith((".experts.up_proj", ".experts.down_proj")):  # [E, out, in], as transformers holds them
                head, _, proj = k.rpartition(".")
                split |= {f"{head}.{e}.{proj}.weight": v[e] for e in range(v.shape[0])}
            else:
                split[k] = v
        tensors = split

    def read(key: str, name: str) -> np.ndarray:
        for part in name.split(JOIN):
            if part not in tensors:
                raise CheckpointError(f"state dict: missing tensor {part!r}")
        return _from_hf(cfg, key, np.concatenate([np.asarray(tensors[part]) for part in name.split(JOIN)]))

    return assemble(cfg, hf_names(cfg), read, dtype)
