"""Linear attention layers' prefill on a GPU: the Pallas kernel (pallas_kernels/linear_scan.py) against the XLA piece
loop it replaces, one layer's rule as the engine runs it (`models.gated_delta._delta_rule`: the states gathered from
their slots and written back, bfloat16 q/k/v into the kernel, float32 in the loop).

Shapes: the gated delta rule with 32 value heads of a 128 x 128 state (Qwen3.5-9B's linear layers) and Mamba-2's
update with 128 heads of state 128 x head 64 (Granite 4.0-H's larger models). Cases: one 2,048-token chunk, four of 512 over prefixes, one 512-token chunk
beside 63 decodes (a mixed step). Each row prints the median time of the XLA loop and of the kernel, their ratio, and
the largest difference of the outputs (relative to the largest output). `--tune` sweeps the kernel's tiles (every
configuration listed compiles for sm90 without spills: tests/test_kernels_compile.py) on the 2,048-token chunk.
`--kda` prices Kimi Delta Attention's decay per key channel instead: the XLA piece loop with it (Kimi Linear's 32
heads of 128 x 128) against the same loop with a decay per head, both float32, on any device.

    python scripts/linear_scan_bench.py [--tune]    # GPU (scripts/gpu_check.sh, step "linear")
    python scripts/linear_scan_bench.py --kda [--quick]
    python scripts/linear_scan_bench.py --quick     # tiny shapes, the kernel in interpret mode: a CPU smoke test
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import gated_delta  # noqa: E402
from pallas_kernels import linear_scan  # noqa: E402
from pallas_kernels.reference import bucket_of  # noqa: E402
from scripts.kernel_bench import time_fn  # noqa: E402

SHAPES = {"qwen3.5-9b 32x128x128": (True, 32, 128, 128), "mamba2 128x128x64": (False, 128, 128, 64)}  # delta, H, Dk, Dv
CASES = {"1 x 2048": [(2048, 0)], "4 x 512": [(512, 1000 * i) for i in range(4)],
         "512 + 63 decodes": [(512, 0)] + [(1, 300 + i) for i in range(63)]}  # (new tokens, start) per sequence
# (chunk, block_v, num_warps): tiles that compile for sm90 without spills at both shapes in bfloat16
TUNE = [(16, 32, 4), (16, 32, 8), (16, 64, 8), (32, 64, 8), (16, 16, 4)]


def make_case(key, seqs, *, delta: bool, num_heads: int, k_dim: int, v_dim: int, pad_tokens: int = 8):
  """The rule's inputs for sequences [(new tokens, start)], states in slots 0..S-1 of one layer's [1, S + 1, ...]."""
  lens = np.asarray([n for n, _ in seqs], np.int32)
  starts = np.asarray([s for _, s in seqs], np.int32)
  num_tokens, num_seqs = int(lens.sum()) + pad_tokens, len(seqs)
  kq, kk, kv, kg, kb, ks = jax.random.split(key, 6)
  unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True))  # noqa: E731
  q = unit(jax.random.normal(kq, (num_tokens, num_heads, k_dim))) * k_dim**-0.5
  k = unit(jax.random.normal(kk, (num_tokens, num_heads, k_dim)))
  v = jax.random.normal(kv, (num_tokens, num_heads, v_dim))
  g = -jax.random.exponential(kg, (num_tokens, num_heads)) * 0.3
  beta = jax.random.uniform(kb, (num_tokens, num_heads))
  ssm = jax.random.normal(ks, (1, num_seqs + 1, num_heads, k_dim, v_dim)) * 0.3
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  return dict(q=q, k=k, v=v, g=g, beta=beta, ssm=ssm, cu=cu, q_lens=jnp.asarray(lens), starts=jnp.asarray(starts),
              delta=delta, num_seqs=num_seqs)


def rule_fn(backend: str, delta: bool, dot_dtype):
  """One layer's rule over the batch, as `gated_delta.mix` calls it (no snapshots, every sequence live)."""
  def run(q, k, v, g, beta, ssm, cu, q_lens, starts):
    num = q_lens.shape[0]
    live = jnp.ones((num,), bool)
    slots = jnp.arange(num, dtype=jnp.int32)
    none = jnp.zeros((num,), jnp.int32)
    seq_of_row = jnp.clip(bucket_of(cu[1:], jnp.arange(q.shape[0], dtype=jnp.int32)), 0, num - 1)
    return gated_delta._delta_rule(q, k, v, g, beta, ssm, 0, cu, q_lens, starts, starts == 0, live, slots, none,
                                   jnp.full((num,), ssm.shape[1], jnp.int32), delta=delta, backend=backend,
                                   dot_dtype=dot_dtype, seq_of_row=seq_of_row)
  return jax.jit(run)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes, the kernel in interpret mode (CPU)")
  parser.add_argument("--tune", action="store_true", help="sweep the kernel's tiles on the 2,048-token chunk")
  parser.add_argument("--kda", action="store_true", help="the XLA loop with a decay per key channel (Kimi Delta "
                      "Attention) against one per head")
  parser.add_argument("--reps", type=int, default=None)
  args = parser.parse_args(argv)
  if args.kda:
    return kda_rows(args)
  backend = "pallas_interpret" if args.quick else "pallas"
  reps = args.reps or (2 if args.quick else 7)
  inner = 1 if args.quick else None  # (interpret mode: every call goes through the kernel's Python; time few)
  shapes = {"tiny": (True, 2, 16, 16), "tiny-mamba2": (False, 2, 16, 16)} if args.quick else SHAPES
  cases = {"1 x 40": [(40, 0)], "24 + 3 decodes": [(24, 5)] + [(1, 9)] * 3} if args.quick else CASES
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  key = jax.random.key(0)
  if args.tune:
    header = f"{'shape':<22} {'chunk':>5} {'block_v':>7} {'warps':>5} {'ms':>9}"
    print(header + "\n" + "-" * len(header))
    for name, (delta, num_heads, k_dim, v_dim) in shapes.items():
      case = make_case(key, next(iter(cases.values())), delta=delta, num_heads=num_heads, k_dim=k_dim, v_dim=v_dim)
      q, k, v = (case[n].astype(jnp.bfloat16) for n in ("q", "k", "v"))
      s0 = case["ssm"][0, : case["num_seqs"]]
      snap = jnp.zeros_like(case["q_lens"])
      for chunk, block_v, warps in TUNE:
        fn = jax.jit(functools.partial(linear_scan.gated_delta_chunks, delta=delta, chunk=chunk, block_v=block_v,
                                       num_warps=warps, interpret=args.quick))
        try:
          seconds = time_fn(fn, q, k, v, case["g"], case["beta"], s0, case["cu"], case["q_lens"], case["starts"],
                            snap, reps=reps, inner=inner)
        except Exception as e:  # noqa: BLE001 (report and go on)
          print(f"{name:<22} {chunk:>5} {block_v:>7} {warps:>5} failed: {type(e).__name__}: {str(e)[:160]}")
          continue
        print(f"{name:<22} {chunk:>5} {block_v:>7} {warps:>5} {seconds * 1e3:9.3f}", flush=True)
    return
  header = f"{'shape':<22} {'case':<18} {'xla loop ms':>11} {'kernel ms':>10} {'speed-up':>8} {'max|diff|':>9}"
  print(header + "\n" + "-" * len(header))
  for name, (delta, num_heads, k_dim, v_dim) in shapes.items():
    for case_name, seqs in cases.items():
      key, sub = jax.random.split(key)
      case = make_case(sub, seqs, delta=delta, num_heads=num_heads, k_dim=k_dim, v_dim=v_dim)
      call = [case[n] for n in ("q", "k", "v", "g", "beta", "ssm", "cu", "q_lens", "starts")]
      times, outs = {}, {}
      for which, dot_dtype in (("xla", jnp.float32), (backend, jnp.bfloat16)):
        fn = rule_fn(which, delta, dot_dtype)
        try:
          outs[which] = np.asarray(fn(*call)[0][: int(case["cu"][-1])], np.float32)
          times[which] = time_fn(fn, *call, reps=reps, inner=inner, warm=True)
        except Exception as e:  # noqa: BLE001
          print(f"{name:<22} {case_name:<18} {which} failed: {type(e).__name__}: {str(e)[:160]}")
      if len(times) < 2:
        continue
      diff = np.abs(outs["xla"] - outs[backend]).max() / (np.abs(outs["xla"]).max() + 1e-30)
      print(f"{name:<22} {case_name:<18} {times['xla'] * 1e3:11.3f} {times[backend] * 1e3:10.3f} "
            f"{times['xla'] / times[backend]:7.2f}x {diff:9.2e}", flush=True)


def kda_rows(args) -> None:
  """The XLA piece loop with a decay per key channel [T, H, Dk] (KDA) against one per head [T, H] (the same decays'
  mean over the channels), the same q, k, v, beta and states: median ms and the ratio."""
  reps = args.reps or (2 if args.quick else 5)
  shape, cases = ((2, 16, 16), {"1 x 200": [(200, 0)]}) if args.quick else (
      (32, 128, 128), {"1 x 2048": [(2048, 0)], "4 x 512": [(512, 1000 * i) for i in range(4)]})
  num_heads, k_dim, v_dim = shape
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  header = f"{'shape':<22} {'case':<12} {'per head ms':>11} {'per channel ms':>14} {'ratio':>6}"
  print(header + "\n" + "-" * len(header))
  key = jax.random.key(0)
  for case_name, seqs in cases.items():
    key, sub, kg = jax.random.split(key, 3)
    case = make_case(sub, seqs, delta=True, num_heads=num_heads, k_dim=k_dim, v_dim=v_dim)
    channel_g = -jax.random.exponential(kg, (*case["g"].shape, k_dim)) * 0.3
    times = {}
    for label, g in (("head", channel_g.mean(-1)), ("channel", channel_g)):
      call = [case[n] for n in ("q", "k", "v")] + [g] + [case[n] for n in ("beta", "ssm", "cu", "q_lens", "starts")]
      times[label] = time_fn(rule_fn("xla", True, jnp.float32), *call, reps=reps, inner=1 if args.quick else None,
                             warm=True)
    print(f"{f'{num_heads}x{k_dim}x{v_dim}':<22} {case_name:<12} {times['head'] * 1e3:11.3f} "
          f"{times['channel'] * 1e3:14.3f} {times['channel'] / times['head']:5.2f}x", flush=True)


if __name__ == "__main__":
  main()
