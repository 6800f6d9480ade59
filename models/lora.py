"""LoRA adapters (HF PEFT format) for serving several fine-tunes of one base model in one batch.

An adapter adds `x @ A @ B * scale` to a projection's output (`scale` = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA). Loaded adapters are stacked per projection, layers first like the
base weights: A [L, N, in, R], B [L, N, R, out] (N adapters, R the largest rank; smaller ranks are
zero-padded, missing projections are zeros, the scale is folded into B). Each token carries the
index of its request's adapter (0: none), and the step adds, for every projection,

    delta = ((x @ A[n]) * [n == adapter]) @ B[n]   summed over n

so one compiled step serves any mix of adapters at the cost of N low-rank products (small next to
the base matmul while N x R is small next to the hidden size).

A mixture-of-experts model's experts are adapted too (PEFT's per-expert modules, `mlp.experts.{e}.gate_proj` or
Mixtral's `block_sparse_moe.experts.{e}.w1`: the names the checkpoint stores the experts under), each expert with its
own A [L, N, E, in, R] and B [L, N, E, R, out]; a (token, expert) pair adds its expert's product of its token's
adapter (models/moe.py: `ExpertLora`, inside both expert paths).
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
EXPERT_PROJECTIONS = ("moe_gate", "moe_up", "moe_down")  # each expert's, where the checkpoint stores them one by one


def expert_modules(cfg: LlamaConfig) -> dict[str, str]:
    """Our expert projection -> its per-expert module name in the checkpoint (`{i}` the layer, `{e}` the expert), for a
    model whose every layer has experts stored one by one ({} otherwise: no experts, experts fused in one tensor, or
    layers that mix experts and dense MLPs)."""
    from models.safetensors_loader import hf_names  # (that module's imports reach this one's importers)

    if not cfg.num_experts or cfg.mixed_mlp:
        return {}
    names = hf_names(cfg)
    return {k: names[k].removesuffix(".weight") for k in EXPERT_PROJECTIONS if "{e}" in names.get(k, "")}


def _peft_prefixes(cfg: LlamaConfig, name: str) -> list[list[str]]:
    """Per layer, the PEFT module prefix of projection `name` (one; an expert projection: one per expert): the
    module the checkpoint stores it as (LFM2's `self_attn.out_proj` and `feed_forward.w1`; a mixture-of-experts model's
    shared expert, which holds the dense MLP's keys: Qwen2-MoE's `mlp.shared_expert.gate_proj`), Llama's name where
    the checkpoint fuses it with others (Phi-3's qkv_proj)."""
    from models.safetensors_loader import hf_names

    if name in EXPERT_PROJECTIONS:
        module = expert_modules(cfg)[name]
        return [[f"base_model.model.{module.format(i=i, e=e)}" for e in range(cfg.num_experts)]
                for i in range(cfg.num_layers)]
    stored = hf_names(cfg).get(name)
    if stored is not None:
        return [[f"base_model.model.{stored.removesuffix('.weight').format(i=i)}"] for i in range(cfg.num_layers)]
    module, block = PROJECTIONS[name]
    return [[f"base_model.model.model.layers.{i}.{block}.{module}"] for i in range(cfg.num_layers)]


def projection_dims(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """(in, out) of each adaptable projection the model has, from its own weight shapes ((E, in, out) of its experts';
    a mixture-of-experts model has no dense MLP unless it has a shared expert; one whose layers mix experts and dense
    MLPs adapts attention only: its MLPs differ from layer to layer)."""
    from models.llama import param_shapes  # models.llama imports this module for lora_delta

    layers = param_shapes(cfg)["layers"]
    dims = {name: tuple(layers[name][1:]) for name in PROJECTIONS if name in layers
            and not (cfg.mixed_mlp and PROJECTIONS[name][1] == "mlp")}
    return dims | {name: tuple(layers[name][1:]) for name in expert_modules(cfg)}


def load_peft_adapter(path: str, cfg: LlamaConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) -> {projection: (A [L, in, r],
    B [L, r, out] with the scale folded in)} for the projections it adapts. ValueError names what is wrong."""
    from safetensors.numpy import load_file

    if cfg.mlp_layers:  # (its modules are numbered by block, not by layer: Nemotron-H)
        raise ValueError(f"LoRA adapter {path}: adapters for {cfg.architecture} (layers of two blocks) are not "
                         "supported")
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
    for name, shape in dims.items():
        *experts, d_in, d_out = shape
        a_all = np.zeros((cfg.num_layers, *experts, d_in, r), np.float32)
        b_all = np.zeros((cfg.num_layers, *experts, r, d_out), np.float32)
        found = False
        for layer, prefixes in enumerate(_peft_prefixes(cfg, name)):
            for x, prefix in enumerate(prefixes):
                ka, kb = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
                if ka not in tensors or kb not in tensors:
                    continue
                used.update((ka, kb))
                a, b = tensors[ka].astype(np.float32), tensors[kb].astype(np.float32)  # PEFT: A [r, in], B [out, r]
                if a.shape != (r, d_in) or b.shape != (d_out, r):
                    raise ValueError(f"LoRA adapter {path}: {prefix.removeprefix('base_model.model.')} has A {a.shape} "
                                     f"and B {b.shape}; the model needs A {(r, d_in)} and B {(d_out, r)} (r={r})")
                at = (layer, x) if experts else (layer,)
                a_all[at], b_all[at], found = a.T, b.T * scale, True
        if found:
            out[name] = (a_all, b_all)
    if not out:
        raise ValueError(f"LoRA adapter {path}: no lora_A / lora_B weights for any of "
                         f"{', '.join(m for m, _ in PROJECTIONS.values())}")
    # NOTE: a LoRA weight this model cannot apply (embeddings, the head, fused experts) would change nothing silently.
    ignored = sorted(k for k in tensors if k not in used)
    if ignored:
        supported = [_peft_prefixes(cfg, n)[0][0].split(".", 5)[-1] for n in PROJECTIONS if n in dims]
        supported += [module.format(i="N", e="E").split(".", 3)[-1] for module in expert_modules(cfg).values()]
        raise ValueError(f"LoRA adapter {path}: {ignored[0]} adapts a module this model does not adapt (supported: "
                         f"{', '.join(supported)})")
    return out


def write_random_adapter(path: str, cfg: LlamaConfig, rank: int, alpha: float, modules=None, seed: int = 0,
                         rslora: bool = False, std: float = 0.3) -> str:
    """A random adapter in HF PEFT's layout (A [r, in], B [out, r] per layer and module) at `path` (tests, benchmarks):
    each module on the layers that have it (a model with linear attention layers: attention's on its attention
    layers); `modules` None: every projection the model adapts (its experts' too)."""
    from safetensors.numpy import save_file

    rng, dims, tensors = np.random.default_rng(seed), projection_dims(cfg), {}
    for name in dims if modules is None else modules:
        d_in, d_out = dims[name][-2:]
        prefixes = _peft_prefixes(cfg, name)
        for layer in layers_of(cfg, name):
            for prefix in prefixes[layer]:
                tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, std, (rank, d_in)).astype(np.float32)
                tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, std, (d_out, rank)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
                   "target_modules": sorted({_peft_prefixes(cfg, m)[0][0].rsplit(".", 1)[-1]
                                             for m in (dims if modules is None else modules)})}, f)
    return path


def rank(adapter: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    return max(a.shape[-1] for a, _ in adapter.values())


def stack_adapters(adapters: list[dict[str, tuple[np.ndarray, np.ndarray]] | None], cfg: LlamaConfig, dtype,
                   max_rank: int = 0, every_projection: bool = False, experts: bool = False) -> dict:
    """Per projection any adapter adapts: {"a": [L, N, in, R], "b": [L, N, R, out]} (an expert projection's:
    [L, N, E, in, R], [L, N, E, R, out]), adapter n at index n - 1; None is an empty slot (zeros). R: the largest rank,
    or `max_rank`; `every_projection`: every projection the model has, adapted or not, so adapters loaded later fit the
    same shapes (lora.max_adapters), its experts' too with `experts` (lora.experts)."""
    loaded = [adapter for adapter in adapters if adapter is not None]
    rank_ = max_rank or max(rank(adapter) for adapter in loaded)
    dims = projection_dims(cfg)
    names = [n for n in dims if (every_projection and (experts or n in PROJECTIONS))
             or any(n in adapter for adapter in loaded)]
    stacked = {}
    for name in names:
        *lead, d_in, d_out = dims[name]
        a_all = np.zeros((cfg.num_layers, len(adapters), *lead, d_in, rank_), np.float32)
        b_all = np.zeros((cfg.num_layers, len(adapters), *lead, rank_, d_out), np.float32)
        for n, adapter in enumerate(adapters):
            if adapter is not None and name in adapter:
                a, b = adapter[name]
                a_all[:, n, ..., : a.shape[-1]], b_all[:, n, ..., : b.shape[-2], :] = a, b
        stacked[name] = {"a": jnp.asarray(a_all, dtype), "b": jnp.asarray(b_all, dtype)}
    return stacked


def adapts_experts(adapter: dict) -> bool:
    return any(name in adapter for name in EXPERT_PROJECTIONS)


def lora_delta(x: jnp.ndarray, weights: dict, onehot: jnp.ndarray) -> jnp.ndarray:
    """x [T, in], weights {"a": [N, in, R], "b": [N, R, out]} (one layer), onehot [T, N] -> [T, out]."""
    xa = jnp.einsum("ti,nir->tnr", x, weights["a"]) * onehot[:, :, None].astype(x.dtype)
    return jnp.einsum("tnr,nro->to", xa, weights["b"])
