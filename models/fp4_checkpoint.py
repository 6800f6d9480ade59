"""NVFP4 checkpoints (NVIDIA's 4-bit float format, as NVIDIA ModelOpt and llm-compressor export it) read as the float
weights they stand for.

A projection's weight [out, in] is stored as E2M1 codes, two a byte [out, in / 2] uint8, the first input in the low
nibble: bit 3 the sign, bits 0-2 an index into 0, 0.5, 1, 1.5, 2, 3, 4, 6. Each 16 consecutive inputs (per output
feature) share a scale in FP8 e4m3 [out, in / 16], and the tensor has one float32 scale more:

- ModelOpt (`quantization_config.quant_method: modelopt` with `quant_algo: NVFP4`, or an `hf_quant_config.json`
  saying so): `<module>.weight` the codes, `<module>.weight_scale`, `<module>.weight_scale_2`; W = code x
  weight_scale x weight_scale_2 (`input_scale` is the activations' and not read).
- compressed-tensors (`format: nvfp4-pack-quantized`, llm-compressor's NVFP4 schemes): `<module>.weight_packed`,
  `<module>.weight_scale`, `<module>.weight_global_scale`; W = code x weight_scale / weight_global_scale.

No kernel here multiplies E2M1 codes (Hopper has no FP4 tensor cores), so they are dequantized as they are read, into
the model's dtype; `model.quantization: fp8 | int8 | int4` quantizes them again at load to keep the memory down.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from models.gguf_loader import CheckpointError

GROUP = 16  # inputs per FP8 scale
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_CODES = np.concatenate([E2M1, -E2M1])  # by the 4-bit code, sign in bit 3


def fp4_method(directory: str) -> str | None:
    """"modelopt" or "compressed-tensors" for an NVFP4 checkpoint directory, None for any other. Another ModelOpt
    algorithm (its FP8 reads as an FP8 checkpoint) or a 4-bit float compressed-tensors scheme other than NVFP4's
    groups of 16 is a CheckpointError naming it."""
    algo = modelopt_algo(directory)
    if algo == "NVFP4":
        return "modelopt"
    if algo not in ("FP8", None):
        raise CheckpointError(f"{directory}: ModelOpt quant_algo={algo!r} is not supported (NVFP4, FP8)")
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        quant = json.load(f).get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors":
        fp4 = [g["weights"] for g in (quant.get("config_groups") or {}).values()
               if (g.get("weights") or {}).get("type") == "float" and g["weights"].get("num_bits") == 4]
        if not fp4:
            return None
        if quant.get("format") != "nvfp4-pack-quantized" or any(w.get("group_size") != GROUP for w in fp4):
            raise CheckpointError(f"{path}: 4-bit float compressed-tensors weights in format {quant.get('format')!r} "
                                  f"with groups of {sorted({w.get('group_size') for w in fp4})} are not supported "
                                  f"(nvfp4-pack-quantized, groups of {GROUP})")
        return "compressed-tensors"
    return None


def modelopt_algo(directory: str) -> str | None:
    """A ModelOpt checkpoint's quant_algo (config.json's quantization_config, else, where config.json names no
    quantization, hf_quant_config.json's `quantization`); None for any other checkpoint, or where neither says."""
    with open(os.path.join(directory, "config.json")) as f:
        quant = json.load(f).get("quantization_config") or {}
    if quant.get("quant_method") == "modelopt" and quant.get("quant_algo"):
        return str(quant["quant_algo"]).upper()
    path = os.path.join(directory, "hf_quant_config.json")
    if (not quant or quant.get("quant_method") == "modelopt") and os.path.isfile(path):
        with open(path) as f:
            algo = (json.load(f).get("quantization") or {}).get("quant_algo")
        return str(algo).upper() if algo else None
    return None


def is_fp4_weight(name: str, method: str | None, has: Callable[[str], bool]) -> bool:
    """Whether tensor `name` (`<module>.weight`) of a checkpoint of `method` is stored as NVFP4 (an excluded module,
    the LM head say, keeps its float weight)."""
    if method is None or not name.endswith(".weight"):
        return False
    prefix = name.removesuffix(".weight")
    if method == "compressed-tensors":
        return has(prefix + ".weight_packed") and has(prefix + ".weight_global_scale")
    return has(prefix + ".weight_scale_2")


def read_fp4_weight(name: str, method: str, stored: Callable[[str], np.ndarray]) -> np.ndarray:
    """The float32 weight [out, in] NVFP4 tensor `name` (`<module>.weight`) stands for; `stored(name)` reads a tensor
    as the file holds it."""
    prefix = name.removesuffix(".weight")
    if method == "compressed-tensors":
        packed = np.asarray(stored(prefix + ".weight_packed"))
        scale = np.asarray(stored(prefix + ".weight_scale")).astype(np.float32)
        scale = scale / np.asarray(stored(prefix + ".weight_global_scale"), np.float32).reshape(())
    else:
        packed = np.asarray(stored(name))
        scale = np.asarray(stored(prefix + ".weight_scale")).astype(np.float32)
        scale = scale * np.asarray(stored(prefix + ".weight_scale_2"), np.float32).reshape(())
    if packed.dtype != np.uint8 or packed.ndim != 2 or scale.shape != (packed.shape[0], 2 * packed.shape[1] // GROUP):
        raise CheckpointError(f"{prefix}: NVFP4 codes {packed.dtype} {packed.shape} and scales {scale.shape} do not "
                              f"fit (uint8 [out, in / 2] and [out, in / {GROUP}])")
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)  # low nibble first
    return (_CODES[codes].reshape(packed.shape[0], -1, GROUP) * scale[..., None]).reshape(codes.shape)
