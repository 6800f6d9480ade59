"""8-bit KV cache: each (token, kv head) vector stored in an 8-bit type with its own float32 scale.

A quantized cache is four arrays instead of two: k/v_pages [.., Hkv, P, ps, D] of int8 values, or
float8_e4m3fn values kept as their uint8 bits (see _STORAGE), and k/v_scales [.., Hkv, P, ps]
float32. A stored vector dequantizes to
values.astype(float32) * scale. The scale is the vector's absolute maximum over the type's largest
value (127 for int8, 448 for e4m3), so nothing saturates and the largest element is exact; int8
rounds every element to within scale / 2, e4m3 to 3 mantissa bits.

Attention never materialises a dequantized tile: the scale of a key is a per-column factor of the
scores, q . (s_k k) = s_k (q . k), and the scale of a value a per-column factor of the
probabilities, sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j. The 8-bit values convert exactly to
bfloat16 / float32 before the dots (|int8| <= 127 and every e4m3 value are bfloat16 numbers).

Quantization is a deterministic function of the vector, so a page written by one prefill or
another holds the same bytes: prefix caching does not change results with a quantized cache either.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# cache.kv_dtype names -> what a stored value is (int8 and float8 with per-vector scales).
KV_DTYPES = {"bfloat16": jnp.dtype(jnp.bfloat16), "int8": jnp.dtype(jnp.int8),
             "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn)}
# What the engine's cache arrays hold: float32 and int8 as they are, bfloat16 and float8 as their
# uint16 / uint8 bits.
# NOTE: XLA's CPU backend has no bfloat16 or float8 gather and scatter and upcasts the whole operand
# for one: such a cache was copied whole at every write and every attention read (XLA's memory analysis:
# temporaries the size of the cache; tests/test_kernels.py::test_xla_cache_storage_is_never_copied).
# Stored as unsigned ints, the cache only ever moves bits; a gathered tile is bitcast back before it
# converts (free on a GPU, where XLA and Triton move either the same way).
_STORAGE = {jnp.dtype(jnp.int8): jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn): jnp.dtype(jnp.uint8),
            jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}
_VALUES = {storage: value for value, storage in _STORAGE.items()}
_QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))  # storage dtypes that come with scales

SCALE_DTYPE = jnp.dtype(jnp.float32)


def storage_dtype(kind) -> jnp.dtype:
  """The cache arrays' dtype for a cache.kv_dtype name ("bfloat16", "int8", "fp8_e4m3") or a value dtype."""
  dtype = KV_DTYPES[kind] if isinstance(kind, str) else jnp.dtype(kind)
  return _STORAGE.get(dtype, dtype)


def is_quantized(dtype) -> bool:
  """Whether cache arrays of this (storage) dtype are an 8-bit cache (with scales)."""
  return jnp.dtype(dtype) in _QUANTIZED


def to_compute(values: jax.Array, dtype) -> jax.Array:
  """Stored cache values (any cache dtype, 8-bit or not) as `dtype`; exact for 8-bit values into
  bfloat16 / float32."""
  value_dtype = _VALUES.get(jnp.dtype(values.dtype))
  if value_dtype is not None and value_dtype != values.dtype:
    values = lax.bitcast_convert_type(values, value_dtype)
  return values.astype(dtype)


def to_storage(x: jax.Array, dtype) -> jax.Array:
  """Values x as cache arrays of (storage) dtype hold them: converted to the value dtype (rounded to
  bfloat16, to e4m3, truncated to int8) and bitcast when stored as bits. 8-bit rows go through
  `quantize`, which scales them into range first."""
  value_dtype = _VALUES.get(jnp.dtype(dtype), jnp.dtype(dtype))
  x = x.astype(value_dtype)
  return x if value_dtype == dtype else lax.bitcast_convert_type(x, dtype)


def max_value(dtype) -> float:
  """The largest magnitude a vector's absolute maximum is mapped to (dtype: the value dtype)."""
  dtype = jnp.dtype(dtype)
  return 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """x [..., D] -> (stored values [..., D], scales [...] float32); dtype: a value or storage dtype.
  An all-zero vector gets scale 1."""
  storage = storage_dtype(dtype)
  if not is_quantized(storage):
    raise ValueError(f"{jnp.dtype(dtype)} is not an 8-bit cache type")
  value_dtype = _VALUES[storage]
  top = max_value(value_dtype)
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scale = jnp.where(amax > 0, amax / top, 1.0)
  y = jnp.clip(x / scale[..., None], -top, top)
  if value_dtype == jnp.int8:
    y = jnp.round(y)
  return to_storage(y, storage), scale


def to_store(k: jax.Array, v: jax.Array, dtype) -> tuple[jax.Array, ...]:
  """New K/V rows [T, Hkv, D] as a cache of (storage) dtype holds them: (k, v), and for an 8-bit cache
  (k, v, k_scales, v_scales) quantized, in the order of the cache's arrays."""
  if not is_quantized(dtype):
    return to_storage(k, dtype), to_storage(v, dtype)
  (k, k_scales), (v, v_scales) = quantize(k, dtype), quantize(v, dtype)
  return k, v, k_scales, v_scales


def scale_kwargs(cache: tuple) -> dict:
  """The k_scales= / v_scales= arguments for a cache tuple (k_pages, v_pages[, k_scales, v_scales])."""
  return dict(zip(("k_scales", "v_scales"), cache[2:]))


def dequantize_np(values, scales) -> np.ndarray:
  """Host (numpy) dequantize, float64: what the float64 test attention reads."""
  return np.asarray(to_compute(jnp.asarray(values), jnp.float32), np.float64) * np.asarray(scales, np.float64)[..., None]


def page_bytes(num_layers: int, num_kv_heads: int, page_size: int, dims: tuple[int, int], dtype) -> int:
  """Bytes of one KV page over every layer: K and V values (`dims`: their widths), plus their scales when
  quantized."""
  per_token = sum(dims) * jnp.dtype(dtype).itemsize + (2 * SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)
  return num_layers * num_kv_heads * page_size * per_token
