"""From a checkpoint's own tensor names to the model's weight pytree (the one place that knows the layout).

Each loader supplies a name table (our key -> its tensor name, `{i}` for the layer, `{e}` for the expert where a
checkpoint stores experts one by one) and a reader that returns a tensor by name in torch orientation ([out, in],
or [E, out, in] for experts stored together); `assemble` cuts fused projections into their parts, transposes matrices
for x @ W, stacks experts on their own axis and layers on axis 0, adds biases when the config has them, and drops
`lm_head` when it is tied.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from models.config import LlamaConfig
from models.moe import LATENT_KEYS, MOE_BIAS_KEYS, MOE_KEYS, SCORE_BIAS, SHARED_GATE
from models.quant import QUANT_SUFFIXES

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_KEYS = ("bq", "bk", "bv")
QK_NORM_KEYS = ("q_norm", "k_norm")
SANDWICH_KEYS = ("post_attn_norm", "post_mlp_norm")
# Latent attention (DeepSeek; models/llama.py `_mla_qkv`) in place of wq / wk / wv: queries directly (wq) or through a
# low-rank projection and its norm (wq_a, q_a_norm, wq_b); the latent and RoPE key (wkv_a), the latent's norm, and the
# latent's up-projection to every head's key and value (wkv_b).
MLA_KEYS = ("wkv_a", "kv_a_norm", "wkv_b")
MLA_Q_LORA_KEYS = ("wq_a", "q_a_norm", "wq_b")
# DeepSeek Sparse Attention's lightning indexer (LlamaConfig.index_topk): its queries from the low-rank query
# projection's output, its key (then a LayerNorm with a bias), a weight per indexer head (float32, as transformers and
# DeepSeek keep it).
INDEX_KEYS = ("index_wq", "index_wk", "index_k_norm", "index_k_norm_bias", "index_weights")
MLP_KEYS = ("w_gate", "w_up", "w_down")  # the dense MLP, or in a mixture-of-experts layer its shared expert
# In a model whose layers mix expert and dense MLPs (`LlamaConfig.moe_layers`): the dense layers' MLP, stacked over
# those layers only, as the expert layers' weights are over theirs (`layer_kind`).
DENSE_KEYS = ("dense_gate", "dense_up", "dense_down")
EXPERT_LAYER_KEYS = frozenset({*MOE_KEYS, *MOE_BIAS_KEYS, SHARED_GATE, SCORE_BIAS, *MLP_KEYS, *LATENT_KEYS})
# Kept in float32 whatever the model's dtype: the router's correction bias chooses experts by differences of a few
# thousandths between scores, which bfloat16's rounding of a bias of ~1 would swamp (DeepSeek-V3 and GLM-4.5 ship it
# in float32, and transformers, vLLM and SGLang keep it so).
# Apertus's xIELU activation: four scalars per layer (alpha_p and alpha_n before their softplus, beta, eps), [L, 1] and [L].
XIELU_KEYS = ("xielu_alpha_p", "xielu_alpha_n", "xielu_beta", "xielu_eps")
# Gated DeltaNet layers (models/gated_delta.py): q, k, v (one projection, convolved together), the output gate z, the
# write strength b and decay a per value head, the convolution [K, conv_dim], the decay's bias and log rate per value
# head (float32, as transformers computes the decay), the per-head norm before the gate, the output projection.
LINEAR_KEYS = ("gdn_qkv", "gdn_z", "gdn_b", "gdn_a", "gdn_conv", "gdn_dt_bias", "gdn_a_log", "gdn_norm", "gdn_out")
# Kimi Delta Attention layers (linear_kind kda) in the same names: q, k, v (three projections in the checkpoint, one
# here, convolved together), the decay per key channel through a low-rank pair (gdn_fa then gdn_fb) with its bias per
# channel and log rate per head, the write strength per head, the output gate through a low-rank pair (gdn_ga then
# gdn_gb), the per-head norm, the output projection.
KDA_KEYS = ("gdn_qkv", "gdn_conv", "gdn_fa", "gdn_fb", "gdn_dt_bias", "gdn_a_log", "gdn_b", "gdn_ga", "gdn_gb",
            "gdn_norm", "gdn_out")
# Mamba-2 layers (linear_kind mamba2) in the same names: gdn_qkv projects x, B and C (convolved together), gdn_z the
# gate, gdn_a the time step per head; they have no write strength (gdn_b) but a skip D per head (gdn_d), a convolution
# bias (gdn_conv_bias, where the config has one), and gdn_norm spans the whole inner width (a norm per B/C group).
MAMBA2_KEYS = ("gdn_qkv", "gdn_z", "gdn_a", "gdn_conv", "gdn_dt_bias", "gdn_a_log", "gdn_d", "gdn_norm", "gdn_out")
# LFM2's short convolution layers (linear_kind short_conv): gdn_qkv projects B, C and x, gdn_conv convolves B x, gdn_out
# projects C times that out.
SHORT_CONV_KEYS = ("gdn_qkv", "gdn_conv", "gdn_out")
# In a model with linear attention layers, the weights only attention layers have (stacked over those: `mixer_kind`).
ATTENTION_KEYS = frozenset({"wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "sinks", "q_norm", "k_norm", *MLA_KEYS,
                            *MLA_Q_LORA_KEYS})
FLOAT32_KEYS = frozenset({SCORE_BIAS, *XIELU_KEYS, "gdn_dt_bias", "gdn_a_log", "score", "index_weights"})
ALL_LINEAR_KEYS = frozenset({*LINEAR_KEYS, *MAMBA2_KEYS, *KDA_KEYS, "gdn_conv_bias"})
NORM_KEYS = frozenset({"attn_norm", "mlp_norm", "final_norm", *QK_NORM_KEYS, *SANDWICH_KEYS, "kv_a_norm", "q_a_norm",
                       "index_k_norm"})
TRANSPOSED = frozenset({"wq", "wk", "wv", "wo", *MLP_KEYS, *DENSE_KEYS, "lm_head", "score", *MOE_KEYS, SHARED_GATE,
                        *LATENT_KEYS, "wq_a", "wq_b",
                        "wkv_a", "wkv_b", "gdn_qkv", "gdn_z", "gdn_b", "gdn_a", "gdn_out", "index_wq", "index_wk",
                        "index_weights", "gdn_fa", "gdn_fb", "gdn_ga", "gdn_gb"})
# A name table's value may join several tensors (`joined`): read one after another, their rows stacked (Kimi Linear's
# q, k and v projections and convolutions, stored apart, are one weight here).
JOIN = "|"


def joined(*names: str) -> str:
    return JOIN.join(names)


# Projections a checkpoint may store as one tensor (Phi-3: qkv_proj, gate_up_proj; gpt-oss: its experts' gate_up_proj
# and their biases), their output rows stacked in this order. A fused key in a name table takes the place of its parts;
# the model keeps the parts (no change to the forward).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up"), "moe_gate_up": ("moe_gate", "moe_up"),
         # Qwen3-Next's linear attention projections (its loader regroups their rows first: `qwen3_next_rows`)
         "gdn_qkvz": ("gdn_qkv", "gdn_z"), "gdn_ba": ("gdn_b", "gdn_a"),
         "mamba_in": ("gdn_z", "gdn_qkv", "gdn_a"),  # Mamba-2's in_proj: z, then x B C, then dt
         "moe_gate_up_bias": ("moe_gate_bias", "moe_up_bias")}


def fused_rows(cfg: LlamaConfig, fused: str) -> tuple[int, ...]:
    """The output rows of each part of a fused tensor."""
    if fused == "wqkv":
        return cfg.q_size, cfg.kv_size, cfg.kv_size
    if fused == "gdn_qkvz":
        return cfg.linear_conv_dim, cfg.linear_value_dim
    if fused == "gdn_ba":
        return cfg.linear_num_value_heads, cfg.linear_num_value_heads
    if fused == "mamba_in":
        return cfg.linear_value_dim, cfg.linear_conv_dim, cfg.linear_num_value_heads
    if fused.startswith("moe_"):
        return cfg.moe_intermediate_size, cfg.moe_intermediate_size
    return cfg.mlp_intermediate_size, cfg.mlp_intermediate_size


def layer_keys(cfg: LlamaConfig) -> tuple[str, ...]:
    """The per-layer weights a config needs."""
    keys = LAYER_KEYS if cfg.mlp_intermediate_size else tuple(k for k in LAYER_KEYS if k not in MLP_KEYS)
    if cfg.mla:
        keys = tuple(k for k in keys if k not in ("wq", "wk", "wv")) + MLA_KEYS + (MLA_Q_LORA_KEYS if cfg.q_lora_rank
                                                                                  else ("wq",))
        keys += INDEX_KEYS if cfg.index_topk else ()
    if cfg.num_experts:
        keys += (MOE_KEYS + ((SHARED_GATE,) if cfg.shared_expert_intermediate_size and cfg.shared_expert_gate else ())
                 + (MOE_BIAS_KEYS if cfg.moe_bias else ()) + ((SCORE_BIAS,) if cfg.router_score_bias else ())
                 + (DENSE_KEYS if cfg.mixed_mlp else ()) + (LATENT_KEYS if cfg.moe_latent_size else ()))
    if not cfg.pre_norms:
        keys = tuple(k for k in keys if k not in ("attn_norm", "mlp_norm"))
    if cfg.parallel_block:  # one norm before attention and the MLP both
        keys = tuple(k for k in keys if k != "mlp_norm")
    if not cfg.gated_mlp:  # up -> act -> down (the experts too)
        keys = tuple(k for k in keys if k not in ("w_gate", "moe_gate"))
    if cfg.hidden_act == "xielu":
        keys += XIELU_KEYS
    if cfg.linear_layers:
        keys += (MAMBA2_KEYS + (("gdn_conv_bias",) if cfg.linear_conv_bias else ()) if cfg.linear_kind == "mamba2"
                 else SHORT_CONV_KEYS if cfg.linear_kind == "short_conv" else KDA_KEYS if cfg.linear_kind == "kda"
                 else LINEAR_KEYS)
    return (keys + (BIAS_KEYS if cfg.attention_bias else ()) + (("bo",) if cfg.attention_out_bias else ())
            + (("sinks",) if cfg.attention_sinks else ()) + (QK_NORM_KEYS if cfg.qk_norm else ())
            + (SANDWICH_KEYS if cfg.sandwich_norms else ()))


def layer_kind(cfg: LlamaConfig, key: str) -> str | None:
    """"moe" or "dense" for a weight stacked over one kind of layer only (in a model whose layers mix expert and dense
    MLPs), "mlp" for the MLP's weights and norm in a model where some layers have none (`LlamaConfig.mlp_layers`),
    None for one stacked over every layer. `key` may carry a quantization suffix (`<name>_scale`)."""
    if not (cfg.mixed_mlp or cfg.mlp_layers):
        return None
    base = next((key.removesuffix(suffix) for suffix in QUANT_SUFFIXES if key.endswith(suffix)), key)
    if cfg.mlp_layers:
        return "mlp" if base in EXPERT_LAYER_KEYS or base == "mlp_norm" else None
    return "dense" if base in DENSE_KEYS else "moe" if base in EXPERT_LAYER_KEYS else None


def mixer_kind(cfg: LlamaConfig, key: str) -> str | None:
    """"linear" or "attention" for a weight stacked over one kind of token mixer only (in a model with linear attention
    layers), None for one stacked over every layer. `key` may carry a quantization suffix."""
    if not cfg.linear_layers:
        return None
    base = next((key.removesuffix(suffix) for suffix in QUANT_SUFFIXES if key.endswith(suffix)), key)
    return "linear" if base in ALL_LINEAR_KEYS else "attention" if base in ATTENTION_KEYS else None


def layers_of(cfg: LlamaConfig, key: str) -> list[int]:
    """The layers whose weights `key` stacks, in order."""
    kind, mixer = layer_kind(cfg, key), mixer_kind(cfg, key)
    if mixer is not None:
        return [i for i, linear in enumerate(cfg.linear_layers) if linear == (mixer == "linear")]
    if kind == "mlp":
        return [i for i, m in enumerate(cfg.mlp_layers) if m]
    return list(range(cfg.num_layers)) if kind is None else [i for i, m in enumerate(cfg.moe_layers)
                                                             if m == (kind == "moe")]


def assemble(cfg: LlamaConfig, names: Mapping[str, str], read: Callable[[str, str], np.ndarray], dtype: Any,
             skip: frozenset[str] = frozenset(), layers_only: bool = False) -> dict:
    """`read(key, tensor_name)` -> a float array (any float dtype) in torch orientation; returns the pytree in `dtype`.
    `key` is ours, or a FUSED key for a fused tensor. Layer weights in `skip` are left out (the caller reads them
    its own way); `layers_only`: {"layers": ...} alone (an MTP layer: models/mtp.py).

    Each stacked weight is allocated once in `dtype` and filled a layer at a time, so the host holds the weights in
    `dtype` plus one layer's tensor, never a float32 copy of the whole checkpoint (a fused tensor is read once per
    layer and cut into its parts)."""

    def load(key: str, i: int | None = None) -> np.ndarray:
        name = names[key]
        if "{e}" in name:  # one tensor per expert
            arr = np.stack([read(key, name.format(i=i, e=e)) for e in range(cfg.num_experts)])
        else:
            arr = read(key, name.format(i=i))
        return np.swapaxes(arr, -1, -2) if key in TRANSPOSED else arr

    def load_fused(fused: str, i: int) -> list[np.ndarray]:
        """Layer i's fused tensor cut into its parts: [(E,) in, rows] each, or [(E,) rows] for biases."""
        name = names[fused].format(i=i)
        arr, rows = read(fused, name), fused_rows(cfg, fused)
        axis = -1 if fused.endswith("_bias") else -2  # torch orientation: a matrix's rows are its outputs
        if arr.shape[axis] != sum(rows):
            raise ValueError(f"tensor {name!r} has {arr.shape[axis]} rows, the config needs "
                             f"{' + '.join(map(str, rows))} ({', '.join(FUSED[fused])})")
        parts = np.split(arr, np.cumsum(rows)[:-1], axis=axis)
        return parts if axis == -1 else [np.swapaxes(part, -1, -2) for part in parts]

    def stacked(keys: tuple[str, ...], load_layer: Callable[[int], list[np.ndarray]]) -> dict[str, np.ndarray]:
        """{key: [layers, ...]} over the layers that have them (`layers_of`), load_layer(i) giving layer i's array of
        each key."""
        out = {}
        for n, i in enumerate(layers_of(cfg, keys[0])):
            for key, arr in zip(keys, load_layer(i)):
                if n == 0:
                    out[key] = np.empty((len(layers_of(cfg, key)), *arr.shape),
                                        np.float32 if key in FLOAT32_KEYS else dtype)
                copy_into(out[key][n, ...], arr)  # (a view even where a layer's slot is one number)
        return out

    layers = {}
    for key in layer_keys(cfg):
        if key in skip:
            continue
        fused = next((f for f, parts in FUSED.items() if key in parts and f in names), None)
        if fused is None:
            layers |= stacked((key,), lambda i: [load(key, i)])
        elif key == FUSED[fused][0]:  # the other parts come with it
            layers |= stacked(FUSED[fused], lambda i: load_fused(fused, i))
    if layers_only:
        return cast_params({"layers": layers}, dtype, np.ascontiguousarray)
    params = {"embed": load("embed"), "layers": layers, "final_norm": load("final_norm")}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = load("lm_head")
    if cfg.num_labels:
        params["score"] = load("score")
    return cast_params(params, dtype, contiguous)


# Columns per block of a transposed copy: a block's rows stay in the CPU's caches while its columns are written.
COPY_BLOCK = 256


def copy_into(out: np.ndarray, arr: np.ndarray) -> None:
    """out[...] = arr (cast to out's dtype), a block of COPY_BLOCK columns at a time where arr is a transposed view
    (every matrix of a checkpoint in torch's orientation): numpy's whole copy walks the source's columns across the
    entire matrix. On a 2-core CPU, bfloat16, Llama-3-8B's [128256, 4096] lm_head took 9.3 s whole and 1.7 s in
    blocks, an MLP matrix [14336, 4096] 439 -> 196 ms (its 96 of them: ~42 -> 19 s)."""
    if arr.ndim < 2 or arr.flags.c_contiguous:
        out[...] = arr
        return
    for start in range(0, arr.shape[-1], COPY_BLOCK):
        out[..., start : start + COPY_BLOCK] = arr[..., start : start + COPY_BLOCK]


def contiguous(arr: np.ndarray, dtype: Any = None) -> np.ndarray:
    """np.ascontiguousarray(arr, dtype), a transposed view copied in blocks (`copy_into`)."""
    if arr.flags.c_contiguous:
        return np.ascontiguousarray(arr, dtype)
    out = np.empty(arr.shape, dtype or arr.dtype)
    copy_into(out, arr)
    return out


def cast_params(params: dict, dtype: Any, to: Callable = np.asarray) -> dict:
    """The (float) weight pytree in `dtype`, FLOAT32_KEYS in float32; `to(array, dtype)` converts (numpy's on the
    host; `lambda a, d: a.astype(d)` where the arrays are)."""
    import jax

    def convert(path, a):
        return to(a, np.float32 if getattr(path[-1], "key", None) in FLOAT32_KEYS else dtype)

    return jax.tree_util.tree_map_with_path(convert, params)
