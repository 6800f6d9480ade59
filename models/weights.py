"""From a checkpoint's own tensor names to the model's weight pytree (the one place that knows the layout).

Each loader supplies a name table (our key -> its tensor name, `{i}` for the layer, `{e}` for the expert where a
checkpoint stores experts one by one) and a reader that returns a tensor by name in torch orientation ([out, in],
or [E, out, in] for experts stored together); `assemble` transposes matrices for x @ W, stacks experts on their own
axis and layers on axis 0, adds biases when the config has them, and drops `lm_head` when it is tied.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from models.config import LlamaConfig
from models.moe import MOE_KEYS, SHARED_GATE

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_KEYS = ("bq", "bk", "bv")
QK_NORM_KEYS = ("q_norm", "k_norm")
SANDWICH_KEYS = ("post_attn_norm", "post_mlp_norm")
NORM_KEYS = frozenset({"attn_norm", "mlp_norm", "final_norm", *QK_NORM_KEYS, *SANDWICH_KEYS})
TRANSPOSED = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", *MOE_KEYS, SHARED_GATE})


def layer_keys(cfg: LlamaConfig) -> tuple[str, ...]:
    """The per-layer weights a config needs."""
    keys = LAYER_KEYS if cfg.mlp_intermediate_size else tuple(k for k in LAYER_KEYS if k not in ("w_gate", "w_up", "w_down"))
    if cfg.num_experts:
        keys += MOE_KEYS + ((SHARED_GATE,) if cfg.shared_expert_intermediate_size else ())
    return (keys + (BIAS_KEYS if cfg.attention_bias else ()) + (QK_NORM_KEYS if cfg.qk_norm else ())
            + (SANDWICH_KEYS if cfg.sandwich_norms else ()))


def assemble(cfg: LlamaConfig, names: Mapping[str, str], read: Callable[[str, str], np.ndarray], dtype: Any) -> dict:
    """`read(key, tensor_name)` -> a float array (any float dtype) in torch orientation; returns the pytree in `dtype`.

    Each stacked weight is allocated once in `dtype` and filled a layer at a time, so the host holds the weights in
    `dtype` plus one layer's tensor, never a float32 copy of the whole checkpoint."""

    def load(key: str, i: int | None = None) -> np.ndarray:
        name = names[key]
        if "{e}" in name:  # one tensor per expert
            arr = np.stack([read(key, name.format(i=i, e=e)) for e in range(cfg.num_experts)])
        else:
            arr = read(key, name.format(i=i))
        return np.swapaxes(arr, -1, -2) if key in TRANSPOSED else arr

    def stacked(key: str) -> np.ndarray:
        first = load(key, 0)
        out = np.empty((cfg.num_layers, *first.shape), dtype)
        out[0] = first
        for i in range(1, cfg.num_layers):
            out[i] = load(key, i)
        return out

    params = {"embed": load("embed"), "layers": {k: stacked(k) for k in layer_keys(cfg)}, "final_norm": load("final_norm")}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = load("lm_head")
    import jax

    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=dtype), params)
