"""Pallas (Triton backend) KV write: scatter new K/V rows into their page slots, in place.

Grid (T, Hkv): program (t, h) copies k[t, h] and v[t, h] ([D] each, or a latent cache's RoPE key
[Dk] and latent [Dv]) to slot slot_mapping[t] of layer `layer`, kv head h, or does nothing when the
slot is negative (padding) or past the pool, or the layer is out of range. The pages are the
engine's stacked cache [L, Hkv, P, ps, D] (a
per-layer [Hkv, P, ps, D] cache is viewed as L = 1); each program's block covers every layer of
its kv head and the layer is an int32 scalar input, indexed inside the kernel. An 8-bit cache
(kv_quant) gets its rows quantized by jnp first; the kernel then also writes each row's scale. The page arrays
are aliased to the outputs (input_output_aliases), so under jit with the cache donated, or
carried through `lax.scan`, nothing but the T * Hkv * D * 2 new values moves; every slot not
written keeps its old contents.

Why not just the jnp scatter: XLA's GPU scatter is correct and also in place under donation, but
it must assume colliding indices and does not know that negative slots are rare; this kernel is a
plain strided copy with one predicated store per row. The xla backend keeps the jnp scatter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_quant
from pallas_kernels.ragged_kernel import scale_specs, stacked_cache


def _write_kernel(slot_ref, layer_ref, *refs):
  # refs: the new rows k, v [D] (and, for an 8-bit cache, their scales []), then the cache arrays as
  # inputs (aliased to the outputs, same buffers: unused), then as outputs: *_pages [L, P, ps, D] of
  # this kv head (and *_scales [L, P, ps]).
  n = len(refs) // 3
  rows, outs = refs[:n], refs[2 * n:]
  num_layers, num_pages, page_size, _ = outs[0].shape
  slot = slot_ref[()]
  layer = layer_ref[()]

  @pl.when((slot >= 0) & (slot < num_pages * page_size) & (layer >= 0) & (layer < num_layers))
  def _():
    page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
    for row, out in zip(rows, outs):  # rows already in their array's dtype (kv_quant.to_store)
      if len(out.shape) == 4:
        out[layer, page, offset, :] = row[...]
      else:
        out[layer, page, offset] = row[()]


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, layer: jax.Array | None = None,
             interpret: bool = False, k_scales=None, v_scales=None):
  """Same contract as pallas_kernels.write_kv: returns the updated (k_pages, v_pages), and the
  updated (k_scales, v_scales) after them for an 8-bit cache (rows quantized here, kv_quant)."""
  shapes = [a.shape for a in (k_pages, v_pages, k_scales, v_scales) if a is not None]
  k_pages, v_pages, layer, scales = stacked_cache(k_pages, v_pages, layer, k_scales, v_scales)
  num_layers, num_kv_heads, num_pages, page_size, _ = k_pages.shape
  num_tokens = k.shape[0]
  k_spec, v_spec = (pl.BlockSpec((num_layers, None, num_pages, page_size, pages.shape[-1]),
                                 lambda t, h: (0, h, 0, 0, 0)) for pages in (k_pages, v_pages))
  rows = kv_quant.to_store(k, v, k_pages.dtype)  # (k, v[, k_scales, v_scales]) as stored
  caches = [k_pages, v_pages, *(scales or ())]
  scale_row_spec = pl.BlockSpec((None, None), lambda t, h: (t, h))
  row_specs = [pl.BlockSpec((None, None, new.shape[-1]), lambda t, h: (t, h, 0)) for new in (k, v)]
  row_specs += [scale_row_spec] * (len(rows) - 2)
  cache_specs = [k_spec, v_spec, *scale_specs(scales, k_spec)]
  n = len(rows)
  out = pl.pallas_call(
      _write_kernel,
      grid=(num_tokens, num_kv_heads),
      in_specs=[pl.BlockSpec((None,), lambda t, h: (t,)), pl.BlockSpec((None,), lambda t, h: (0,)),
                *row_specs, *cache_specs],
      out_specs=cache_specs,
      out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
      input_output_aliases={2 + n + i: i for i in range(n)},
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="write_kv",
  )(slot_mapping.astype(jnp.int32), layer, *rows, *caches)
  return tuple(a.reshape(shape) for a, shape in zip(out, shapes))
