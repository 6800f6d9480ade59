"""Attention kernel benchmark: decode and prefill at Llama-3-8B head shapes, bfloat16.

Prints one table row per (case, backend): median time, achieved bandwidth and FLOP rate (from the
case's ideal bytes and FLOPs, see docs/kernels.md), each also as a fraction of ceilings measured
on this device at start-up (device-to-device copy bandwidth, large bf16 matmul), and the largest
difference from the xla reference output.

  python scripts/kernel_bench.py            # GPU: the full table (scripts/gpu_check.sh runs it)
  python scripts/kernel_bench.py --quick    # tiny shapes, Pallas in interpret mode: CPU smoke test
  python scripts/kernel_bench.py --tune     # GPU: launch-config sweep at the goal shapes

`--tune` times our kernels under each launch configuration of TUNE_PREFILL / TUNE_DECODE /
TUNE_SPLITS at the shapes the issue's goals name (prefill 2,048 over 8,192; decode 64 x 8k; split
counts at small batches), so that one GPU session yields the data to set the defaults from. Every
configuration listed compiles for sm90 without spills within shared memory
(tests/test_kernels_compile.py checks that on the CPU), so no GPU time goes to failures.

Draft-tree verification (VERIFY_CASES: each of B sequences verifies its last token and a tree of TREE_BRANCHES
branches of 5 drafts over a context, the step `speculative.ngram_branches` makes): the ragged kernel as a chain would
run it (`pallas`, causal) and with the tree's masks (`pallas tree`, against the xla path with the same masks), so the
table shows what the masks cost.

One more decode row reads a latent cache at DeepSeek-V3's heads under tensor parallelism 8 (MLA_HEADS: 16 q heads on
one kv head whose K pages hold a 64-wide RoPE key and V pages a 512-wide latent; rows marked MLA), pallas vs xla.

Our backends are called as the engine calls them: a stacked cache [L, Hkv, P, page_size, D]
(`--num-layers`, default 2) and a traced int32 layer index (the last layer, so the kernels must
offset into the stack), the layer read in place.

Backends: `pallas` (our kernels; decode cases use the split-KV decode kernel), `xla` (the jnp
reference), for the large decode cases `pallas int8` (the decode kernel over the same cache quantized to int8 with
a float32 scale per vector, pallas_kernels/kv_quant.py: its bytes are the 8-bit values plus the
scales, its error includes the quantization's) and `jax_paged` =
jax.experimental.pallas.ops.gpu.paged_attention. JAX's
kernel takes a dense batch (q [B, Hq, D], one page-table row and length per sequence, exactly one
query token each) over one layer's [Hkv, P, page_size, D] pages (the same content, kept as its
own array so that no slice is timed), and needs pages_per_sequence % k_splits == 0; it has no
ragged chunks, sliding window or padding rows.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from engine import speculative  # noqa: E402
from pallas_kernels import kv_quant  # noqa: E402


def time_fn(fn, *args, reps: int, inner: int | None = None, warm: bool = False) -> float:
  """Median seconds per call. Each timed sample runs `inner` calls back to back (hides launch
  gaps; by default enough for ~20 ms); slow cases take fewer samples to bound the total time.
  warm: `fn` already ran on these arguments (compiled); with `inner` given, no call goes untimed."""
  if not warm:
    jax.block_until_ready(fn(*args))  # compile + warm up
  if inner is None:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    inner = max(1, min(20, int(0.02 / max(first, 1e-6))))
    if first > 0.2:
      reps = min(reps, 3)
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / inner)
  return statistics.median(samples)


def measure_ceilings(quick: bool) -> tuple[float, float]:
  """(copy bytes/s, bf16 matmul FLOP/s) measured on the default device."""
  # Random data: zeros or ones can run faster than real data does (a matmul on zeros did, on an H200).
  kx, ka, kb = jax.random.split(jax.random.key(7), 3)
  n = (1 << 20) if quick else (1 << 30)                       # elements (bf16: 2 GiB on GPU)
  x = jax.random.normal(kx, (n,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + 1)                               # reads and writes every byte
  copy_s = time_fn(copy, x, reps=5, inner=3)
  del x
  m = 512 if quick else 8192
  a, b = (jax.random.normal(k, (m, m), jnp.bfloat16) for k in (ka, kb))
  mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32).astype(p.dtype))
  mm_s = time_fn(mm, a, b, reps=5, inner=3)
  return 2 * 2 * n / copy_s, 2 * m ** 3 / mm_s


def widths(head_dim) -> tuple[int, int, int]:
  """(q, K, V widths) of head_dim: an int, or a latent cache's (Dk, Dv) (q is Dk + Dv wide)."""
  if isinstance(head_dim, tuple):
    return sum(head_dim), *head_dim
  return head_dim, head_dim, head_dim


def make_batch(key, *, q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype,
               num_layers):
  """Device-side random ragged batch with shuffled page tables (no big host transfers).

  k_all / v_all [L, Hkv, P, ps, D]: layer L - 1 holds k_pages / v_pages (one layer's pages, kept
  for jax_paged); the other layers hold other random values. head_dim (Dk, Dv): a latent cache.
  """
  num_seqs = len(q_lens)
  pages_per_seq = [-(-kv // page_size) for kv in kv_lens]
  max_pages = max(pages_per_seq)
  num_pages = sum(pages_per_seq)
  kq, kk, kv, kp, ko = jax.random.split(key, 5)
  q_dim, k_dim, v_dim = widths(head_dim)
  shape = (num_kv_heads, num_pages, page_size)
  k_pages = jax.random.normal(kk, (*shape, k_dim), dtype)
  v_pages = jax.random.normal(kv, (*shape, v_dim), dtype)
  other = jax.random.normal(ko, (num_layers - 1, *shape, max(k_dim, v_dim)), dtype)
  k_all = jnp.concatenate([other[..., :k_dim], k_pages[None]])
  v_all = jnp.concatenate([-other[..., :v_dim], v_pages[None]])
  del other
  perm = np.asarray(jax.random.permutation(kp, num_pages))
  page_indices = np.zeros((num_seqs, max_pages), np.int32)
  start = 0
  for s, n in enumerate(pages_per_seq):
    page_indices[s, :n] = perm[start:start + n]
    start += n
  num_tokens = sum(q_lens)
  return dict(
      q=jax.random.normal(kq, (num_tokens, num_q_heads, q_dim), dtype),
      k_pages=k_pages, v_pages=v_pages, k_all=k_all, v_all=v_all,
      layer=jnp.int32(num_layers - 1),
      kv_lens=jnp.asarray(kv_lens, jnp.int32),
      page_indices=jnp.asarray(page_indices),
      cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
      num_seqs=jnp.asarray([num_seqs], jnp.int32))


def ideal_cost(q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, itemsize, kv_vector_bytes=None):
  """(bytes, flops): every visible KV row read once, q read and out written once; causal FLOPs.
  kv_vector_bytes: bytes of one cached (token, kv head) K or V vector (default head_dim * itemsize).
  head_dim (Dk, Dv): a latent cache, each position's K and V rows read once, scores over both, values V."""
  q_dim, k_dim, v_dim = widths(head_dim)
  kv_bytes = sum(kv_lens) * num_kv_heads * (kv_vector_bytes * 2 if kv_vector_bytes else (k_dim + v_dim) * itemsize)
  q_bytes = sum(q_lens) * num_q_heads * (q_dim + v_dim) * itemsize
  visible = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens))
  return kv_bytes + q_bytes, 2 * num_q_heads * (q_dim + v_dim) * visible


def case_batch(key, kind: str, a: int, b: int, *, num_q_heads, num_kv_heads, head_dim, page_size,
               dtype, num_layers):
  """(row name, device batch, (ideal bytes, FLOPs)) of one case: ("decode", batch, context) or
  ("prefill", chunk, cached prefix)."""
  if kind == "decode":
    name, q_lens, kv_lens = f"decode B={a} ctx={b}", [1] * a, [b] * a
  elif kind == "verify":
    name, q_lens, kv_lens = f"verify B={a} ctx={b} 1+15", [16] * a, [b] * a
  else:
    name, q_lens, kv_lens = f"prefill chunk={a} prefix={b}", [a], [a + b]
  if isinstance(head_dim, tuple):
    name += " MLA"
  batch = make_batch(key, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=num_q_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                     dtype=dtype, num_layers=num_layers)
  cost = ideal_cost(q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, jnp.dtype(dtype).itemsize)
  return name, batch, cost


def kernel_args(batch):
  """Our kernels' positional arguments, the stacked cache included (layer= comes last)."""
  return (batch["q"], batch["k_all"], batch["v_all"], batch["kv_lens"], batch["page_indices"],
          batch["cu_q_lens"], batch["num_seqs"], batch["layer"])


def measure(fn, fn_args, ref, *, reps: int, inner: int | None) -> tuple[float, float]:
  """(max |fn - ref|, median seconds per call)."""
  err = float(jnp.max(jnp.abs(fn(*fn_args).astype(jnp.float32) - ref.astype(jnp.float32))))  # (compiles it)
  return err, time_fn(fn, *fn_args, reps=reps, inner=inner, warm=True)


def jax_paged_fn(batch, *, sm_scale, interpret):
  """JAX's GPU paged_attention on a decode batch, or None when it is unavailable."""
  try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa  # noqa: PLC0415
  except Exception:  # noqa: BLE001 (any import failure means: skip this column)
    return None
  pages_per_seq = batch["page_indices"].shape[1]
  k_splits = math.gcd(16, pages_per_seq)
  fn = functools.partial(jax_pa.paged_attention, k_splits=k_splits,
                         pages_per_compute_block=math.gcd(8, pages_per_seq // k_splits),
                         interpret=interpret)
  # JAX's kernel does not scale q; fold sm_scale in (one tiny multiply, included in the timing).
  return jax.jit(lambda q, k, v, pt, lens: fn(q * jnp.asarray(sm_scale, q.dtype), k, v, pt, lens))


# DeepSeek-V3 at tensor parallelism 8: 16 q heads on one kv head of a latent cache (a 64-wide RoPE key, a 512-wide
# latent); its decode cases (batch, context) get pallas and xla rows.
MLA_HEADS = (16, 1, (64, 512))
MLA_DECODE_CASES = [(64, 8192)]

# Decode cases that also get a `pallas int8` row on a GPU (the large memory-bound ones; gpu_check's time limit).
# Not 64 x 32k: over 2 layers its int8 K array is exactly 4 GiB, which the Triton lowering indexes with 32-bit
# offsets that wrap (ragged_kernel.check_offsets refuses it; on an H200 it was off by 0.45 before that check).
INT8_DECODE_CASES = {(64, 8192), (8, 32768)}
# Tree verification: (sequences, context); each verifies 1 + 15 rows, three branches of five drafts.
VERIFY_CASES = [(1, 8192), (8, 8192)]
TREE_BRANCHES = [[b] * 5 for b in range(3)]


def tree_masks(num_seqs: int) -> jax.Array:
  """[num_seqs * 16] int32: each sequence's rows' masks for TREE_BRANCHES (its root and 15 nodes)."""
  masks = speculative.build_tree(TREE_BRANCHES, speculative.MAX_TREE_NODES).masks()
  return jnp.asarray(np.tile(np.asarray(masks, np.int32), num_seqs))

# Launch configurations swept by --tune (the first of each list is the default on Hopper; the prefill
# kernel's elsewhere is (32, 64, 8, 2)).
TUNE_PREFILL = [  # (block_q tokens, block_kv positions, num_warps, num_stages); GQA 4: rows = 4 x block_q
    (32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 3)]
TUNE_DECODE = [   # (block_kv positions, num_warps, num_stages)
    (64, 4, 2), (64, 4, 3), (32, 4, 2), (128, 4, 3)]
# KV splits for decode at small batches (batch, context): the default is default_num_splits'.
TUNE_SPLITS = {(8, 32768): [1, 2, 4, 8, 16], (8, 1024): [1, 2, 4, 8], (64, 1024): [1, 2, 4]}


def tune(args, *, quick: bool, num_q_heads, num_kv_heads, head_dim, dtype, sm_scale, copy_bw,
         mm_flops):
  """The --tune output: the small-decode breakdown first (gpu_check's time limit may cut the sweep short), then our
  kernels under each launch configuration, at the goal shapes."""
  from pallas_kernels import decode_kernel, ragged_kernel  # noqa: PLC0415
  decode_overhead(args, quick=quick, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  dtype=dtype, sm_scale=sm_scale)
  interpret = quick
  if quick:
    prefill, decode = (16, 48), (4, 64)
    prefill_cfgs = [(4, 16, 4, 2), (8, 32, 4, 2)]
    decode_cfgs = [(16, 4, 2), (32, 4, 2)]
    split_cases = {(2, 96): [1, 2]}
  else:
    prefill, decode = (2048, 8192), (64, 8192)
    prefill_cfgs, decode_cfgs, split_cases = TUNE_PREFILL, TUNE_DECODE, TUNE_SPLITS
  runs = []
  for block_q, block_kv, warps, stages in prefill_cfgs:
    runs.append(("prefill", prefill, f"bq={block_q} bkv={block_kv} w={warps} s={stages}",
                 functools.partial(ragged_kernel.ragged_paged_attention, block_q=block_q,
                                   block_kv=block_kv, num_warps=warps, num_stages=stages)))
  for block_kv, warps, stages in decode_cfgs:
    runs.append(("decode", decode, f"bkv={block_kv} w={warps} s={stages}",
                 functools.partial(decode_kernel.decode_attention, block_kv=block_kv,
                                   num_warps=warps, num_stages=stages)))
  for splits, split_counts in split_cases.items():
    for num_splits in split_counts:
      runs.append(("decode", splits, f"splits={num_splits}",
                   functools.partial(decode_kernel.decode_attention, num_splits=num_splits)))
  header = f"{'case':<26} {'config':<26} {'ms':>9} {'%copy':>6} {'%mm':>6} {'max|err|':>9}"
  print("\n" + header + "\n" + "-" * len(header))
  key, batches = jax.random.key(1), {}
  for kind, (a, b), label, kernel in runs:
    if (kind, a, b) not in batches:
      batches.clear()  # one shape's batch at a time (the 32k decode batch is large)
      key, sub = jax.random.split(key)
      name, batch, cost = case_batch(sub, kind, a, b, num_q_heads=num_q_heads,
                                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                                     page_size=args.page_size, dtype=dtype,
                                     num_layers=args.num_layers)
      call_args = kernel_args(batch)
      ref = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=sm_scale,
                                      backend="xla"))(*call_args[:-1], layer=call_args[-1])
      batches[(kind, a, b)] = (name, call_args, ref, cost)
    name, call_args, ref, (n_bytes, n_flops) = batches[(kind, a, b)]
    fn = jax.jit(lambda *xs, kernel=kernel: kernel(*xs[:-1], layer=xs[-1], sm_scale=sm_scale,
                                                  interpret=interpret))
    try:
      err, seconds = measure(fn, call_args, ref, reps=args.reps or (2 if quick else 7),
                             inner=1 if quick else None)
    except Exception as e:  # noqa: BLE001 (report and go on with the other configurations)
      print(f"{name:<26} {label:<26} failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    print(f"{name:<26} {label:<26} {seconds * 1e3:9.3f} "
          f"{100 * n_bytes / seconds / copy_bw:5.1f}% {100 * n_flops / seconds / mm_flops:5.1f}% "
          f"{err:9.2e}", flush=True)


@contextlib.contextmanager
def looped_search():
  """Within it, functions traced by the kernels' wrappers map rows to sequences with jnp.searchsorted's default method
  (a loop: a while loop in the compiled program), as they did until 2026-12-04, instead of the unrolled
  `reference.bucket_of`: the A/B of the small-decode breakdown."""
  from pallas_kernels import reference  # noqa: PLC0415
  unrolled = reference.bucket_of
  reference.bucket_of = lambda ends, values: jnp.searchsorted(ends, values, side="right").astype(jnp.int32)
  try:
    yield
  finally:
    reference.bucket_of = unrolled


def decode_overhead(args, *, quick: bool, num_q_heads, num_kv_heads, head_dim, dtype, sm_scale):
  """Where a small decode batch's time goes (on an H200, 8 x 1k took ~0.2 ms whatever the split count, for 34 MB
  of KV, when the wrappers still searched with a loop): the whole call with the unrolled search and with the loop
  (timed alternately), against its jnp pieces jitted alone, and the while loops left in each compiled program (on a
  GPU XLA launches a while loop's kernels from the host one iteration at a time)."""
  from pallas_kernels import decode_kernel, reference  # noqa: PLC0415
  batch_size, context = (2, 64) if quick else (8, 1024)
  _, batch, _ = case_batch(jax.random.key(3), "decode", batch_size, context, num_q_heads=num_q_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=args.page_size, dtype=dtype,
                           num_layers=args.num_layers)
  call_args = kernel_args(batch)
  num_tokens, splits = batch["q"].shape[0], 4
  rows, width = (splits, num_tokens, num_q_heads), head_dim
  partials = (jax.random.normal(jax.random.key(4), (*rows, width), jnp.float32),
              jax.random.normal(jax.random.key(5), rows, jnp.float32), jnp.ones(rows, jnp.float32))

  def merge(acc, m, l):  # the decode wrapper's log-sum-exp epilogue
    return decode_kernel.merge_splits(acc, m, l).astype(dtype)

  def call():
    return jax.jit(lambda *xs: decode_kernel.decode_attention(*xs[:-1], layer=xs[-1], sm_scale=sm_scale,
                                                              interpret=quick))

  def metadata():
    return jax.jit(functools.partial(reference.token_metadata, num_tokens=num_tokens))

  meta_args = (batch["cu_q_lens"], batch["kv_lens"], batch["num_seqs"])
  pieces = [  # (label, jitted function, its arguments, traced with the looped search)
      ("whole decode call", call(), call_args, False),
      ("whole call, looped search", call(), call_args, True),
      ("token metadata", metadata(), meta_args, False),
      ("token metadata, looped", metadata(), meta_args, True),
      (f"merge of {splits} splits", jax.jit(merge), partials, False),
  ]
  print(f"\nsmall decode batch, {batch_size} x {context}: the call and its jnp pieces alone (medians of "
        "alternating rounds)")
  print(f"{'piece':<28} {'ms':>9} {'while loops':>12}")
  whiles, samples = {}, {label: [] for label, *_ in pieces}
  for label, fn, fn_args, looped in pieces:
    with looped_search() if looped else contextlib.nullcontext():
      try:
        whiles[label] = fn.lower(*fn_args).compile().as_text().count(" while(")
        jax.block_until_ready(fn(*fn_args))  # traced (and compiled) under the chosen search
      except Exception as e:  # noqa: BLE001 (report and go on)
        print(f"{label:<28} failed: {type(e).__name__}: {str(e)[:200]}")
  for _ in range(args.reps or (2 if quick else 7)):  # alternating, so that drift on a shared machine hits all
    for label, fn, fn_args, _ in pieces:
      if label in whiles:
        samples[label].append(time_fn(fn, *fn_args, reps=1, inner=1 if quick else None))
  for label, *_ in pieces:
    if label in whiles:
      print(f"{label:<28} {statistics.median(samples[label]) * 1e3:9.3f} {whiles[label]:12d}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, Pallas in interpret mode (runs on CPU)")
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--num-layers", type=int, default=2,
                      help="layers in the stacked cache; the last one is read")
  parser.add_argument("--tune", action="store_true",
                      help="sweep launch configurations at the goal shapes instead of the table")
  args = parser.parse_args(argv)

  quick = args.quick
  pallas_backend = "pallas_interpret" if quick else "pallas"
  if quick:
    num_q_heads, num_kv_heads, head_dim = 8, 2, 64
    decode_cases = [(1, 64), (4, 256)]
    prefill_cases = [(16, 0), (64, 64)]
    verify_cases = [(2, 64)]
    mla_heads, mla_cases = (4, 1, (16, 32)), [(2, 64)]
    reps, inner = args.reps or 2, 1
  else:
    num_q_heads, num_kv_heads, head_dim = 32, 8, 128  # Llama-3-8B
    decode_cases = [(b, ctx) for b in (1, 8, 64) for ctx in (1024, 8192, 32768)]
    prefill_cases = [(chunk, prefix) for chunk in (512, 2048) for prefix in (0, 2048, 8192)]
    verify_cases = VERIFY_CASES
    mla_heads, mla_cases = MLA_HEADS, MLA_DECODE_CASES
    reps, inner = args.reps or 7, None
  dtype = jnp.bfloat16
  page_size = args.page_size
  sm_scale = head_dim ** -0.5

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  copy_bw, mm_flops = measure_ceilings(quick)
  print(f"ceilings: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_flops / 1e12:.1f} TFLOP/s")
  print(f"heads: {num_q_heads} q / {num_kv_heads} kv, head_dim {head_dim}, page_size {page_size}, "
        f"bfloat16, stacked cache of {args.num_layers} layers (the last one read); GB/s and "
        f"TFLOP/s from ideal bytes/FLOPs (docs/kernels.md)")
  if args.tune:
    tune(args, quick=quick, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
         head_dim=head_dim, dtype=dtype, sm_scale=sm_scale, copy_bw=copy_bw, mm_flops=mm_flops)
    return
  header = (f"{'case':<26} {'backend':<17} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} "
            f"{'%mm':>6} {'max|err|':>9}")
  print(header)
  print("-" * len(header))

  attn = jax.jit(pallas_kernels.ragged_paged_attention,
                 static_argnames=("sm_scale", "backend", "decode_only"))
  assert args.num_layers >= 1
  key = jax.random.key(0)
  results = {}  # (kind, a, b, backend) -> (seconds, fraction of copy bandwidth, fraction of matmul)
  heads = (num_q_heads, num_kv_heads, head_dim)
  cases = [("decode", b, ctx, heads) for b, ctx in decode_cases] + \
          [("prefill", c, p, heads) for c, p in prefill_cases]
  # The goals' shapes first, so a run cut short by gpu_check's time limit still has them; the latent cache's last.
  goals = [("decode", 64, 8192, heads), ("prefill", 2048, 8192, heads)]
  cases = [c for c in goals if c in cases] + [c for c in cases if c not in goals]
  cases += [("verify", b, ctx, heads) for b, ctx in verify_cases]
  cases += [("decode", b, ctx, mla_heads) for b, ctx in mla_cases]
  for kind, a, b, (num_q_heads, num_kv_heads, head_dim) in cases:
    latent = isinstance(head_dim, tuple)
    sm_scale = widths(head_dim)[0] ** -0.5
    key, sub = jax.random.split(key)
    name, batch, (n_bytes, n_flops) = case_batch(
        sub, kind, a, b, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, dtype=dtype, num_layers=args.num_layers)
    call_args = kernel_args(batch)
    runs = {
        "xla": lambda *a: attn(*a[:-1], layer=a[-1], sm_scale=sm_scale, backend="xla"),
        pallas_backend: lambda *a: attn(*a[:-1], layer=a[-1], sm_scale=sm_scale,
                                        backend=pallas_backend, decode_only=kind == "decode"),
    }
    ref_out = runs["xla"](*call_args)
    rows = [(backend, fn, call_args, ref_out) for backend, fn in runs.items()]
    int8_row = kind == "decode" and not latent and (quick or (a, b) in INT8_DECODE_CASES)
    if int8_row:
      (k8, ks), (v8, vs) = (kv_quant.quantize(batch[n], jnp.int8) for n in ("k_all", "v_all"))
      int8_args = (*call_args[:1], k8, v8, *call_args[3:], ks, vs)
      rows.append(("pallas int8", lambda *a: attn(*a[:-3], layer=a[-3], k_scales=a[-2], v_scales=a[-1],
                                                  sm_scale=sm_scale, backend=pallas_backend,
                                                  decode_only=True), int8_args, ref_out))
    if kind == "verify":  # the same rows as a tree: masks in the kernel and in the reference
      masks = tree_masks(a)
      tree_ref = attn(*call_args[:-1], layer=call_args[-1], sm_scale=sm_scale, backend="xla", tree_masks=masks)
      rows.append(("pallas tree", lambda *a: attn(*a[:-2], layer=a[-2], tree_masks=a[-1], sm_scale=sm_scale,
                                                  backend=pallas_backend, decode_only=False),
                   (*call_args, masks), tree_ref))
    if kind == "decode" and not latent and (fn := jax_paged_fn(batch, sm_scale=sm_scale, interpret=quick)):
      rows.append(("jax_paged", fn, (batch["q"], batch["k_pages"], batch["v_pages"],
                                     batch["page_indices"], batch["kv_lens"]), ref_out))
    for backend, fn, fn_args, ref in rows:
      try:
        err, seconds = measure(fn, fn_args, ref, reps=reps, inner=inner)
      except Exception as e:  # noqa: BLE001 (report and go on with the other rows)
        print(f"{name:<26} {backend:<17} failed: {type(e).__name__}: {str(e)[:200]}")
        continue
      if backend == "pallas int8":  # its own ideal bytes: 8-bit values and a float32 scale per vector
        row_bytes = ideal_cost([1] * a, [b] * a, num_q_heads, num_kv_heads, head_dim, jnp.dtype(dtype).itemsize,
                               head_dim + kv_quant.SCALE_DTYPE.itemsize)[0]
      else:
        row_bytes = n_bytes
      gbs, tflops = row_bytes / seconds / 1e9, n_flops / seconds / 1e12
      if not latent:
        results[(kind, a, b, backend)] = (seconds, gbs * 1e9 / copy_bw, tflops * 1e12 / mm_flops)
      print(f"{name:<26} {backend:<17} {seconds * 1e3:9.3f} {gbs:8.1f} "
            f"{100 * gbs * 1e9 / copy_bw:5.1f}% {tflops:8.2f} "
            f"{100 * tflops * 1e12 / mm_flops:5.1f}% {err:9.2e}", flush=True)
    del batch, call_args, ref_out, rows
    if int8_row:
      del k8, v8, ks, vs, int8_args
  if not quick:
    print_goals(results, pallas_backend)


def print_goals(results, backend: str):
  """The issue's goals on this device, from the table's rows: PASS / FAIL / n/a (row missing)."""
  def row(kind, a, b, name=backend):
    return results.get((kind, a, b, name))

  goals = []
  decode = row("decode", 64, 8192)
  goals.append(("decode 64 x 8k >= 70% of copy bandwidth",
                None if decode is None else decode[1] >= 0.70,
                "n/a" if decode is None else f"{100 * decode[1]:.1f}%"))
  prefill = row("prefill", 2048, 8192)
  goals.append(("prefill 2k over 8k >= 40% of bf16 matmul",
                None if prefill is None else prefill[2] >= 0.40,
                "n/a" if prefill is None else f"{100 * prefill[2]:.1f}%"))
  pairs = [(ours, theirs) for (kind, a, b, name), theirs in results.items()
           if name == "jax_paged" and (ours := row(kind, a, b)) is not None]
  slower = [ours[0] / theirs[0] for ours, theirs in pairs]
  goals.append(("decode never slower than JAX's paged_attention",
                None if not pairs else max(slower) <= 1.0,
                "n/a" if not pairs else f"worst ratio {max(slower):.2f}x over {len(pairs)} cases"))
  print("\ngoals:")
  for text, ok, value in goals:
    print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {text}: {value}")


if __name__ == "__main__":
  main()
