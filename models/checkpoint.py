"""Orbax checkpoints of RadixLM: `<dir>/radixlm.json` (model config), `<dir>/params/` (Orbax), `<dir>/tokenizer/`.

`scripts/convert.py` writes them from any source; they load without dequantizing or transposing anything.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from models.config import LlamaConfig
from models.gguf_loader import CheckpointError
from models.weights import cast_params
from models.llama import check_params, param_shapes

FORMAT = "radixlm-orbax-v1"
META_FILE = "radixlm.json"


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def save_orbax(path: str, cfg: LlamaConfig, params: dict, dtype: str) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), jax.tree.map(np.asarray, params), force=True)
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({"format": FORMAT, "dtype": dtype, "model": cfg.to_dict()}, f, indent=2)


def load_orbax(path: str, dtype: Any) -> tuple[LlamaConfig, dict]:
    """Restores config and weights as device arrays of `dtype`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = LlamaConfig.from_dict(meta["model"])
    saved_dtype = np.dtype(jax.numpy.dtype(meta["dtype"]))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, saved_dtype), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    target = cast_params(target, saved_dtype, lambda a, d: jax.ShapeDtypeStruct(a.shape, d))  # float32 keys stay
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(path, "params"), target)
    except Exception as e:  # orbax raises many kinds on missing/corrupt/mismatched files
        raise CheckpointError(f"{path}/params: cannot restore Orbax checkpoint ({type(e).__name__}: {e})") from e
    check_params(cfg, params, path)
    if np.dtype(dtype) != saved_dtype:
        params = cast_params(params, dtype, lambda a, d: a.astype(d))
    return cfg, params
