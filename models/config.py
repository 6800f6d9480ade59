"""Architecture of a Llama-family decoder, read from an HF `config.json` or from GGUF metadata.

One frozen dataclass describes every model the forward pass supports: Llama 2/3 (with Llama 3 RoPE
scaling), Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), SmolLM2 (tied embeddings), Gemma 2
(sandwich norms, GELU, scaled embeddings, attention and final logit soft caps, windowed layers
alternating with global ones) and Gemma 3 (q/k norms instead of soft caps, 5 windowed layers per
global one, each kind with its own RoPE base) and Phi-3 / Phi-4-mini (LongRoPE, partial rotary embeddings) and
gpt-oss (attention sinks, biases on every projection, experts with biases and a clamped SwiGLU) and SmolLM3 (no
RoPE on every fourth layer), GQA of any ratio and any head_dim; RoPE scaled as Llama 3, linearly, by YaRN (Qwen2.5/Qwen3 long-context configs) or by
LongRoPE (models/rope.py). Unsupported architectures fail here, naming the source and the field.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np

from models import rope
from models.errors import ConfigError
from models.moe import SCORINGS, Routing
from models.rope import ROPE_TYPES, RopeScaling  # noqa: F401 (re-exported: models.config.ROPE_TYPES)

# HF `model_type` / GGUF `general.architecture` values this decoder implements.
SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "gpt_oss",
    "smollm3", "glm", "glm4", "glm4_moe", "deepseek_v2", "deepseek_v3", "olmo2", "olmo3", "granite", "granitemoe",
    "granitemoeshared", "granitemoehybrid", "exaone4", "seed_oss", "cohere", "cohere2", "arcee", "apertus", "qwen3_5", "qwen3_5_moe", "qwen3_next",
    "minimax_m2", "olmoe", "dots1", "ernie4_5", "ernie4_5_moe", "lfm2", "llama4", "kimi_linear",
    "nemotron_h")  # (lfm2_moe: lfm2's)
# The gated MLP's activation: act(gate) * up, or gpt-oss's clamped variant (`LlamaConfig.swiglu_limit`).
HIDDEN_ACTS = ("silu", "gelu_tanh", "swiglu_oai", "relu2", "xielu")
# Gemma 3 interleaves 5 sliding-window layers with 1 global one, from the first layer on (Gemma 2:
# 1 with 1); GGUF metadata says neither this nor Gemma 3's local RoPE base (llama.cpp hard-codes
# both the same way).
GEMMA_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
# The `general.architecture`s of GGUF files that LlamaConfig.from_gguf_metadata reads (llama.cpp writes OLMo 3 as olmo2).
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe", "gpt-oss", "smollm3",
                      "glm4", "glm4moe", "deepseek2", "olmo2", "granite", "granitemoe", "seed_oss", "command-r",
                      "cohere2", "arcee", "qwen35", "qwen35moe", "qwen3next", "granitehybrid", "minimax-m2",
                      "olmoe", "dots1", "ernie4_5", "ernie4_5-moe", "lfm2", "lfm2moe", "glm-dsa", "deepseek32",
                      "llama4", "nemotron_h", "nemotron_h_moe")
# GGUF architectures with Gated DeltaNet layers (Qwen3.5 dense and MoE, Qwen3-Next), and the names they load as.
GATED_DELTA_GGUF = {"qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe", "qwen3next": "qwen3_next"}
# The `model_type`s of config.json that LlamaConfig.from_hf_config reads.
HF_MODEL_TYPES = ("llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, smollm3, olmo2, olmo3, granite, glm, glm4, "
                  "exaone4, seed_oss, cohere, cohere2, arcee, apertus, mixtral, qwen2_moe, qwen3_moe, granitemoe, granitemoeshared, "
                  "granitemoehybrid, gpt_oss, glm4_moe, glm4_moe_lite, minimax_m2, olmoe, dots1, ernie4_5, ernie4_5_moe, lfm2, lfm2_moe, deepseek_v2, deepseek_v3, deepseek_v32, glm_moe_dsa, kimi_k2, kimi_linear, qwen3_5, qwen3_5_text, qwen3_5_moe, qwen3_5_moe_text, qwen3_next, "
                  "nemotron_h, "
                  "llama4 (text), llama4_text, llava, llava_next, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, gemma3, mistral3 (text), "
                  "kimi_k25 (text)")
GEMMA3_LOCAL_ROPE_THETA = 10000.0
# transformers' Gemma3TextConfig defaults: the published `gemma3` checkpoints (4B, 12B, 27B) write only the fields of
# their text_config that differ from them.
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096,
                        "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
                        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA}
GRANITE_HF = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")  # Granite's multipliers; the MoE ones' experts


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # [rotary_dim // 2] divisors of the global layers' inverse frequencies, after rope_scaling: a GGUF's
    # `rope_freqs.weight` (llama.cpp's converter writes Llama 3 scaling so, not as metadata); None: none.
    rope_freq_factors: tuple[float, ...] | None = None
    # RoPE turns the first rotary_dim = int(head_dim * this) dims of each head (rotate-half within them); the rest
    # pass unrotated (Phi-4-mini: 0.75).
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # A sequence classifier (HF `*ForSequenceClassification`: reward models, classifiers): its `score` head [hidden,
    # num_labels] reads the last token's final normed state, and it generates nothing; 0: a language model.
    num_labels: int = 0
    labels: tuple[str, ...] = ()  # each class's name (config.json's id2label), when it names them: `label_names`
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    attention_out_bias: bool = False  # the output projection too (gpt-oss)
    # A learned logit per query head in every softmax, with no value (gpt-oss's attention sinks): attention may give
    # part of its weight to nothing.
    attention_sinks: bool = False
    max_position: int = 4096
    sliding_window: int | None = None  # window of the windowed layers; None = full attention
    sliding_layers: tuple[bool, ...] = ()  # per layer, True = windowed; () = the window is on all
    rope_layers: tuple[bool, ...] = ()  # per layer, False = no positional embedding (SmolLM3's NoPE layers); () = all
    rope_local_theta: float | None = None  # RoPE base of the windowed layers (None: rope_theta)
    # Chunked attention (Llama 4): on the layers `chunked_layers` marks (() = none), a position sees only its own chunk
    # of attention_chunk positions up to itself (pallas_kernels.ragged_paged_attention's attention_chunk).
    attention_chunk: int = 0
    chunked_layers: tuple[bool, ...] = ()
    # Llama 4: q and k RMS-normed without a weight after RoPE, on the layers with RoPE (use_qk_norm); and on the layers
    # without, q scaled by log1p(floor((pos + 1) / floor_scale)) x attn_scale + 1 (attn_temperature_tuning):
    # nope_temperature = (floor_scale, attn_scale), () = off.
    qk_norm_unweighted: bool = False
    nope_temperature: tuple[float, ...] = ()
    # Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): each position is (temporal, height, width), and the rotary dims' pairs
    # are turned by those in sections of these many pairs, in that order (summing to rotary_dim // 2); () = one
    # position per token. A text token's three are equal, so text alone is plain RoPE (models.llama.apply_rope).
    mrope_section: tuple[int, ...] = ()
    # ... the sections interleaved instead (Qwen3.5, Qwen3-VL): pair j is turned by height where j % 3 == 1 and
    # j < 3 * sections[1], by width where j % 3 == 2 and j < 3 * sections[2], by the temporal position elsewhere
    mrope_interleaved: bool = False
    # "silu" | "gelu_tanh" | "swiglu_oai" | "relu2" (relu(x)^2: Arcee's, not gated) | "xielu" (Apertus's, not gated: its
    # four scalars per layer are weights, `weights.XIELU_KEYS`)
    hidden_act: str = "silu"
    # The dense MLP is act(x @ w_gate) * (x @ w_up) -> w_down; False: act(x @ w_up) -> w_down, no w_gate (Arcee)
    gated_mlp: bool = True
    # swiglu_oai (gpt-oss): (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    qk_norm: bool = False  # RMSNorm on each q and k head before RoPE (Qwen3, Gemma 3)
    # ... over each projection's heads together, weights [q_size] and [kv_size] (OLMo 2 / 3), not per head
    qk_norm_whole: bool = False
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 2/3)
    # RMSNorm on the attention's and the MLP's inputs (attn_norm, mlp_norm); False: on their outputs only (OLMo 2 / 3,
    # whose sandwich_norms are its only ones)
    pre_norms: bool = True
    # Attention and the MLP both read the one norm's output (attn_norm; no mlp_norm), their outputs added to the
    # residual stream together (Cohere)
    parallel_block: bool = False
    norm_kind: str = "rms"  # the residual stream's norms: "rms" | "layer" (LayerNorm without a bias: Cohere)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (None: head_dim)
    attn_soft_cap: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_soft_cap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # Granite's multipliers: the softmax scale itself (None: from query_pre_attn_scalar or head_dim), each attention
    # and MLP output's before it joins the residual stream, and the logits' divisor.
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Mixture of experts on every layer (models/moe.py; Mixtral, Qwen2-MoE, Qwen3-MoE): 0 = a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # experts each token goes through (top k of the router's)
    moe_intermediate_size: int = 0  # one expert's intermediate size
    norm_topk_prob: bool = True  # the top k routing weights renormalized to sum to 1
    # Qwen2-MoE: a shared expert every token goes through (the dense MLP's weights at this intermediate size), scaled
    # by a sigmoid gate; 0 = none.
    shared_expert_intermediate_size: int = 0
    moe_bias: bool = False  # the router and every expert projection carry biases (gpt-oss)
    shared_expert_gate: bool = True  # the shared expert is scaled by a sigmoid gate (Qwen2-MoE; not GLM-4.5, DeepSeek)
    # Per layer, True = experts, False = a dense MLP of intermediate_size (the first_k_dense_replace layers of GLM-4.5
    # and DeepSeek, Qwen-MoE's mlp_only_layers); () = every layer alike. Each kind's weights are stacked over its own
    # layers only (models/weights.py: `layer_kind`).
    moe_layers: tuple[bool, ...] = ()
    # Per layer, False = no MLP after its token mixer (Nemotron-H's mixer blocks followed by another mixer block);
    # () = an MLP after every one. The MLP's weights and its norm are stacked over the layers that have one
    # (models/weights.py: `layer_kind` "mlp"). Hybrid models only (their layers are grouped by kind, each kind's body
    # static: models/llama.py `_grouped_layers`).
    mlp_layers: tuple[bool, ...] = ()
    router_scoring: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3, GLM-4.5): models/moe.Routing
    router_score_bias: bool = False  # e_score_correction_bias: chooses experts, does not weigh them
    expert_groups: int = 1  # n_group: experts in equal groups, a token's chosen from its best topk_group groups
    expert_groups_per_tok: int = 1  # topk_group
    routed_scaling_factor: float = 1.0  # the routing weights multiplied by this
    expert_group_top: int = 2  # a group's score: the sum of its best this many (DeepSeek-V3: 2; V2: 1, the max)
    router_scales_input: bool = False  # a token's routing weight multiplies its input to the expert (Llama 4)
    # Experts in a latent space of this width (Nemotron 3 Super's LatentMoE): the layer's input projected down to it
    # before them (`latent_down`), their weighted sum projected back up after (`latent_up`); the router and any shared
    # expert read the input itself. 0: the experts read and write hidden_size.
    moe_latent_size: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3, Kimi K2; models/llama.py `_mla_qkv`): K and V come from one
    # latent of kv_lora_rank dims per token (plus one shared RoPE key of qk_rope_head_dim), which is all the cache
    # holds (`kv_dims`): head_dim (a query's width, absorbed) is qk_rope_head_dim + kv_lora_rank and num_kv_heads 1
    # (under tensor parallelism, a copy per device: models/sharding.py). 0 = ordinary attention.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # queries through a low-rank projection of this rank (0: projected directly)
    qk_nope_head_dim: int = 0  # each head's query / key dims without RoPE
    qk_rope_head_dim: int = 0  # ... and with it
    v_head_dim: int = 0  # each head's value dims
    # DeepSeek Sparse Attention (DeepSeek-V3.2; pallas_kernels/indexed_attention.py): each latent attention layer's
    # lightning indexer (index_num_heads heads of index_head_dim, the first qk_rope_head_dim turned by RoPE, read from
    # the queries' low-rank projection) picks the index_topk cached positions a query attends to. Its key per token is
    # cached after the RoPE key (`kv_dims`). 0 = dense latent attention.
    index_topk: int = 0
    index_num_heads: int = 0
    index_head_dim: int = 0
    index_rope_interleaved: bool = False  # the checkpoint's indexer turns interleaved pairs (GLM-5): rows reordered at load
    # Gated DeltaNet layers (Qwen3.5; models/gated_delta.py): per layer, True = linear attention over a recurrent state
    # (no K/V cached), False = softmax attention; () = attention everywhere. The attention weights and the KV cache
    # are stacked over the attention layers only, the linear layers' weights and states over theirs.
    linear_layers: tuple[bool, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4  # the causal depthwise convolution's width over q, k and v
    # Which linear layer: "gated_delta" (Qwen3.5, Qwen3-Next), "kda" (Kimi Linear's Kimi Delta Attention: the gated
    # delta rule with a decay per key channel, as many key as value heads) or "mamba2" (Granite 4.0-H: Mamba-2's SSD,
    # models/gated_delta.py maps it onto the same state). For mamba2 the key heads are its B/C groups, the key head dim
    # its state size, the value heads and head dim its heads and their width.
    linear_kind: str = "gated_delta"
    linear_conv_bias: bool = False  # the convolution has a bias (Mamba-2)
    linear_dt_limit: tuple[float, ...] = ()  # Mamba-2's time step clamped to [lo, hi] after its softplus; (): none
    # q_proj also gives each head an output gate (its rows [query, gate] per head): attention's output is multiplied by
    # sigmoid(gate) before o_proj (Qwen3.5)
    attn_output_gate: bool = False
    # The attention projections' input width where it is not hidden_size (0: hidden_size): an EAGLE-3 draft head's one
    # layer reads [its embedding's norm, the hidden state's norm], twice the hidden size (models/eagle3.py).
    attn_input_size: int = 0
    # How to run 8-bit weights (models/quant.py), not a checkpoint's: activations quantized like them (int8 or e4m3, a
    # scale per token: W8A8), set by model.quantization: w8a8 and w8a8_fp8.
    quantized_activations: bool = False
    # How to run expert layers, not a checkpoint's: grouped matmuls instead of every expert (models/moe.py), set by
    # model.moe_backend.
    moe_grouped: bool = False
    # How to run quantized weights' matmuls, not a checkpoint's: "none" (XLA converts a layer's weights for its GEMM),
    # "pallas" / "pallas_interpret" (pallas_kernels/fp8_matmul.py: an FP8 checkpoint's block-scaled projections, and
    # 8-bit experts on the grouped path, read as stored), "pallas_experts" (the experts only; the dense block-scaled
    # projections by XLA, which ran them faster on an H200), set by the engine from its attention backend.
    quant_kernels: str = "none"
    # How the experts lie on a tensor-parallel mesh, not a checkpoint's: whole, E / N a device (models/moe.py
    # expert_parallel_moe), instead of every expert split by its intermediate features; set by parallel.expert.
    expert_parallel: bool = False

    @property
    def label_names(self) -> tuple[str, ...]:
        """A sequence classifier's class names: `labels`, else transformers' LABEL_i."""
        return self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported ({', '.join(HIDDEN_ACTS)})")
        if not self.pre_norms and not self.sandwich_norms:
            raise ConfigError("pre_norms=False needs sandwich_norms (a layer normed nowhere is not a decoder here)")
        if self.hidden_act == "xielu" and self.gated_mlp:
            raise ConfigError("hidden_act=xielu is an ungated MLP's activation (gated_mlp=False)")
        if not self.gated_mlp and self.hidden_act == "swiglu_oai":
            raise ConfigError("gated_mlp=False is for MLPs with a plain activation (not swiglu_oai)")
        if self.norm_kind not in ("rms", "layer"):
            raise ConfigError(f"norm_kind={self.norm_kind!r} is not supported (rms, layer)")
        if self.mrope_section and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2):
            raise ConfigError(f"mrope_section {list(self.mrope_section)} must be 3 counts summing to "
                              f"{self.rotary_dim // 2} (half the rotary dims)")
        if self.parallel_block and (not self.pre_norms or self.sandwich_norms):
            raise ConfigError("parallel_block needs pre_norms and no sandwich_norms (one norm feeds attention and MLP)")
        if self.qk_norm_whole and not self.qk_norm:
            raise ConfigError("qk_norm_whole is set but qk_norm is not")
        if self.logits_scaling == 0:
            raise ConfigError("logits_scaling must not be 0 (the logits are divided by it)")
        object.__setattr__(self, "sliding_layers", tuple(bool(b) for b in self.sliding_layers))
        object.__setattr__(self, "rope_layers", tuple(bool(b) for b in self.rope_layers))
        object.__setattr__(self, "chunked_layers", tuple(bool(b) for b in self.chunked_layers))
        object.__setattr__(self, "nope_temperature", tuple(float(x) for x in self.nope_temperature))
        if self.chunked_layers and (len(self.chunked_layers) != self.num_layers or self.attention_chunk <= 0):
            raise ConfigError(f"chunked_layers needs an entry per layer ({self.num_layers}) and attention_chunk > 0 "
                              f"(got {len(self.chunked_layers)} entries, attention_chunk={self.attention_chunk})")
        if self.chunked_layers and self.linear_layers:
            raise ConfigError("chunked attention layers beside linear attention layers are not supported")
        if self.nope_temperature and len(self.nope_temperature) != 2:
            raise ConfigError(f"nope_temperature is (floor_scale, attn_scale); got {self.nope_temperature}")
        if self.router_scales_input and (self.moe_bias or not self.gated_mlp):
            raise ConfigError("router_scales_input needs gated experts without biases (expert(w x) = w down(act(w "
                              "gate) up))")
        if self.rope_layers and len(self.rope_layers) != self.num_layers:
            raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")
        if self.kv_lora_rank:
            mla = (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
            if min(mla) <= 0 or self.head_dim != self.qk_rope_head_dim + self.kv_lora_rank:
                raise ConfigError(f"latent attention needs qk_nope_head_dim, qk_rope_head_dim, v_head_dim > 0 (got {mla}) "
                                  f"and head_dim = qk_rope_head_dim + kv_lora_rank (got {self.head_dim})")
            if self.attention_bias or self.attention_out_bias or self.qk_norm or self.attention_sinks:
                raise ConfigError("latent attention with attention biases, q/k norms or sinks is not supported")
        if self.index_topk:
            if not (self.mla and self.q_lora_rank) or self.index_num_heads <= 0 or \
                    self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError("sparse attention's indexer needs latent attention with q_lora_rank, index_num_heads "
                                  f"> 0 and index_head_dim >= qk_rope_head_dim (got {self.index_num_heads} heads of "
                                  f"{self.index_head_dim}, q_lora_rank {self.q_lora_rank})")
        object.__setattr__(self, "rope_freq_factors", rope.check(
            self.qk_rope_head_dim if self.kv_lora_rank else self.head_dim, self.partial_rotary_factor,
            self.rope_scaling, self.rope_freq_factors))
        if self.sliding_layers:
            if len(self.sliding_layers) != self.num_layers:
                raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
            if self.sliding_window is None:
                raise ConfigError("sliding_layers is set but sliding_window is not")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
            if self.router_scoring not in SCORINGS:
                raise ConfigError(f"router scoring {self.router_scoring!r} is not supported ({', '.join(SCORINGS)})")
            if self.num_experts % self.expert_groups or not 1 <= self.expert_groups_per_tok <= self.expert_groups:
                raise ConfigError(f"n_group={self.expert_groups} must divide num_experts={self.num_experts} and "
                                  f"topk_group={self.expert_groups_per_tok} be in [1, n_group]")
            if self.moe_latent_size and (self.moe_bias or self.router_scales_input or self.moe_latent_size < 0):
                raise ConfigError(f"moe_latent_size={self.moe_latent_size} needs experts without biases or input "
                                  "weighting")
            if not self.gated_mlp and (self.moe_bias or self.hidden_act != "relu2"):
                raise ConfigError("experts without a gate (gated_mlp false) take relu2 and no biases (got "
                                  f"hidden_act={self.hidden_act!r}, moe_bias={self.moe_bias})")
            if self.expert_groups_per_tok * (self.num_experts // self.expert_groups) < self.num_experts_per_tok:
                raise ConfigError(f"topk_group={self.expert_groups_per_tok} groups of {self.num_experts // self.expert_groups} "
                                  f"experts cannot hold num_experts_per_tok={self.num_experts_per_tok}")
        object.__setattr__(self, "linear_layers", tuple(bool(b) for b in self.linear_layers))
        if self.linear_layers:
            if len(self.linear_layers) != self.num_layers:
                raise ConfigError(f"linear_layers has {len(self.linear_layers)} entries for {self.num_layers} layers")
            if self.linear_kind not in ("gated_delta", "kda", "mamba2", "short_conv"):
                raise ConfigError(f"linear_kind={self.linear_kind!r} is not supported (gated_delta, kda, mamba2, "
                                  "short_conv)")
            if self.linear_kind == "kda" and (self.linear_num_key_heads != self.linear_num_value_heads
                                              or self.linear_key_head_dim != self.linear_value_head_dim):
                raise ConfigError("kda layers have as many key as value heads, of one head dim")
            sizes = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                     self.linear_value_head_dim)
            if self.linear_kind == "short_conv":  # (LFM2's: a convolution over hidden_size channels, no heads)
                if self.linear_conv_kernel < 2 or any(sizes) or self.linear_conv_bias:
                    raise ConfigError("short_conv layers take no heads or convolution bias, and linear_conv_kernel >= 2")
            elif min(sizes) <= 0 or self.linear_num_value_heads % self.linear_num_key_heads or self.linear_conv_kernel < 2:
                raise ConfigError(f"linear attention layers need key/value heads and head dims > 0 (got {sizes}), "
                                  "value heads a multiple of key heads and linear_conv_kernel >= 2")
            if all(self.linear_layers) or self.index_topk or self.sliding_window is not None:
                raise ConfigError("linear attention layers need some attention layers, and are not supported with "
                                  "sparse attention or sliding windows")
        object.__setattr__(self, "mlp_layers", tuple(bool(b) for b in self.mlp_layers))
        if self.mlp_layers:
            if len(self.mlp_layers) != self.num_layers:
                raise ConfigError(f"mlp_layers has {len(self.mlp_layers)} entries for {self.num_layers} layers")
            if all(self.mlp_layers):
                object.__setattr__(self, "mlp_layers", ())
            elif not self.linear_layers or self.moe_layers or self.sandwich_norms or self.parallel_block \
                    or self.hidden_act == "xielu" or not self.pre_norms:
                raise ConfigError("layers without an MLP are supported in hybrid models (linear_layers) with pre-norms "
                                  "and one kind of MLP (no moe_layers, sandwich norms, parallel blocks or xIELU)")
        object.__setattr__(self, "moe_layers", tuple(bool(b) for b in self.moe_layers))
        if self.moe_layers:
            if len(self.moe_layers) != self.num_layers:
                raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
            if not self.num_experts or not any(self.moe_layers):
                raise ConfigError("moe_layers marks expert layers but the config has no experts")
            if all(self.moe_layers):
                object.__setattr__(self, "moe_layers", ())

    @property
    def mrope_rows(self) -> tuple[int, ...]:
        """Per rotary pair, which of M-RoPE's (temporal, height, width) positions turns it; () without M-RoPE."""
        sec = self.mrope_section
        if not sec:
            return ()
        if not self.mrope_interleaved:
            return tuple(np.repeat(np.arange(len(sec)), sec).tolist())
        j = np.arange(sum(sec))
        return tuple(np.where((j % 3 == 1) & (j < 3 * sec[1]), 1, np.where((j % 3 == 2) & (j < 3 * sec[2]), 2, 0))
                     .tolist())

    @property
    def rotary_dim(self) -> int:
        """The dims of each q/k head RoPE turns, the first ones (as transformers rounds: down; latent attention:
        the RoPE key's)."""
        return rope.rotary_dim(self.qk_rope_head_dim if self.kv_lora_rank else self.head_dim, self.partial_rotary_factor)

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek): the cache holds one latent per token."""
        return self.kv_lora_rank > 0

    @property
    def kv_dims(self) -> tuple[int, int]:
        """The widths of a cached K and V vector: head_dim both, or latent attention's RoPE key (and indexer key)
        and latent."""
        if self.mla:  # (sparse attention: the indexer's key after the RoPE key)
            return self.qk_rope_head_dim + self.index_head_dim * bool(self.index_topk), self.kv_lora_rank
        return self.head_dim, self.head_dim

    @property
    def sm_scale(self) -> float:
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def qk_norm_sizes(self) -> tuple[int, int]:
        """The widths of the q and k norms' weights: a head's, or a whole projection's (qk_norm_whole)."""
        return (self.q_size, self.kv_size) if self.qk_norm_whole else (self.head_dim, self.head_dim)

    @property
    def mixed_windows(self) -> bool:
        """Some layers are windowed and some are not: the window is chosen per layer at run time."""
        return self.sliding_window is not None and bool(self.sliding_layers) and not all(self.sliding_layers)

    @property
    def kv_reach(self) -> tuple[tuple[bool, ...], int, bool] | None:
        """(the layers that never attend further back than a fixed reach, that reach in tokens, whether it is an
        attention chunk rather than a sliding window) where such layers mix with layers that see every position: what
        a hybrid KV cache keeps only that far back of (engine.window_pages). Gemma 2/3's and gpt-oss's sliding
        windows; Llama 4's chunks, where a token sees back to its chunk's first position, (pos // C) x C. None: none."""
        if self.mixed_windows:
            return tuple(self.sliding_layers), int(self.sliding_window), False
        if self.attention_chunk and any(self.chunked_layers) and not all(self.chunked_layers) \
                and self.sliding_window is None:
            return tuple(self.chunked_layers), int(self.attention_chunk), True
        return None

    @property
    def mixed_mlp(self) -> bool:
        """Some layers have experts and some a dense MLP (`moe_layers`)."""
        return bool(self.moe_layers)

    @property
    def num_kv_layers(self) -> int:
        """The layers that attend over a KV cache (all but the linear attention layers)."""
        return self.num_layers - sum(self.linear_layers)

    @property
    def linear_conv_dim(self) -> int:
        """A linear attention layer's q, k and v together (what its convolution mixes; LFM2's short convolution: B x,
        hidden_size channels)."""
        if self.linear_kind == "short_conv":
            return self.hidden_size
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_value_dim

    @property
    def linear_value_dim(self) -> int:
        return self.hidden_size if self.linear_kind == "short_conv" else self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def num_moe_layers(self) -> int:
        if self.moe_layers:
            return sum(self.moe_layers)
        return (sum(self.mlp_layers) if self.mlp_layers else self.num_layers) * bool(self.num_experts)

    @property
    def routing(self) -> Routing:
        return Routing(top_k=self.num_experts_per_tok, norm_topk_prob=self.norm_topk_prob, scoring=self.router_scoring,
                       groups=self.expert_groups, groups_per_tok=self.expert_groups_per_tok,
                       scaling=self.routed_scaling_factor, group_top=self.expert_group_top,
                       scales_input=self.router_scales_input)

    @property
    def mlp_intermediate_size(self) -> int:
        """Intermediate size of the dense MLP weights (w_gate, w_up, w_down): a MoE model's shared expert, or 0."""
        return self.shared_expert_intermediate_size if self.num_experts else self.intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count of the checkpoint this config describes."""
        h, per_layer = self.hidden_size, 0
        if self.mla:
            heads, qk = self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
            rank = self.q_lora_rank
            per_layer += (h * rank + rank + rank * heads * qk) if rank else h * heads * qk  # queries
            per_layer += h * self.head_dim + self.kv_lora_rank  # the latent and RoPE key, the latent's norm
            per_layer += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)  # latent -> K, V
            per_layer += heads * self.v_head_dim * h  # output
            if self.index_topk:  # the indexer's queries, key (and its LayerNorm), head weights
                hi, di = self.index_num_heads, self.index_head_dim
                per_layer += rank * hi * di + h * di + 2 * di + h * hi
        else:
            per_layer += h * (self.q_size * (2 if self.attn_output_gate else 1) + 2 * self.kv_size) + self.q_size * h
        per_layer += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        per_layer += h * self.attention_out_bias + self.num_heads * self.attention_sinks
        per_layer += sum(self.qk_norm_sizes) * self.qk_norm
        num_linear = sum(self.linear_layers)
        attention = (self.num_layers - num_linear) * per_layer
        hv, value, conv = self.linear_num_value_heads, self.linear_value_dim, self.linear_conv_dim
        if self.linear_kind == "short_conv":  # in_proj (B, C, x), the convolution, out_proj
            linear = num_linear * (3 * h * h + h * self.linear_conv_kernel + h * h)
        elif self.linear_kind == "kda":  # q, k, v, conv, the decay's low-rank pair, dt_bias, A_log, b, the gate's pair,
            # norm, out_proj
            d, hd = self.linear_key_head_dim, value
            linear = num_linear * (h * conv + conv * self.linear_conv_kernel + 2 * (h * d + d * hd) + hd + hv + h * hv
                                   + d + hd * h)
        elif self.linear_kind == "mamba2":  # in_proj (z, x B C, dt), conv (+ bias), dt_bias, A_log, D, norm, out_proj
            linear = num_linear * (h * (conv + value + hv) + conv * (self.linear_conv_kernel + self.linear_conv_bias)
                                   + 3 * hv + value + value * h)
        else:
            linear = num_linear * (h * (conv + value + 2 * hv) + conv * self.linear_conv_kernel
                                   + 2 * hv + self.linear_value_head_dim + value * h)
        per_layer = 2 * h * self.sandwich_norms
        per_layer += (1 if self.parallel_block else 2) * h * self.pre_norms
        dense_mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size + 2 * (self.hidden_act == "xielu")
        moe_mlp = 0
        if self.num_experts:
            projections = 3 if self.gated_mlp else 2  # (an ungated expert: up and down)
            width = self.moe_latent_size or h  # (the experts' input and output; the router reads h)
            moe_mlp += self.num_experts * (projections * width * self.moe_intermediate_size + h)  # experts and router
            moe_mlp += 2 * h * self.moe_latent_size  # the projections to the latent space and back
            moe_mlp += self.num_experts * (2 * self.moe_intermediate_size + h + 1) * self.moe_bias
            moe_mlp += self.num_experts * self.router_score_bias
            if self.shared_expert_intermediate_size:  # the shared expert and its gate
                moe_mlp += projections * h * self.shared_expert_intermediate_size + h * self.shared_expert_gate
        num_moe = self.num_moe_layers
        num_mlp = sum(self.mlp_layers) if self.mlp_layers else self.num_layers  # (the others: no MLP, nor its norm)
        mlps = num_moe * moe_mlp + (num_mlp - num_moe) * dense_mlp - (self.num_layers - num_mlp) * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + attention + linear + self.num_layers * per_layer + mlps + h

    def rope_inv_freq(self, local: bool = False) -> np.ndarray:
        """[rotary_dim // 2] float64 inverse frequencies, scaled as the checkpoint was trained: by rope_scaling, then
        divided by rope_freq_factors (as llama.cpp divides by rope_freqs); rope.inverse_frequencies computes them.

        local: those of the sliding-window layers (their own base, never scaled, as in Gemma 3)."""
        theta, scaling, freq_factors = self._layer_rope(local)
        return rope.inverse_frequencies(theta, self.rotary_dim, scaling, freq_factors, context_len=self.max_position)

    def rope_attention_factor(self, local: bool = False) -> float:
        """What RoPE's cos and sin are multiplied by (so q and k both, after rotation): YaRN's or LongRoPE's
        attention factor, 1 otherwise (rope.attention_factor). local: as in rope_inv_freq."""
        return rope.attention_factor(self._layer_rope(local)[1])

    def _layer_rope(self, local: bool) -> tuple[float, RopeScaling | None, tuple[float, ...] | None]:
        """(RoPE base, rope_scaling, rope_freq_factors) of the global layers, or of the windowed ones: their own base,
        never scaled, where they have one."""
        if local and self.rope_local_theta:
            return self.rope_local_theta, None, None
        return self.rope_theta, self.rope_scaling, self.rope_freq_factors

    # ---------------------------------------------------------------- sources
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Reads an HF `config.json` dict (model_type: HF_MODEL_TYPES)."""
        archs = cfg.get("architectures") or [""]
        if archs[0].endswith("ForSequenceClassification"):  # the language model, with a score head for its LM head
            base = cls.from_hf_config({**cfg, "architectures": [archs[0].replace("ForSequenceClassification",
                                                                                   "ForCausalLM")],
                                       "tie_word_embeddings": True}, source)
            id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
            num_labels = int(cfg.get("num_labels") or len(id2label) or 2)  # (transformers' default: 2)
            named = all(i in id2label for i in range(num_labels))
            return dataclasses.replace(base, num_labels=num_labels,
                                       labels=tuple(id2label[i] for i in range(num_labels)) if named else ())
        arch = cfg.get("model_type")
        if arch in ("llava", "llava_next"):  # an image model (models/vision.py): its language model is one of the others
            return cls.from_hf_config(_llava_text_config(cfg), f"{source} text_config")
        if arch in ("llama4", "llama4_text"):
            return _llama4_from_hf(cfg, source)
        if arch == "mistral3":  # an image model whose Pixtral tower is not read here (Mistral Small 3.1 / 3.2,
            # Magistral, Devstral): its language model alone, served for text
            text = dict(cfg.get("text_config") or {})
            text.setdefault("model_type", "mistral")
            if "tie_word_embeddings" in cfg:  # (the whole model's says whether its head is the embeddings)
                text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
            return cls.from_hf_config(text, f"{source} text_config")
        if arch == "kimi_k25":  # Kimi K2.5 / K2.6: K2 behind a MoonViT tower not read here, served for text
            text = {"model_type": "kimi_k2", **(cfg.get("text_config") or {})}
            if "tie_word_embeddings" in cfg:  # (as mistral3's: the whole model's says whether its head is the
                # embeddings)
                text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
            return cls.from_hf_config(text, f"{source} text_config")
        if arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):  # image models (models/qwen_vision.py)
            return _qwen2_vl_from_hf(cfg, source)  # around a Qwen2 / Qwen3 / Qwen3-MoE with M-RoPE
        if arch in ("gemma2", "gemma3_text"):
            return _gemma_from_hf(cfg, source, "gemma3" if arch == "gemma3_text" else arch)
        if arch == "gemma3":  # Gemma 3 4B and up (models/vision.py reads its tower): the text_config's Gemma 3
            return _gemma_from_hf({**GEMMA3_TEXT_DEFAULTS, **(cfg.get("text_config") or {})}, f"{source} text_config",
                                  "gemma3")
        if arch in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "kimi_k2", "glm4_moe_lite"):
            return _deepseek_from_hf(cfg, source, "deepseek_v2" if arch == "deepseek_v2" else "deepseek_v3")
        if arch in ("olmo2", "olmo3", "exaone4"):
            return _olmo_from_hf(cfg, source, arch)
        if arch in ("cohere", "cohere2"):
            return _cohere_from_hf(cfg, source, arch)
        if arch in ("lfm2", "lfm2_moe"):
            return _lfm2_from_hf(cfg, source)
        if arch == "nemotron_h":
            return _nemotron_h_from_hf(cfg, source)
        if arch == "kimi_linear":
            return _kimi_linear_from_hf(cfg, source)
        if arch in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"):
            return _qwen3_5_from_hf(cfg, source, "qwen3_5_moe" if arch.startswith("qwen3_5_moe") else
                                    arch if arch == "qwen3_next" else "qwen3_5")
        if arch not in SUPPORTED_ARCHITECTURES or arch == "gemma3":
            raise ConfigError(f"{source}: model_type={arch!r} is not supported (supported: {HF_MODEL_TYPES})")
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported (the dense MLP's projections have no biases here)")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: missing field {key!r}")
            return cfg[key]

        granite4 = arch == "granitemoehybrid"  # Granite 4.0: attention and Mamba-2 layers, an MLP or experts after each
        mamba = _granite4_mamba(cfg, source) if granite4 else {}
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        ernie = arch in ("ernie4_5", "ernie4_5_moe")
        head_dim = cfg.get("head_dim") or (128 if ernie else hidden // num_heads)  # (transformers' ERNIE default)
        if ernie and cfg.get("use_bias"):
            raise ConfigError(f"{source}: use_bias=true (biases on every projection, the MLP's too) is not supported")
        if arch == "olmoe" and cfg.get("clip_qkv") is not None:
            raise ConfigError(f"{source}: clip_qkv={cfg['clip_qkv']} is not supported (q/k/v are not clamped here)")
        # transformers windows every layer of a Mistral, Mixtral or Phi-3 whose sliding_window is set (some Phi-3-mini
        # revisions: 2047), of the others only with use_sliding_window; gpt-oss the layers its layer_types name.
        window = (cfg.get("sliding_window") if cfg.get("use_sliding_window", arch in ("mistral", "mixtral", "phi3", "gpt_oss"))
                  else None)
        types = cfg.get("layer_types") if arch in ("gpt_oss", "smollm3") and window else None
        if types and set(types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(f"{source}: layer_types {sorted(set(types) - {'sliding_attention', 'full_attention'})} "
                              "are not supported")
        # transformers >= 5 writes `rope_parameters` (rope_theta and partial_rotary_factor inside); older configs
        # `rope_scaling` + top-level `rope_theta`, `partial_rotary_factor`.
        rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        minimax = _minimax_m2_fields(cfg, source, int(head_dim)) if arch == "minimax_m2" else {}
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            # (Granite 4.0 without experts: the shared MLP is the MLP)
            intermediate_size=int(need("shared_intermediate_size") if granite4 and not cfg.get("num_local_experts")
                                  else need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=rope.scaling_from_hf(rope_params, source, cfg),
            # (GLM-4 turns half of each head unless it says otherwise, as transformers' config defaults it)
            partial_rotary_factor=float(rope_params.get("partial_rotary_factor", cfg.get(
                "partial_rotary_factor", minimax.get("partial_rotary_factor", 0.5 if arch in ("glm", "glm4") else 1.0)))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", ernie)),
            attention_bias=bool(cfg.get("attention_bias", arch in ("qwen2", "qwen2_moe", "glm", "glm4", "seed_oss"))),
            **(dict(gated_mlp=False, hidden_act=_plain_act(cfg.get("hidden_act", "relu2" if arch == "arcee" else "xielu"),
                                                           source))
               if arch in ("arcee", "apertus") else {}),
            sandwich_norms=arch == "glm4",  # GLM-4-0414: norms after attention and the MLP as well as before
            # gpt-oss's and Granite's attention_bias covers o_proj too (transformers builds all four projections with it)
            # (Seed-OSS says so apart: attention_out_bias)
            attention_out_bias=((arch == "gpt_oss" or arch in GRANITE_HF) and bool(cfg.get("attention_bias", arch == "gpt_oss"))
                                or bool(cfg.get("attention_out_bias"))),
            attention_sinks=arch == "gpt_oss",
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=int(window) if window else None,
            sliding_layers=tuple(t == "sliding_attention" for t in types) if types else (),
            rope_layers=(_rope_layers(cfg) if arch == "smollm3" else (False,) * int(need("num_hidden_layers"))
                         if granite4 and cfg.get("position_embedding_type") != "rope" else ()),  # Granite 4.0's NoPE
            # (OLMoE's q/k norms over whole projections, as OLMo 2's; dots.llm1's per head, as Qwen3's)
            qk_norm=arch in ("qwen3", "qwen3_moe", "apertus", "dots1", "olmoe")
            or (arch == "glm4_moe" and bool(cfg.get("use_qk_norm"))) or minimax.get("qk_norm_whole", False),
            qk_norm_whole=arch == "olmoe" or minimax.get("qk_norm_whole", False),
            **(dict(hidden_act="swiglu_oai", swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                    swiglu_limit=float(cfg.get("swiglu_limit", 7.0))) if arch == "gpt_oss" else {}),
            **(_granite_multipliers(cfg) if arch in GRANITE_HF else {}),
            **_experts_from_hf(cfg, source, arch),
            **mamba,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str], source: str,
                           rope_freqs: np.ndarray | None = None,
                           longrope_factors: tuple[np.ndarray, np.ndarray] | None = None) -> "LlamaConfig":
        """Reads GGUF metadata (`general.architecture`: GGUF_ARCHITECTURES; Mistral GGUFs say llama, and Mixtral's llama
        with experts; DeepSeek-V2, V3 and Kimi K2 deepseek2; DeepSeek-V3.2 deepseek32; GLM-5 glm-dsa; OLMo 3 olmo2).
        rope_freqs: the file's `rope_freqs.weight` [rotary_dim // 2], where it has one (Llama 3.1+: their RoPE
        scaling). longrope_factors: a phi3 file's (`rope_factors_short.weight`, `rope_factors_long.weight`), where it
        has them (LongRoPE)."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"{source}: general.architecture={arch!r} is not supported "
                              f"({', '.join(GGUF_ARCHITECTURES)})")

        if arch in ("nemotron_h", "nemotron_h_moe"):  # (its blocks paired into layers as config.json's are)
            return _nemotron_h_from_hf(_nemotron_h_gguf_fields(meta, tensor_names, arch, source), source)
        need = functools.partial(_gguf_field, meta, source, arch)

        hidden = int(need("embedding_length"))
        num_heads = int(need("attention.head_count"))
        # rope.dimension_count: the rotated dims of a head, head_dim but where only part turns (phi3, glm4, glm4moe: the
        # first rope_dims; glm4's in interleaved pairs, reordered at load, gguf_loader).
        rope_dims = meta.get(f"{arch}.rope.dimension_count")
        partial = arch in ("phi3", "glm4", "glm4moe", "minimax-m2", *GATED_DELTA_GGUF)
        head_dim = int(meta.get(f"{arch}.attention.key_length") or (not partial and rope_dims) or hidden // num_heads)
        partial_rotary_factor = 1.0
        if partial and rope_dims:
            if rope_dims % 2 or not 0 < rope_dims <= head_dim:
                raise ConfigError(f"{source}: {arch}.rope.dimension_count={rope_dims} must be even and in "
                                  f"(0, head_dim={head_dim}]")
            partial_rotary_factor = rope_dims / head_dim
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ConfigError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
        window = meta.get(f"{arch}.attention.sliding_window")
        # glm4moe's block_count counts its trailing multi-token-prediction blocks too (nextn_predict_layers), which
        # llama.cpp loads and never runs; they are not read here.
        num_layers = int(need("block_count")) - int(meta.get(f"{arch}.nextn_predict_layers") or 0)
        experts = _experts_from_gguf(meta, tensor_names, arch, num_layers, source)
        linear = {}  # linear attention layers (Qwen3.5 / Qwen3-Next's Gated DeltaNet, Granite 4.0-H's Mamba-2)
        kv_heads = meta.get(f"{arch}.attention.head_count_kv") or num_heads
        if arch in GATED_DELTA_GGUF:
            linear = _gated_delta_from_gguf(meta, arch, num_layers, source, bool(experts))
        if arch == "granitehybrid":  # (head_count_kv a list per layer, 0 on the Mamba-2 ones)
            linear = _mamba2_from_gguf(meta, tensor_names, num_layers, source)
            kv_heads = max(kv_heads)
        if arch in ("lfm2", "lfm2moe"):  # (head_count_kv a list per layer, 0 on the short convolution ones)
            if (not isinstance(kv_heads, list) or len(kv_heads) != num_layers or len(set(kv_heads) - {0}) != 1
                    or 0 not in kv_heads):
                raise ConfigError(f"{source}: {arch}.attention.head_count_kv={kv_heads!r} must list {num_layers} "
                                  "layers' KV heads, 0 on the short convolution layers and one count on the others")
            linear = dict(linear_kind="short_conv", linear_layers=tuple(k == 0 for k in kv_heads),
                          linear_conv_kernel=int(need("shortconv.l_cache")))
            kv_heads = max(kv_heads)
        # where to look for the attention layers' optional tensors (a hybrid model's first layer may be a linear one)
        first_attention = linear["linear_layers"].index(False) if linear.get("linear_layers") else 0
        gemma = {}
        if arch in GEMMA_SLIDING_PATTERN:
            # NOTE: llama.cpp stores Gemma's norm weights as 1 + w, so RMSNorm multiplies by them as is.
            pattern = GEMMA_SLIDING_PATTERN[arch]
            big = num_layers == (62 if arch == "gemma3" else 46)  # the 27B models
            gemma = dict(
                sliding_layers=tuple((i + 1) % pattern != 0 for i in range(num_layers)),
                hidden_act="gelu_tanh", sandwich_norms=True, embed_scale=math.sqrt(hidden),
                # llama.cpp: 1/sqrt(head_dim), except the 27B models: 1/sqrt(hidden / heads).
                query_pre_attn_scalar=float(hidden // num_heads if big else head_dim),
            )
            if arch == "gemma3":
                gemma["rope_local_theta"] = GEMMA3_LOCAL_ROPE_THETA
            else:
                gemma["attn_soft_cap"] = float(need("attn_logit_softcapping"))
                gemma["final_soft_cap"] = float(need("final_logit_softcapping"))
        max_position = int(meta.get(f"{arch}.context_length", 4096))
        rope_scaling = rope.scaling_from_gguf(meta, arch, source)
        if longrope_factors is not None:  # llama.cpp's converter writes LongRoPE so (and no rope.scaling.type)
            rope_scaling = rope.longrope_from_gguf(meta, arch, source, longrope_factors, context_len=max_position)
        implied = {}  # what gpt-oss's and SmolLM3's metadata leave to llama.cpp's graphs
        if arch == "gpt-oss":
            # What the metadata leaves out, as in OpenAI's reference (and its HF config): windowed layers first, then
            # every other one; YaRN's ramp not rounded to whole pairs (truncate: false); SwiGLU's alpha and clamp.
            implied = dict(sliding_layers=tuple(i % 2 == 0 for i in range(num_layers)) if window else (),
                           attention_out_bias=True, attention_sinks=True, hidden_act="swiglu_oai")
            if rope_scaling is not None and rope_scaling.rope_type == "yarn":
                rope_scaling = dataclasses.replace(rope_scaling, truncate=False)
        if arch == "smollm3":  # llama.cpp's graph: every 4th layer without RoPE (the metadata does not say)
            implied["rope_layers"] = _rope_layers({"num_hidden_layers": num_layers})
        if arch == "olmo2":  # norms after attention and the MLP only, q/k norms over whole projections
            implied = dict(pre_norms=False, sandwich_norms=True, qk_norm_whole=True,
                           attention_out_bias="blk.0.attn_output.bias" in tensor_names)
            pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
            if window and pattern is not None:  # OLMo 3: windowed layers with RoPE unscaled, as transformers runs them
                if len(pattern) != num_layers:
                    raise ConfigError(f"{source}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries "
                                      f"for {num_layers} layers")
                implied |= dict(sliding_layers=tuple(bool(b) for b in pattern),
                                rope_local_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)))
        if arch == "glm4":  # GLM-4-0414: norms after attention and the MLP too (post_attention_norm, post_ffw_norm)
            implied = dict(sandwich_norms=True)
        if arch in ("minimax-m2", "olmoe"):  # q/k norms over whole projections (attn_q_norm: q_size weights)
            implied = dict(qk_norm_whole=True)
        if arch in ("command-r", "cohere2"):  # one LayerNorm before attention and the MLP both; llama.cpp's graph:
            # Cohere 2's windows on all but every 4th layer, RoPE on the windowed ones alone
            if "blk.0.attn_q_norm.weight" in tensor_names:  # Command R+'s LayerNorm per q/k head
                raise ConfigError(f"{source}: attn_q_norm / attn_k_norm (a LayerNorm per q/k head) are not supported")
            logit_scale = float(meta.get(f"{arch}.logit_scale") or 1.0)
            windowed = tuple((i + 1) % 4 != 0 for i in range(num_layers)) if arch == "cohere2" else ()
            implied = dict(parallel_block=True, norm_kind="layer", logits_scaling=1.0 / logit_scale,
                           sliding_layers=windowed, rope_layers=windowed,
                           attention_out_bias="blk.0.attn_output.bias" in tensor_names)
        if arch == "arcee":  # Llama's layers (Q/K permuted as its converter's), the MLP up -> relu^2 -> down
            implied = dict(gated_mlp=False, hidden_act="relu2")
        if arch == "seed_oss":  # Llama's layers with q/k/v biases (rows as HF has them, NeoX RoPE), o's where present
            implied = dict(attention_out_bias="blk.0.attn_output.bias" in tensor_names)
        if arch in ("granite", "granitemoe", "granitehybrid"):  # the converter writes Granite's multipliers as scales
            implied = dict(embed_scale=float(meta.get(f"{arch}.embedding_scale") or 1.0),
                           attention_multiplier=float(meta.get(f"{arch}.attention.scale") or 1.0),
                           residual_multiplier=float(meta.get(f"{arch}.residual_scale") or 1.0),
                           logits_scaling=float(meta.get(f"{arch}.logit_scale") or 1.0),
                           attention_out_bias=f"blk.{first_attention}.attn_output.bias" in tensor_names)
        if arch == "llama4":  # what llama.cpp's graph fixes for it: chunks of 8,192 on three layers in four, the
            # fourth without RoPE and with the query temperature (floor 8,192, scale 0.1); q/k RMS-normed without
            # weights on the RoPE layers but in the 128-expert model (Maverick); experts weighted at their input by the sigmoid of
            # their logit, not renormalized, beside a shared expert of their size, ungated. A sliding_window of 0
            # (MobileLLM's files) turns chunks and NoPE layers off; it is no sliding window either way.
            chunked = meta.get(f"{arch}.attention.sliding_window", 1) != 0
            window = None
            pattern = tuple((i + 1) % 4 != 0 for i in range(num_layers)) if chunked else ()
            implied = dict(attention_chunk=8192 if chunked else 0, chunked_layers=pattern, rope_layers=pattern,
                           qk_norm_unweighted=experts.get("num_experts") != 128,
                           nope_temperature=(8192.0, 0.1) if chunked else ())
            first_moe = experts["moe_layers"].index(True) if any(experts.get("moe_layers", ())) else 0
            shared = f"blk.{first_moe}.ffn_gate_shexp.weight" in tensor_names
            experts.update(norm_topk_prob=False, shared_expert_gate=False, router_scales_input=True,
                           shared_expert_intermediate_size=experts["moe_intermediate_size"] if shared else 0)
        latent = {}
        if arch in ("deepseek2", "glm-dsa", "deepseek32"):  # one cached KV head of [RoPE key, latent] (older files'
            # key_length is a query head's); GLM-5's and V3.2's sparse attention indexer beside it
            rope_scaling, latent = _latent_attention_from_gguf(meta, arch, rope_scaling, source)
            head_dim = latent["qk_rope_head_dim"] + latent["kv_lora_rank"]
        names = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "llama": "mixtral" if experts else "llama",
                 "gpt-oss": "gpt_oss", "glm4moe": "glm4_moe", "minimax-m2": "minimax_m2", "ernie4_5-moe": "ernie4_5_moe",
                 "granitemoe": "granitemoeshared" if experts.get("shared_expert_intermediate_size") else "granitemoe",
                 "olmo2": "olmo3" if implied.get("sliding_layers") else "olmo2", "command-r": "cohere",
                 "deepseek2": "deepseek_v3" if experts.get("router_scoring") == "sigmoid" else "deepseek_v2",
                 "glm-dsa": "deepseek_v3", "deepseek32": "deepseek_v3", "lfm2moe": "lfm2",
                 "granitehybrid": "granitemoehybrid", **GATED_DELTA_GGUF}
        # The dense MLP's size: Qwen3.5-MoE's config.json has none (the shared expert's, as from_hf_config reads it);
        # Granite 4.0-H's shared MLP is its MLP where it has no experts.
        ffn = meta.get(f"{arch}.feed_forward_length")
        if arch == "granitehybrid" and not experts:
            ffn = meta.get(f"{arch}.expert_shared_feed_forward_length") or ffn
        if arch in GATED_DELTA_GGUF and not ffn:
            ffn = experts.get("shared_expert_intermediate_size")
        cfg = cls(
            architecture=names.get(arch, arch),
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(ffn or experts.get("moe_intermediate_size") or need("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=1 if latent else int(kv_heads),
            head_dim=head_dim,
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            rope_freq_factors=None if rope_freqs is None else tuple(np.ravel(rope_freqs).tolist()),
            partial_rotary_factor=partial_rotary_factor,
            rms_norm_eps=float(need("attention.layer_norm_epsilon" if arch in ("command-r", "cohere2")
                                    else "attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=f"blk.{first_attention}.attn_q.bias" in tensor_names,
            max_position=max_position,
            sliding_window=int(window) if window else None,
            qk_norm=f"blk.{first_attention}.attn_q_norm.weight" in tensor_names,
            **gemma,
            **experts,
            **implied,
            **latent,
            **linear,
        )
        if partial and rope_dims and cfg.rotary_dim != rope_dims:  # int(head_dim * rope_dims / head_dim)
            raise ConfigError(f"{source}: {arch}.rope.dimension_count={rope_dims} does not survive as a fraction of "
                              f"head_dim={head_dim}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        # JSON keeps tuples as lists: every per-layer pattern, section and name list back to the tuple it was
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _experts_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], arch: str, num_layers: int,
                       source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of GGUF metadata ({} for a dense model), as llama.cpp's graphs run them.

    Softmax routing, the top k renormalized (qwen3moe, Mixtral) or not (qwen2moe, olmoe, `expert_weights_norm`
    false); ernie4_5-moe's correction bias chooses among softmax scores, its experts on the layers past
    `leading_dense_block_count` whose number + 1 divides by `interleave_moe_layer_step`, its shared experts ungated.
    glm4moe routes as DeepSeek-V3: sigmoid scores (`expert_gating_func` 2, llama.cpp's default for it and for
    minimax-m2, llama4 and older dots1 files, whose converters write none: those models route so), the correction
    bias `exp_probs_b.bias` choosing experts, the weights scaled by `expert_weights_scale`, groups where
    `expert_group_count` says; its first `leading_dense_block_count` layers dense, its `expert_shared_count` shared
    experts one ungated MLP of that many times an expert's intermediate size. deepseek2 alike, but softmax where
    `expert_gating_func` is absent (llama.cpp's default for V2 files) and not renormalized where `expert_weights_norm`
    is; its softmax files (V2) rank groups by their best expert as the model does (llama.cpp: by their best two)."""
    if not meta.get(f"{arch}.expert_count"):
        return {}
    used = meta.get(f"{arch}.expert_used_count")
    moe_intermediate = meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length")
    if not used or not moe_intermediate:
        raise ConfigError(f"{source}: a GGUF with experts needs {arch}.expert_used_count and "
                          f"{arch}.expert_feed_forward_length (or {arch}.feed_forward_length)")
    moe_intermediate = int(moe_intermediate)
    gating = int(meta.get(f"{arch}.expert_gating_func") or (2 if arch in ("glm4moe", "minimax-m2", "dots1", "glm-dsa",
                                                                          "deepseek32", "llama4") else 1))
    scoring = {1: "softmax", 2: "sigmoid"}.get(gating)
    if scoring is None:
        raise ConfigError(f"{source}: {arch}.expert_gating_func={gating} is not supported (1 softmax, 2 sigmoid)")
    first_dense = int(meta.get(f"{arch}.leading_dense_block_count") or 0)
    step = int(meta.get(f"{arch}.interleave_moe_layer_step") or 1)  # (ERNIE 4.5: experts where layer + 1 divides by it)
    shared = (int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0)
              or int(meta.get(f"{arch}.expert_shared_count") or 0) * moe_intermediate)
    moe_layers = tuple(i >= first_dense and (i + 1) % step == 0 for i in range(num_layers))
    first_moe = moe_layers.index(True) if any(moe_layers) else first_dense
    return dict(
        num_experts=int(meta[f"{arch}.expert_count"]), num_experts_per_tok=int(used),
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm",
                                     arch not in ("qwen2moe", "deepseek2", "deepseek32", "olmoe"))),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=arch not in ("glm4moe", "deepseek2", "glm-dsa", "deepseek32", "granitemoe", "granitehybrid",
                                        "dots1", "ernie4_5-moe"),
        moe_bias=arch == "gpt-oss",
        moe_layers=moe_layers,
        router_scoring=scoring, router_score_bias=f"blk.{first_moe}.exp_probs_b.bias" in tensor_names,
        expert_groups=int(meta.get(f"{arch}.expert_group_count") or 1),
        expert_groups_per_tok=int(meta.get(f"{arch}.expert_group_used_count") or 1),
        routed_scaling_factor=float(meta.get(f"{arch}.expert_weights_scale") or 1.0),
        expert_group_top=1 if arch == "deepseek2" and scoring == "softmax" else 2,
    )


def _gguf_field(meta: Mapping[str, Any], source: str, arch: str, key: str) -> Any:
    """The GGUF metadata field `arch.key`, or a ConfigError naming the file and the field."""
    if f"{arch}.{key}" not in meta:
        raise ConfigError(f"{source}: missing GGUF field '{arch}.{key}'")
    return meta[f"{arch}.{key}"]


def _gated_delta_from_gguf(meta: Mapping[str, Any], arch: str, num_layers: int, source: str,
                           has_experts: bool) -> dict[str, Any]:
    """The Gated DeltaNet fields of a `qwen35`, `qwen35moe` or `qwen3next` GGUF, as llama.cpp's converter writes them
    (Qwen3NextModel's set_gguf_parameters) and its graphs read them: `ssm.group_count` key heads of `ssm.state_size`
    dims, `ssm.time_step_rank` value heads sharing `ssm.inner_size` dims, `ssm.conv_kernel`; every
    `full_attention_interval`-th layer attention (4 where the file is silent, as llama.cpp defaults it; an
    `attention.recurrent_layers` array, where a file has one, says it per layer). Attention with an output gate; the
    MoE kinds' experts are required."""

    need = functools.partial(_gguf_field, meta, source, arch)

    key_heads, key_dim = int(need("ssm.group_count")), int(need("ssm.state_size"))
    value_heads, inner = int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    if value_heads <= 0 or inner % value_heads:
        raise ConfigError(f"{source}: {arch}.ssm.inner_size={inner} is not a multiple of "
                          f"{arch}.ssm.time_step_rank={value_heads} (the value heads)")
    if arch != "qwen35" and not has_experts:
        raise ConfigError(f"{source}: missing GGUF field '{arch}.expert_count' ({arch} has experts on every layer)")
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None:
        if len(recurrent) < num_layers:
            raise ConfigError(f"{source}: {arch}.attention.recurrent_layers has {len(recurrent)} entries for "
                              f"{num_layers} layers")
        linear = tuple(bool(x) for x in recurrent[:num_layers])
    else:
        interval = int(meta.get(f"{arch}.full_attention_interval") or 4)
        linear = tuple((i + 1) % interval != 0 for i in range(num_layers))
    return dict(attn_output_gate=True, linear_layers=linear, linear_num_key_heads=key_heads,
                linear_key_head_dim=key_dim, linear_num_value_heads=value_heads,
                linear_value_head_dim=inner // value_heads, linear_conv_kernel=int(need("ssm.conv_kernel")))


def _mamba2_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], num_layers: int,
                      source: str) -> dict[str, Any]:
    """The Mamba-2 fields of a `granitehybrid` GGUF (Granite 4.0-H), as llama.cpp's converter writes them
    (GraniteHybridModel): `attention.head_count_kv` per layer, 0 on the Mamba-2 layers; `ssm.group_count` B/C groups
    of `ssm.state_size`, `ssm.time_step_rank` heads sharing `ssm.inner_size`, `ssm.conv_kernel` (a bias where the
    file has `ssm_conv1d.bias`); RoPE only where `rope.scaling.finetuned` says so (the converter's flag for it: Granite
    4.0-H's attention has no position embedding). The time step is not clamped (llama.cpp's graph does not: the
    converter writes no time_step_limit)."""

    need = functools.partial(_gguf_field, meta, source, "granitehybrid")

    kv_heads = need("attention.head_count_kv")
    if (not isinstance(kv_heads, list) or len(kv_heads) != num_layers or len(set(kv_heads) - {0}) != 1
            or 0 not in kv_heads):
        raise ConfigError(f"{source}: granitehybrid.attention.head_count_kv={kv_heads!r} must list {num_layers} "
                          "layers' KV heads, 0 on the Mamba-2 layers and one count on the others (some of each)")
    linear = tuple(k == 0 for k in kv_heads)
    heads, inner = int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    if heads <= 0 or inner % heads:
        raise ConfigError(f"{source}: granitehybrid.ssm.inner_size={inner} is not a multiple of "
                          f"granitehybrid.ssm.time_step_rank={heads} (the heads)")
    first = linear.index(True)
    if f"blk.{first}.ssm_in.bias" in tensor_names:
        raise ConfigError(f"{source}: ssm_in.bias is not supported (Mamba-2's projections have no biases here)")
    return dict(linear_kind="mamba2", linear_layers=linear,
                linear_num_key_heads=int(need("ssm.group_count")), linear_key_head_dim=int(need("ssm.state_size")),
                linear_num_value_heads=heads, linear_value_head_dim=inner // heads,
                linear_conv_kernel=int(need("ssm.conv_kernel")),
                linear_conv_bias=f"blk.{first}.ssm_conv1d.bias" in tensor_names,
                rope_layers=() if meta.get("granitehybrid.rope.scaling.finetuned") else (False,) * num_layers)


def _latent_attention_from_gguf(meta: Mapping[str, Any], arch: str, rope_scaling: RopeScaling | None,
                                source: str) -> tuple[RopeScaling | None, dict[str, Any]]:
    """A deepseek2 (or glm-dsa, deepseek32) GGUF's latent attention: (its RoPE scaling as the model runs it, the
    LlamaConfig fields). glm-dsa (GLM-5 as llama.cpp's converter writes it) and deepseek32 (DeepSeek-V3.2's) add sparse
    attention's indexer (`attention.indexer.head_count`, `key_length`, `top_k`; GLM-5's RoPE in interleaved pairs,
    rows reordered at load, V3.2's in halves);
    `attention.indexer.types` naming a layer that reuses another's top-k is refused by name.

    A query head's width (nope + rope) and a value head's are `attention.key_length_mla` / `value_length_mla` where
    the file has them (llama.cpp's converter since it splits attn_kv_b; key_length / value_length then describe the
    absorbed KV head: kv_lora_rank + rope, kv_lora_rank), else `key_length` / `value_length`. The softmax scale is
    llama.cpp's: mscale^2 / sqrt(nope + rope), mscale = 1 + `rope.scaling.yarn_log_multiplier` ln(factor), the
    converter storing 0.1 x mscale_all_dim there; RoPE itself unscaled by YaRN's magnitude (HF: mscale over
    mscale_all_dim, equal in every DeepSeek config)."""

    need = functools.partial(_gguf_field, meta, source, arch)

    rank, rope_dim = int(need("attention.kv_lora_rank")), int(need("rope.dimension_count"))
    qk = int(meta.get(f"{arch}.attention.key_length_mla") or need("attention.key_length"))
    v_dim = int(meta.get(f"{arch}.attention.value_length_mla") or need("attention.value_length"))
    if qk <= rope_dim:
        raise ConfigError(f"{source}: a query head of {qk} dims cannot hold rope.dimension_count={rope_dim} and more")
    # the converter's 0.1 x mscale_all_dim, undone in float32 as llama.cpp does (0.1 x 1.0 reads back as 1.0)
    mscale_all_dim = float(np.float32(meta.get(f"{arch}.rope.scaling.yarn_log_multiplier") or 0.0) / np.float32(0.1))
    if rope_scaling is not None and rope_scaling.rope_type == "yarn":
        rope_scaling = dataclasses.replace(rope_scaling, mscale=mscale_all_dim or None,
                                           mscale_all_dim=mscale_all_dim or None,
                                           attention_factor=rope_scaling.attention_factor or (None if mscale_all_dim
                                                                                              else 1.0))
    sm_scale = rope.yarn_softmax_scale(qk, rope_scaling and rope_scaling.factor, mscale_all_dim)
    sparse = {}
    if arch in ("glm-dsa", "deepseek32"):
        shared = [i for i, full in enumerate(meta.get(f"{arch}.attention.indexer.types") or ()) if not full]
        if shared:
            raise ConfigError(f"{source}: layers {shared} reuse another layer's top-k positions "
                              f"({arch}.attention.indexer.types), which is not supported: every layer must run its "
                              "own indexer")
        sparse = dict(index_topk=int(need("attention.indexer.top_k")),
                      index_num_heads=int(need("attention.indexer.head_count")),
                      index_head_dim=int(need("attention.indexer.key_length")),
                      index_rope_interleaved=arch == "glm-dsa")
    return rope_scaling, dict(
        **sparse,
        kv_lora_rank=rank, q_lora_rank=int(meta.get(f"{arch}.attention.q_lora_rank") or 0),
        qk_nope_head_dim=qk - rope_dim, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
        query_pre_attn_scalar=sm_scale**-2,
    )


def _rope_layers(cfg: Mapping[str, Any]) -> tuple[bool, ...]:
    """SmolLM3's layers with RoPE: `no_rope_layers` (1 = RoPE, 0 = none), else every `no_rope_layer_interval`-th
    layer without (transformers' default, 4)."""
    given = cfg.get("no_rope_layers")
    if given:
        return tuple(bool(x) for x in given)
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    return tuple((i + 1) % interval != 0 for i in range(int(cfg["num_hidden_layers"])))


def _granite4_mamba(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A granitemoehybrid config's Mamba-2 layers as linear layers ({} for an attention-only one). Its layer_types say
    "mamba" (checkpoints) or "linear_attention" (transformers >= 5 writes), and "attention"."""
    types = list(cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * int(cfg["num_hidden_layers"]))
    unknown = set(types) - {"mamba", "linear_attention", "attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{source}: granitemoehybrid layer_types {sorted(unknown)} are not supported")
    linear = tuple(t in ("mamba", "linear_attention") for t in types)
    if not any(linear):
        return {}
    if cfg.get("mamba_proj_bias"):
        raise ConfigError(f"{source}: mamba_proj_bias=true is not supported (Mamba-2's projections have no biases here)")
    hidden, heads = int(cfg["hidden_size"]), int(cfg.get("mamba_n_heads", 128))
    inner = int(cfg.get("mamba_expand", 2)) * hidden
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = inner // heads if head_dim in (None, "auto") else int(head_dim)
    if head_dim * heads != inner:
        raise ConfigError(f"{source}: mamba_n_heads={heads} x mamba_d_head={head_dim} must be mamba_expand x hidden_size "
                          f"= {inner}")
    # (transformers >= 5 writes an infinite limit as {"__float__": "Infinity"}, json.dumps as Infinity)
    lo, hi = (float(x["__float__"] if isinstance(x, dict) else x)
              for x in (cfg.get("time_step_limit") or (0.0, float("inf"))))
    return dict(linear_kind="mamba2", linear_layers=linear, linear_num_key_heads=int(cfg.get("mamba_n_groups", 1)),
                linear_key_head_dim=int(cfg.get("mamba_d_state", 256)), linear_num_value_heads=heads,
                linear_value_head_dim=head_dim, linear_conv_kernel=int(cfg.get("mamba_d_conv", 4)),
                linear_conv_bias=bool(cfg.get("mamba_conv_bias", True)),
                linear_dt_limit=() if (lo, hi) == (0.0, float("inf")) else (lo, hi))


def _lfm2_from_hf(cfg: Mapping[str, Any], source: str) -> LlamaConfig:
    """An HF `lfm2` config.json (Liquid's LFM2): short convolution layers (`layer_types` "conv", else those
    `full_attn_idxs` leaves out; models/gated_delta.py, linear_kind short_conv: B, C, x from one projection, a causal
    depthwise convolution of `conv_L_cache` taps over B x, times C, projected out) among attention layers with q/k
    RMSNorms per head, each layer's MLP after it; the MLP's width as transformers computes it
    (`block_auto_adjust_ff_dim`: 2/3 of intermediate_size, times `block_ffn_dim_multiplier`, rounded up to
    `block_multiple_of`); tied embeddings; the final norm is `embedding_norm`. Refused by name: `conv_bias`.
    `lfm2_moe` (LFM2-8B-A1B): the first `num_dense_layers` layers' MLP as given (`intermediate_size`, not adjusted),
    the others `num_experts` experts of `moe_intermediate_size`, the top `num_experts_per_tok` by sigmoid score plus
    `expert_bias` (which chooses, not weighs; `use_expert_bias`), renormalized (`norm_topk_prob`) and scaled by
    `routed_scaling_factor`; no shared expert."""

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    num_layers, hidden, heads = int(need("num_hidden_layers")), int(need("hidden_size")), int(need("num_attention_heads"))
    if cfg.get("conv_bias"):
        raise ConfigError(f"{source}: conv_bias=true is not supported (LFM2's released models have none)")
    types = cfg.get("layer_types")
    if types is None:
        full = set(cfg.get("full_attn_idxs") or range(num_layers))
        types = ["full_attention" if i in full else "conv" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"conv", "full_attention"}:
        raise ConfigError(f"{source}: layer_types must name each of the {num_layers} layers conv or full_attention")
    ffn = int(need("intermediate_size"))
    experts = {}
    if cfg.get("model_type") == "lfm2_moe":
        first_dense = int(cfg.get("num_dense_layers", 2))
        experts = dict(num_experts=int(need("num_experts")), num_experts_per_tok=int(need("num_experts_per_tok")),
                       moe_intermediate_size=int(need("moe_intermediate_size")),
                       norm_topk_prob=bool(cfg.get("norm_topk_prob", True)), router_scoring="sigmoid",
                       router_score_bias=bool(cfg.get("use_expert_bias", True)),
                       routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                       moe_layers=tuple(i >= first_dense for i in range(num_layers)))
    elif cfg.get("block_auto_adjust_ff_dim", True):
        ffn = int(2 * ffn / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            multiple = int(cfg.get("block_multiple_of", 256))
            ffn = int(float(cfg["block_ffn_dim_multiplier"]) * ffn)
            ffn = multiple * ((ffn + multiple - 1) // multiple)
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return LlamaConfig(
        architecture="lfm2", vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=ffn,
        num_layers=num_layers, num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=hidden // heads,
        rope_theta=float(rope_params.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
        rope_scaling=rope.scaling_from_hf(rope_params, source, cfg),
        rms_norm_eps=float(cfg.get("norm_eps", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))),
        max_position=int(cfg.get("max_position_embeddings", 128_000)), qk_norm=True,
        linear_kind="short_conv", linear_layers=tuple(t == "conv" for t in types),
        linear_conv_kernel=int(cfg.get("conv_L_cache", 3)), **experts,
    )


# Nemotron-H's block kinds, as `hybrid_override_pattern` writes them and as `layers_block_type` (or transformers'
# older names) does
NEMOTRON_H_BLOCKS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe", "linear_attention": "mamba",
                     "mamba": "mamba", "full_attention": "attention", "attention": "attention", "mlp": "mlp",
                     "moe": "moe"}


def nemotron_h_blocks(cfg: Mapping[str, Any], source: str) -> list[str]:
    """A nemotron_h config's blocks in order, each "mamba", "attention", "mlp" or "moe": `layers_block_type`
    (transformers 5 writes it, `layer_types` its alias) or `hybrid_override_pattern` (NVIDIA's checkpoints: M, *, -,
    E)."""
    given = cfg.get("layers_block_type") or cfg.get("layer_types") or cfg.get("hybrid_override_pattern")
    if not given:
        raise ConfigError(f"{source}: missing field 'hybrid_override_pattern' (or 'layers_block_type')")
    unknown = sorted({str(b) for b in given} - set(NEMOTRON_H_BLOCKS))
    if unknown:
        raise ConfigError(f"{source}: nemotron_h block kinds {unknown} are not supported (M, *, -, E or "
                          f"{', '.join(k for k in NEMOTRON_H_BLOCKS if len(k) > 1)})")
    return [NEMOTRON_H_BLOCKS[str(b)] for b in given]


def nemotron_h_layers(blocks: list[str], source: str) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """Nemotron-H's blocks as this decoder's layers: each token mixer block (Mamba-2 or attention) starts a layer, and
    the MLP or expert block right after it, if any, is that layer's MLP (a pre-norm block each, so a mixer block and
    its MLP block compute what a layer does). Returns (linear_layers, mlp_layers). Refused by name: an MLP block that
    follows no mixer block, dense MLP and expert blocks in one model."""
    linear, mlp = [], []
    if "mlp" in blocks and "moe" in blocks:
        raise ConfigError(f"{source}: dense MLP (-) and expert (E) blocks in one model are not supported")
    for b, kind in enumerate(blocks):
        if kind in ("mlp", "moe"):
            if b == 0 or blocks[b - 1] in ("mlp", "moe"):
                raise ConfigError(f"{source}: block {b} is an MLP that follows no token mixer block, which is not "
                                  "supported (each MLP block must come right after a Mamba-2 or attention block)")
            mlp[-1] = True
        else:
            linear.append(kind == "mamba")
            mlp.append(False)
    return tuple(linear), tuple(mlp)


def _nemotron_h_experts(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Nemotron 3's expert blocks (E): `n_routed_experts` experts of `moe_intermediate_size` without a gate (relu^2,
    as its dense MLP), the top `num_experts_per_tok` by sigmoid score plus a correction bias within the best
    `topk_group` of `n_group` groups (DeepSeek-V3's routing), renormalized (`norm_topk_prob`) and scaled by
    `routed_scaling_factor`, beside one shared expert of `moe_shared_expert_intermediate_size`; Nemotron 3 Super's
    experts in a latent space of `moe_latent_size` (`LlamaConfig.moe_latent_size`). Refused by name: other than one
    shared expert."""
    if int(cfg.get("n_shared_experts", 1)) != 1:
        raise ConfigError(f"{source}: n_shared_experts={cfg['n_shared_experts']} is not supported (one)")
    return dict(num_experts=int(cfg.get("n_routed_experts", 8)),
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size", 7688)),
                shared_expert_intermediate_size=int(cfg.get("moe_shared_expert_intermediate_size", 7688)),
                shared_expert_gate=False, norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                router_scoring="sigmoid", router_score_bias=True, expert_groups=int(cfg.get("n_group", 1)),
                expert_groups_per_tok=int(cfg.get("topk_group", 1)),
                routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                moe_latent_size=int(cfg.get("moe_latent_size") or 0))


def _nemotron_h_gguf_fields(meta: Mapping[str, Any], tensor_names: set[str], arch: str, source: str) -> dict[str, Any]:
    """A `nemotron_h` / `nemotron_h_moe` GGUF's metadata as the config.json fields `_nemotron_h_from_hf` reads, as
    llama.cpp's converter writes them (NemotronHModel over GraniteHybridModel): a block each entry of the per-block
    lists `attention.head_count_kv` (the KV heads on attention blocks, else 0) and `feed_forward_length` (the MLP's, or
    an expert's, width on MLP / expert blocks, else 0), the others Mamba-2 (`ssm.*` as Granite 4.0-H's); `block_count`
    counts a trailing MTP block (`nextn_predict_layers`), not read; the experts from `expert_*` (sigmoid routing, as
    llama.cpp's graph runs them). The converter writes no `time_step_limit` (llama.cpp clamps nothing) and a context
    of 2^20."""
    need = functools.partial(_gguf_field, meta, source, arch)
    blocks = int(need("block_count")) - int(meta.get(f"{arch}.nextn_predict_layers") or 0)
    kv, ff = need("attention.head_count_kv"), need("feed_forward_length")
    if not (isinstance(kv, list) and isinstance(ff, list) and len(kv) >= blocks and len(ff) >= blocks):
        raise ConfigError(f"{source}: {arch}.attention.head_count_kv and {arch}.feed_forward_length must list each "
                          f"of the {blocks} blocks (got {kv!r}, {ff!r})")
    moe = arch == "nemotron_h_moe"
    kinds = ["attention" if kv[b] else ("moe" if moe else "mlp") if ff[b] else "mamba" for b in range(blocks)]
    heads, inner = int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    if heads <= 0 or inner % heads:
        raise ConfigError(f"{source}: {arch}.ssm.inner_size={inner} is not a multiple of {arch}.ssm.time_step_rank="
                          f"{heads} (the heads)")
    first_mamba = kinds.index("mamba") if "mamba" in kinds else 0
    fields = dict(
        layers_block_type=kinds, vocab_size=need("vocab_size"), hidden_size=need("embedding_length"),
        num_attention_heads=need("attention.head_count"), num_key_value_heads=max(kv[:blocks]) or None,
        head_dim=meta.get(f"{arch}.attention.key_length"), intermediate_size=max(ff[:blocks]),
        mamba_num_heads=heads, mamba_head_dim=inner // heads, n_groups=need("ssm.group_count"),
        ssm_state_size=need("ssm.state_size"), conv_kernel=need("ssm.conv_kernel"),
        use_conv_bias=f"blk.{first_mamba}.ssm_conv1d.bias" in tensor_names,
        layer_norm_epsilon=need("attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=meta.get(f"{arch}.context_length", 4096))
    if moe:
        groups = int(meta.get(f"{arch}.expert_group_count") or 1)
        if groups > 1 and f"{arch}.expert_group_used_count" not in meta:
            raise ConfigError(f"{source}: {arch}.expert_group_count={groups} without expert_group_used_count")
        fields |= dict(n_routed_experts=need("expert_count"), num_experts_per_tok=need("expert_used_count"),
                       moe_intermediate_size=need("expert_feed_forward_length"),
                       moe_shared_expert_intermediate_size=need("expert_shared_feed_forward_length"),
                       n_shared_experts=meta.get(f"{arch}.expert_shared_count", 1),
                       norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)),
                       routed_scaling_factor=meta.get(f"{arch}.expert_weights_scale") or 1.0, n_group=groups,
                       topk_group=meta.get(f"{arch}.expert_group_used_count") or 1,
                       moe_latent_size=meta.get(f"{arch}.moe_latent_size"))
    return fields


def _nemotron_h_from_hf(cfg: Mapping[str, Any], source: str) -> LlamaConfig:
    """An HF `nemotron_h` config.json (NVIDIA's Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano and Super): blocks of one
    kind each behind an RMSNorm, Mamba-2 (`mamba_num_heads` heads of `mamba_head_dim`, `n_groups` B/C groups of
    `ssm_state_size`, a convolution of `conv_kernel` taps, time steps clamped to `time_step_limit`), attention without
    positional embeddings, and an MLP without a gate (relu(x)^2) or experts (`_nemotron_h_experts`), paired into layers
    (`nemotron_h_layers`). Refused by name: biases on the projections (`use_bias`, `mlp_bias`, `attention_bias`), an
    activation other than relu2 (silu in the Mamba-2 layers), a sliding window."""

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    blocks = nemotron_h_blocks(cfg, source)
    linear, mlp = nemotron_h_layers(blocks, source)
    for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}=true is not supported (Nemotron-H's projections have no biases here)")
    if cfg.get("mlp_hidden_act", "relu2") != "relu2" or cfg.get("mamba_hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: mlp_hidden_act={cfg.get('mlp_hidden_act')!r} / mamba_hidden_act="
                          f"{cfg.get('mamba_hidden_act')!r} are not supported (relu2 / silu)")
    if cfg.get("sliding_window") is not None:
        raise ConfigError(f"{source}: sliding_window is not supported for nemotron_h")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    mamba_heads, mamba_dim = int(cfg.get("mamba_num_heads", 128)), int(cfg.get("mamba_head_dim", 64))

    def either(*keys, default):
        return next((cfg[k] for k in keys if cfg.get(k) is not None), default)

    lo, hi = (float(x["__float__"] if isinstance(x, dict) else x)
              for x in either("time_step_limit", "mamba_dt_limit", default=(0.0, float("inf"))))
    experts = _nemotron_h_experts(cfg, source) if "moe" in blocks else {}
    return LlamaConfig(
        architecture="nemotron_h", vocab_size=int(need("vocab_size")), hidden_size=hidden,
        # (with experts no MLP has intermediate_size, and a GGUF file does not say it: an expert's width)
        intermediate_size=experts.get("moe_intermediate_size") or int(cfg.get("intermediate_size", 21504)),
        num_layers=len(linear), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(either("head_dim", "attention_head_dim", default=hidden // heads)),
        rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", 4096)), gated_mlp=False, hidden_act="relu2",
        rope_layers=(False,) * len(linear),  # (attention without positional embeddings)
        linear_kind="mamba2", linear_layers=linear, mlp_layers=mlp,
        linear_num_key_heads=int(either("n_groups", "mamba_n_groups", default=8)),
        linear_key_head_dim=int(cfg.get("ssm_state_size", 128)), linear_num_value_heads=mamba_heads,
        linear_value_head_dim=mamba_dim, linear_conv_kernel=int(either("conv_kernel", "mamba_d_conv", default=4)),
        linear_conv_bias=bool(either("use_conv_bias", "mamba_conv_bias", default=True)),
        linear_dt_limit=() if (lo, hi) == (0.0, float("inf")) else (lo, hi),
        **experts,
    )


def _minimax_m2_fields(cfg: Mapping[str, Any], source: str, head_dim: int) -> dict[str, Any]:
    """What a MiniMax-M2 config.json adds to Llama's layers: q/k RMSNorms over the whole projections (`qk_norm_type`
    per_layer), RoPE on the first `rotary_dim` dims of each head (transformers 5 writes it as rope_parameters'
    partial_rotary_factor, which then wins): {"qk_norm_whole", "partial_rotary_factor"}. Refused by name: MiniMax-Text-01's lightning attention layers
    (`attn_type_list` 0s), per-head q/k norms, a shared expert, routing other than sigmoid. The experts:
    `_experts_from_hf`."""
    if any(int(t) != 1 for t in cfg.get("attn_type_list") or ()):
        raise ConfigError(f"{source}: attn_type_list marks linear (lightning) attention layers, which are not supported "
                          "(MiniMax-M2's layers are all full attention: 1)")
    if cfg.get("qk_norm_type", "per_layer") != "per_layer":
        raise ConfigError(f"{source}: qk_norm_type={cfg['qk_norm_type']!r} is not supported (per_layer: one RMSNorm "
                          "over each whole q and k projection)")
    if int(cfg.get("shared_intermediate_size") or 0):
        raise ConfigError(f"{source}: shared_intermediate_size={cfg['shared_intermediate_size']} (a shared expert) is "
                          "not supported for minimax_m2")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"{source}: scoring_func={cfg['scoring_func']!r} is not supported for minimax_m2 (sigmoid)")
    fields: dict[str, Any] = dict(qk_norm_whole=bool(cfg.get("use_qk_norm", True)))
    if cfg.get("rotary_dim"):
        fields["partial_rotary_factor"] = int(cfg["rotary_dim"]) / head_dim
    return fields


def _experts_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> dict[str, Any]:
    """The mixture-of-experts fields of an HF config ({} for a dense model)."""
    if arch not in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "glm4_moe", "granitemoe", "granitemoeshared",
                    "granitemoehybrid", "minimax_m2", "olmoe", "dots1", "ernie4_5_moe") or (arch == "granitemoehybrid" and not cfg.get("num_local_experts")):
        return {}
    if arch == "ernie4_5_moe":  # (ERNIE's names for the counts)
        cfg = {**cfg, "num_experts": cfg.get("moe_num_experts", 64), "num_experts_per_tok": cfg.get("moe_k", 6)}
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0
    if not num_experts or not cfg.get("num_experts_per_tok"):
        raise ConfigError(f"{source}: a {arch} config needs num_experts (or num_local_experts, n_routed_experts) and "
                          "num_experts_per_tok")
    num_layers, moe_intermediate = int(cfg["num_hidden_layers"]), int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if arch == "ernie4_5_moe":
        # ERNIE 4.5: softmax scores, a correction bias (`moe_statics`) that chooses experts without weighing them, the
        # chosen scores renormalized; `moe_num_shared_experts` ungated shared experts; experts on the layers from
        # moe_layer_start_index to moe_layer_end_index (-1: the last) whose number + 1 divides by moe_layer_interval
        start, end = int(cfg.get("moe_layer_start_index", 1)), int(cfg.get("moe_layer_end_index", -1))
        end, step = num_layers - 1 if end == -1 else end, int(cfg.get("moe_layer_interval") or 1)
        return dict(
            num_experts=int(num_experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=moe_intermediate, norm_topk_prob=True,
            shared_expert_intermediate_size=int(cfg.get("moe_num_shared_experts", 2) or 0) * moe_intermediate,
            shared_expert_gate=False, moe_layers=tuple((i + 1) % step == 0 and start <= i <= end for i in range(num_layers)),
            router_scoring="softmax", router_score_bias=True)
    if arch in ("glm4_moe", "dots1"):  # DeepSeek-V3's router: sigmoid scores, a correction bias, groups; shared experts ungated
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        return dict(
            num_experts=int(num_experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=moe_intermediate, norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            shared_expert_intermediate_size=int(cfg.get("n_shared_experts") or 0) * moe_intermediate,
            shared_expert_gate=False, moe_layers=tuple(i >= first_dense for i in range(num_layers)),
            router_scoring="sigmoid", router_score_bias=True, expert_groups=int(cfg.get("n_group") or 1),
            expert_groups_per_tok=int(cfg.get("topk_group") or 1),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        )
    if arch == "minimax_m2":  # experts on every layer, chosen by sigmoid score plus a correction bias (no groups),
        # the chosen scores renormalized; no shared expert
        return dict(num_experts=int(num_experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_intermediate_size=moe_intermediate, norm_topk_prob=True, router_scoring="sigmoid",
                    router_score_bias=bool(cfg.get("use_routing_bias", True)))
    # Qwen-MoE: a layer has experts unless mlp_only_layers names it, and then only every decoder_sparse_step-th
    dense, step = set(cfg.get("mlp_only_layers") or ()), int(cfg.get("decoder_sparse_step") or 1)
    return dict(
        num_experts=int(num_experts),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=moe_intermediate,
        # Mixtral, gpt-oss and Granite: softmax over the top k logits, the same as the top k probabilities renormalized
        norm_topk_prob=bool(cfg.get("norm_topk_prob", arch in ("mixtral", "gpt_oss", *GRANITE_HF))),
        # (Granite's shared expert, `shared_intermediate_size` wide, is added ungated)
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size")
                                            or cfg.get("shared_intermediate_size") or 0),
        shared_expert_gate=arch not in GRANITE_HF,
        moe_bias=arch == "gpt_oss",
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _llama4_from_hf(cfg: Mapping[str, Any], source: str) -> LlamaConfig:
    """Llama 4 (Scout, Maverick): config.json `llama4` (its text_config; the vision tower is not read, the model is
    served for text) or `llama4_text`. Layers without RoPE every `no_rope_layer_interval`-th (`no_rope_layers`: 1 =
    RoPE), full attention there and chunked attention of `attention_chunk_size` on the others (`layer_types`);
    RoPE in interleaved pairs (the loader reorders q/k rows), llama3 scaling; q/k RMS-normed without weights after
    RoPE on the RoPE layers (`use_qk_norm`), q scaled by position on the others (`attn_temperature_tuning`:
    `floor_scale`, `attn_scale`). Experts on the layers `moe_layers` names (else every `interleave_moe_layer_step`-th):
    `num_local_experts` of `intermediate_size`, the top `num_experts_per_tok` by router logit, weighted by its
    sigmoid, the weight multiplying the expert's input; a shared expert of `intermediate_size` beside them, ungated;
    the other layers' MLP of `intermediate_size_mlp`."""
    if cfg.get("model_type") == "llama4":
        text = dict(cfg.get("text_config") or {})
        if "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        cfg, source = text, f"{source} text_config"

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    num_layers, hidden, num_heads = int(need("num_hidden_layers")), int(need("hidden_size")), int(need("num_attention_heads"))
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    rope_layers = tuple(bool(x) for x in (cfg.get("no_rope_layers")
                                          or [(i + 1) % interval != 0 for i in range(num_layers)]))
    chunk = cfg.get("attention_chunk_size")
    types = cfg.get("layer_types") or ["chunked_attention" if r and chunk else "full_attention" for r in rope_layers]
    if len(types) != num_layers or set(types) - {"chunked_attention", "full_attention"}:
        raise ConfigError(f"{source}: layer_types must name each of the {num_layers} layers chunked_attention or "
                          f"full_attention; got {types}")
    chunked = tuple(t == "chunked_attention" for t in types)
    if any(chunked) and not chunk:
        raise ConfigError(f"{source}: chunked_attention layers need attention_chunk_size")
    step = int(cfg.get("interleave_moe_layer_step") or 1)
    moe = cfg.get("moe_layers")
    moe = set(range(step - 1, num_layers, step)) if moe is None else {int(i) for i in moe}
    inter = int(need("intermediate_size"))
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return LlamaConfig(
        architecture="llama4", vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size_mlp") or inter), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rope_theta=float(rope_params.get("rope_theta", cfg.get("rope_theta", 500000.0))),
        rope_scaling=rope.scaling_from_hf(rope_params, source, cfg), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        attention_bias=bool(cfg.get("attention_bias", False)), attention_out_bias=bool(cfg.get("attention_bias", False)),
        rope_layers=() if all(rope_layers) else rope_layers,
        attention_chunk=int(chunk) if any(chunked) else 0, chunked_layers=chunked if any(chunked) else (),
        qk_norm_unweighted=bool(cfg.get("use_qk_norm", True)),
        nope_temperature=((float(cfg.get("floor_scale", 8192)), float(cfg.get("attn_scale", 0.1)))
                          if cfg.get("attn_temperature_tuning", True) else ()),
        num_experts=int(need("num_local_experts")), num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
        moe_intermediate_size=inter, norm_topk_prob=False, shared_expert_intermediate_size=inter,
        shared_expert_gate=False, moe_layers=tuple(i in moe for i in range(num_layers)), router_scoring="sigmoid",
        router_scales_input=True,
    )


def _shared_indexers(cfg: Mapping[str, Any], num_layers: int) -> list[int]:
    """The layers of a GLM-MoE-DSA config.json that reuse the previous layer's top-k instead of running an indexer:
    `indexer_types` "shared", else `index_topk_pattern`'s S, else those `index_topk_freq` (1: none) skips from
    `index_skip_topk_offset` (2) on, as transformers reads them."""
    types = cfg.get("indexer_types")
    if types is None and cfg.get("index_topk_pattern") is not None:
        types = ["shared" if c in ("S", "shared") else "full" for c in cfg["index_topk_pattern"]]
    if types is None:
        freq, offset = max(int(cfg.get("index_topk_freq") or 1), 1), int(cfg.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)]
    return [i for i, t in enumerate(types) if t == "shared"]


def _deepseek_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> LlamaConfig:
    """An HF `deepseek_v2` or `deepseek_v3` config.json (Kimi K2's `kimi_k2` and GLM-4.7-Flash's `glm4_moe_lite` are
    V3's; DeepSeek-V3.2's `deepseek_v32` is V3's with sparse attention's indexer in every layer, GLM-5's
    `glm_moe_dsa` V3.2's with the indexer's RoPE in interleaved pairs): latent attention,
    the first first_k_dense_replace layers dense (or those `mlp_layer_types` calls "dense": glm4_moe_lite's, whose
    default is the first), the rest experts plus shared ones. V2 routes by softmax (greedy, or `group_limited_greedy`:
    groups ranked by their best expert) without renormalizing; V3 as GLM-4.5 (sigmoid, a correction bias, groups ranked
    by their best two). The softmax scale carries YaRN's mscale_all_dim twice."""

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    num_layers, hidden = int(need("num_hidden_layers")), int(need("hidden_size"))
    if cfg.get("rope_interleave") is False:  # a transformers switch; DeepSeek's checkpoints turn interleaved pairs
        raise ConfigError(f"{source}: rope_interleave=false is not supported (the loader reorders interleaved pairs)")
    nope, rope_dim, v_dim = int(need("qk_nope_head_dim")), int(need("qk_rope_head_dim")), int(need("v_head_dim"))
    rank = int(need("kv_lora_rank"))
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    scaling = rope.scaling_from_hf(rope_params, source, cfg)
    sm_scale = rope.yarn_softmax_scale(nope + rope_dim, scaling and scaling.factor, rope_params.get("mscale_all_dim"))
    v3 = arch == "deepseek_v3"
    method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"{source}: topk_method={method!r} is not supported (greedy, group_limited_greedy, noaux_tc)")
    grouped = method != "greedy"
    moe_intermediate = int(need("moe_intermediate_size"))
    first_dense = int(cfg.get("first_k_dense_replace") or (cfg.get("model_type") == "glm4_moe_lite"))
    step = int(cfg.get("moe_layer_freq") or 1)
    moe_layers = tuple(i >= first_dense and i % step == 0 for i in range(num_layers))
    if cfg.get("mlp_layer_types") is not None:
        types = list(cfg["mlp_layer_types"])
        if len(types) != num_layers or set(types) - {"dense", "sparse"}:
            raise ConfigError(f"{source}: mlp_layer_types must name each of the {num_layers} layers dense or sparse")
        moe_layers = tuple(t == "sparse" for t in types)
    scoring = "sigmoid" if v3 else "softmax"
    if cfg.get("scoring_func", scoring) != scoring:
        raise ConfigError(f"{source}: scoring_func={cfg.get('scoring_func')!r} is not supported for {arch}")
    sparse = {}
    glm = cfg.get("model_type") == "glm_moe_dsa"
    if cfg.get("model_type") == "deepseek_v32" or glm:  # DeepSeek Sparse Attention (transformers' defaults)
        sparse = dict(index_topk=int(cfg.get("index_topk") or 2048),
                      index_num_heads=int(cfg.get("index_n_heads") or (32 if glm else 64)),
                      index_head_dim=int(cfg.get("index_head_dim") or 128), index_rope_interleaved=glm)
        shared = _shared_indexers(cfg, num_layers) if glm else []
        if shared:
            raise ConfigError(f"{source}: layers {shared} reuse another layer's top-k positions (indexer_types "
                              "'shared'), which is not supported: every layer must run its own indexer")
    return LlamaConfig(
        **sparse,
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=int(need("num_attention_heads")),
        num_kv_heads=1,
        head_dim=rope_dim + rank,
        rope_theta=float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        query_pre_attn_scalar=sm_scale ** -2,
        kv_lora_rank=rank,
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        num_experts=int(need("n_routed_experts")),
        num_experts_per_tok=int(need("num_experts_per_tok")),
        moe_intermediate_size=moe_intermediate,
        # transformers' V2 router never renormalizes (V2 configs say norm_topk_prob: false)
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if v3 else False,
        shared_expert_intermediate_size=int(cfg.get("n_shared_experts") or 0) * moe_intermediate,
        shared_expert_gate=False,
        moe_layers=moe_layers,
        router_scoring=scoring,
        router_score_bias=v3,
        expert_groups=int(cfg.get("n_group") or 1) if grouped else 1,
        expert_groups_per_tok=int(cfg.get("topk_group") or 1) if grouped else 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        expert_group_top=2 if v3 else 1,
    )


def _kimi_linear_from_hf(cfg: Mapping[str, Any], source: str) -> LlamaConfig:
    """Kimi Linear (`kimi_linear`): Kimi Delta Attention (linear_kind "kda") on the layers
    `linear_attn_config.kda_layers` names and DeepSeek-V3's latent attention without RoPE on its `full_attn_layers` (both 1-based; or transformers'
    `layer_types`), each layer's MLP as V3's (dense first layers, then experts routed by sigmoid with a correction
    bias, plus shared ones), its fields under their own names (num_experts, num_experts_per_token, num_shared_experts,
    moe_renormalize, num_expert_group, model_max_length). The softmax scale is the query head dim's, without YaRN."""
    linear = cfg.get("linear_attn_config") or {}
    for key, want in (("mla_use_nope", True), ("moe_router_activation_func", "sigmoid"),
                      ("mla_use_output_gate", False)):
        if cfg.get(key, want) != want:
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported (only {want!r})")
    for key in ("use_full_rank_gate", "gate_lower_bound"):
        if linear.get(key):
            raise ConfigError(f"{source}: linear_attn_config.{key}={linear[key]!r} is not supported")
    renamed = {"n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
               "n_shared_experts": "num_shared_experts", "norm_topk_prob": "moe_renormalize",
               "n_group": "num_expert_group", "max_position_embeddings": "model_max_length"}
    deepseek = {**cfg, **{ours: cfg[theirs] for ours, theirs in renamed.items() if cfg.get(theirs) is not None},
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "rope_scaling": None, "rope_parameters": None}
    base = _deepseek_from_hf(deepseek, source, "deepseek_v3")
    n = base.num_layers
    types = cfg.get("layer_types")
    if types is None and {"kda_layers", "full_attn_layers"} <= set(linear):
        types = [None] * n
        for kind, key in (("linear_attention", "kda_layers"), ("full_attention", "full_attn_layers")):
            for layer in linear[key]:
                if not 1 <= int(layer) <= n:
                    raise ConfigError(f"{source}: linear_attn_config.{key} names layer {layer} of {n} (1-based)")
                types[int(layer) - 1] = kind
    types = types or ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    if len(types) != n or set(types) - {"linear_attention", "full_attention"}:
        raise ConfigError(f"{source}: every one of the {n} layers must be linear_attention (kda_layers) or "
                          f"full_attention (full_attn_layers); got {types}")
    heads = int(linear.get("num_heads", cfg.get("linear_num_heads", 32)))
    head_dim = int(linear.get("head_dim", cfg.get("linear_head_dim", 128)))
    return dataclasses.replace(
        base, architecture="kimi_linear", rope_layers=(False,) * n,
        query_pre_attn_scalar=float(base.qk_nope_head_dim + base.qk_rope_head_dim),
        linear_layers=tuple(t == "linear_attention" for t in types), linear_kind="kda",
        linear_num_key_heads=heads, linear_num_value_heads=heads, linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_conv_kernel=int(linear.get("short_conv_kernel_size", cfg.get("linear_conv_kernel_dim", 4))))


def _layer_types(cfg: Mapping[str, Any], source: str, num_layers: int,
                 pattern: int) -> tuple[list[str], Mapping[str, Any], Mapping[str, Any]]:
    """(each layer's type, the global layers' RoPE parameters, the windowed layers') of an HF config whose windowed
    layers surround global ones: `layer_types`, else every `pattern`-th layer global; transformers 5's
    `rope_parameters` per layer type, or one dict for all."""
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{source}: layer_types {sorted(unknown)} are not supported")
    rope_params = cfg.get("rope_parameters") or {}
    return types, rope_params.get("full_attention", rope_params), rope_params.get("sliding_attention", {})


def _plain_act(name: str, source: str) -> str:
    """An ungated MLP's activation (Arcee's relu2, Apertus's xielu) by its HF name."""
    if name not in ("relu2", "xielu"):
        raise ConfigError(f"{source}: hidden_act={name!r} is not supported for an MLP without a gate (relu2, xielu)")
    return name


def _granite_multipliers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An HF `granite` config's four multipliers as LlamaConfig fields (transformers' defaults: 1)."""
    return dict(embed_scale=float(cfg.get("embedding_multiplier", 1.0)),
                attention_multiplier=float(cfg.get("attention_multiplier", 1.0)),
                residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
                logits_scaling=float(cfg.get("logits_scaling", 1.0)))


def _need(cfg: Mapping[str, Any], source: str):
    """need(key) -> cfg[key], or a ConfigError naming the missing field."""

    def need(key):
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    return need


def _layers_from_hf(cfg: Mapping[str, Any], source: str, arch: str, window, types, full: Mapping[str, Any],
                    theta: float, **fields) -> LlamaConfig:
    """A config.json's sizes, RoPE (`full`: the global layers' parameters), biases and windows (`types`: each layer's,
    when `window`) as a LlamaConfig of `arch`, with `fields` on top."""
    need = _need(cfg, source)
    num_heads, bias = int(need("num_attention_heads")), bool(cfg.get("attention_bias", False))
    return LlamaConfig(**{
        "architecture": arch,
        "vocab_size": int(need("vocab_size")),
        "hidden_size": int(need("hidden_size")),
        "intermediate_size": int(need("intermediate_size")),
        "num_layers": int(need("num_hidden_layers")),
        "num_heads": num_heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or num_heads),
        "head_dim": int(cfg.get("head_dim") or int(need("hidden_size")) // num_heads),
        "rope_theta": theta,
        "rope_scaling": rope.scaling_from_hf(full if full.get("rope_type") else cfg.get("rope_scaling"), source, cfg),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "attention_bias": bias,
        "attention_out_bias": bias,
        "max_position": int(cfg.get("max_position_embeddings", 4096)),
        "sliding_window": int(window) if window else None,
        "sliding_layers": tuple(t == "sliding_attention" for t in types) if window else (),
        **fields,
    })


def _olmo_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> LlamaConfig:
    """An HF `olmo2`, `olmo3` or `exaone4` config.json: norms after attention and the MLP only. OLMo: q/k norms over
    whole projections; OLMo 3's windowed layers (`layer_types`, else all but every fourth) keep RoPE unscaled and the
    global ones take `rope_scaling` (transformers 5: `rope_parameters` per layer type), as transformers runs them.
    EXAONE 4: q/k norms per head; with a `sliding_window`, windowed layers (`layer_types`, else
    `sliding_window_pattern`: every n-th layer global, or a string such as "LLLG") and global ones without RoPE."""
    num_layers = int(_need(cfg, source)("num_hidden_layers"))
    window = cfg.get("sliding_window") if arch in ("olmo3", "exaone4") else None
    pattern = (cfg.get("sliding_window_pattern") or 4) if arch == "exaone4" else 4
    if isinstance(pattern, str) and not cfg.get("layer_types"):  # "LLLG": a window (L) or not (G) per layer, repeated
        if set(pattern) - {"L", "G"}:
            raise ConfigError(f"{source}: sliding_window_pattern={pattern!r} is not a string of L and G")
        cfg = {**cfg, "layer_types": ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention"
                                      for i in range(num_layers)]}
    types, full, local = _layer_types(cfg, source, num_layers, pattern if isinstance(pattern, int) else 4)
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 500_000.0 if arch == "olmo3" else 10_000.0)))
    exaone = arch == "exaone4"
    return _layers_from_hf(
        cfg, source, arch, window, types, full, theta,
        # EXAONE 4: RoPE (and its scaling) on the windowed layers alone where any are windowed
        rope_layers=tuple(t == "sliding_attention" for t in types) if exaone and window else (),
        rope_local_theta=float(local.get("rope_theta", theta)) if window and not exaone else None,
        qk_norm=True, qk_norm_whole=not exaone, sandwich_norms=True, pre_norms=False,
    )


def _cohere_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> LlamaConfig:
    """An HF `cohere` (Command R, Aya Expanse) or `cohere2` (Command R7B, Command A) config.json: one LayerNorm without
    bias (`layer_norm_eps`) before attention and the MLP both, whose outputs join the stream together; RoPE on
    interleaved pairs (the loader reorders q/k rows); logits times `logit_scale`; tied embeddings. Cohere 2: windowed
    layers (`layer_types`, else all but every `sliding_window_pattern`-th) with RoPE around global ones without."""
    if cfg.get("use_qk_norm"):  # Command R+'s LayerNorm per head, weights [heads, head_dim]
        raise ConfigError(f"{source}: use_qk_norm=true is not supported (a LayerNorm per q/k head)")
    num_layers = int(_need(cfg, source)("num_hidden_layers"))
    window = cfg.get("sliding_window") if arch == "cohere2" else None
    types, full, _ = _layer_types(cfg, source, num_layers, int(cfg.get("sliding_window_pattern") or 4))
    logit_scale = float(cfg.get("logit_scale", 0.0625))
    if logit_scale == 0:
        raise ConfigError(f"{source}: logit_scale must not be 0")
    return _layers_from_hf(
        {**cfg, "rms_norm_eps": cfg.get("layer_norm_eps", 1e-5), "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
         "max_position_embeddings": cfg.get("max_position_embeddings", 8192)},
        source, arch, window, types, full, float(full.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_layers=tuple(t == "sliding_attention" for t in types) if window else (),  # no RoPE on global layers
        logits_scaling=1.0 / logit_scale, parallel_block=True, norm_kind="layer",
    )


def _gemma_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> LlamaConfig:
    """An HF `gemma2` or `gemma3_text` config.json (transformers 4.5x `rope_theta` /
    `rope_local_base_freq`, or transformers 5 `rope_parameters`, per layer type for Gemma 3)."""

    def need(key):
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention is not supported (a causal decoder only)")
    num_layers = int(need("num_hidden_layers"))
    types, full, local = _layer_types(cfg, source, num_layers,
                                      cfg.get("sliding_window_pattern", GEMMA_SLIDING_PATTERN[arch]))
    hidden = int(need("hidden_size"))
    gemma3 = arch == "gemma3"
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    return LlamaConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=int(need("num_attention_heads")),
        num_kv_heads=int(need("num_key_value_heads")),
        head_dim=int(need("head_dim")),
        rope_theta=float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0 if gemma3 else 10_000.0))),
        rope_scaling=rope.scaling_from_hf(full if full.get("rope_type") else cfg.get("rope_scaling"), source, cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        max_position=int(cfg.get("max_position_embeddings", 8192)),
        sliding_window=int(need("sliding_window")),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        rope_local_theta=(float(local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)))
                          if gemma3 else None),
        hidden_act="gelu_tanh" if act in ("gelu_pytorch_tanh", "gelu_tanh") else str(act),
        qk_norm=gemma3,
        sandwich_norms=True,
        embed_scale=math.sqrt(hidden),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_soft_cap=float(cfg["attn_logit_softcapping"]) if cfg.get("attn_logit_softcapping") else None,
        final_soft_cap=float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") else None,
    )


# transformers' LlamaConfig defaults: older LLaVA checkpoints (llava-hf/llava-1.5-*) write only the fields of their
# text_config that differ from them.
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def _llava_text_config(cfg: Mapping[str, Any]) -> dict:
    """A LLaVA config.json's language model config (its text_config, a Llama's defaults filled in where it leaves
    them out)."""
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "llama")
    return {**_LLAMA_DEFAULTS, **text} if text["model_type"] == "llama" else text


def _qwen2_vl_from_hf(cfg: Mapping[str, Any], source: str) -> LlamaConfig:
    """A Qwen2-VL / Qwen2.5-VL config.json's language model: a Qwen2 whose RoPE takes three positions a token
    (`mrope_section`). Its fields are top-level in older configs, in `text_config` since transformers 5; the rope
    dict says `"type": "mrope"` (older) or `"rope_type": "default"` beside the sections. Qwen3-VL's (`qwen3_vl`,
    `qwen3_vl_moe`): a Qwen3 or Qwen3-MoE in its text_config, the sections interleaved (`mrope_interleaved`)."""
    arch = {"qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe"}.get(cfg.get("model_type"), "qwen2")
    text = {**cfg, **(cfg.get("text_config") or {}), "model_type": arch}
    rope_params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = tuple(int(n) for n in rope_params.pop("mrope_section", ()) or ())
    rope_params.pop("mrope_interleaved", None)
    interleaved = arch != "qwen2"  # (transformers' Qwen3-VL rotary interleaves whatever the flag says)
    if rope_params.get("rope_type", rope_params.get("type")) in ("mrope", "default", None):
        rope_params = {k: v for k, v in rope_params.items() if k not in ("type", "rope_type")}
    text.pop("rope_scaling", None)
    text["rope_parameters"] = rope_params or None
    if not section:
        raise ConfigError(f"{source}: a {cfg.get('model_type')} config needs rope_scaling's mrope_section")
    out = LlamaConfig.from_hf_config(text, f"{source} ({cfg.get('model_type')})")
    try:
        return dataclasses.replace(out, mrope_section=section, mrope_interleaved=interleaved)
    except ConfigError as e:  # (the sections, checked by LlamaConfig)
        raise ConfigError(f"{source}: {e}") from None


def _qwen3_5_from_hf(cfg: Mapping[str, Any], source: str, arch: str) -> LlamaConfig:
    """An HF `qwen3_5` / `qwen3_5_moe` (its `text_config`; the vision tower is models/qwen_vision.py's) or
    `qwen3_5_text` / `qwen3_5_moe_text` config.json: Gated DeltaNet layers around every `full_attention_interval`-th
    attention layer (`layer_types`), attention with an output gate, per-head q/k norms, RoPE on a quarter of each head;
    every RMSNorm of the stream and of q/k scales by 1 + w (the loader adds the 1). Text positions turn all three of
    M-RoPE's sections alike: plain RoPE, so M-RoPE (interleaved) is on only with a vision tower. The MoE models: every MLP experts (softmax, top k renormalized) and a shared expert
    behind a sigmoid gate, as Qwen2-MoE's. `qwen3_next` (Qwen3-Next): the same layers and experts (its projections
    fused differently: the loader's business); dense layers among the expert ones are refused."""
    vision = bool(cfg.get("vision_config"))
    cfg = cfg.get("text_config") or cfg
    need = _need(cfg, source)
    experts = {}
    if arch == "qwen3_next" and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1):
        raise ConfigError(f"{source}: qwen3_next with dense layers (mlp_only_layers, decoder_sparse_step) is not "
                          "supported")
    if arch in ("qwen3_5_moe", "qwen3_next"):
        shared = int(need("shared_expert_intermediate_size"))
        experts = dict(num_experts=int(need("num_experts")), num_experts_per_tok=int(need("num_experts_per_tok")),
                       moe_intermediate_size=int(need("moe_intermediate_size")), norm_topk_prob=True,
                       shared_expert_intermediate_size=shared, shared_expert_gate=True)
        cfg = {"intermediate_size": shared, **cfg}
    num_layers = int(need("num_hidden_layers"))
    interval = int(cfg.get("full_attention_interval", 4))
    types = cfg.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention"
                                       for i in range(num_layers)]
    unknown = set(types) - {"linear_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{source}: layer_types {sorted(unknown)} are not supported")
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope_params.get("rope_type", "default") not in ("default", "mrope"):
        raise ConfigError(f"{source}: rope_type={rope_params['rope_type']!r} is not supported for qwen3_5")
    # With its vision tower (models/qwen_vision.py), image positions take M-RoPE's three numbers, interleaved as
    # transformers' Qwen3.5 rotary always lays them out
    mrope = (dict(mrope_section=tuple(int(n) for n in rope_params.get("mrope_section") or (11, 11, 10)),
                  mrope_interleaved=True) if vision else {})
    return _layers_from_hf(
        {**cfg, "rope_scaling": None}, source, arch, None, types, {},
        float(rope_params.get("rope_theta", cfg.get("rope_theta", 10_000_000.0))),
        partial_rotary_factor=float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_norm=True, attn_output_gate=True,
        linear_layers=tuple(t == "linear_attention" for t in types),
        linear_num_key_heads=int(need("linear_num_key_heads")),
        linear_num_value_heads=int(need("linear_num_value_heads")),
        linear_key_head_dim=int(need("linear_key_head_dim")),
        linear_value_head_dim=int(need("linear_value_head_dim")),
        linear_conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
        **experts, **mrope,
    )
