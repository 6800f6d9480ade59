"""LoRA adapters (HF PEFT format) for serving several fine-tunes of one base model in one batch.

An adapter adds `x @ A @ B * scale` to a projection's output (`scale` = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA). Loaded adapters are stacked per projection, layers first like the
base weights: A [L, N, in, R], B [L, N, R, out] (N adapters, R the largest rank; smaller ranks are
zero-padded, missing projections are zeros, the scale is folded into B). Each token carries the
index of its request's adapter (0: none), and the step adds, for every projection,

    delta = ((x @ A[n]) * [n == adapter]) @ B[n]   summed over n

so one compiled step serves any mix of adapters at the cost of N low-rank products (small next to
the base matmul while N x R is small next to the hidden size).
"""
from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig
from models.weights import layers_of

# Our projection name -> (PEFT module name, its parent block).
PROJECTIONS = {
    "wq": ("q_proj", "self_attn"), "wk": ("k_proj", "self_attn"), "wv": ("v_proj", "self_attn"),
    "wo": ("o_proj", "self_attn"), "w_gate": ("gate_proj", "mlp"), "w_up": ("up_proj", "mlp"),
    "w_down": ("down_proj", "mlp"),
}


def projection_dims(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable projection the model has, from its own weight shapes (a mixture-of-experts model
    has no dense MLP unless it has a shared expert; one whose layers mix experts and dense MLPs adapts attention
    only: its MLPs differ from layer to layer)."""
    from models.llama import param_shapes  # models.llama imports this module for lora_delta

    layers = param_shapes(cfg)["layers"]
    return {name: tuple(layers[name][1:]) for name in PROJECTIONS if name in layers
            and not (cfg.mixed_mlp and PROJECTIONS[name][1] == "mlp")}


def load_peft_adapter(path: str, cfg: LlamaConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) -> {projection: (A [L, in, r],
    B [L, r, out] with the scale folded in)} for the projections it adapts. ValueError names what is wrong."""
    from safetensors.numpy import load_file

    config_path, weights_path = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise ValueError(f"LoRA adapter {path}: {os.path.basename(f)} not found")
    with open(config_path) as f:
        meta = json.load(f)
    r, alpha = int(meta.get("r", 8)), float(meta.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
    tensors = load_file(weights_path)
    dims = projection_dims(cfg)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    used: set[str] = set()
    for name, (module, block) in PROJECTIONS.items():
        if name not in dims:
            continue
        keys = [(f"base_model.model.model.layers.{layer}.{block}.{module}.lora_A.weight",
                 f"base_model.model.model.layers.{layer}.{block}.{module}.lora_B.weight") for layer in range(cfg.num_layers)]
        present = [a in tensors and b in tensors for a, b in keys]
        used.update(k for pair, ok in zip(keys, present) if ok for k in pair)
        if not any(present):
            continue
        d_in, d_out = dims[name]
        a_all = np.zeros((cfg.num_layers, d_in, r), np.float32)
        b_all = np.zeros((cfg.num_layers, r, d_out), np.float32)
        for layer, ((ka, kb), ok) in enumerate(zip(keys, present)):
            if not ok:
                continue
            a, b = tensors[ka].astype(np.float32), tensors[kb].astype(np.float32)  # PEFT: A [r, in], B [out, r]
            if a.shape != (r, d_in) or b.shape != (d_out, r):
                raise ValueError(f"LoRA adapter {path}: {module} of layer {layer} has A {a.shape} and B {b.shape}; "
                                 f"the model needs A {(r, d_in)} and B {(d_out, r)} (r={r})")
            a_all[layer], b_all[layer] = a.T, b.T * scale
        out[name] = (a_all, b_all)
    if not out:
        raise ValueError(f"LoRA adapter {path}: no lora_A / lora_B weights for any of "
                         f"{', '.join(m for m, _ in PROJECTIONS.values())}")
    # NOTE: a LoRA weight this model cannot apply (experts, embeddings, the head) would change nothing silently.
    ignored = sorted(k for k in tensors if k not in used)
    if ignored:
        raise ValueError(f"LoRA adapter {path}: {ignored[0]} adapts a module this model does not adapt (supported: "
                         f"{', '.join(f'{b}.{m}' for n, (m, b) in PROJECTIONS.items() if n in dims)})")
    return out


def write_random_adapter(path: str, cfg: LlamaConfig, rank: int, alpha: float, modules=tuple(PROJECTIONS), seed: int = 0,
                         rslora: bool = False, std: float = 0.3) -> str:
    """A random adapter in HF PEFT's layout (A [r, in], B [out, r] per layer and module) at `path` (tests, benchmarks):
    each module on the layers that have it (a model with linear attention layers: attention's on its attention
    layers)."""
    from safetensors.numpy import save_file

    rng, dims, tensors = np.random.default_rng(seed), projection_dims(cfg), {}
    for name in modules:
        module, block = PROJECTIONS[name]
        d_in, d_out = dims[name]
        for layer in layers_of(cfg, name):
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, std, (rank, d_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, std, (d_out, rank)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
                   "target_modules": [PROJECTIONS[m][0] for m in modules]}, f)
    return path


def rank(adapter: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    return max(a.shape[-1] for a, _ in adapter.values())


def stack_adapters(adapters: list[dict[str, tuple[np.ndarray, np.ndarray]] | None], cfg: LlamaConfig, dtype,
                   max_rank: int = 0, every_projection: bool = False) -> dict:
    """Per projection any adapter adapts: {"a": [L, N, in, R], "b": [L, N, R, out]}, adapter n at index n - 1; None
    is an empty slot (zeros). R: the largest rank, or `max_rank`; `every_projection`: every projection the model has,
    adapted or not, so adapters loaded later fit the same shapes (lora.max_adapters)."""
    loaded = [adapter for adapter in adapters if adapter is not None]
    rank_ = max_rank or max(rank(adapter) for adapter in loaded)
    dims = projection_dims(cfg)
    names = [n for n in PROJECTIONS if n in dims and (every_projection or any(n in adapter for adapter in loaded))]
    stacked = {}
    for name in names:
        d_in, d_out = dims[name]
        a_all = np.zeros((cfg.num_layers, len(adapters), d_in, rank_), np.float32)
        b_all = np.zeros((cfg.num_layers, len(adapters), rank_, d_out), np.float32)
        for n, adapter in enumerate(adapters):
            if adapter is not None and name in adapter:
                a, b = adapter[name]
                a_all[:, n, :, : a.shape[-1]], b_all[:, n, : b.shape[1]] = a, b
        stacked[name] = {"a": jnp.asarray(a_all, dtype), "b": jnp.asarray(b_all, dtype)}
    return stacked


def lora_delta(x: jnp.ndarray, weights: dict, onehot: jnp.ndarray) -> jnp.ndarray:
    """x [T, in], weights {"a": [N, in, R], "b": [N, R, out]} (one layer), onehot [T, N] -> [T, out]."""
    xa = jnp.einsum("ti,nir->tnr", x, weights["a"]) * onehot[:, :, None].astype(x.dtype)
    return jnp.einsum("tnr,nro->to", xa, weights["b"])
