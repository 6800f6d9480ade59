"""Llama-family decoder as pure functions over a pytree of weights (the config's switches also make
it Qwen2/3, Gemma 2/3, Phi-3, OLMo 2/3, Granite and gpt-oss: biases, q/k norms, sandwich or post norms, GELU, soft
caps, Granite's multipliers, per-layer windows, partial rotary embeddings, attention sinks).

Weights are a plain dict pytree (see `param_shapes`), passed to jitted functions as arguments, never
baked into the HLO. Two entry points share every layer but attention:

- `forward(params, cfg, kv_caches, inputs, attn_backend)`: the engine's step. Takes arrays only (tokens,
  positions, slots, page-table rows, lengths) for a ragged batch of prefill chunks and decodes, writes
  the new K/V into their pages and attends over the paged cache through `pallas_kernels`.
- `forward_dense(params, cfg, tokens)`: the non-paged reference; one sequence, plain causal attention.

Layers are stacked (every leaf of `params["layers"]` has a leading [L] axis) and run by `lax.scan`:
XLA compiles one layer body, not L copies, which keeps start-up compilation of every bucket short.
The KV cache is stacked the same way, `(k, v)` each [L, Hkv, num_pages, page_size, D], carried
through the scan and written in place; attention reads layer `i` by index, never a sliced copy.

Layouts: activations [T, hidden]; q [T, Hq, D].
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from models.config import LlamaConfig
from pallas_kernels import fp8_matmul, indexed_attention, kv_quant
from models import gated_delta, moe, quant
from models.lora import EXPERT_PROJECTIONS, lora_delta
from models.quant import SCALE_SUFFIX, packed_weight
from models.weights import NORM_KEYS, layer_kind, layers_of, mixer_kind

Params = dict
KVCache = tuple  # (k_pages, v_pages) [L, Hkv, num_pages, page_size, D], then (k_scales, v_scales) [L, Hkv, num_pages,
# page_size] for an 8-bit cache (pallas_kernels/kv_quant.py)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One ragged batch, every field a device array. T = token bucket, S = sequence bucket."""

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, absolute position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32, page * page_size + offset where its K/V goes; < 0 for padding
    kv_lens: jax.Array  # [S] int32, KV length of each sequence including this step's tokens
    page_indices: jax.Array  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [1] int32
    logits_indices: jax.Array  # [R] int32: the rows whose hidden states are returned (each sequence's last token, then draft positions)
    adapter_ids: jax.Array | None = None  # [T] int32: each token's LoRA adapter (0: none), with adapters loaded
    # A hybrid cache (`HybridLayout`): the windowed layers' slots in place of pages, laid out like slot_mapping and
    # page_indices (a window slot per page; out-of-window pages hold any valid slot: attention never reads them).
    window_slot_mapping: jax.Array | None = None  # [T] int32
    window_page_indices: jax.Array | None = None  # [S, max_pages_per_seq] int32
    # A model with linear attention layers: each sequence's state slot (models/gated_delta.py), [S] int32
    state_slots: jax.Array | None = None
    snapshot_offsets: jax.Array | None = None  # [S] int32: a snapshot of the state after this many new tokens (0: none)
    snapshot_slots: jax.Array | None = None  # [S] int32: ... into this slot (engine.state_snapshots)
    # ... and with speculative decoding, where its state after each of its first K tokens goes (gated_delta.Batch)
    draft_slots: jax.Array | None = None  # [S, K] int32
    # Images (models/vision.py): the rows that stand for tokens past the vocabulary (an image's positions), [T, hidden];
    # None in steps without any
    mm_embeds: jax.Array | None = None
    # M-RoPE (`LlamaConfig.mrope_section`): each token's (temporal, height, width) positions, [3, T] int32; these
    # replace `positions` in RoPE (an image's rows: their place in its grid; text: positions shifted past the images)
    mrope_positions: jax.Array | None = None
    # Qwen3-VL's DeepStack: [k, T, hidden], added after each of the first k layers (zeros but at images' positions);
    # None in steps without images and for the other models
    mm_deep: jax.Array | None = None
    # Gemma 3's images, whose positions attend to each other both ways: the last KV position each token attends to,
    # [T] int32 (its own, or its image's last: pallas_kernels.ragged_paged_attention); None in steps without images
    # and for the other models (causal)
    kv_limits: jax.Array | None = None
    # Draft trees (speculative.ngram_branches): each row's mask of the positions before it that it does not see (other
    # branches' nodes; pallas_kernels.ragged_paged_attention's tree_masks), [T] int32; None without trees
    tree_masks: jax.Array | None = None
    # An MTP drafter (speculative.method: mtp; models/mtp.py): the token after each row, [T] int32, or -1 - r for the
    # token head row r samples in this step (engine.runner's `_mtp_extend_impl` reads it; the model does not)
    next_tokens: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class HybridLayout:
    """A hybrid KV cache (engine.window_pages): the global layers keep `num_pages` pages each and the sliding-window
    layers `num_window_pages` slots each, all in one array per cache tensor, [1, Hkv, size, page_size, ...]: layer
    l's page p is entry bases[l] + p. Each layer reads and writes through its own table (page_indices or
    window_page_indices, shifted by its base), so one scanned layer body serves both kinds and no layer keeps
    pages it never reads."""

    windowed: tuple[bool, ...]  # per layer
    num_pages: int
    num_window_pages: int

    @property
    def bases(self) -> tuple[int, ...]:
        out, g, w = [], 0, sum(not x for x in self.windowed) * self.num_pages
        for windowed in self.windowed:
            out.append(w if windowed else g)
            w, g = (w + self.num_window_pages, g) if windowed else (w, g + self.num_pages)
        return tuple(out)

    @property
    def size(self) -> int:
        num_windowed = sum(self.windowed)
        return (len(self.windowed) - num_windowed) * self.num_pages + num_windowed * self.num_window_pages

    def flat_pairs(self, page_pairs, slot_pairs) -> list[tuple[int, int]]:
        """(src, dst) page copies and window-slot copies as pairs of entries in every layer."""
        bases = self.bases
        return [(b + s, b + d) for b, w in zip(bases, self.windowed)
                for s, d in (slot_pairs if w else page_pairs)]


def param_shapes(cfg: LlamaConfig) -> Params:
    """The weight pytree as shapes (HF orientation transposed to x @ W; layers stacked on axis 0)."""
    h, i, n = cfg.hidden_size, cfg.mlp_intermediate_size, cfg.num_layers
    layers = {"attn_norm": (n, h), "mlp_norm": (n, h)} if cfg.pre_norms else {}
    if cfg.parallel_block:  # one norm before attention and the MLP both
        del layers["mlp_norm"]
    if cfg.mla:
        heads, qk, rank = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.q_lora_rank
        layers |= {
            "wkv_a": (n, h, cfg.head_dim),  # [the RoPE key, the latent] (the checkpoint's rows reordered so)
            "kv_a_norm": (n, cfg.kv_lora_rank),
            "wkv_b": (n, cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),  # latent -> K, V per head
            "wo": (n, heads * cfg.v_head_dim, h),
        }
        layers |= ({"wq_a": (n, h, rank), "q_a_norm": (n, rank), "wq_b": (n, rank, heads * qk)} if rank
                   else {"wq": (n, h, heads * qk)})
        if cfg.index_topk:  # sparse attention's indexer
            hi, di = cfg.index_num_heads, cfg.index_head_dim
            layers |= {"index_wq": (n, rank, hi * di), "index_wk": (n, h, di), "index_k_norm": (n, di),
                       "index_k_norm_bias": (n, di), "index_weights": (n, h, hi)}
    else:
        a = cfg.attn_input_size or h
        layers |= {"wq": (n, a, cfg.q_size * (2 if cfg.attn_output_gate else 1)), "wk": (n, a, cfg.kv_size),
                   "wv": (n, a, cfg.kv_size), "wo": (n, cfg.q_size, h)}
    if i:  # the dense MLP (a MoE model's shared expert)
        layers |= {"w_gate": (n, h, i), "w_up": (n, h, i), "w_down": (n, i, h)}
        if not cfg.gated_mlp:
            del layers["w_gate"]
        if cfg.hidden_act == "xielu":
            layers |= {"xielu_alpha_p": (n, 1), "xielu_alpha_n": (n, 1), "xielu_beta": (n,), "xielu_eps": (n,)}
    if cfg.num_experts:
        e, mi = cfg.num_experts, cfg.moe_intermediate_size
        layers |= {"router": (n, h, e), "moe_gate": (n, e, h, mi), "moe_up": (n, e, h, mi), "moe_down": (n, e, mi, h)}
        if cfg.shared_expert_intermediate_size and cfg.shared_expert_gate:
            layers[moe.SHARED_GATE] = (n, h, 1)
        if cfg.moe_bias:
            layers |= {"router_bias": (n, e), "moe_gate_bias": (n, e, mi), "moe_up_bias": (n, e, mi),
                       "moe_down_bias": (n, e, h)}
        if cfg.router_score_bias:
            layers[moe.SCORE_BIAS] = (n, e)
        if cfg.moe_latent_size:  # experts in a latent space: reading and writing it, projected there and back
            lat = cfg.moe_latent_size
            layers |= {"moe_gate": (n, e, lat, mi), "moe_up": (n, e, lat, mi), "moe_down": (n, e, mi, lat),
                       "latent_down": (n, h, lat), "latent_up": (n, lat, h)}
        if not cfg.gated_mlp:  # ungated experts (Nemotron-H's): up -> act -> down
            del layers["moe_gate"]
        if cfg.mixed_mlp:  # the dense layers' MLP
            di = cfg.intermediate_size
            layers |= {"dense_gate": (n, h, di), "dense_up": (n, h, di), "dense_down": (n, di, h)}
    if cfg.attention_bias:
        layers |= {"bq": (n, cfg.q_size), "bk": (n, cfg.kv_size), "bv": (n, cfg.kv_size)}
    if cfg.attention_out_bias:
        layers["bo"] = (n, h)
    if cfg.attention_sinks:
        layers["sinks"] = (n, cfg.num_heads)
    if cfg.qk_norm:
        layers |= {"q_norm": (n, cfg.qk_norm_sizes[0]), "k_norm": (n, cfg.qk_norm_sizes[1])}
    if cfg.sandwich_norms:
        layers |= {"post_attn_norm": (n, h), "post_mlp_norm": (n, h)}
    if cfg.linear_kind == "short_conv" and cfg.linear_layers:  # LFM2: B, C, x; the convolution over B x; out
        layers |= {"gdn_qkv": (n, h, 3 * h), "gdn_conv": (n, cfg.linear_conv_kernel, h), "gdn_out": (n, h, h)}
    elif cfg.linear_kind == "kda" and cfg.linear_layers:  # Kimi Delta Attention (models/gated_delta.py)
        hh, d, width = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_dim
        layers |= {"gdn_qkv": (n, h, 3 * width), "gdn_conv": (n, cfg.linear_conv_kernel, 3 * width),
                   "gdn_fa": (n, h, d), "gdn_fb": (n, d, width), "gdn_dt_bias": (n, width), "gdn_a_log": (n, hh),
                   "gdn_b": (n, h, hh), "gdn_ga": (n, h, d), "gdn_gb": (n, d, width), "gdn_norm": (n, d),
                   "gdn_out": (n, width, h)}
    elif cfg.linear_layers:  # Gated DeltaNet or Mamba-2 (models/gated_delta.py)
        hv, conv = cfg.linear_num_value_heads, cfg.linear_conv_dim
        layers |= {"gdn_qkv": (n, h, conv), "gdn_z": (n, h, cfg.linear_value_dim), "gdn_b": (n, h, hv),
                   "gdn_a": (n, h, hv), "gdn_conv": (n, cfg.linear_conv_kernel, conv), "gdn_dt_bias": (n, hv),
                   "gdn_a_log": (n, hv), "gdn_norm": (n, cfg.linear_value_head_dim), "gdn_out": (n, cfg.linear_value_dim, h)}
        if cfg.linear_kind == "mamba2":  # no write strength; a skip per head, the norm over the inner width
            del layers["gdn_b"]
            layers |= {"gdn_d": (n, hv), "gdn_norm": (n, cfg.linear_value_dim)}
            if cfg.linear_conv_bias:
                layers["gdn_conv_bias"] = (n, conv)
    # a weight of one kind of layer only (models with expert and dense layers) is stacked over those layers
    layers = {k: (len(layers_of(cfg, k)), *shape[1:]) for k, shape in layers.items()}
    shapes = {"embed": (cfg.vocab_size, h), "layers": layers, "final_norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    if cfg.num_labels:  # a sequence classifier's score head
        shapes["score"] = (h, cfg.num_labels)
    return shapes


# Past this many values a draw is made at its own size (a power-of-two bucket could double a large model's draw).
_BUCKETED_DRAW_MAX = 1 << 24


@functools.partial(jax.jit, static_argnums=1)
def _flat_normal(key: jax.Array, size: int) -> jax.Array:
    return jax.random.normal(key, (size,))


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.normal(key, shape)` in float32, value for value, compiled once per power-of-two size rather than
    once per shape: JAX's threefry draws value i from (key, i), so a longer flat draw's first values are the shorter
    one's. Random models of many configs (the tests build hundreds) share a handful of programs instead of one
    ~0.3 s compile per weight shape."""
    size = math.prod(shape)
    bucket = size if size > _BUCKETED_DRAW_MAX else 1 << max(size - 1, 0).bit_length()
    return _flat_normal(key, bucket)[:size].reshape(shape)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> Params:
    """Random weights of the right shapes (tests and synthetic benchmarks)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    norms = NORM_KEYS | {"gdn_norm"}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    arrays = [(1.0 + scale * normal(k, s)) if any(n in path for n in norms) else scale * normal(k, s)
              for k, s, path in zip(keys, leaves, paths)]
    return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def check_params(cfg: LlamaConfig, params: Params, source: str) -> None:
    """Raises ValueError naming the first tensor whose shape disagrees with the config."""
    want = param_shapes(cfg)
    if set(want) != set(params):
        raise ValueError(f"{source}: weights have {sorted(params)} but the config needs {sorted(want)}")
    flat_want = jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, shape in flat_want:
        if path not in got:
            raise ValueError(f"{source}: missing tensor {jax.tree_util.keystr(path)}")
        if tuple(got[path].shape) != tuple(shape):
            raise ValueError(
                f"{source}: tensor {jax.tree_util.keystr(path)} has shape {tuple(got[path].shape)}, config needs {tuple(shape)}"
            )


# ---------------------------------------------------------------------------------------------- layers
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without a bias (Cohere's): mean-centred, scaled to unit variance, times w; in float32."""
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def stream_norm(cfg: LlamaConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """A norm of the residual stream (before or after attention and the MLP, the final one): cfg.norm_kind's."""
    return (layer_norm if cfg.norm_kind == "layer" else rms_norm)(x, w, cfg.rms_norm_eps)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor=1.0,
               mrope_rows: tuple[int, ...] = ()) -> jax.Array:
    """Rotate-half RoPE (HF layout) on the first R = 2 * len(inv_freq) dims of each head; the other D - R pass
    unrotated (partial rotary embeddings, Phi-4-mini; R = D elsewhere). x: [T, H, D], positions: [T], or [3, T] with
    `mrope_rows` (M-RoPE, `LlamaConfig.mrope_rows`: pair j turned by positions[mrope_rows[j]]). cos and sin are
    multiplied by `attention_factor` (YaRN's or LongRoPE's; a float32 scalar, traced or not)."""
    rot = 2 * inv_freq.shape[-1]  # static: the table's shape
    inv = jnp.asarray(inv_freq, jnp.float32)
    if positions.ndim == 2:  # each pair's angle from its row's position
        freqs = positions.astype(jnp.float32)[np.asarray(mrope_rows)].T * inv  # [T, R/2]
    else:
        freqs = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, R/2]
    cos = jnp.cos(freqs)[:, None, :] * attention_factor  # [T, 1, R/2]
    sin = jnp.sin(freqs)[:, None, :] * attention_factor
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32[..., :rot], 2, axis=-1)
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    passed = [x32[..., rot:]] if rot < x.shape[-1] else []  # [T, H, D - R]
    return jnp.concatenate(rotated + passed, axis=-1).astype(x.dtype)


# (layer index, sliding window, attention sinks [Hq] float32 or None, q [T, Hq, D], k/v [T, Hkv, D], carry[, sparse
# attention's (indexer queries [T, Hi, Di], head weights [T, Hi]): DeepSeek-V3.2's layers]) -> (out [T, Hq, D], carry)
AttentionFn = Callable[[jax.Array, Any, Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

# The window of a global layer among windowed ones (Gemma 3): wider than any context.
NO_WINDOW = 1 << 30


def layer_window(cfg: LlamaConfig, windowed: jax.Array | None):
    """The sliding window attention gets for a layer: None (static: no window anywhere), an int
    (static: the same window on every layer), or, when windowed and global layers mix, an int32
    scalar chosen per layer at run time (`windowed`: that layer's traced flag)."""
    if cfg.sliding_window is None or (cfg.sliding_layers and not any(cfg.sliding_layers)):
        return None
    if cfg.mixed_windows:
        return jnp.where(windowed, jnp.int32(cfg.sliding_window), jnp.int32(NO_WINDOW))
    return cfg.sliding_window


def gated_activation(cfg: LlamaConfig) -> moe.Glu:
    """The gated MLP's (gate, up) -> down input: act(gate) * up, or gpt-oss's clamped SwiGLU."""
    if cfg.hidden_act == "swiglu_oai":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit

        def clamped(gate, up):
            gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
            return (up + 1) * gate * jax.nn.sigmoid(gate * alpha)

        return clamped
    if cfg.hidden_act == "gelu_tanh":
        return lambda gate, up: jax.nn.gelu(gate, approximate=True) * up
    return moe.swiglu


def plain_activation(cfg: LlamaConfig, p: Params):
    """An ungated MLP's activation (`gated_mlp` false): relu(x)^2 (Arcee), or xIELU with layer p's scalars (Apertus):
    alpha_p x^2 + beta x above 0, alpha_n (expm1(min(x, eps)) - x) + beta x below, the alphas through a softplus."""
    if cfg.hidden_act == "relu2":
        return lambda x: jnp.square(jax.nn.relu(x))
    assert cfg.hidden_act == "xielu", cfg.hidden_act
    beta, eps = p["xielu_beta"], p["xielu_eps"]
    alpha_p, alpha_n = jax.nn.softplus(p["xielu_alpha_p"][0]), beta + jax.nn.softplus(p["xielu_alpha_n"][0])

    def xielu(x):
        x32 = x.astype(jnp.float32)
        out = jnp.where(x32 > 0, alpha_p * x32 * x32 + beta * x32,
                        (jnp.expm1(jnp.minimum(x32, eps)) - x32) * alpha_n + beta * x32)
        return out.astype(x.dtype)

    return xielu


def _decoder(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, attend: AttentionFn,
             carry: Any = None, lora: dict | None = None, adapter_ids: jax.Array | None = None,
             stats: bool = False, mesh: jax.sharding.Mesh | None = None,
             recurrent: tuple[gated_delta.States, gated_delta.Batch] | None = None,
             mm_embeds: jax.Array | None = None, mm_deep: jax.Array | None = None,
             embeds: jax.Array | None = None, attn_in: jax.Array | None = None,
             aux_layers: tuple[int, ...] = ()) -> tuple[jax.Array, Any]:
    """Embedding and every decoder layer (one `lax.scan` step each); returns (hidden [T, hidden] before
    the final norm, the attention carry: the KV cache for the paged step). `lora` (models.lora.stack_adapters)
    with `adapter_ids` [T] adds each token's adapter to the projections it adapts. `mesh`: the tensor-parallel
    mesh the weights are split over (the Pallas FP8 matmuls run per device).

    `recurrent` (a model with linear attention layers): their states and the batch's state slots; the carry returned
    is then (attention's carry, the new states). Each layer runs one kind of token mixer, static in the scan body
    (`_grouped_layers`), attend's layer index being the layer's place among the attention layers (the KV cache holds
    those only). `mm_embeds` [T, hidden]: the input rows of the tokens past the vocabulary (images' positions);
    `mm_deep` [k, T, hidden] (Qwen3-VL's DeepStack): added to the residual stream after each of the first k layers
    (zero rows but at image positions). `embeds` [T, hidden]: the first layer's input rows in place of the tokens'
    embeddings (an MTP layer's: models/mtp.py). `attn_in` [T, attn_input_size]: the attention's input rows in place of
    its norm of the stream (an EAGLE-3 head's one layer: models/eagle3.py).

    `aux_layers`: the input rows of these layers (the residual stream before each; 0 is the embedding) are returned
    third, concatenated [T, len(aux_layers) x hidden] (what an EAGLE-3 head reads of the model)."""
    t, eps = tokens.shape[0], cfg.rms_norm_eps
    # Windowed layers may have their own RoPE base (Gemma 3): pick the table (and YaRN's factor) per layer.
    # Table 2: no rotation at all (zero frequencies, factor 1), for the layers without RoPE (SmolLM3's NoPE layers).
    inv_freqs = np.stack([cfg.rope_inv_freq(), cfg.rope_inv_freq(local=True),
                          np.zeros_like(cfg.rope_inv_freq())])  # [3, rotary_dim / 2]
    rope_factors = np.array([cfg.rope_attention_factor(), cfg.rope_attention_factor(local=True), 1.0])  # [3]
    windowed = np.asarray(cfg.sliding_layers or [cfg.sliding_window is not None] * cfg.num_layers)
    tables = np.where(np.asarray(cfg.rope_layers or [True] * cfg.num_layers), windowed.astype(np.int32), 2)
    lora = lora or {}
    onehot = None
    if lora:
        num_adapters = next(iter(lora.values()))["a"].shape[1]
        onehot = adapter_ids[:, None] == jnp.arange(1, num_adapters + 1, dtype=jnp.int32)[None, :]  # [T, N]

    glu = gated_activation(cfg)
    # Weights of one kind of layer only (models whose layers mix expert and dense MLPs) are not scanned: each layer
    # takes its kind's at its place among them.
    scanned = {k: v for k, v in params["layers"].items() if layer_kind(cfg, k) is None}
    by_kind = {kind: {k: v for k, v in params["layers"].items() if layer_kind(cfg, k) == kind}
               for kind in ("moe", "dense", "mlp")}
    is_moe_layer = np.asarray(cfg.moe_layers or [bool(cfg.num_experts)] * cfg.num_layers)
    places = np.where(is_moe_layer, np.cumsum(is_moe_layer) - 1, np.cumsum(~is_moe_layer) - 1).astype(np.int32)
    # Token mixers: each layer's kind and its place among its kind (its weights' index, its KV cache's or state's).
    is_linear = np.asarray(cfg.linear_layers or [False] * cfg.num_layers)
    mixer_places = np.where(is_linear, np.cumsum(is_linear) - 1, np.cumsum(~is_linear) - 1).astype(np.int32)
    if cfg.linear_layers:
        scanned = {k: v for k, v in scanned.items() if mixer_kind(cfg, k) is None}
        by_mixer = {kind: {k: v for k, v in params["layers"].items() if mixer_kind(cfg, k) == kind}
                    for kind in ("linear", "attention")}
        if stats:
            raise ValueError("activation statistics (w8a8 smoothing) of a model with linear attention layers are not "
                             "supported")

    def linear_mixer(h, p, states, place, proj):
        """A linear attention layer's token mixing (gated_delta.mix); under a tensor-parallel mesh each device runs it
        on its own heads (its share of the weights and states, `sharding.linear_layer_specs`) under shard_map, and
        the output projection's partial sums are all-reduced."""
        if mesh is None:
            return gated_delta.mix(cfg, p, h, states, place, recurrent[1], proj)
        from jax.sharding import PartitionSpec as P

        from models.sharding import AXIS, linear_layer_specs, state_specs

        n = mesh.shape[AXIS]
        local_cfg = dataclasses.replace(cfg, linear_num_key_heads=cfg.linear_num_key_heads // n,
                                        linear_num_value_heads=cfg.linear_num_value_heads // n)
        specs = linear_layer_specs(cfg)
        w = {k: v for k, v in p.items() if k in specs}

        def local(h, w, states, place, batch):
            out, states = gated_delta.mix(local_cfg, w, h, states, place, batch, lambda x, name: proj(x, name, w))
            return jax.lax.psum(out, AXIS), states

        return jax.shard_map(
            local, mesh=mesh, in_specs=(P(), {k: specs[k] for k in w}, state_specs(), P(), P()),
            out_specs=(P(), state_specs()), check_vma=False,  # (the piece loop's carry starts replicated)
        )(h, w, states, place, recurrent[1])

    def residual(o):
        """A block's output as it joins the residual stream (Granite scales it)."""
        return o if cfg.residual_multiplier == 1.0 else o * jnp.asarray(cfg.residual_multiplier, o.dtype)

    # Each layer's place in the buffer of captured inputs (`aux_layers`, each layer once); the others write to a last
    # place no one reads.
    captured = sorted(set(aux_layers))
    capture_at = np.full(cfg.num_layers, len(captured), np.int32)
    capture_at[captured] = np.arange(len(captured), dtype=np.int32)

    def layer(state, xs, linear_layer: bool = False, has_mlp: bool = True):
        """One layer; `linear_layer` (static) runs a Gated DeltaNet layer's token mixer instead of attention;
        without `has_mlp` (static) the layer ends after its token mixer."""
        x, carry = state
        p, i, is_windowed, table, lo, is_moe, place, mixer_place = xs
        if captured:
            carry, aux = carry
            aux = jax.lax.dynamic_update_index_in_dim(aux, x.astype(aux.dtype), jnp.asarray(capture_at)[i], 0)

        def proj(h, name, w=p):
            y = linear(h, w, name, cfg.quantized_activations, cfg.quant_kernels, mesh)
            return y + lora_delta(h, lo[name], onehot) if name in lo else y

        def mlp(h, w, experts: bool):
            """(the MLP's output, the down projection's input or None): the dense MLP (or shared expert) in `w`,
            plus the experts in an expert layer."""
            o = down_in = None
            if "w_down" in w:  # the dense MLP, or a MoE layer's shared expert
                down_in = (glu(proj(h, "w_gate", w), proj(h, "w_up", w)) if cfg.gated_mlp
                           else plain_activation(cfg, w)(proj(h, "w_up", w)))
                o = proj(down_in, "w_down", w)
            if experts:
                if o is not None and cfg.shared_expert_gate:
                    o = o * jax.nn.sigmoid(h @ w[moe.SHARED_GATE])
                expert_lora = {k: lo[k] for k in EXPERT_PROJECTIONS if k in lo}
                act = glu if cfg.gated_mlp else (lambda gate, up: plain_activation(cfg, w)(up))  # (gate: None)
                expert_in = proj(h, "latent_down", w) if cfg.moe_latent_size else h  # (the router reads h)
                routed = moe.moe_mlp(expert_in, w, cfg.routing, act, cfg.moe_grouped, cfg.quantized_activations,
                                     cfg.quant_kernels, mesh, cfg.expert_parallel,
                                     moe.ExpertLora(expert_lora, onehot) if expert_lora else None,
                                     router_in=h if cfg.moe_latent_size else None)
                if cfg.moe_latent_size:
                    routed = proj(routed, "latent_up", w)
                o = routed if o is None else o + routed
            return o, down_in

        def attention(h, p, carry, cache_layer):
            """Attention's output (after wo) and carry."""
            gate = index = None
            if cfg.mla:
                q_lora = _mla_q_lora(cfg, p, h, proj)
                q, k, v = _mla_qkv(cfg, p, h, proj, q_lora)
                if cfg.index_topk:
                    index = _indexer(cfg, p, h, q_lora, proj)
            else:
                q, k, v = proj(h, "wq", p), proj(h, "wk", p), proj(h, "wv", p)
                if cfg.attention_bias:
                    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
                if cfg.qk_norm_whole:  # over all heads of each projection (OLMo 2)
                    q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
                if cfg.attn_output_gate:  # each head's rows: [query, gate]
                    q, gate = jnp.split(q.reshape(t, cfg.num_heads, 2 * cfg.head_dim), 2, axis=-1)
                q = q.reshape(t, cfg.num_heads, cfg.head_dim)
                k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
                v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm and not cfg.qk_norm_whole:
                q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
            inv_freq = jnp.asarray(inv_freqs, jnp.float32)[table]
            rope_factor = jnp.asarray(rope_factors, jnp.float32)[table]
            q = apply_rope(q, positions, inv_freq, rope_factor, cfg.mrope_rows)
            k = apply_rope(k, positions, inv_freq, rope_factor, cfg.mrope_rows)
            if cfg.qk_norm_unweighted:  # Llama 4, on the layers with RoPE
                unit = jnp.ones((cfg.head_dim,), jnp.float32)
                q = jnp.where(table != 2, rms_norm(q, unit, eps), q)
                k = jnp.where(table != 2, rms_norm(k, unit, eps), k)
            if cfg.nope_temperature:  # Llama 4, on the layers without: longer contexts, sharper attention
                floor_scale, attn_scale = cfg.nope_temperature
                temperature = jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1) / floor_scale)) * attn_scale + 1
                q = jnp.where(table == 2, (q.astype(jnp.float32) * temperature[:, None, None]).astype(q.dtype), q)
            sinks = p["sinks"].astype(jnp.float32) if cfg.attention_sinks else None
            if index is None:
                o, carry = attend(cache_layer, layer_window(cfg, is_windowed), sinks, q, k, v, carry)
            else:  # the indexer's key is cached after the RoPE key (LlamaConfig.kv_dims); its queries go along
                index_q, index_k, weights = index
                index_q = apply_rope(index_q, positions, inv_freq, rope_factor)
                index_k = apply_rope(index_k[:, None], positions, inv_freq, rope_factor)
                k = jnp.concatenate([k, jnp.broadcast_to(index_k, (*k.shape[:2], index_k.shape[-1]))], axis=-1)
                o, carry = attend(cache_layer, None, None, q, k, v, carry, (index_q, weights))
            if cfg.mla:  # each head's latent output -> its values
                o = jnp.einsum("thc,chv->thv", o, _mla_up(cfg, p)[1].astype(o.dtype))
            if gate is not None:
                o = (o.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(o.dtype)
            o = proj(o.reshape(t, -1), "wo", p)
            if cfg.attention_out_bias:
                o = o + p["bo"]
            return o, carry

        if attn_in is not None:
            h = attn_in
        else:
            h = stream_norm(cfg, x, p["attn_norm"]) if cfg.pre_norms else x
        mlp_in = h
        amax = {"attn_in": jnp.max(jnp.abs(h), axis=0)} if stats else None
        if cfg.linear_layers:  # this layer's token mixer, its cache or state at its place among its kind
            kv, states = carry
            if linear_layer:
                o, states = linear_mixer(h, p, states, mixer_place, proj)
            else:
                o, kv = attention(h, p, kv, mixer_place)
            carry = (kv, states)
        else:
            o, carry = attention(h, p, carry, i)
        x = x + residual(rms_norm(o, p["post_attn_norm"], eps) if cfg.sandwich_norms else o)
        if not has_mlp:  # (a hybrid model's layer, in a body of its own: `_grouped_layers`)
            return (x, (carry, aux) if captured else carry), amax
        if cfg.parallel_block:  # the MLP reads what attention read; both outputs join the stream
            h = mlp_in
        else:
            h = stream_norm(cfg, x, p["mlp_norm"]) if cfg.pre_norms else x
        if cfg.mixed_mlp:  # each kind's weights at this layer's place among its kind; one branch runs
            def take(kind):
                return {name.replace("dense_", "w_"): w[place] for name, w in by_kind[kind].items()}

            if stats:  # each kind's w_down input, zeros from the branch of the other kind (their widths differ)
                def run(h, kind):
                    o, down = mlp(h, take(kind), kind == "moe")
                    widths = {"moe": cfg.shared_expert_intermediate_size, "dense": cfg.intermediate_size}
                    downs = {k: jnp.zeros((h.shape[0], widths[k]), h.dtype) for k in widths if widths[k]}
                    if down is not None:
                        downs[kind] = down
                    return o, downs

                o, downs = jax.lax.cond(is_moe, lambda h: run(h, "moe"), lambda h: run(h, "dense"), h)
                down_in = downs.get("moe")  # the shared expert's, as in a model of expert layers only
                if "dense" in downs:
                    amax["dense_down_in"] = jnp.max(jnp.abs(downs["dense"]), axis=0)
            else:
                o = jax.lax.cond(is_moe, lambda h: mlp(h, take("moe"), True)[0],
                                 lambda h: mlp(h, take("dense"), False)[0], h)
        else:
            o, down_in = mlp(h, p, bool(cfg.num_experts))
        x = x + residual(rms_norm(o, p["post_mlp_norm"], eps) if cfg.sandwich_norms else o)
        if mm_deep is not None:  # Qwen3-VL's DeepStack: after layer i < depth, the image rows' i-th extra features
            depth = mm_deep.shape[0]
            x = x + jnp.where(i < depth, mm_deep[jnp.minimum(i, depth - 1)].astype(x.dtype), 0)
        if stats:  # per input channel, the largest |activation| each projection group sees (models/quant.smooth_params)
            amax["mlp_in"] = jnp.max(jnp.abs(h), axis=0)
            if down_in is not None:  # (an expert layer's: its shared expert's; the experts' own are not smoothed)
                amax["down_in"] = jnp.max(jnp.abs(down_in), axis=0)
        return (x, (carry, aux) if captured else carry), amax

    is_image = None if mm_embeds is None else tokens >= cfg.vocab_size  # [T]
    if embeds is not None:
        x = embeds
    else:
        x = input_rows(params, cfg, tokens if is_image is None else jnp.where(is_image, 0, tokens))  # [T, H]
    if is_image is not None:  # (not scaled: the projector's rows are the model's inputs as they are)
        x = jnp.where(is_image[:, None], mm_embeds.astype(x.dtype), x)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (scanned, layer_ids, jnp.asarray(windowed), jnp.asarray(tables, jnp.int32), lora, jnp.asarray(is_moe_layer),
          jnp.asarray(places), jnp.asarray(mixer_places))
    if cfg.linear_layers:
        carry = (carry, recurrent[0])
    if captured:
        carry = (carry, jnp.zeros((len(captured) + 1, *x.shape), x.dtype))
    if cfg.linear_layers:
        x, carry = _grouped_layers(cfg, layer, x, carry, xs, by_mixer | ({"mlp": by_kind["mlp"]} if cfg.mlp_layers
                                                                        else {}))
        amax = None
    else:
        (x, carry), amax = jax.lax.scan(layer, (x, carry), xs)
    if captured:
        carry, aux = carry
        aux = jnp.concatenate([aux[captured.index(j)] for j in aux_layers], axis=-1)
        return x, carry, aux
    return (x, carry, amax) if stats else (x, carry)


def _grouped_layers(cfg: LlamaConfig, layer, x, carry, xs, by_mixer):
    """The layers of a model with linear attention layers, scanned a period of its layer pattern at a time (Qwen3.5:
    three linear layers and an attention layer), each layer's kind static in the body: no `lax.cond` whose operands
    (the KV cache, the states) XLA would copy at every layer. `xs` as the per-layer scan's, each weight of one kind
    stacked over that kind's layers (`by_mixer`: "linear", "attention", and "mlp" where some layers have no MLP, a
    layer's kind then its mixer and whether it has one)."""
    n = cfg.num_layers
    pattern = tuple(zip(cfg.linear_layers, cfg.mlp_layers or (True,) * n))
    period = next(q for q in range(1, n + 1) if n % q == 0 and all(pattern[i] == pattern[i % q] for i in range(n)))
    if period == n:  # no repeating period (some Granite 4.0-H sizes): a scan per run of same-kind layers
        return _layer_runs(pattern, layer, x, carry, xs, by_mixer)
    groups = n // period
    per_group = {kind: sum(1 for linear, mlp in pattern[:period] if _has(kind, linear, mlp)) for kind in by_mixer}
    by_group = lambda a, size: a.reshape(groups, size, *a.shape[1:])  # noqa: E731
    grouped = (jax.tree.map(lambda a: by_group(a, period), xs),
               {kind: jax.tree.map(lambda a, k=kind: by_group(a, per_group[k]), w) for kind, w in by_mixer.items()})

    def group(state, gxs):
        layer_xs, kind_w = gxs
        seen = dict.fromkeys(kind_w, 0)
        for j in range(period):
            one = jax.tree.map(lambda a: a[j], layer_xs)
            p = dict(one[0])
            for kind, w in kind_w.items():
                if _has(kind, *pattern[j]):
                    p |= {k: v[seen[kind]] for k, v in w.items()}
                    seen[kind] += 1
            state, _ = layer(state, (p, *one[1:]), linear_layer=pattern[j][0], has_mlp=pattern[j][1])
        return state, None

    (x, carry), _ = jax.lax.scan(group, (x, carry), grouped)
    return x, carry


def _has(kind: str, linear: bool, mlp: bool) -> bool:
    """Whether a layer of this (linear mixer, has an MLP) holds weights of `kind` ("linear", "attention", "mlp")."""
    return mlp if kind == "mlp" else linear == (kind == "linear")


def _layer_runs(pattern, layer, x, carry, xs, by_mixer):
    """The layers of a hybrid model whose pattern does not repeat, one `lax.scan` per run of consecutive layers of
    one kind (a body per run, where one group of the whole pattern would unroll every layer in its body). Each step
    indexes its layer's weights in the stacked arrays in place, as a scan over them does (slicing out a run's
    weights first would copy them at every step)."""
    runs, start = [], 0
    for i in range(1, len(pattern) + 1):
        if i == len(pattern) or pattern[i] != pattern[start]:
            runs.append((pattern[start], start, i - start))
            start = i
    seen = dict.fromkeys(by_mixer, 0)
    state = (x, carry)
    for kind_of_layer, first, length in runs:
        offsets = {kind: seen[kind] for kind in by_mixer if _has(kind, *kind_of_layer)}
        for kind in offsets:
            seen[kind] += length

        def body(state, i, kind_of_layer=kind_of_layer, first=first, offsets=offsets):
            one = jax.tree.map(lambda a: a[first + i], xs)
            p = dict(one[0])
            for kind, offset in offsets.items():
                p |= {k: v[offset + i] for k, v in by_mixer[kind].items()}
            return layer(state, (p, *one[1:]), linear_layer=kind_of_layer[0], has_mlp=kind_of_layer[1])[0], None

        state, _ = jax.lax.scan(body, state, jnp.arange(length, dtype=jnp.int32))
    return state


def _mla_up(cfg: LlamaConfig, p: Params) -> tuple[jax.Array, jax.Array]:
    """A latent-attention layer's wkv_b as (W_UK [latent, heads, qk_nope], W_UV [latent, heads, v])."""
    w = p["wkv_b"].reshape(cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim :]


def _mla_q_lora(cfg: LlamaConfig, p: Params, h: jax.Array, proj) -> jax.Array | None:
    """The queries' low-rank projection, normed ([T, q_lora_rank]), or None where queries are projected directly."""
    return rms_norm(proj(h, "wq_a"), p["q_a_norm"], cfg.rms_norm_eps) if cfg.q_lora_rank else None


def _indexer(cfg: LlamaConfig, p: Params, h: jax.Array, q_lora: jax.Array, proj) -> tuple[jax.Array, ...]:
    """Sparse attention's lightning indexer inputs, before RoPE: queries [T, Hi, Di] from the low-rank query
    projection, the key [T, Di] (a LayerNorm with a bias), and each head's weight [T, Hi] float32 with the scales
    Hi^-1/2 and Di^-1/2 folded in (relu commutes with a positive factor; pallas_kernels/indexed_attention.py)."""
    t, hi, di = h.shape[0], cfg.index_num_heads, cfg.index_head_dim
    key = layer_norm(proj(h, "index_wk").astype(jnp.float32), p["index_k_norm"], 1e-6)
    key = key + p["index_k_norm_bias"].astype(jnp.float32)
    weights = h.astype(jnp.float32) @ p["index_weights"].astype(jnp.float32) * (hi * di) ** -0.5
    return proj(q_lora, "index_wq").reshape(t, hi, di), key.astype(h.dtype), weights


def _mla_qkv(cfg: LlamaConfig, p: Params, h: jax.Array, proj,
             q_lora: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Multi-head latent attention (DeepSeek-V2/V3) as attention with one KV head over the latent, the key and value
    up-projections absorbed: q [T, H, qk_rope + kv_lora_rank] (RoPE dims first), k [T, 1, qk_rope] (the RoPE key) and
    v [T, 1, kv_lora_rank] (the latent), a latent cache's layout (`pallas_kernels.ragged_paged_attention`: a
    position's key is its k and v together, its value v).

    A head's score q_nope . (W_UK c) + q_rope . k_rope equals [q_rope, W_UK^T q_nope] . [k_rope, c], so the cache holds
    the latent c and the RoPE key once per token, for every head; attention returns each head's latent output, which
    W_UV takes to its values (`_decoder`). q_lora: `_mla_q_lora`'s output where the caller has it."""
    t, heads, nope, rope_dim = h.shape[0], cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        q = proj(_mla_q_lora(cfg, p, h, proj) if q_lora is None else q_lora, "wq_b")
    else:
        q = proj(h, "wq")
    q = q.reshape(t, heads, nope + rope_dim)
    w_uk, _ = _mla_up(cfg, p)
    q_latent = jnp.einsum("thn,chn->thc", q[..., :nope], w_uk.astype(q.dtype))
    kv = proj(h, "wkv_a")  # [T, rope_dim + latent]
    latent = rms_norm(kv[:, rope_dim:], p["kv_a_norm"], cfg.rms_norm_eps)
    q = jnp.concatenate([q[..., nope:], q_latent], axis=-1)
    copies = (t, cfg.num_kv_heads)  # one, or one per device under tensor parallelism
    return (q, jnp.broadcast_to(kv[:, None, :rope_dim], copies + (rope_dim,)),
            jnp.broadcast_to(latent[:, None], copies + (cfg.kv_lora_rank,)))


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """[T] ids -> [T, hidden] rows of the embedding table (int8 rows times their scales: models/quant.py)."""
    rows = params["embed"][tokens]
    if "embed" + SCALE_SUFFIX not in params:
        return rows
    dtype = params["final_norm"].dtype  # the model's dtype
    return (rows.astype(jnp.float32) * params["embed" + SCALE_SUFFIX][tokens][:, None]).astype(dtype)


def input_rows(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """[T] ids -> [T, hidden]: what the first layer reads of them, the embedding table's rows times the model's
    embedding scale (Gemma: sqrt(hidden)). A prompt given as embeddings gives these (engine/prompt_embeds.py)."""
    x = embed_tokens(params, tokens)
    return x * jnp.asarray(cfg.embed_scale, x.dtype) if cfg.embed_scale != 1.0 else x


def linear(h: jax.Array, p: Params, name: str, quantized_activations: bool = False, quant_kernels: str = "none",
           mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """h [N, in] @ one layer's projection `name` in `p` -> [N, out] in h's dtype: float weights, 8-bit ones (int8 or
    e4m3 with a float32 scale per output feature), 4-bit ones (int4: a float16 scale and offset per group of inputs;
    mxfp4: e2m1 codes and a power of two per group) or an FP8 checkpoint's blocks (the last two dequantized into h's
    dtype for the matmul; the blocks read by the Pallas kernel instead with `quant_kernels` "pallas" or
    "pallas_interpret", not "pallas_experts": LlamaConfig.quant_kernels, per device of a tensor-parallel `mesh`);
    models/quant.py has the formats."""
    if (quant_kernels in ("pallas", "pallas_interpret") and name + quant.BLOCK_SCALE_SUFFIX in p
            and fp8_matmul.tileable(p[name].shape, p[name + quant.BLOCK_SCALE_SUFFIX].shape)):
        return _fp8_kernel_linear(h, p[name], p[name + quant.BLOCK_SCALE_SUFFIX], name,
                                  quant_kernels == "pallas_interpret", mesh)
    w = packed_weight(p, name, h.dtype)
    if w is not None:
        return jnp.dot(h, w, preferred_element_type=jnp.float32).astype(h.dtype)
    if name + SCALE_SUFFIX in p:
        return scaled_dot(h, p[name], p[name + SCALE_SUFFIX], 0, quantized_activations).astype(h.dtype)
    return h @ p[name]


def _fp8_kernel_linear(h: jax.Array, values: jax.Array, scales: jax.Array, name: str, interpret: bool,
                       mesh: jax.sharding.Mesh | None) -> jax.Array:
    """h [..., in] @ an FP8 checkpoint's block-scaled projection `name` through pallas_kernels/fp8_matmul.py. Under a
    tensor-parallel mesh each device runs it on its own share under shard_map, as XLA's partitioner splits the dot
    (a pallas_call it would run on gathered operands): a column-parallel weight's output features, a row-parallel
    one's input features (float32 partial sums, all-reduced, then h's dtype), a replicated one whole."""
    rows = h.reshape(-1, h.shape[-1])

    def local(x, v, s, out_dtype=h.dtype):
        return fp8_matmul.block_fp8_matmul(x, v, s, interpret=interpret, out_dtype=out_dtype)

    if mesh is None:
        out = local(rows, values, scales)
    else:
        from jax.sharding import PartitionSpec as P

        from models.sharding import AXIS, COLUMN_PARALLEL, ROW_PARALLEL

        if name in ROW_PARALLEL:
            split, inputs, outputs = P(AXIS, None), P(None, AXIS), P()

            def per_device(x, v, s):
                return jax.lax.psum(local(x, v, s, jnp.float32), AXIS).astype(h.dtype)
        else:
            split = P(None, AXIS) if name in COLUMN_PARALLEL else P()
            inputs, outputs, per_device = P(), split, local
        out = jax.shard_map(per_device, mesh=mesh, in_specs=(inputs, split, split), out_specs=outputs,
                            check_vma=False)(rows, values, scales)
    return out.reshape(*h.shape[:-1], out.shape[-1])


def scaled_dot(h: jax.Array, w: jax.Array, scale: jax.Array, w_contract: int, quantized_activations: bool) -> jax.Array:
    """h [N, K] @ an 8-bit matrix w (int8 or e4m3; K on axis `w_contract`) whose output columns have float32 `scale`s
    -> [N, M] float32. W8A16: w converted to h's dtype. W8A8 (`quantized_activations`): each row of h quantized to w's
    type with its own scale (int8: max |h| / 127, rounded; e4m3: max |h| / 448, to the nearest e4m3), an 8-bit x
    8-bit dot (int32 or float32 sums), both scales applied after."""
    dims = (((h.ndim - 1,), (w_contract,)), ((), ()))
    if not quantized_activations:
        return jax.lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32) * scale
    hq, h_scale = quant.quantize_activations(h, w.dtype)
    acc = jax.lax.dot_general(hq, w, dims, preferred_element_type=jnp.int32 if w.dtype == jnp.int8 else jnp.float32)
    return acc.astype(jnp.float32) * h_scale * scale


def final_hidden(params: Params, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    """The decoder's output rows [N, hidden] after the final norm: what the LM head reads, and an embedding."""
    return stream_norm(cfg, x, params["final_norm"])


def compute_logits(params: Params, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    """[N, hidden] -> [N, vocab] float32."""
    x = final_hidden(params, cfg, x)
    name = "embed" if cfg.tie_word_embeddings else "lm_head"
    if name + SCALE_SUFFIX in params:  # int8 head: a float32 scale per vocabulary column
        logits = scaled_dot(x, params[name], params[name + SCALE_SUFFIX], 1 if cfg.tie_word_embeddings else 0,
                            cfg.quantized_activations)
    else:
        head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
    if cfg.logits_scaling != 1.0:  # Granite
        logits = logits / cfg.logits_scaling
    if cfg.final_soft_cap:
        logits = cfg.final_soft_cap * jnp.tanh(logits / cfg.final_soft_cap)
    return logits


def forward(
    params: Params, cfg: LlamaConfig, kv_caches: KVCache, inputs: ModelInputs, attn_backend: str = "xla",
    mesh: jax.sharding.Mesh | None = None, all_hidden: bool = False, lora: dict | None = None,
    layout: HybridLayout | None = None, decode_only: bool | None = None, states: gated_delta.States | None = None,
    decode_step: bool = False, embeds: jax.Array | None = None, attn_in: jax.Array | None = None,
    aux_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, KVCache]:
    """The engine's step over paged KV: returns (hidden states [S, hidden] of the rows at
    `logits_indices`, updated caches). `compute_logits` turns those rows into logits.
    all_hidden: the first item is (those rows, every row's hidden state [T, hidden]) instead.
    layout: the caches are a hybrid cache (`HybridLayout`; inputs carry the window slots).
    decode_only: the attention kernel to use on the Pallas backends (`pallas_kernels.ragged_paged_attention`).
    states: a model with linear attention layers' recurrent states (`inputs.state_slots` says whose is where); the
    updated states are returned third. decode_step (static): every sequence has one new token, or a real token and
    its drafts (a decode step); the linear attention layers then compile only their recurrent rule's single steps.
    embeds: the first layer's input rows in place of the tokens' embeddings (an MTP layer's); attn_in: its attention's
    input rows (an EAGLE-3 head's layer). aux_layers (with all_hidden): the first item also holds these layers' input
    rows, concatenated [T, len(aux_layers) x hidden], third (`_decoder`: what an EAGLE-3 head reads).

    With a tensor-parallel `mesh`, attention runs per device under `shard_map` on its own heads."""
    # A window that is the same on every layer stays a static int (or None); mixed windowed and global
    # layers (Gemma 3) pass it per layer as a traced scalar.
    static_window = None if cfg.mixed_windows else layer_window(cfg, None)
    chunks = attention_chunks(cfg)

    def local_attention(i, window, sinks, q, k, v, kv, slots, kv_lens, page_indices, cu_q_lens, num_seqs, kv_limits,
                        tree_masks, index, chunk):
        window = window if cfg.mixed_windows else static_window
        kv = pallas_kernels.write_kv(*kv[:2], k, v, slots, backend=attn_backend, layer=i, **kv_quant.scale_kwargs(kv))
        if index is not None:  # sparse attention (every backend: jnp)
            return indexed_attention.paged_indexed_attention(
                q, *index, kv[0], kv[1], kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=cfg.sm_scale,
                top_k=cfg.index_topk, layer=i, **kv_quant.scale_kwargs(kv)), kv
        out = pallas_kernels.ragged_paged_attention(
            q, kv[0], kv[1], kv_lens, page_indices, cu_q_lens, num_seqs,
            sm_scale=cfg.sm_scale, sliding_window=window, soft_cap=cfg.attn_soft_cap, backend=attn_backend, layer=i,
            decode_only=decode_only, sinks=sinks if cfg.attention_sinks else None, kv_limits=kv_limits,
            tree_masks=tree_masks, attention_chunk=chunk, **kv_quant.scale_kwargs(kv),
        )
        return out, kv

    if mesh is not None:
        from jax.sharding import PartitionSpec as P

        from models.sharding import AXIS, kv_spec

        heads = P(None, AXIS, None)  # [T, H, D] split by head
        kv_specs = tuple(kv_spec(a.ndim) for a in kv_caches)
        local_attention = jax.shard_map(
            local_attention, mesh=mesh,
            in_specs=(P(), P(), P(AXIS), heads, heads, heads, kv_specs, P(), P(), P(), P(), P(), P(), P(), P(), P()),
            out_specs=(heads, kv_specs),
            check_vma=False,  # the kernels' loop carries start replicated and become per-shard
        )

    def attend(i, window, sinks, q, k, v, kv, index=None):
        slots, page_indices, layer = inputs.slot_mapping, inputs.page_indices, i
        if layout is not None:  # this layer's entries of the one stacked array: its table shifted by its base
            windowed = jnp.asarray(layout.windowed)[i]
            base = jnp.asarray(layout.bases, jnp.int32)[i]
            slots = jnp.where(windowed, inputs.window_slot_mapping, slots)
            slots = jnp.where(slots < 0, -1, slots + base * kv[0].shape[3])
            page_indices = jnp.where(windowed, inputs.window_page_indices, page_indices) + base
            layer = jnp.int32(0)
        return local_attention(
            layer, window if cfg.mixed_windows else jnp.int32(0),
            jnp.zeros((cfg.num_heads,), jnp.float32) if sinks is None else sinks, q, k, v, kv, slots, inputs.kv_lens,
            page_indices, inputs.cu_q_lens, inputs.num_seqs, inputs.kv_limits, inputs.tree_masks, index,
            None if chunks is None else chunks[i],
        )

    recurrent = None if states is None else (states, gated_delta.Batch(
        inputs.cu_q_lens, inputs.kv_lens, inputs.num_seqs, inputs.state_slots, inputs.snapshot_offsets,
        inputs.snapshot_slots, inputs.draft_slots, decode_step, attn_backend))
    positions = inputs.positions if inputs.mrope_positions is None else inputs.mrope_positions
    x, kv_caches, *aux = _decoder(params, cfg, inputs.tokens, positions, attend, tuple(kv_caches), lora,
                                  inputs.adapter_ids, mesh=mesh, recurrent=recurrent, mm_embeds=inputs.mm_embeds,
                                  mm_deep=inputs.mm_deep, embeds=embeds, attn_in=attn_in, aux_layers=aux_layers)
    out = (x[inputs.logits_indices], x, *aux) if all_hidden else x[inputs.logits_indices]
    return (out, *kv_caches) if recurrent is not None else (out, kv_caches)


def attention_chunks(cfg: LlamaConfig) -> jax.Array | None:
    """Each layer's attention chunk, [L] int32 (Llama 4: its chunked layers' size, a chunk past any context on the
    others), or None for a model without chunked layers."""
    if not cfg.chunked_layers:
        return None
    return jnp.asarray(np.where(np.asarray(cfg.chunked_layers), cfg.attention_chunk, NO_WINDOW), jnp.int32)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window=None,
                           sm_scale: float | None = None, soft_cap: float | None = None,
                           sinks: jax.Array | None = None, attention_chunk=None) -> jax.Array:
    """Plain causal GQA attention over one sequence. q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]. sinks [Hq]: one
    more logit per head in each softmax, with no value (gpt-oss). attention_chunk: a position sees nothing before
    its chunk's first (Llama 4's chunked layers). k and v narrower than q: latent attention (a key
    is k and v together, its value v; `_mla_qkv`) -> [T, Hq, Dv]."""
    t, hq, d = q.shape
    if k.shape[-1] != d:
        k = jnp.concatenate([k, v], axis=-1)
    group = hq // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scale = d**-0.5 if sm_scale is None else sm_scale
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if soft_cap:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = ki <= qi
    if sliding_window is not None:
        mask &= ki > qi - sliding_window
    if attention_chunk is not None:
        mask &= ki >= qi // attention_chunk * attention_chunk
    scores = jnp.where(mask[None], scores, -jnp.inf)
    if sinks is not None:  # the sink's column joins the softmax and is dropped after it
        sink_col = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None, None], (hq, t, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink_col], axis=-1), axis=-1)[..., :t]
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def _dense_attend(cfg: LlamaConfig) -> AttentionFn:
    """The decoder's attention over one sequence's own K/V (no cache): the dense reference paths."""
    chunks = attention_chunks(cfg)

    def attend(i, w, sinks, q, k, v, c, index=None):
        if index is not None:  # sparse attention
            return indexed_attention.dense_indexed_attention(q, k, v, *index, sm_scale=cfg.sm_scale,
                                                             top_k=cfg.index_topk), c
        return dense_causal_attention(q, k, v, w, cfg.sm_scale, cfg.attn_soft_cap, sinks,
                                      None if chunks is None else chunks[i]), c

    return attend


@functools.partial(jax.jit, static_argnums=1)
def activation_amax(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> dict[str, jax.Array]:
    """The dense forward of one sequence, returning per layer the largest |input| of each projection group by
    channel: {"attn_in": [L, hidden] (q/k/v), "mlp_in": [L, hidden] (gate/up; in an expert layer the router's, the
    experts' and the shared expert's), "down_in": [L, intermediate] (w_down's: in an expert layer the shared
    expert's, absent without one), and in a model whose layers mix experts and dense MLPs "dense_down_in": [L,
    intermediate] (the dense layers' w_down inputs; zero rows at expert layers, as "down_in" has at dense ones)}."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    _, _, amax = _decoder(params, cfg, tokens, positions, _dense_attend(cfg), stats=True)
    return amax


def decoder_dense(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Non-paged reference decoder over one sequence: tokens [T] -> hidden [T, hidden] before the final norm."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    recurrent = ((gated_delta.allocate(cfg, 1), gated_delta.one_sequence(tokens.shape[0]))
                 if cfg.linear_layers else None)
    x, _ = _decoder(params, cfg, tokens, positions, _dense_attend(cfg), recurrent=recurrent)
    return x


@functools.partial(jax.jit, static_argnums=(1,))
def forward_dense(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Non-paged reference forward of one sequence: tokens [T] -> logits [T, vocab] float32."""
    return compute_logits(params, cfg, decoder_dense(params, cfg, tokens))
