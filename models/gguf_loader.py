"""GGUF checkpoints: metadata, config and weights, dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama` GGUFs for its interleaved RoPE; they are
permuted back here so every loader hands the model the HF layout.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from models.llama import stack_layers
from models.config import ConfigError, LlamaConfig


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit its config; the message names the file."""


def open_gguf(path: str):
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises a mix of ValueError/struct.error/IndexError on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader) -> dict[str, Any]:
    """Every scalar and string metadata field (arrays of tokens/merges are left to the tokenizer)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre") and len(field.data) > 1:
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types the reader can't render: not needed for the model
            continue
    return meta


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [out, in] (torch orientation)."""
    out = w.shape[0]
    return w.reshape(num_heads, out // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype: Any = np.float32) -> tuple[LlamaConfig, dict]:
    """Reads config and weights (numpy arrays of `dtype`) from a GGUF file."""
    import gguf

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    try:
        cfg = LlamaConfig.from_gguf_metadata(meta, set(tensors), source=path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model metadata ({e})") from e

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        t = tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported GGUF type {t.tensor_type.name}") from e
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {name!r} holds {arr.size} values, its shape {shape} needs {np.prod(shape)}")
        return arr.reshape(shape).astype(np.float32, copy=False)

    permuted = cfg.architecture == "llama"
    layers = []
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        wq, wk = get(b + "attn_q.weight"), get(b + "attn_k.weight")
        if permuted:
            wq, wk = _unpermute(wq, cfg.num_heads), _unpermute(wk, cfg.num_kv_heads)
        layer = {
            "attn_norm": get(b + "attn_norm.weight"),
            "wq": wq.T,
            "wk": wk.T,
            "wv": get(b + "attn_v.weight").T,
            "wo": get(b + "attn_output.weight").T,
            "mlp_norm": get(b + "ffn_norm.weight"),
            "w_gate": get(b + "ffn_gate.weight").T,
            "w_up": get(b + "ffn_up.weight").T,
            "w_down": get(b + "ffn_down.weight").T,
        }
        if cfg.attention_bias:
            layer |= {"bq": get(b + "attn_q.bias"), "bk": get(b + "attn_k.bias"), "bv": get(b + "attn_v.bias")}
        layers.append(layer)
    params = {"embed": get("token_embd.weight"), "layers": stack_layers(layers), "final_norm": get("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("output.weight").T
    return cfg, _cast(params, dtype)


def _cast(params: dict, dtype: Any) -> dict:
    import jax

    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=dtype), params)
