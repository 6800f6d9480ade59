"""DeepSeek Sparse Attention's cost against dense latent attention, one layer's paged attention as the engine runs it
(pallas_kernels/indexed_attention.py against reference.ragged_paged_attention, the xla backend; both jnp).

Shapes: DeepSeek-V3.2 on one device of 8 under tensor parallelism (16 of its 128 query heads; a latent of 512 and a
RoPE key of 64; the indexer's 64 heads of 128 and its top 2,048 positions), float32 (this is the CPU's path).
Cases: decodes at batch 1 and 8, and a 512-token chunk, over each context. Each row prints the median time of each
and their ratio; the indexer reads every cached position once per row (64 x 128 multiply-adds each, where dense
attention spends 16 x 576 on scores and 16 x 512 on values), then attends to 2,048 positions whatever the context.

    PYTHONPATH=. .venv/bin/python scripts/sparse_attention_bench.py [--contexts 4096 16384] [--reps 5]
    PYTHONPATH=. .venv/bin/python scripts/sparse_attention_bench.py --quick    # tiny shapes: a smoke test
    python scripts/sparse_attention_bench.py --dtype bfloat16 --backend pallas --contexts 8192 32768   # a GPU
    (scripts/gpu_check.sh, step "sparse": dense attention on the Pallas kernels there, as the engine runs it)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels import indexed_attention  # noqa: E402
from scripts.kernel_bench import time_fn  # noqa: E402


def make_case(rng, seqs, *, heads, rope, index_dim, latent, index_heads, page_size, dtype=jnp.float32):
  """Inputs for sequences [(new tokens, context)]: pages in order, q and the indexer's queries and weights."""
  pages_per_seq = [-(-kv // page_size) for _, kv in seqs]
  num_pages, max_pages = sum(pages_per_seq), max(pages_per_seq)
  table = np.zeros((len(seqs), max_pages), np.int32)
  start = 0
  for s, n in enumerate(pages_per_seq):
    table[s, :n] = np.arange(start, start + n)
    start += n
  t = sum(q for q, _ in seqs)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  data = lambda *shape: f32(*shape).astype(dtype)  # noqa: E731
  return dict(q=data(t, heads, rope + latent), index_q=data(t, index_heads, index_dim), index_w=f32(t, index_heads),
              k_pages=data(1, num_pages, page_size, rope + index_dim), v_pages=data(1, num_pages, page_size, latent),
              kv_lens=jnp.asarray([kv for _, kv in seqs], jnp.int32), page_indices=jnp.asarray(table),
              cu_q_lens=jnp.asarray(np.cumsum([0] + [q for q, _ in seqs]), jnp.int32),
              num_seqs=jnp.asarray([len(seqs)], jnp.int32))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--backend", default="xla", choices=["xla", "pallas", "pallas_interpret"],
                  help="dense attention's (A)")
  args = ap.parse_args(argv)
  if args.quick:
    dims = dict(heads=4, rope=8, index_dim=16, latent=32, index_heads=4, page_size=8)
    top_k, contexts, chunk, reps = 16, [64], 24, 1
  else:
    dims = dict(heads=16, rope=64, index_dim=128, latent=512, index_heads=64, page_size=64)
    top_k, contexts, chunk, reps = 2048, args.contexts, 512, args.reps
  rope, sm_scale = dims["rope"], 192 ** -0.5
  dense = jax.jit(lambda c: pallas_kernels.ragged_paged_attention(
      c["q"], c["k_pages"][..., :rope], c["v_pages"], c["kv_lens"], c["page_indices"], c["cu_q_lens"], c["num_seqs"],
      sm_scale=sm_scale, backend=args.backend))
  sparse = jax.jit(lambda c: indexed_attention.paged_indexed_attention(
      c["q"], c["index_q"], c["index_w"], c["k_pages"], c["v_pages"], c["kv_lens"], c["page_indices"], c["cu_q_lens"],
      c["num_seqs"], sm_scale=sm_scale, top_k=top_k))
  rng = np.random.default_rng(0)
  print(f"{jax.devices()[0].device_kind}: {dims['heads']} heads, top {top_k}, {args.dtype}, dense on "
        f"{args.backend}; median ms of {reps}")
  print(f"{'case':<28}{'dense':>10}{'sparse':>10}{'dense/sparse':>14}")
  for context in contexts:
    for name, seqs in ((f"decode x1 @ {context}", [(1, context)]), (f"decode x8 @ {context}", [(1, context)] * 8),
                       (f"chunk {chunk} @ {context}", [(chunk, context)])):
      case = make_case(rng, seqs, **dims, dtype=jnp.dtype(args.dtype))
      d, s = (time_fn(fn, case, reps=reps) * 1e3 for fn in (dense, sparse))
      print(f"{name:<28}{d:>10.2f}{s:>10.2f}{d / s:>14.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
