"""Test and benchmark helpers: random ragged paged batches and a float64 numpy attention.

Host-side numpy only (no jit); used by tests/test_kernels.py and scripts/kernel_bench.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
  """One ragged attention call's inputs as numpy arrays (pallas_kernels.ragged_paged_attention)."""
  q: np.ndarray             # [T, Hq, D]
  k_pages: np.ndarray       # [Hkv, P, ps, D]
  v_pages: np.ndarray       # [Hkv, P, ps, D]
  kv_lens: np.ndarray       # [S] int32
  page_indices: np.ndarray  # [S, max_pages_per_seq] int32
  cu_q_lens: np.ndarray     # [S + 1] int32
  num_seqs: np.ndarray      # [1] int32

  @property
  def args(self):
    return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_indices, self.cu_q_lens,
            self.num_seqs)

  @property
  def num_valid_tokens(self) -> int:
    return int(self.cu_q_lens[int(self.num_seqs[0])])


def random_ragged_batch(rng: np.random.Generator, seqs, *, num_q_heads: int, num_kv_heads: int,
                        head_dim: int, page_size: int, num_tokens: int | None = None,
                        max_seqs: int | None = None, max_pages_per_seq: int | None = None,
                        extra_pages: int = 3, dtype=np.float32,
                        garbage_scale: float = 30.0,
                        latent_dims: tuple[int, int] | None = None) -> RaggedBatch:
  """A batch of sequences given as (q_len, kv_len) pairs, with padding rows and padding sequences.
  latent_dims (Dk, Dv): a latent cache (DeepSeek's): K pages Dk wide, V pages Dv, q head_dim = Dk + Dv.

  Pages are shuffled across the pool, so page tables are non-contiguous. Everything a correct
  kernel must ignore (KV slots past kv_len, unused pages, unused page-table columns, padding query
  rows) holds large random values so that a leak shows up as a large error.
  """
  seqs = [(int(q), int(kv)) for q, kv in seqs]
  assert all(1 <= q <= kv for q, kv in seqs), seqs
  num_valid = sum(q for q, _ in seqs)
  num_tokens = num_valid if num_tokens is None else num_tokens
  max_seqs = len(seqs) if max_seqs is None else max_seqs
  assert num_tokens >= num_valid and max_seqs >= len(seqs)
  seq_pages = [-(-kv // page_size) for _, kv in seqs]
  if max_pages_per_seq is None:
    max_pages_per_seq = max(seq_pages) + 1
  assert max_pages_per_seq >= max(seq_pages)
  num_pages = sum(seq_pages) + extra_pages

  k_dim, v_dim = latent_dims or (head_dim, head_dim)
  assert latent_dims is None or k_dim + v_dim == head_dim
  k_pages = garbage_scale * rng.standard_normal((num_kv_heads, num_pages, page_size, k_dim))
  v_pages = garbage_scale * rng.standard_normal((num_kv_heads, num_pages, page_size, v_dim))
  # Page table: a random permutation of the pool; unused columns point at random pages.
  perm = rng.permutation(num_pages)
  page_indices = rng.integers(0, num_pages, size=(max_seqs, max_pages_per_seq))
  next_page = 0
  for s, (_, kv_len) in enumerate(seqs):
    for j in range(seq_pages[s]):
      page = perm[next_page]
      next_page += 1
      page_indices[s, j] = page
      n = min(page_size, kv_len - j * page_size)
      k_pages[:, page, :n] = rng.standard_normal((num_kv_heads, n, k_dim))
      v_pages[:, page, :n] = rng.standard_normal((num_kv_heads, n, v_dim))

  q = rng.standard_normal((num_tokens, num_q_heads, head_dim))
  q[num_valid:] *= garbage_scale
  kv_lens = np.zeros(max_seqs, np.int32)
  kv_lens[:len(seqs)] = [kv for _, kv in seqs]
  cu_q_lens = np.full(max_seqs + 1, num_valid, np.int32)
  cu_q_lens[:len(seqs) + 1] = np.cumsum([0] + [q for q, _ in seqs])
  return RaggedBatch(
      q=q.astype(dtype), k_pages=k_pages.astype(dtype), v_pages=v_pages.astype(dtype),
      kv_lens=kv_lens, page_indices=page_indices.astype(np.int32), cu_q_lens=cu_q_lens,
      num_seqs=np.array([len(seqs)], np.int32))


def row_positions(batch: RaggedBatch) -> np.ndarray:
  """[T] int32: each row's absolute position, -1 for padding rows."""
  positions = np.full(batch.q.shape[0], -1, np.int32)
  for s in range(int(batch.num_seqs[0])):
    q_start, q_end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    positions[q_start:q_end] = batch.kv_lens[s] - (q_end - q_start) + np.arange(q_end - q_start)
  return positions


def _random_span(rng: np.random.Generator, lo: int, hi: int, boundary: int | None) -> tuple[int, int]:
  """[s, e) with lo <= s < e <= hi; one holding both sides of a multiple B of `boundary` (s < B < e) when
  lo < B < hi has one."""
  crossings = [b for b in range(lo + 1, hi) if boundary and b % boundary == 0]
  if crossings:
    b = int(rng.choice(crossings))
    return int(rng.integers(lo, b)), int(rng.integers(b + 1, hi + 1))
  s = int(rng.integers(lo, hi))
  return s, int(rng.integers(s + 1, hi + 1))


def random_kv_limits(rng: np.random.Generator, batch: RaggedBatch, *, boundary: int | None = None,
                     max_spans: int = 2) -> np.ndarray:
  """[T] int32 per-row KV limits (Gemma 3's bidirectional image tokens). Each chunk (a sequence with more than
  one new token) holds 0 to max_spans "image spans", random [s, e) positions among its new tokens (the counts
  0, 1, .., max_spans dealt over the chunks in random order, at least one span in all). A row in a span gets
  limit e - 1, every other row its own position, padding rows random junk (every backend must ignore it). With
  `boundary` (a KV tile or page size) each chunk's first span crosses a multiple of it where the chunk's
  positions hold one."""
  positions = row_positions(batch)
  limits = positions.copy()
  chunks = [s for s in range(int(batch.num_seqs[0])) if batch.cu_q_lens[s + 1] - batch.cu_q_lens[s] > 1]
  num_spans = rng.permutation(np.arange(len(chunks)) % (max_spans + 1))  # 0, 1, .., max_spans, 0, .. shuffled
  if chunks and not num_spans.any():
    num_spans[0] = 1
  for s, count in zip(chunks, num_spans):
    q_start, q_end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    first, end = int(positions[q_start]), int(positions[q_end - 1]) + 1
    free = [(first, end)]                       # position ranges no span holds yet
    for i in range(count):
      free = [(lo, hi) for lo, hi in free if hi > lo]
      if not free:
        break
      lo, hi = free.pop(int(rng.integers(len(free))))
      span = _random_span(rng, lo, hi, boundary if i == 0 else None)
      free += [(lo, span[0]), (span[1], hi)]
      rows = q_start + np.arange(span[0], span[1]) - first
      limits[rows] = span[1] - 1
  num_valid = batch.num_valid_tokens
  limits[num_valid:] = rng.integers(-5, 1000, len(limits) - num_valid)
  return limits


def random_tree_masks(rng: np.random.Generator, batch: RaggedBatch) -> np.ndarray:
  """[T] int32 draft-tree masks (tree speculative decoding). The last min(q_len, 33) new tokens of each chunk (a
  sequence with more than one new token) are a random tree's nodes in DFS preorder, the first its root: node i >= 1
  hangs below node i - 1 (the branch goes on) or, with even odds, below a random node on the path from the root to
  node i - 1 (a new branch), so that trees are both deep and wide. Row i's mask has bit i - 1 - j set for each
  earlier node j that is not one of its ancestors. Rows before those 33 and decodes get 0, padding rows random junk
  (every backend must ignore it)."""
  masks = np.zeros(batch.q.shape[0], np.int64)
  for s in range(int(batch.num_seqs[0])):
    q_start, q_end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    root = max(q_start, q_end - 33)
    path = [0]                                  # the nodes from the root to the last one placed
    for i in range(1, q_end - root):
      parent = len(path) - 1 if rng.random() < 0.5 else int(rng.integers(len(path)))
      path = path[:parent + 1] + [i]
      masks[root + i] = sum(1 << (i - 1 - j) for j in range(i) if j not in path)
  num_valid = batch.num_valid_tokens
  masks[num_valid:] = rng.integers(-2**31, 2**31, len(masks) - num_valid)
  return masks.astype(np.uint32).view(np.int32)


def random_sinks(rng: np.random.Generator, num_q_heads: int) -> np.ndarray:
  """[Hq] float32 attention sinks: one +10 (outweighs the scores: that head's output shrinks by
  orders of magnitude), one -30 (no effect within float32 tolerance), the rest in [-3, 3], shuffled."""
  sinks = rng.uniform(-3.0, 3.0, num_q_heads)
  sinks[:2] = (10.0, -30.0)[:num_q_heads]
  return rng.permutation(sinks).astype(np.float32)


def attention_f64(batch: RaggedBatch, *, sm_scale: float, sliding_window: int | None = None,
                  soft_cap: float | None = None, sinks: np.ndarray | None = None,
                  kv_limits: np.ndarray | None = None, tree_masks: np.ndarray | None = None,
                  attention_chunk: int | None = None) -> np.ndarray:
  """Dense float64 attention, one sequence at a time. Returns [num_valid_tokens, Hq, Dv].

  kv_limits ([T] int, each >= its row's position): row t sees KV positions <= kv_limits[t] instead of <= its
  own position (Gemma 3's bidirectional image tokens); a window still starts from the row's own position
  (pos - sliding_window, kv_limits[t]], and nothing past kv_len is seen.

  tree_masks ([T] int, draft trees): bit b (0 <= b < 32) of tree_masks[t] set hides KV position pos - 1 - b from
  row t, and a window counts back from pos - (the number of set bits): the row sees positions
  > pos - popcount - sliding_window.

  attention_chunk: a row sees no position before its chunk's first, (window position // chunk) x chunk (the
  window position: pos, or pos - popcount with a tree mask).

  sinks [Hq]: one more logit per head in every row's softmax, with no value (gpt-oss), taken as
  given: not scaled, capped or masked. K and V pages narrower than q: a latent cache, each key its
  K and V vectors together.
  """
  q = np.asarray(batch.q, np.float64)
  k_pages = np.asarray(batch.k_pages, np.float64)
  v_pages = np.asarray(batch.v_pages, np.float64)
  if k_pages.shape[-1] != q.shape[-1]:
    k_pages = np.concatenate([k_pages, v_pages], axis=-1)
  num_kv_heads, _, page_size, head_dim = k_pages.shape
  v_dim = v_pages.shape[-1]
  num_q_heads = q.shape[1]
  group = num_q_heads // num_kv_heads
  out = np.zeros((batch.num_valid_tokens, num_q_heads, v_dim))
  for s in range(int(batch.num_seqs[0])):
    q_start, q_end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    kv_len = int(batch.kv_lens[s])
    pages = batch.page_indices[s, :-(-kv_len // page_size)]
    k = k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :kv_len]  # [Hkv, L, D]
    v = v_pages[:, pages].reshape(num_kv_heads, -1, v_dim)[:, :kv_len]
    k = np.repeat(k, group, axis=0)                                        # [Hq, L, D]
    v = np.repeat(v, group, axis=0)
    pos = kv_len - (q_end - q_start) + np.arange(q_end - q_start)          # [q_len]
    scores = np.einsum("thd,hld->htl", q[q_start:q_end], k) * sm_scale     # [Hq, q_len, L]
    if soft_cap is not None:
      scores = soft_cap * np.tanh(scores / soft_cap)
    kv_pos = np.arange(kv_len)
    limit = pos if kv_limits is None else np.asarray(kv_limits[q_start:q_end])
    assert (limit >= pos).all(), "a row's limit is never below its position"
    mask = kv_pos[None, :] <= limit[:, None]
    window_pos = pos
    if tree_masks is not None:
      row_masks = np.asarray(tree_masks[q_start:q_end]).astype(np.int64) & 0xFFFFFFFF   # the 32 bits, unsigned
      bits = [[b for b in range(32) if int(m) >> b & 1] for m in row_masks]
      for i, row_bits in enumerate(bits):
        hidden = pos[i] - 1 - np.array(row_bits, int)
        mask[i, hidden[hidden >= 0]] = False
      window_pos = pos - np.array([len(row_bits) for row_bits in bits], int)
    if sliding_window is not None:
      mask &= kv_pos[None, :] > window_pos[:, None] - sliding_window
    if attention_chunk is not None:
      mask &= kv_pos[None, :] >= window_pos[:, None] // attention_chunk * attention_chunk
    scores = np.where(mask[None], scores, -np.inf)
    if sinks is None:
      p = np.exp(scores - scores.max(axis=-1, keepdims=True))
      p /= p.sum(axis=-1, keepdims=True)
    else:
      sink = np.asarray(sinks, np.float64)[:, None, None]                   # [Hq, 1, 1]
      m = np.maximum(scores.max(axis=-1, keepdims=True), sink)
      p = np.exp(scores - m)
      p /= p.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    out[q_start:q_end] = np.einsum("htl,hld->thd", p, v)
  return out


def tolerances(dtype) -> dict:
  """assert_allclose tolerances: float32 within 1e-5, bfloat16 within 2e-2."""
  return dict(rtol=1e-5, atol=1e-5) if np.dtype(dtype) == np.float32 else dict(rtol=2e-2, atol=2e-2)


def check_attention(fn, seqs, *, reference_fn=None, seed: int = 0, num_q_heads: int = 4,
                    num_kv_heads: int = 2, head_dim: int = 32, page_size: int = 4,
                    dtype=np.float32, sliding_window: int | None = None,
                    soft_cap: float | None = None, num_tokens: int | None = None,
                    max_seqs: int | None = None, nan_padding: bool = False,
                    kv_dtype=None, sinks: np.ndarray | None = None,
                    latent_dims: tuple[int, int] | None = None, kv_limits=None, tree_masks=None,
                    attention_chunk: int | None = None) -> None:
  """Runs fn(*batch.args, sm_scale=, sliding_window=, soft_cap=) on a fresh random batch.

  Checks the real rows against float64 numpy attention (on the inputs as rounded to dtype) and,
  when given, against reference_fn's output; padding rows must stay finite unless nan_padding
  fills padding query rows with NaN (then only the real rows are checked: NaN must not leak).
  kv_dtype (int8 / float8_e4m3fn): the pages are quantized (kv_quant.quantize) and passed with
  k_scales= / v_scales=; the float64 attention reads them dequantized. sinks ([Hq]): passed as
  sinks= (float32), and to the float64 attention. latent_dims: a latent cache (random_ragged_batch).
  kv_limits: a function of the random batch giving its [T] int32 limits (e.g. random_kv_limits with a fresh rng),
  passed as kv_limits= and to the float64 attention. tree_masks: likewise, a function of the batch giving its [T]
  int32 draft-tree masks (e.g. random_tree_masks with a fresh rng).
  """
  import jax.numpy as jnp  # noqa: PLC0415 (the batch builders above stay numpy-only)

  rng = np.random.default_rng(seed)
  batch = random_ragged_batch(
      rng, seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      page_size=page_size, num_tokens=num_tokens, max_seqs=max_seqs, latent_dims=latent_dims)
  n = batch.num_valid_tokens
  q = np.array(batch.q)
  if nan_padding:
    q[n:] = np.nan
  args = [jnp.asarray(q, dtype), jnp.asarray(batch.k_pages, dtype),
          jnp.asarray(batch.v_pages, dtype), *map(jnp.asarray, batch.args[3:])]
  opts = dict(sm_scale=head_dim ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
  if attention_chunk is not None:
    opts["attention_chunk"] = attention_chunk
  call_opts = dict(opts)
  if sinks is not None:
    sinks = np.asarray(sinks, np.float32)
    opts["sinks"], call_opts["sinks"] = sinks, jnp.asarray(sinks)
  if kv_limits is not None:
    limits = np.asarray(kv_limits(batch), np.int32)
    opts["kv_limits"], call_opts["kv_limits"] = limits, jnp.asarray(limits)
  if tree_masks is not None:
    masks = np.asarray(tree_masks(batch), np.int32)
    opts["tree_masks"], call_opts["tree_masks"] = masks, jnp.asarray(masks)
  as_read = [np.asarray(a.astype(jnp.float32)) for a in args[:3]]  # what the float64 attention reads
  if kv_dtype is not None:
    from pallas_kernels import kv_quant  # noqa: PLC0415
    (args[1], k_scales), (args[2], v_scales) = (kv_quant.quantize(a, kv_dtype) for a in args[1:3])
    call_opts.update(k_scales=k_scales, v_scales=v_scales)
    as_read[1:] = kv_quant.dequantize_np(args[1], k_scales), kv_quant.dequantize_np(args[2], v_scales)
  out = fn(*args, **call_opts)
  assert out.shape == q.shape[:-1] + batch.v_pages.shape[-1:] and out.dtype == dtype, (out.shape, out.dtype)
  out = np.asarray(out.astype(jnp.float32))
  if not nan_padding:
    assert np.isfinite(out).all(), "padding rows must stay finite"
  rounded = RaggedBatch(*as_read, *map(np.asarray, args[3:]))
  tol = tolerances(dtype)
  np.testing.assert_allclose(out[:n], attention_f64(rounded, **opts), **tol)
  if reference_fn is not None:
    ref = np.asarray(reference_fn(*args, **call_opts).astype(jnp.float32))
    np.testing.assert_allclose(out[:n], ref[:n], **tol)
