"""Pallas (Triton backend) KV write: scatter new K/V rows into their page slots, in place.

Grid (T, Hkv): program (t, h) copies k[t, h] and v[t, h] ([D] each) to slot slot_mapping[t] of
layer `layer`, kv head h, or does nothing when the slot is negative (padding) or past the pool, or
the layer is out of range. The pages are the engine's stacked cache [L, Hkv, P, ps, D] (a
per-layer [Hkv, P, ps, D] cache is viewed as L = 1); each program's block covers every layer of
its kv head and the layer is an int32 scalar input, indexed inside the kernel. The page arrays
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

from pallas_kernels.ragged_kernel import stacked_cache


def _write_kernel(slot_ref, layer_ref, k_ref, v_ref, k_pages_in, v_pages_in, k_pages_ref,
                  v_pages_ref):
  # slot_ref, layer_ref []; k_ref, v_ref [D]; *_pages_ref [L, P, ps, D] of this kv head (aliased
  # to the inputs).
  del k_pages_in, v_pages_in  # Same buffers as the outputs.
  num_layers, num_pages, page_size, _ = k_pages_ref.shape
  slot = slot_ref[()]
  layer = layer_ref[()]

  @pl.when((slot >= 0) & (slot < num_pages * page_size) & (layer >= 0) & (layer < num_layers))
  def _():
    page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
    k_pages_ref[layer, page, offset, :] = k_ref[...].astype(k_pages_ref.dtype)
    v_pages_ref[layer, page, offset, :] = v_ref[...].astype(v_pages_ref.dtype)


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, layer: jax.Array | None = None,
             interpret: bool = False):
  """Same contract as pallas_kernels.write_kv: returns the updated (k_pages, v_pages)."""
  shape = k_pages.shape
  k_pages, v_pages, layer = stacked_cache(k_pages, v_pages, layer)
  num_layers, num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
  num_tokens = k.shape[0]
  page_spec = pl.BlockSpec((num_layers, None, num_pages, page_size, head_dim),
                           lambda t, h: (0, h, 0, 0, 0))
  row_spec = pl.BlockSpec((None, None, head_dim), lambda t, h: (t, h, 0))
  k_out, v_out = pl.pallas_call(
      _write_kernel,
      grid=(num_tokens, num_kv_heads),
      in_specs=[pl.BlockSpec((None,), lambda t, h: (t,)), pl.BlockSpec((None,), lambda t, h: (0,)),
                row_spec, row_spec, page_spec, page_spec],
      out_specs=[page_spec, page_spec],
      out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
      input_output_aliases={4: 0, 5: 1},
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="write_kv",
  )(slot_mapping.astype(jnp.int32), layer, k, v, k_pages, v_pages)
  return k_out.reshape(shape), v_out.reshape(shape)
