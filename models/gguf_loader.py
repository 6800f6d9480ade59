"""GGUF checkpoints: metadata, config and weights, dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama` GGUFs for its interleaved RoPE; they are
permuted back here so every loader hands the model the HF layout.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from models.config import ConfigError, LlamaConfig
from models.weights import assemble


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


GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
    "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias", "bv": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight", "post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
}


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
    arch = meta.get("general.architecture")
    if f"{arch}.vocab_size" not in meta and "token_embd.weight" in tensors:
        meta[f"{arch}.vocab_size"] = int(tensors["token_embd.weight"].shape[-1])  # [hidden, vocab], fastest first
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

    def read(key: str, name: str) -> np.ndarray:
        arr = get(name)
        if cfg.architecture == "llama" and key in ("wq", "wk"):
            arr = _unpermute(arr, cfg.num_heads if key == "wq" else cfg.num_kv_heads)
        return arr

    return cfg, assemble(cfg, GGUF_NAMES, read, dtype)
