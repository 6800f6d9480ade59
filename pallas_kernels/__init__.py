"""Attention kernels behind one interface.

Backends:
  "xla"              plain jnp (pallas_kernels/reference.py): the reference, and the CPU path.
  "pallas"           Pallas kernels lowered through Triton (CUDA and ROCm GPUs).
  "pallas_interpret" the same Pallas kernels in interpret mode (CPU tests).
  "auto"             "pallas" on a GPU, "xla" otherwise (see `resolve_backend`).

Everything here is a pure function of arrays and static options; call it inside the jitted step.
"""
from __future__ import annotations

import jax

from pallas_kernels import reference

BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")

__all__ = ["BACKENDS", "ragged_paged_attention", "resolve_backend", "write_kv"]


def resolve_backend(name: str) -> str:
  """Validates a backend name; "auto" becomes "pallas" on a GPU and "xla" elsewhere."""
  if name not in BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; allowed values: {', '.join(BACKENDS)}")
  if name == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return name


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, backend: str = "xla",
                           decode_only: bool = False, layer: jax.Array | None = None) -> jax.Array:
  """Causal attention of a ragged batch of new tokens over paged KV. Returns [T, Hq, D], q's dtype.

  q [T, Hq, D]: all sequences' new tokens back to back. k_pages, v_pages [Hkv, P, page_size, D]:
  one layer's cache, new tokens already written. kv_lens [S] int32: KV length of each sequence,
  new tokens included. page_indices [S, max_pages_per_seq] int32. cu_q_lens [S + 1] int32.
  num_seqs [1] int32: sequences at index >= num_seqs[0] are padding (kv_len 0, empty chunk).

  Row i of sequence s sits at position kv_lens[s] - q_len + i and attends to KV positions
  [0, pos] (only those > pos - sliding_window when a window is given). soft_cap applies
  soft_cap * tanh(score / soft_cap) before masking. q head h reads kv head h // (Hq // Hkv).
  Rows past cu_q_lens[num_seqs] are padding: their output is finite but unspecified.

  decode_only (static): the caller promises every real sequence has exactly one new token
  (row s is sequence s). The Pallas backend then uses the split-KV decode kernel; the xla
  backend ignores the flag.
  """
  backend = resolve_backend(backend)
  if backend == "xla":
    return reference.ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, layer=layer)
  if layer is not None:  # TODO(kernels): index the layer inside the kernel instead of slicing it out
    k_pages, v_pages = k_pages[layer], v_pages[layer]
  from pallas_kernels import ragged_kernel  # noqa: PLC0415 (imports Pallas lazily)
  return ragged_kernel.ragged_paged_attention(
      q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
      sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
      interpret=backend == "pallas_interpret")


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, backend: str = "xla", layer: jax.Array | None = None):
  """Writes new K/V rows (k, v: [T, Hkv, D]) into flat slots (page * page_size + offset).

  Negative slots are padding and are skipped. With `layer` (int32 scalar) the pages hold every
  layer, [L, Hkv, P, ps, D], and only that layer is written. Returns the updated (k_pages, v_pages).
  """
  backend = resolve_backend(backend)
  if backend in ("xla", "pallas", "pallas_interpret"):
    return reference.write_kv(k_pages, v_pages, k, v, slot_mapping, layer=layer)
  raise NotImplementedError(f"backend {backend!r} is not implemented yet")
