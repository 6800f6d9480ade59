"""8-bit KV cache: each (token, kv head) vector stored in an 8-bit type with its own float32 scale.

A quantized cache is four arrays instead of two: k/v_pages [.., Hkv, P, ps, D] in int8 or
float8_e4m3fn, and k/v_scales [.., Hkv, P, ps] float32. A stored vector dequantizes to
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

# cache.kv_dtype names -> storage dtype.
KV_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn)}

SCALE_DTYPE = jnp.dtype(jnp.float32)


def is_quantized(dtype) -> bool:
  return jnp.dtype(dtype) in KV_DTYPES.values()


def max_value(dtype) -> float:
  """The largest magnitude a vector's absolute maximum is mapped to."""
  dtype = jnp.dtype(dtype)
  return 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """x [..., D] -> (values [..., D] in dtype, scales [...] float32); an all-zero vector gets scale 1."""
  dtype = jnp.dtype(dtype)
  top = max_value(dtype)
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scale = jnp.where(amax > 0, amax / top, 1.0)
  y = jnp.clip(x / scale[..., None], -top, top)
  if dtype == jnp.int8:
    y = jnp.round(y)
  return y.astype(dtype), scale


def dequantize(values: jax.Array, scales: jax.Array) -> jax.Array:
  """(values [..., D], scales [...]) -> float32 [..., D]."""
  return values.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def dequantize_np(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """Host (numpy) dequantize, float64: what the float64 test attention reads."""
  return np.asarray(jnp.asarray(values).astype(jnp.float32), np.float64) * np.asarray(scales, np.float64)[..., None]


def page_bytes(num_layers: int, num_kv_heads: int, page_size: int, head_dim: int, dtype) -> int:
  """Bytes of one KV page over every layer: K and V values, plus their scales when quantized."""
  per_vector = head_dim * jnp.dtype(dtype).itemsize + (SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)
  return 2 * num_layers * num_kv_heads * page_size * per_vector
