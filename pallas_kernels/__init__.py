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


def resolve_backend(name: str, dims: tuple[int, ...] | None = None) -> str:
  """Validates a backend name; "auto" becomes "pallas" on a GPU and "xla" elsewhere. `dims`: the widths the compiled
  kernels tile, a cached K and V vector's (LlamaConfig.kv_dims: head_dim twice, or a latent cache's RoPE key and
  latent). Triton's tiles need powers of two >= 16: for other widths "auto" is "xla" and "pallas" an error that
  names the width (interpret mode tiles nothing and takes any)."""
  if name not in BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; allowed values: {', '.join(BACKENDS)}")
  untileable = [d for d in dims or () if d < 16 or d & (d - 1)]
  if name == "auto":
    return "pallas" if jax.default_backend() == "gpu" and not untileable else "xla"
  if name == "pallas" and untileable:
    raise ValueError(f"attention.backend=pallas needs K and V widths that are powers of two >= 16 (the kernels' "
                     f"tiles); the model's cache has {untileable[0]} (widths {tuple(dims)}); use attention.backend=xla")
  return name


# Most new tokens of one sequence for which the decode kernel still pays: its rows each read the sequence's KV, but
# split over programs; past this a chunk's rows are better served by the ragged kernel's shared KV tiles. 8 covers
# decodes and speculative verification (up to 7 drafts). A guess until timed on a GPU (docs/kernels.md).
DECODE_MAX_ROWS = 8


def prefers_decode_kernel(max_chunk: int) -> bool:
  """Whether a step whose longest chunk has `max_chunk` new tokens should pass decode_only=True."""
  return max_chunk <= DECODE_MAX_ROWS


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | jax.Array | None = None,
                           soft_cap: float | None = None, backend: str = "xla",
                           decode_only: bool | None = None, layer: jax.Array | None = None,
                           k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                           sinks: jax.Array | None = None, kv_limits: jax.Array | None = None,
                           tree_masks: jax.Array | None = None,
                           attention_chunk: int | jax.Array | None = None) -> jax.Array:
  """Causal attention of a ragged batch of new tokens over paged KV (optionally with per-row limits or draft-tree
  masks). Returns [T, Hq, Dv], q's dtype.

  q [T, Hq, D]: all sequences' new tokens back to back. k_pages, v_pages [Hkv, P, page_size, D]:
  one layer's cache, new tokens already written. kv_lens [S] int32: KV length of each sequence,
  new tokens included. page_indices [S, max_pages_per_seq] int32. cu_q_lens [S + 1] int32.
  num_seqs [1] int32: sequences at index >= num_seqs[0] are padding (kv_len 0, empty chunk).

  A latent cache (DeepSeek's multi-head latent attention): k_pages [.., Dk] and v_pages [.., Dv]
  with Dk + Dv = D. A position's key is its K and V rows together, its value the V row, and the
  output is [T, Hq, Dv]; every backend reads it (docs/kernels.md, "Latent cache").

  Row i of sequence s sits at position kv_lens[s] - q_len + i and attends to KV positions
  [0, pos] (only those > pos - sliding_window when a window is given; the window may be an int32
  scalar traced per layer, e.g. Gemma 3's windowed and global layers under one scan). soft_cap applies
  soft_cap * tanh(score / soft_cap) before masking. q head h reads kv head h // (Hq // Hkv).
  Rows past cu_q_lens[num_seqs] are padding: their output is finite but unspecified.

  kv_limits ([T] int32, Gemma 3's bidirectional image tokens): the last KV position each row of q may
  attend to, in place of its own position: row t sees [0, kv_limits[t]], or (pos - sliding_window,
  kv_limits[t]] (the window still starts from the row's own position). A limit is never below the
  row's own position (the backends clamp it into [pos, kv_len - 1]); rows past cu_q_lens[num_seqs]
  ignore it. None (static): each row's own position, plain causal attention, the same programs as
  without the argument.

  tree_masks ([T] int32, tree speculative decoding): a sequence's new tokens are [last real token, draft
  nodes...] in DFS preorder at consecutive positions, and a node sees only its ancestors among them. Bit b
  (0 <= b < 32) of tree_masks[t] set: row t does NOT see KV position pos - 1 - b (a node of another branch);
  everything else is as without it (the causal limit or kv_limits, kv_len). With a sliding window the row
  counts back from its depth in the tree, pos - popcount(tree_masks[t]) (the positions it skips before it are
  other branches' nodes): it sees positions > pos - popcount(tree_masks[t]) - sliding_window. Rows past
  cu_q_lens[num_seqs] ignore it. All-zero masks give the causal result bit for bit; None (static): the same
  programs as without the argument.

  attention_chunk (Llama 4's chunked attention layers; an int, or an int32 scalar traced per layer): row t sees
  no position before its chunk's first, (pos // attention_chunk) * attention_chunk (a draft tree's row: of
  pos - popcount, its depth, as a window counts). None (static): no such bound, the same programs as without it.

  decode_only (static, a performance hint): True: the split-KV decode kernel (pallas_kernels/
  decode_kernel.py), for batches whose sequences have one new token each, or a few (see
  DECODE_MAX_ROWS); it handles every row independently, so it stays correct for any batch, only
  slower on long chunks (each row reads its sequence's KV). False: the ragged kernel (query blocks:
  a chunk's rows share each KV tile). None: the decode kernel when T <= S (rows <= sequence slots),
  a guess for callers that do not know their chunks; the engine passes the step's own answer
  (`prefers_decode_kernel`). The xla backend ignores the flag.

  layer (int32 scalar): k_pages / v_pages hold every layer, [L, Hkv, P, page_size, D] (the
  engine's stacked cache carried through `lax.scan`); attention reads that layer in place, every
  backend indexing it inside its gather or kernel (no copy of the layer). layer must be in
  [0, L); the Pallas kernels clamp it so that a bad index can never read outside the cache.

  k_scales, v_scales ([L, Hkv, P, ps] or [Hkv, P, ps] float32): the pages are an 8-bit cache
  (int8, or float8_e4m3fn stored as uint8 bits: pallas_kernels/kv_quant.py) and position j stands for
  pages[..., j, :] * scales[..., j]. Given exactly when the pages are 8-bit.

  sinks ([Hq] float32, gpt-oss's attention sinks; with `layer` too, the one layer's row): the
  softmax of q head h gets one more logit, sinks[h], that has no value:
  out = sum_j e^s_j v_j / (e^sinks[h] + sum_j e^s_j), s_j the scores after sm_scale, soft cap and
  masking; the sink itself is neither scaled, capped nor masked. None (static) leaves it out.
  """
  backend = resolve_backend(backend)
  if backend == "xla":
    return reference.ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, layer=layer,
        k_scales=k_scales, v_scales=v_scales, sinks=sinks, kv_limits=kv_limits, tree_masks=tree_masks,
        attention_chunk=attention_chunk)
  # Pallas modules are imported lazily so that the xla path never touches Pallas.
  from pallas_kernels import decode_kernel, ragged_kernel  # noqa: PLC0415
  # A bucket with no more token rows than sequence slots gains nothing from query blocks (they
  # would hold ~1 row each), so it takes the split-KV decode kernel too.
  use_decode = q.shape[0] <= page_indices.shape[0] if decode_only is None else decode_only
  kernel = decode_kernel.decode_attention if use_decode else ragged_kernel.ragged_paged_attention
  return kernel(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, layer=layer,
                interpret=backend == "pallas_interpret", k_scales=k_scales, v_scales=v_scales,
                sinks=sinks, kv_limits=kv_limits, tree_masks=tree_masks, attention_chunk=attention_chunk)


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, backend: str = "xla", layer: jax.Array | None = None,
             k_scales: jax.Array | None = None, v_scales: jax.Array | None = None):
  """Writes new K/V rows (k, v: [T, Hkv, D], or a latent cache's [.., Dk] and [.., Dv]) into flat slots
  (page * page_size + offset).

  Negative slots are padding and are skipped. With `layer` (int32 scalar) the pages hold every
  layer, [L, Hkv, P, page_size, D], and only that layer is written, in place (layer in [0, L);
  the Pallas kernel writes nothing for any other). Returns the updated (k_pages, v_pages); under jit with the pages donated,
  or carried through `lax.scan`, only the new rows move. An 8-bit cache (k/v_scales given, as in
  ragged_paged_attention) quantizes each new row and returns (k_pages, v_pages, k_scales, v_scales).
  """
  backend = resolve_backend(backend)
  if backend == "xla":
    return reference.write_kv(k_pages, v_pages, k, v, slot_mapping, layer=layer, k_scales=k_scales,
                              v_scales=v_scales)
  from pallas_kernels import write_kv_kernel  # noqa: PLC0415
  return write_kv_kernel.write_kv(k_pages, v_pages, k, v, slot_mapping, layer=layer,
                                  interpret=backend == "pallas_interpret", k_scales=k_scales,
                                  v_scales=v_scales)
