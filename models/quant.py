"""Weight-only int8 quantization of the decoder's projections (`model.quantization: int8`, W8A16).

Each projection W [L, in, out] (q, k, v, o, gate, up, down) is stored as int8 values with one float32
scale per layer and output feature, `scale = max_i |W[l, i, o]| / 127`, next to it as `<name>_scale`
[L, out]. The step converts a layer's int8 weight to the activations' dtype inside the matmul and
scales the output columns: x @ (W_q * s) = (x @ W_q) * s. Embeddings, the LM head, norms and biases
stay in model.dtype. Weights take a quarter of their float32 bytes (half of bfloat16); activations
and the KV cache are unchanged (cache.kv_dtype quantizes the cache).

Quantizing is deterministic and happens after loading (any checkpoint) and after the tensor-parallel
layout is prepared (repeated KV heads quantize alike), before the weights are placed on devices.
"""
from __future__ import annotations

import numpy as np

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
SCALE_SUFFIX = "_scale"


def quantize_weight(w) -> tuple[np.ndarray, np.ndarray]:
    """[L, in, out] float -> (int8 [L, in, out], float32 scales [L, out]); an all-zero column gets scale 1.
    One layer at a time, so the float32 temporaries are one layer's (an 8B model's stacked w_gate is 7.5 GB)."""
    w = np.asarray(w)
    values, scales = np.empty(w.shape, np.int8), np.empty((w.shape[0], w.shape[-1]), np.float32)
    for layer in range(w.shape[0]):
        x = w[layer].astype(np.float32)
        amax = np.abs(x).max(axis=0)
        scales[layer] = np.where(amax > 0, amax / 127.0, 1.0)
        values[layer] = np.clip(np.rint(x / scales[layer]), -127, 127)
    return values, scales


def quantize_params(params: dict) -> dict:
    """The weight pytree with every projection int8 and its `<name>_scale` beside it (host arrays)."""
    layers = dict(params["layers"])
    for name in PROJECTIONS:
        layers[name], layers[name + SCALE_SUFFIX] = quantize_weight(layers[name])
    return {**params, "layers": layers}


def dequantize_params(params: dict, dtype=np.float32) -> dict:
    """Inverse view for tests: every int8 projection times its scale, in `dtype`, scales dropped."""
    layers = {k: v for k, v in params["layers"].items() if not k.endswith(SCALE_SUFFIX)}
    for name in PROJECTIONS:
        w, s = np.asarray(params["layers"][name]), np.asarray(params["layers"][name + SCALE_SUFFIX])
        layers[name] = (w.astype(np.float32) * s[..., None, :]).astype(dtype)
    return {**params, "layers": layers}
