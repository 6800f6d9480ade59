"""Weight quantization: int8 (`model.quantization: int8`, W8A16) for the projections, the embeddings and the LM
head; int4 (`model.quantization: int4`, W4A16), MXFP4 and FP8 for the projections.

Each projection W [L, in, out] (q, k, v, o, gate, up, down) is stored as int8 values with one float32
scale per layer and output feature, `scale = max_i |W[l, i, o]| / 127`, next to it as `<name>_scale`
[L, out]; a mixture-of-experts layer's experts [L, E, in, out] get a scale per layer, expert and output feature
(`<name>_scale` [L, E, out]). The step converts a layer's int8 weight to the activations' dtype inside the matmul and
scales the output columns: x @ (W_q * s) = (x @ W_q) * s.

With `model.quantize_embeddings`, the embedding table [V, H] gets one scale per token row (`embed_scale` [V]): a lookup scales the rows
it gathers, and a tied LM head, x @ E^T, scales its output columns by the same V scales. An untied
`lm_head` [H, V] gets one scale per output column (`lm_head_scale` [V]); otherwise both keep model.dtype,
as norms and biases always do. Weights take a quarter of their float32 bytes (half of bfloat16); activations and the
KV cache are unchanged (cache.kv_dtype quantizes the cache).

Weight-only int4 (`model.quantization: int4`, W4A16): each projection W [L, in, out] is stored as unsigned 4-bit
values with a float16 scale and offset per group of `group_size` consecutive input features (for each layer and
output feature; GPTQ's and AWQ's layout, and GGUF's Q4 blocks'), `<name>_scale` and `<name>_offset` [L, in / group,
out]: W[l, i, o] = q * scale[l, i // group, o] + offset[l, i // group, o], q in [0, 15]. The step converts a layer's
weight to the activations' dtype inside the matmul. Each group's scale and offset are the best of a few candidate
grids and least-squares refits (`_int4_layer`): a GGUF Q4_1 block (32 values d * q + m, its smallest at q = 0 and its
largest at q = 15) comes back exactly with group_size 32 (SmolLM2's projections lose nothing), a Q4_K block up to
its scale's float16 rounding. 4 bits per weight plus 32 bits of scale and offset per group
(5 bits with groups of 32, 4.25 with 128), against 8 for int8. Embeddings and the LM head take int8 with
`model.quantize_embeddings`.

MXFP4 (`model.quantization: mxfp4`, OCP's microscaling format, gpt-oss's experts): each weight a 4-bit e2m1 code
(sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) and each group of 32 input
features (per output feature) a power-of-two scale, stored as its biased 8-bit exponent (E8M0): `<name>_exponent`
[L, (E,) in / 32, out], W = E2M1[code] * 2^(exponent - 127); 4.25 bits a weight. A group's exponent puts its largest
|weight| in [4, 8) of the grid (larger values clamp to 6), codes round to the nearest grid value: weights that MXFP4
holds exactly (a dequantized gpt-oss checkpoint) come back exactly. A model with experts keeps its other projections
in model.dtype, as gpt-oss's MXFP4 checkpoints do (attention is a few percent of the weights); a dense model's
projections all go to MXFP4.

FP8 (`model.quantization: fp8`, W8A16; `w8a8_fp8`, W8A8): each weight an e4m3 float (OCP FP8: 4 exponent bits, 3
mantissa bits, largest 448), a byte a weight. A float checkpoint's projections and experts get int8's layout with e4m3
values: a float32 scale per output feature, `scale = max_i |W[l, i, o]| / 448` (`<name>_scale` [L, (E,) out]), each
weight rounded to the nearest e4m3 value (3 mantissa bits: within 1/16 of its magnitude, where int8's step is 1/127 of
the column's largest). An FP8 checkpoint's weights (DeepSeek-V3/R1, Qwen3 / Llama "-FP8": e4m3 with a scale per block
of 128 x 128) are kept as stored, bit for bit: `<name>_block_scale` [L, (E,) in / 128, out / 128], W = e4m3 *
scale of its block (`dequantize_fp8_blocks`); the projections such a checkpoint leaves in float (or the loader cannot
keep in blocks: DeepSeek's wkv_a, whose rows are reordered across blocks) keep model.dtype. The matmul converts the
weight to the activations' dtype (W8A16); with `w8a8_fp8` it also quantizes each token's activations to e4m3 (a scale
per token, max |x| / 448) for an e4m3 x e4m3 -> float32 dot, the FP8 tensor cores' rate on Hopper and MI300
(per-output-feature scales only: block-scaled weights run W8A16).

Quantizing is deterministic and happens after loading (any checkpoint) and after the tensor-parallel
layout is prepared (repeated KV heads quantize alike), before the weights are placed on devices.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# dense_*: a dense layer's MLP in a model with expert layers too (models/weights.DENSE_KEYS); wq_a, wq_b, wkv_a: latent
# attention's (models/weights.MLA_KEYS; its wkv_b stays in model.dtype, read whole by the absorbed products)
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "dense_gate", "dense_up", "dense_down", "wq_a", "wq_b",
               "wkv_a")
EXPERTS = ("moe_gate", "moe_up", "moe_down")  # [L, E, in, out]: a scale per layer, expert and output feature
# Float weights that read the MLP norm's output beside the quantized projections: SmoothQuant multiplies their rows too
SMOOTHED_FLOAT = ("router", "shared_gate")
# Every weight SmoothQuant may change (`smooth_params`): worked on in float32, cast back to its own dtype
SMOOTHED = ("attn_norm", "mlp_norm", *PROJECTIONS, *EXPERTS, *SMOOTHED_FLOAT)
SCALE_SUFFIX = "_scale"
OFFSET_SUFFIX = "_offset"  # int4 weights: a group's smallest value
EXPONENT_SUFFIX = "_exponent"  # mxfp4 weights: a group's power-of-two scale, biased by 127 (E8M0)
BLOCK_SCALE_SUFFIX = "_block_scale"  # fp8 weights kept as an FP8 checkpoint stores them: a scale per block
QUANT_SUFFIXES = (BLOCK_SCALE_SUFFIX, SCALE_SUFFIX, OFFSET_SUFFIX, EXPONENT_SUFFIX)  # the longest first
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
INT4_MAX = 15
MX_GROUP = 32  # input features per MXFP4 scale (OCP MX)
# e2m1 values by 4-bit code, the sign in the high bit (MXFP4's elements)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)


def quantize_weight(w, on_layer=None, dtype=np.int8) -> tuple[np.ndarray, np.ndarray]:
    """[L, ..., in, out] float -> (int8 of the same shape, float32 scales [L, ..., out]): a scale per output feature
    of each matrix (a layer's projection, or each expert's); an all-zero column gets scale 1. One layer at a time,
    so the float32 temporaries are one layer's (an 8B model's stacked w_gate is 7.5 GB). `dtype` FP8: e4m3 values,
    the column's largest |weight| at 448, each rounded to the nearest e4m3 value."""
    w = np.asarray(w)
    top = FP8_MAX if dtype == FP8 else 127.0
    values, scales = np.empty(w.shape, dtype), np.empty(w.shape[:-2] + w.shape[-1:], np.float32)
    for layer in range(w.shape[0]):
        x = w[layer].astype(np.float32)
        amax = np.abs(x).max(axis=-2)
        scales[layer] = np.where(amax > 0, amax / top, 1.0)
        x = np.clip(x / np.expand_dims(scales[layer], -2), -top, top)
        values[layer] = x.astype(FP8) if dtype == FP8 else np.rint(x)
        if on_layer is not None:
            on_layer()
    return values, scales


INT4_SPANS = (15, 14, 13, 12)  # a group's range split into this many steps: tried in turn (see _int4_layer)
INT4_REFINE_STEPS = 2


def quantize_weight_int4(w, group_size: int, on_layer=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[L, ..., in, out] float -> (uint4 of the same shape, float16 scales and offsets [L, ..., in / group_size, out]):
    each group of `group_size` input features (per output feature) mapped onto 0..15 with the least squared error
    `_int4_layer` finds. One layer at a time (jitted, on the default device), like `quantize_weight`."""
    w = np.asarray(w)
    values = np.empty(w.shape, ml_dtypes.uint4)
    scales, offsets = (np.empty((*w.shape[:-2], w.shape[-2] // group_size, w.shape[-1]), np.float16) for _ in range(2))
    for layer in range(w.shape[0]):
        q, scales[layer], offsets[layer] = (np.asarray(a) for a in _int4_layer(np.asarray(w[layer], np.float32),
                                                                              group_size))
        values[layer] = q.astype(ml_dtypes.uint4)
        if on_layer is not None:
            on_layer()
    return values, scales, offsets


@functools.partial(jax.jit, static_argnames="group_size")
def _int4_layer(w: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's [..., in, out] float32 -> (q uint8 in 0..15, float16 scales and offsets [..., in / group, out]).

    Per group, the lowest squared error (measured with the float16 scale and offset it would be stored with) among:
    the group's range from its smallest weight in 15, 14, 13 or 12 steps (a GGUF Q4_1 block is exactly the first,
    a Q4_K block whose values use fewer than 16 levels one of the others, up to its float16 scale's rounding), then
    INT4_REFINE_STEPS least-squares refits of scale and offset to the chosen levels (linear regression of the
    weights on q), each kept only where it lowers the error. A candidate never replaces an equally good one, so an
    exact fit stays exact; a group of equal weights gets scale 1 and q = 0."""
    *lead, fan_in, fan_out = w.shape
    x = w.reshape(*lead, fan_in // group_size, group_size, fan_out)  # [..., G, g, out]

    def fit(scale, offset):
        scale16, offset16 = scale.astype(jnp.float16), offset.astype(jnp.float16)
        scale16 = jnp.where(scale16 > 0, scale16, jnp.float16(1))
        s, o = scale16.astype(jnp.float32)[..., None, :], offset16.astype(jnp.float32)[..., None, :]
        q = jnp.clip(jnp.rint((x - o) / s), 0, INT4_MAX)
        return q, scale16, offset16, jnp.sum(jnp.square(q * s + o - x), axis=-2)

    def better(best, cand):
        take = cand[3] < best[3]
        return tuple(jnp.where(take[..., None, :] if a.ndim == x.ndim else take, c, a) for a, c in zip(best, cand))

    low, high = x.min(axis=-2), x.max(axis=-2)
    best = fit((high - low) / INT4_SPANS[0], low)
    for span in INT4_SPANS[1:]:
        best = better(best, fit((high - low) / span, low))
    for _ in range(INT4_REFINE_STEPS):
        q, scale = best[0], best[1].astype(jnp.float32)
        q_mean, x_mean = q.mean(axis=-2), x.mean(axis=-2)
        var = jnp.sum(jnp.square(q - q_mean[..., None, :]), axis=-2)
        cov = jnp.sum((q - q_mean[..., None, :]) * (x - x_mean[..., None, :]), axis=-2)
        refit = jnp.where(var > 0, cov / jnp.where(var > 0, var, 1), scale)
        refit = jnp.where(refit > 0, refit, scale)
        best = better(best, fit(refit, x_mean - refit * q_mean))
    q, scale, offset, _ = best
    return q.astype(jnp.uint8).reshape(w.shape), scale, offset


def dequantize_int4(values, scales, offsets, dtype=np.float32):
    """The weights int4 values, scales and offsets stand for ([..., in, out], numpy or jax arrays alike): what a
    matmul reads."""
    xp = jnp if isinstance(values, jax.Array) else np
    *lead, fan_in, fan_out = values.shape
    groups = scales.shape[-2]
    q = values.astype(xp.float32).reshape(*lead, groups, fan_in // groups, fan_out)
    w = q * scales.astype(xp.float32)[..., None, :] + offsets.astype(xp.float32)[..., None, :]
    return w.reshape(values.shape).astype(dtype)


def quantize_weight_mxfp4(w, on_layer=None) -> tuple[np.ndarray, np.ndarray]:
    """[L, ..., in, out] float -> (uint4 e2m1 codes of the same shape, uint8 biased exponents [L, ..., in / 32, out]),
    one layer at a time (the module docstring has the format)."""
    w = np.asarray(w)
    codes = np.empty(w.shape, ml_dtypes.uint4)
    exponents = np.empty((*w.shape[:-2], w.shape[-2] // MX_GROUP, w.shape[-1]), np.uint8)
    for layer in range(w.shape[0]):
        q, exponents[layer] = (np.asarray(a) for a in _mxfp4_layer(np.asarray(w[layer], np.float32)))
        codes[layer] = q.astype(ml_dtypes.uint4)
        if on_layer is not None:
            on_layer()
    return codes, exponents


@jax.jit
def _mxfp4_layer(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's [..., in, out] float32 -> (codes uint8 in 0..15, biased exponents uint8 [..., in / 32, out])."""
    *lead, fan_in, fan_out = w.shape
    x = w.reshape(*lead, fan_in // MX_GROUP, MX_GROUP, fan_out)
    amax = jnp.abs(x).max(axis=-2)
    # the largest power of two p with amax / p >= 4 (the grid's top binade is [4, 6]); an all-zero group: p = 1.
    # frexp, not log2: amax = m * 2^e with m in [0.5, 1) exactly, so floor(log2(amax)) = e - 1 with no rounding.
    _, e = jnp.frexp(amax)
    exp = jnp.clip(jnp.where(amax > 0, e - 3, 0), -127, 127).astype(jnp.float32)
    v = jnp.abs(x) / jnp.exp2(exp)[..., None, :]
    grid = jnp.asarray(E2M1_VALUES[:8])
    # the nearest grid value (on a tie the smaller); past 6: 6
    code = jnp.argmin(jnp.abs(v[..., None] - grid), axis=-1).astype(jnp.uint8)
    code = code | jnp.where(jnp.signbit(x), jnp.uint8(8), jnp.uint8(0))
    return code.reshape(w.shape), (exp + 127).astype(jnp.uint8)


def _e2m1_values(codes, xp):
    """E2M1_VALUES[codes] as float32, built from the codes' bits (sign, 2-bit exponent, 1-bit mantissa) rather than
    looked up: integer ops and a bitcast, which vectorize and fuse where a gather from a table may not."""
    c = codes.astype(xp.uint32)
    sign, exp, mantissa = (c >> 3) << 31, (c >> 1) & 3, c & 1
    normal = ((exp + 126) << 23) | (mantissa << 22)  # (1 + m / 2) * 2^(e - 1)
    bits = sign | xp.where(exp > 0, normal, mantissa * xp.uint32(0x3F000000))  # e = 0: 0 or 0.5
    return jax.lax.bitcast_convert_type(bits, jnp.float32) if xp is jnp else bits.view(np.float32)


def dequantize_mxfp4(codes, exponents, dtype=np.float32):
    """The weights MXFP4 codes and exponents stand for ([..., in, out], numpy or jax arrays alike): what a matmul
    reads."""
    xp = jnp if isinstance(codes, jax.Array) else np
    *lead, fan_in, fan_out = codes.shape
    groups = exponents.shape[-2]
    values = _e2m1_values(codes, xp).reshape(*lead, groups, fan_in // groups, fan_out)
    scales = xp.exp2(exponents.astype(xp.float32) - 127)
    return (values * scales[..., None, :]).reshape(codes.shape).astype(dtype)


def quantize_weight_fp8_blocks(w, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """[L, ..., in, out] float -> (e4m3 of the same shape, float32 scales [L, ..., in / block, out / block]): a scale
    per block of block x block weights, its largest |weight| / 448, as an FP8 checkpoint stores them (benchmarks and
    tests; `model.quantization: fp8` keeps a checkpoint's own blocks and quantizes float weights per output feature)."""
    w = np.asarray(w, np.float32)
    *lead, fan_in, fan_out = w.shape
    blocks = w.reshape(*lead, fan_in // block, block, fan_out // block, block)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scales = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    values = np.clip(blocks / scales[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8).reshape(w.shape)
    return values, scales


def quantize_activations(h: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Each row of h (the last axis) in 8 bits for a W8A8 matmul against `dtype` weights -> (values, float32 scales
    [..., 1]): int8, scale max |row| / 127, rounded; e4m3, scale max |row| / 448, to the nearest e4m3. A zero row
    gets scale 1."""
    fp8 = jnp.dtype(dtype) == jnp.float8_e4m3fn
    top = FP8_MAX if fp8 else 127.0
    h32 = h.astype(jnp.float32)
    amax = jnp.max(jnp.abs(h32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    values = jnp.clip(h32 / scale, -top, top)
    return (values.astype(dtype) if fp8 else jnp.round(values).astype(jnp.int8)), scale


def dequantize_fp8_blocks(values, scales, dtype=np.float32):
    """The weights of an FP8 checkpoint kept as stored: e4m3 values [..., in, out] times the scale of their block,
    scales [..., in / block_in, out / block_out] (numpy or jax arrays alike)."""
    xp = jnp if isinstance(values, jax.Array) else np
    *lead, fan_in, fan_out = values.shape
    rows, cols = scales.shape[-2:]
    w = values.astype(xp.float32).reshape(*lead, rows, fan_in // rows, cols, fan_out // cols)
    return (w * scales.astype(xp.float32)[..., :, None, :, None]).reshape(values.shape).astype(dtype)


def packed_weight(p: dict, name: str, dtype):
    """Projection `name` of `p` as float weights in `dtype` when it is stored in 4 bits (int4 or mxfp4) or in FP8
    blocks, for the matmul to read; None for float weights and those with a scale per output feature (int8, fp8)."""
    if name + BLOCK_SCALE_SUFFIX in p:
        return dequantize_fp8_blocks(p[name], p[name + BLOCK_SCALE_SUFFIX], dtype)
    if name + OFFSET_SUFFIX in p:
        return dequantize_int4(p[name], p[name + SCALE_SUFFIX], p[name + OFFSET_SUFFIX], dtype)
    if name + EXPONENT_SUFFIX in p:
        return dequantize_mxfp4(p[name], p[name + EXPONENT_SUFFIX], dtype)
    return None


def dequantize_weight(layers: dict, name: str, dtype=np.float32):
    """Projection `name` of `layers` as the float weights its int8 values and scale (int4: values, scales and offsets;
    mxfp4: codes and exponents) stand for, in `dtype`; numpy or jax arrays alike (a jax array stays on its device)."""
    packed = packed_weight(layers, name, dtype)
    if packed is not None:
        return packed
    w, scale = layers[name], layers[name + SCALE_SUFFIX]
    xp = jnp if isinstance(w, jax.Array) else np
    return (w.astype(xp.float32) * scale[..., None, :]).astype(dtype)


def check_group_size(params: dict, group_size: int, names=PROJECTIONS + EXPERTS, what="model.quantization_group_size") -> None:
    """ValueError naming the first projection among `names` whose input features `group_size` does not divide."""
    if group_size < 1:
        raise ValueError(f"{what} must be positive, got {group_size}")
    for name in names:
        w = params["layers"].get(name)
        if w is not None and w.shape[-2] % group_size:
            raise ValueError(f"{what}={group_size} does not divide {name}'s {w.shape[-2]} input features"
                             + ("; take a divisor of it (32 fits most models)" if what.startswith("model.") else ""))


def quantized_names(layers: dict, method: str) -> list[str]:
    """The projections `method` quantizes: all of them, but for mxfp4 only a mixture-of-experts model's experts, and
    for fp8 none of an FP8 checkpoint's (those it stores in FP8 are kept so; those it does not, stay in float)."""
    names = [name for name in PROJECTIONS + EXPERTS if name in layers]  # a MoE model: experts, maybe no dense MLP
    if method == "mxfp4" and any(name in layers for name in EXPERTS):
        names = [name for name in EXPERTS if name in layers]
    if method == "fp8" and any(name + s in layers for name in names for s in (BLOCK_SCALE_SUFFIX, SCALE_SUFFIX)):
        names = []
    return names


def quantize_rows(w, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (int8 [N, K], float32 scales [N]), a scale per row (an embedding table's token rows);
    `chunk` rows at a time, so the float32 temporaries stay small for a 128k-262k vocabulary."""
    w = np.asarray(w)
    values, scales = np.empty(w.shape, np.int8), np.empty(w.shape[0], np.float32)
    for start in range(0, w.shape[0], chunk):
        x = w[start : start + chunk].astype(np.float32)
        amax = np.abs(x).max(axis=1)
        scales[start : start + chunk] = np.where(amax > 0, amax / 127.0, 1.0)
        values[start : start + chunk] = np.clip(np.rint(x / scales[start : start + chunk, None]), -127, 127)
    return values, scales


def quantize_params(params: dict, method: str = "int8", group_size: int = 32, embeddings: bool = False,
                    progress: bool = False) -> dict:
    """The weight pytree with every projection quantized (host arrays): `method` "int8" or "fp8" (`<name>_scale`
    beside each; an FP8 checkpoint's weights, kept as stored, are left as they are), "int4" (groups of `group_size`
    input features, `<name>_scale` and `<name>_offset` beside each) or "mxfp4" (a MoE model's experts, a dense
    model's projections: `<name>_exponent` beside each). With `embeddings`, the embedding
    table and an untied LM head become int8 (any method). `progress`: a bar over the layers' projections (an 8B
    model's take tens of seconds on the host)."""
    from tqdm import tqdm

    layers = dict(params["layers"])
    names = quantized_names(layers, method)
    # weights loaded quantized already (an MXFP4 checkpoint's experts, a GPTQ / AWQ / compressed-tensors checkpoint's
    # projections: models/int_checkpoint.py) are kept as they are
    names = [name for name in names if not any(name + suffix in layers for suffix in QUANT_SUFFIXES)]
    num_layers = len(layers[names[0]]) if names else 0
    if method == "int4":
        check_group_size(params, group_size, names)
    if method == "mxfp4":
        check_group_size(params, MX_GROUP, names, "MXFP4's group of inputs")
    with tqdm(total=num_layers * len(names), desc=f"{method} weights", unit="matrix", disable=not progress) as bar:
        for name in names:
            if method == "mxfp4":
                layers[name], layers[name + EXPONENT_SUFFIX] = quantize_weight_mxfp4(layers[name], on_layer=bar.update)
            elif method == "int4":
                layers[name], layers[name + SCALE_SUFFIX], layers[name + OFFSET_SUFFIX] = quantize_weight_int4(
                    layers[name], group_size, on_layer=bar.update)
            else:
                layers[name], layers[name + SCALE_SUFFIX] = quantize_weight(
                    layers[name], on_layer=bar.update, dtype=FP8 if method == "fp8" else np.int8)
    out = {**params, "layers": layers}
    if not embeddings:
        return out
    out["embed"], out["embed" + SCALE_SUFFIX] = quantize_rows(params["embed"])
    if "lm_head" in params:  # [H, V]: a scale per output column, as a projection's
        values, scales = quantize_weight(np.asarray(params["lm_head"])[None])
        out["lm_head"], out["lm_head" + SCALE_SUFFIX] = values[0], scales[0]
    return out


def dequantize_params(params: dict, dtype=np.float32) -> dict:
    """Inverse view for tests: every int8 or fp8 weight times its scale (int4: `dequantize_int4`, mxfp4:
    `dequantize_mxfp4`, FP8 blocks: `dequantize_fp8_blocks`), in `dtype`, scales dropped."""
    src = params["layers"]
    layers = {k: v for k, v in src.items() if not k.endswith(QUANT_SUFFIXES)}
    host = {k: np.asarray(v) for k, v in src.items() if k.endswith(QUANT_SUFFIXES)}
    for name in [n for n in PROJECTIONS + EXPERTS if any(n + s in src for s in QUANT_SUFFIXES)]:
        layers[name] = dequantize_weight({**host, name: np.asarray(src[name])}, name, dtype)
    out = {k: v for k, v in params.items() if not k.endswith(SCALE_SUFFIX)}
    out["layers"] = layers
    if "embed" + SCALE_SUFFIX in params:
        out["embed"] = (np.asarray(params["embed"], np.float32) * params["embed" + SCALE_SUFFIX][:, None]).astype(dtype)
    if "lm_head" + SCALE_SUFFIX in params:
        out["lm_head"] = (np.asarray(params["lm_head"], np.float32) * np.asarray(params["lm_head" + SCALE_SUFFIX])).astype(dtype)
    return out


# SmoothQuant: move activation outliers into the weights before W8A8 (model.quantization: w8a8)
CALIBRATION_MODULES = ("os", "io", "pprint", "dataclasses", "enum", "heapq", "bisect", "csv", "string", "random",
                       "math", "shutil", "tempfile", "inspect")  # not scripts/quality.py's texts, which measure it


def calibration_ids(tokenizer, num_tokens: int = 2048, window: int = 512) -> list[list[int]]:
    """Windows of `window` token ids from standard-library docstrings (always at hand, no network)."""
    import importlib
    import inspect

    docs: list[str] = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        docs += [d for d in [inspect.getdoc(module)] + [inspect.getdoc(getattr(module, a)) for a in sorted(dir(module))
                                                        if not a.startswith("_")] if d and d not in docs]
    ids = tokenizer.encode("\n\n".join(docs), add_special_tokens=False)
    return [ids[i : i + window] for i in range(0, min(num_tokens, len(ids)) - window + 1, window)]


def smooth_params(params: dict, amax: dict, alpha: float = 0.5, layers_of: Callable[[str], list[int]] | None = None
                  ) -> dict:
    """SmoothQuant (Xiao et al. 2023) on a float weight pytree, from each projection group's largest |input| per
    channel (`llama.activation_amax` over calibration text). For input channel j of a group, s_j =
    max|X_j|^alpha / max|W_j|^(1 - alpha); the inputs are divided by s and the weights' rows multiplied by it, so
    x @ W is unchanged and per-token int8 activations no longer have a few huge channels setting every step.
    Divisions fold into what makes the input: the attention and MLP norms' weights (q/k/v, gate/up) and w_up's
    output columns (w_down's input is act(gate) * up); a model without norms before its projections (OLMo 2) smooths
    w_down's inputs only, one whose attention and MLP read one norm (Cohere) all five projections by one factor. In
    an expert layer the MLP norm feeds the experts' gate/up (max|W_j| over every expert), the shared expert's and the
    router (and Qwen2-MoE's shared-expert gate), whose float rows take s too; w_down's inputs are the shared expert's
    (each expert's own down inputs are not smoothed: one factor per expert would need its own calibration). In a model
    whose layers mix experts and dense MLPs (DeepSeek-V3, GLM-4.5: `layers_of(name)`, the layers a weight is stacked
    over, `weights.layers_of`), each layer's factor comes from its own kind's weights, and the dense layers' w_down
    inputs fold into their dense_up. Latent attention's wq (or wq_a) and wkv_a take the attention norm's factor as
    q/k/v do. The forward is the same up to float rounding (tested)."""
    layers = {k: np.asarray(v, np.float32).copy() if k in SMOOTHED else v for k, v in params["layers"].items()}
    num_layers = len(amax["attn_in"])

    def at(w) -> np.ndarray:  # the layers weight w is stacked over
        return np.arange(num_layers) if layers_of is None else np.asarray(layers_of(w))

    def rows(s, w):  # s [L, in] against weight w's input rows: [Lw, in, out] or experts' [Lw, E, in, out]
        s = s[at(w)]
        return s.reshape(s.shape[:1] + (1,) * (layers[w].ndim - 3) + s.shape[1:] + (1,))

    def factors(x_amax, weights):
        x_amax = np.asarray(x_amax, np.float32)  # [L, in]
        w_amax = np.zeros_like(x_amax)  # [L, in]: over each layer's own weights (none: 0, and the factor 1)
        for w in weights:
            i = at(w)
            w_amax[i] = np.maximum(w_amax[i], np.abs(layers[w]).max(axis=tuple(range(1, layers[w].ndim - 2)) + (-1,)))
        s = np.power(np.maximum(x_amax, 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
        return np.where((x_amax > 0) & (w_amax > 0), s, 1.0).astype(np.float32)

    mlp = ("w_gate", "w_up", "moe_gate", "moe_up", "dense_gate", "dense_up")
    # (latent attention: wq or wq_a, and wkv_a, read the attention norm's output)
    groups = [("attn_norm", ("wq", "wk", "wv", "wq_a", "wkv_a"), "attn_in"), ("mlp_norm", mlp, "mlp_in")]
    if "attn_norm" in layers and "mlp_norm" not in layers:  # a parallel block (Cohere): one norm feeds all five
        groups = [("attn_norm", ("wq", "wk", "wv", "w_gate", "w_up"), "attn_in")]
    for norm, weights, key in groups:
        weights = [w for w in weights if w in layers]  # (an ungated MLP has no w_gate; an expert layer, maybe no w_up)
        if norm not in layers or not weights:  # no norm before the projections (OLMo 2): nothing to fold it into
            continue
        s = factors(amax[key], weights)
        layers[norm] /= s
        for w in weights + ([k for k in SMOOTHED_FLOAT if k in layers] if norm == "mlp_norm" else []):
            layers[w] *= rows(s, w)
    if "xielu_beta" in layers:  # xIELU(up / s) is no multiple of xIELU(up): nothing to fold w_down's division into
        return _cast_smoothed(params, layers)
    for down_in, (gate, up, down) in (("down_in", ("w_gate", "w_up", "w_down")),  # (absent: no w_down, experts alone)
                                      ("dense_down_in", ("dense_gate", "dense_up", "dense_down"))):
        if down_in not in amax:
            continue
        s = factors(amax[down_in], (down,))
        # w_down's input is act(gate) * up, linear in up; without a gate relu(up)^2, which dividing up by sqrt(s)
        # divides by s
        layers[up] /= (s if gate in layers else np.sqrt(s))[at(up)][:, None, :]
        layers[down] *= rows(s, down)
    return _cast_smoothed(params, layers)


def _cast_smoothed(params: dict, layers: dict) -> dict:
    """The smoothed float32 layers back in the checkpoint's dtype."""
    return {**params, "layers": {k: v.astype(np.asarray(params["layers"][k]).dtype) if k in SMOOTHED else v
                                 for k, v in layers.items()}}
