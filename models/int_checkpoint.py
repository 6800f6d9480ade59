"""Integer-quantized HF checkpoints: GPTQ, AWQ and compressed-tensors (llm-compressor's W4A16 / W8A16 / W8A8).

Each stores a projection's weight [out, in] as small integers q with a float scale s and an integer zero point z per
group of `group_size` consecutive input features (per output feature), W = (q - z) * s; they differ in how the
integers are packed into int32 words and where the zero point sits:

- GPTQ (`quant_method: gptq`): `<module>.qweight` int32 [in / (32 / bits), out], a word holding consecutive input
  features (the first in its lowest bits); `qzeros` int32 [groups, out / (32 / bits)] packed along the outputs;
  `scales` [groups, out]; `g_idx` [in], each input feature's group. The classic layout (`checkpoint_format: gptq`)
  stores z - 1 (GPTQ-for-LLaMa's off-by-one), `gptq_v2` z itself. With `desc_act` (act-order) `g_idx` is not
  i // group_size: groups are scattered across the inputs.
- AWQ (`quant_method: awq`, the GEMM layout): `qweight` int32 [in, out / 8], a word holding 8 consecutive outputs in
  the order 0, 2, 4, 6, 1, 3, 5, 7 (AWQ_ORDER: nibble k holds output AWQ_ORDER[k]); `qzeros` [groups, out / 8] alike;
  `scales` [groups, out].
- compressed-tensors (`quant_method: compressed-tensors`): `pack-quantized` stores `<module>.weight_packed` int32
  [out, in * bits / 32] (consecutive inputs, the first in the lowest bits), the signed q + 2^(bits-1) in each field;
  `weight_scale` [out, groups] ([out, 1] for a scale per output feature); asymmetric schemes add
  `weight_zero_point`, signed, packed along the outputs ([out * bits / 32, groups]); `int-quantized` stores the
  signed int8 weight as `<module>.weight` with `weight_scale` beside it.

`read_int_weight` turns any of them into one form: unsigned levels `q` [in, out] in 0 .. 2^bits - 1 and float32
`scale` and `offset` [groups, out] with W = q * scale + offset (offset = -z * s; both exact in float32, as the
products of a 16-bit scale and a small integer are). That is models/quant.py's int4 layout, so a 4-bit checkpoint whose
groups are contiguous is served as stored (`model.quantization: int4`, which `auto` picks for it); an 8-bit one with a
scale per output feature and no zero point is int8's layout (`int8`, or `w8a8` where the checkpoint quantizes
activations too). Other shapes of these formats (act-order, 8-bit groups, 2-bit) are dequantized at load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from models.gguf_loader import CheckpointError

INT_METHODS = ("gptq", "awq")  # quantization_config.quant_method values read here (and compressed-tensors' int schemes)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds output AWQ_ORDER[k] of its eight


@dataclasses.dataclass(frozen=True)
class IntWeight:
    """One projection's integer weight: W[i, o] = q[i, o] * scale[g, o] + offset[g, o], g = i // (in / groups)."""

    q: np.ndarray  # [in, out] uint8, levels 0 .. 2^bits - 1
    scale: np.ndarray  # [groups, out] float32
    offset: np.ndarray  # [groups, out] float32
    bits: int
    symmetric: bool  # offset = -2^(bits-1) * scale: no zero point of its own
    act_order: bool = False  # GPTQ's scattered groups: `groups_of` holds each input's group
    groups_of: np.ndarray | None = None  # [in] int, only with act_order

    def dequantize(self) -> np.ndarray:
        """The float32 weights [in, out] the integers stand for."""
        fan_in = self.q.shape[0]
        group = (self.groups_of if self.act_order
                 else np.arange(fan_in) // (fan_in // self.scale.shape[0]))
        return self.q.astype(np.float32) * self.scale[group] + self.offset[group]

    def signed_int8(self) -> np.ndarray:
        """8-bit symmetric levels as int8 [in, out] (the stored q - 128), for int8's layout."""
        return (self.q.astype(np.int16) - 128).astype(np.int8)


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> uint8 fields of `bits` bits, the first in each word's lowest bits, laid out along `axis` (each
    word becomes 32 / bits consecutive entries there)."""
    if 32 % bits:
        raise CheckpointError(f"{bits}-bit weights packed across int32 words are not supported (2, 4 or 8 bits are)")
    words = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    fields = ((words[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)
    return np.moveaxis(fields.reshape(*words.shape[:-1], -1), -1, axis)


@dataclasses.dataclass(frozen=True)
class IntScheme:
    """What config.json's quantization_config says of an integer checkpoint."""

    method: str  # "gptq" | "awq" | "compressed-tensors"
    bits: int = 4
    gptq_v1: bool = True  # GPTQ's zero points stored minus one
    activations: bool = False  # compressed-tensors: activations quantized to int8 too (W8A8)


def int_scheme(directory: str) -> IntScheme | None:
    """The integer scheme of an HF checkpoint directory, or None when its config.json names none (float, FP8 and
    MXFP4 checkpoints; compressed-tensors with float weights). An integer scheme with settings this module does not
    read is a CheckpointError naming them."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        quant = json.load(f).get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "gptq":
        fmt = quant.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{path}: GPTQ checkpoint_format={fmt!r} is not supported (gptq, gptq_v2)")
        return IntScheme("gptq", int(quant.get("bits", 4)), gptq_v1=fmt == "gptq")
    if method == "awq":
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{path}: AWQ version={version!r} is not supported (gemm)")
        if not quant.get("zero_point", True):
            raise CheckpointError(f"{path}: AWQ without zero points is not supported")
        return IntScheme("awq", int(quant.get("w_bit", quant.get("bits", 4))))
    if method == "compressed-tensors":
        groups = [g for g in (quant.get("config_groups") or {}).values()
                  if (g.get("weights") or {}).get("type") == "int"]
        if not groups:
            return None
        bits = {int(g["weights"].get("num_bits", 8)) for g in groups}
        acts = any((g.get("input_activations") or {}).get("type") == "int" for g in groups)
        return IntScheme("compressed-tensors", max(bits), activations=acts)
    return None


def has_packed_weight(prefix: str, has: Callable[[str], bool]) -> bool:
    """Whether module `prefix` (a tensor name without `.weight`) stores its weight packed in int32 words (GPTQ, AWQ,
    compressed-tensors' pack-quantized) rather than as `<prefix>.weight` (float, e4m3, or int-quantized's int8)."""
    return has(prefix + ".qweight") or has(prefix + ".weight_packed")


def read_int_weight(prefix: str, scheme: IntScheme, stored: Callable[[str], np.ndarray],
                    has: Callable[[str], bool]) -> IntWeight:
    """Module `prefix`'s integer weight (packed, or an int8 `<prefix>.weight` with a `weight_scale`) in the common form. `stored(name)` reads a
    tensor as the file holds it."""
    if has(prefix + ".qweight"):
        return _gptq(prefix, scheme, stored, has) if scheme.method == "gptq" else _awq(prefix, scheme, stored)
    return _compressed_tensors(prefix, stored, has)


def _checked(prefix: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> None:
    fan_in, fan_out = q.shape
    if scale.shape[-1] != fan_out or zero.shape != scale.shape or fan_in % scale.shape[0]:
        raise CheckpointError(f"{prefix}: weights [{fan_in}, {fan_out}] (in, out), scales {scale.shape} and zero "
                              f"points {zero.shape} do not fit one another")


def _int_weight(prefix: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
                groups_of: np.ndarray | None = None) -> IntWeight:
    """q [in, out] unsigned levels, scale [groups, out] float, zero [groups, out] integer zero points."""
    scale = np.asarray(scale, np.float32)
    _checked(prefix, q, scale, zero)
    act_order = groups_of is not None and not np.array_equal(
        groups_of, np.arange(q.shape[0]) // (q.shape[0] // scale.shape[0]))
    if groups_of is not None and (groups_of.shape != (q.shape[0],) or groups_of.min() < 0
                                  or groups_of.max() >= scale.shape[0]):
        raise CheckpointError(f"{prefix}.g_idx: {groups_of.shape} group indices do not fit {q.shape[0]} inputs and "
                              f"{scale.shape[0]} groups")
    symmetric = bool(np.all(zero == 1 << (bits - 1)))
    return IntWeight(q, scale, -zero.astype(np.float32) * scale, bits, symmetric, act_order,
                     groups_of if act_order else None)


def _gptq(prefix: str, scheme: IntScheme, stored, has) -> IntWeight:
    bits = scheme.bits
    q = _unpack(stored(prefix + ".qweight"), bits, axis=0)  # [in, out]
    zero = _unpack(stored(prefix + ".qzeros"), bits, axis=1)[:, : q.shape[1]].astype(np.int32)
    if scheme.gptq_v1:  # as GPTQ's kernels read it: a stored 2^bits - 1 (a zero point of 0 written minus one) is 2^bits
        zero = zero + 1
    groups_of = np.asarray(stored(prefix + ".g_idx"), np.int64) if has(prefix + ".g_idx") else None
    return _int_weight(prefix, q, stored(prefix + ".scales"), zero, bits, groups_of)


def _awq(prefix: str, scheme: IntScheme, stored) -> IntWeight:
    if scheme.bits != 4:
        raise CheckpointError(f"{prefix}: {scheme.bits}-bit AWQ weights are not supported (4-bit)")
    order = np.argsort(AWQ_ORDER)  # output j of a word sits in nibble order[j]

    def unpack(words: np.ndarray) -> np.ndarray:
        fields = _unpack(words, 4, axis=1)
        return fields.reshape(fields.shape[0], -1, 8)[:, :, order].reshape(fields.shape)

    q = unpack(stored(prefix + ".qweight"))
    return _int_weight(prefix, q, stored(prefix + ".scales"), unpack(stored(prefix + ".qzeros")).astype(np.int32), 4)


def _compressed_tensors(prefix: str, stored, has) -> IntWeight:
    scale = np.asarray(stored(prefix + ".weight_scale"), np.float32)
    if has(prefix + ".weight_packed"):
        packed = stored(prefix + ".weight_packed")
        shape = tuple(int(n) for n in np.asarray(stored(prefix + ".weight_shape")).reshape(-1))
        if len(shape) != 2 or packed.shape[0] != shape[0] or (32 * packed.shape[1]) % shape[1]:
            raise CheckpointError(f"{prefix}.weight_packed {packed.shape} does not hold weight_shape {shape}")
        bits = 32 * packed.shape[1] // shape[1]
        if bits not in (2, 4, 8):
            raise CheckpointError(f"{prefix}: {bits}-bit packed weights are not supported (2, 4 or 8 bits are)")
        q = _unpack(packed, bits, axis=1)[:, : shape[1]].T  # [in, out], q + 2^(bits-1)
    else:  # int-quantized: signed int8 weights as stored
        weight = np.asarray(stored(prefix + ".weight"))
        if weight.dtype != np.int8:
            raise CheckpointError(f"{prefix}.weight is {weight.dtype} beside a weight_scale; int8 expected")
        bits, q = 8, (weight.astype(np.int16) + 128).astype(np.uint8).T
    fan_out = q.shape[1]
    scale = scale.reshape(fan_out, -1).T if scale.size > 1 else np.full((1, fan_out), scale.reshape(()), np.float32)
    zero = np.zeros(scale.shape, np.int32)
    if has(prefix + ".weight_zero_point"):
        zp = np.asarray(stored(prefix + ".weight_zero_point"))
        if zp.dtype == np.int32 and zp.shape[0] != fan_out:  # packed along the outputs
            zp = (_unpack(zp, bits, axis=0)[:fan_out].astype(np.int32) - (1 << (bits - 1)))
        zp = zp.astype(np.int32).reshape(fan_out, -1).T
        zero = np.broadcast_to(zp, scale.shape).astype(np.int32)
    return _int_weight(prefix, q, scale, zero + (1 << (bits - 1)), bits)
