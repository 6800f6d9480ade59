"""Llama-family decoder as pure functions over a pytree of weights.

Weights are a plain dict pytree (see `param_shapes`), passed to jitted functions as arguments, never
baked into the HLO. Two entry points share every layer but attention:

- `forward(params, cfg, kv_caches, inputs, attn_backend)`: the engine's step. Takes arrays only (tokens,
  positions, slots, page-table rows, lengths) for a ragged batch of prefill chunks and decodes, writes
  the new K/V into their pages and attends over the paged cache through `pallas_kernels`.
- `forward_dense(params, cfg, tokens)`: the non-paged reference; one sequence, plain causal attention.

Layouts: activations [T, hidden]; q [T, Hq, D]; per-layer KV pages [Hkv, num_pages, page_size, D].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from models.config import LlamaConfig

Params = dict
KVCache = list  # [(k_pages, v_pages)] per layer, each [Hkv, num_pages, page_size, D]


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
    logits_indices: jax.Array  # [S] int32, row of each sequence's last token (its logits are returned)


def param_shapes(cfg: LlamaConfig) -> Params:
    """The weight pytree as shapes (HF orientation transposed to x @ W)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    layer = {
        "attn_norm": (h,),
        "wq": (h, cfg.q_size),
        "wk": (h, cfg.kv_size),
        "wv": (h, cfg.kv_size),
        "wo": (cfg.q_size, h),
        "mlp_norm": (h,),
        "w_gate": (h, i),
        "w_up": (h, i),
        "w_down": (i, h),
    }
    if cfg.attention_bias:
        layer |= {"bq": (cfg.q_size,), "bk": (cfg.kv_size,), "bv": (cfg.kv_size,)}
    shapes = {"embed": (cfg.vocab_size, h), "layers": [dict(layer) for _ in range(cfg.num_layers)], "final_norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> Params:
    """Random weights of the right shapes (tests and synthetic benchmarks)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    arrays = [
        (1.0 + scale * jax.random.normal(k, s)) if len(s) == 1 else scale * jax.random.normal(k, s)
        for k, s in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def check_params(cfg: LlamaConfig, params: Params, source: str) -> None:
    """Raises ValueError naming the first tensor whose shape disagrees with the config."""
    want = param_shapes(cfg)
    if set(want) != set(params):
        raise ValueError(f"{source}: weights have {sorted(params)} but the config needs {sorted(want)}")
    if len(params["layers"]) != cfg.num_layers:
        raise ValueError(f"{source}: {len(params['layers'])} layers of weights, config says num_layers={cfg.num_layers}")
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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (HF layout). x: [T, H, D], positions: [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [T, D/2]
    cos, sin = jnp.cos(freqs)[:, None, :], jnp.sin(freqs)[:, None, :]  # [T, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


AttentionFn = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]  # (layer, q, k, v) -> [T, Hq, D]


def _decoder(params: Params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, attend: AttentionFn) -> jax.Array:
    """Embedding and every decoder layer; returns the final hidden states [T, hidden] (before final norm)."""
    inv_freq = cfg.rope_inv_freq()
    x = params["embed"][tokens]  # [T, H]
    t = tokens.shape[0]
    for i, p in enumerate(params["layers"]):
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
        if cfg.attention_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q = apply_rope(q.reshape(t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        o = attend(i, q, k, v).reshape(t, cfg.q_size)
        x = x + o @ p["wo"]
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
    return x


def compute_logits(params: Params, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    """[N, hidden] -> [N, vocab] float32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(x, head, preferred_element_type=jnp.float32)


def forward(
    params: Params, cfg: LlamaConfig, kv_caches: KVCache, inputs: ModelInputs, attn_backend: str = "xla"
) -> tuple[jax.Array, KVCache]:
    """The engine's step over paged KV: returns (hidden states [S, hidden] of the rows at
    `logits_indices`, updated caches). `compute_logits` turns those rows into logits."""
    new_caches = list(kv_caches)
    sm_scale = cfg.head_dim**-0.5

    def attend(i, q, k, v):
        k_pages, v_pages = pallas_kernels.write_kv(*new_caches[i], k, v, inputs.slot_mapping, backend=attn_backend)
        new_caches[i] = (k_pages, v_pages)
        return pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, inputs.kv_lens, inputs.page_indices, inputs.cu_q_lens, inputs.num_seqs,
            sm_scale=sm_scale, sliding_window=cfg.sliding_window, backend=attn_backend,
        )

    x = _decoder(params, cfg, inputs.tokens, inputs.positions, attend)
    return x[inputs.logits_indices], new_caches


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Plain causal GQA attention over one sequence. q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * d**-0.5
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = ki <= qi
    if sliding_window is not None:
        mask &= ki > qi - sliding_window
    probs = jax.nn.softmax(jnp.where(mask[None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(q.dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def forward_dense(params: Params, cfg: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Non-paged reference forward of one sequence: tokens [T] -> logits [T, vocab] float32."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    x = _decoder(params, cfg, tokens, positions, lambda i, q, k, v: dense_causal_attention(q, k, v, cfg.sliding_window))
    return compute_logits(params, cfg, x)
