"""Pallas (Triton backend) kernel for the linear attention layers' prefill: the gated delta rule (Qwen3.5,
Qwen3-Next) and Mamba-2's gated update (Granite 4.0-H) over a ragged batch of chunks, each sequence walked in one
program from its state slot, with no loop on the host.

Why a kernel. The XLA path (`models.gated_delta._delta_rule`) walks a chunk's pieces in a `lax.fori_loop` whose trip
count is known only on the device; on a GPU XLA runs such a loop from the host, reading its predicate back at every
piece of every linear layer (576 round trips for a 2,048-token chunk, 32 pieces, through 18 linear layers). Here the
loop over pieces runs inside each program.

Grid (S, H, Dv / block_v): sequence s, value head h, a block of the state's value columns. A program holds its
state S [Dk, block_v] in float32 and walks the sequence's new tokens in tiles of `chunk` rows aligned to absolute
positions (multiples of `chunk`, so that how the scheduler cut a prompt into chunks does not move a tile's edges).
A tile's rows outside the sequence (the first tile's rows before its start, the last tile's past its end) are masked:
g = beta = 0, k = q = v = 0, which leaves the state as it is. Within a tile the rule is solved in matrix form (the
WY representation; `models/gated_delta.py` derives it), with G the running sum of the decays g within the tile:

    L[i, j] = beta_i exp(G_i - G_j) k_i . k_j  (j < i),   T = (I + L)^-1          (forward substitution, c steps)
    W = T (beta exp(G) K),   U = T (beta V) - W S                                  (delta rule; Mamba-2: U = V)
    O = exp(G) Q S + (Q K^T * exp(G_i - G_j), j <= i) U
    S <- exp(G_last) S + (K * exp(G_last - G))^T U

Every exponent is <= 0 (g <= 0), so nothing overflows. The tile is small (16 rows by default) because the inverse
is a loop of `chunk` steps over [chunk, chunk] values on the vector units; the rest are dots.

A snapshot (the prefix cache's state at a page boundary, `snap[s]` tokens into the chunk) inside a tile is the same
sum stopped at the cut: exp(G_cut) S + (K * exp(G_cut - G), rows < cut)^T U, since the rows before the cut never
depend on the rows after it; no tile is split.

Inputs are read in place from the packed rows ([T, H, D] padded by one tile at each end; a tile's rows of a
neighbouring sequence are read and masked), and outputs written there with a masked store (`plgpu.store`), so that a
program writes its own sequence's rows only: the first and last tiles share rows with the neighbours' programs.

A program of a sequence with no new tokens here does nothing (its outputs are unspecified): the caller routes
decodes and drafted tokens elsewhere and keeps their states.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_kernel import next_pow2

NEG_INF = -1e30  # exp() of it is 0: the masked entries of a decay matrix


def _t_dot(a, b):
  """a^T b for a [c, m], b [c, n] -> [m, n] (float32 accumulation)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
  """a b^T for a [m, d], b [n, d] -> [m, n]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def unit_lower_inverse(l):
  """(I + L)^-1 for a strictly lower triangular L [c, c] float32, by forward substitution: row t of the inverse is
  e_t - sum_{j < t} L[t, j] row_j (rows of L past the diagonal are zero, so the rows not yet written add nothing)."""
  c = l.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c,), 0)

  def row(t, x):
    l_t = jnp.sum(jnp.where(rows == t, l, 0.0), axis=0)                  # [c]: L[t, j] by column j
    x_t = jnp.where(col == t, 1.0, 0.0) - jnp.sum(l_t[:, None] * x, axis=0)
    return jnp.where(rows == t, x_t[None, :], x)

  return lax.fori_loop(0, c, row, jnp.zeros((c, c), jnp.float32))


def _scan_kernel(
    row_ref,    # []  the sequence's first new token's row in the padded inputs
    off_ref,    # []  its absolute position modulo chunk: rows of the first tile before it
    len_ref,    # []  its new tokens here (0: the program does nothing)
    snap_ref,   # []  the snapshot's cut, in new tokens (0: none)
    q_ref,      # [Tp, Dk]
    k_ref,      # [Tp, Dk]
    v_ref,      # [Tp, block_v] (q's dtype)
    g_ref,      # [Tp] float32, <= 0
    beta_ref,   # [Tp] float32
    s0_ref,     # [Dk, block_v] float32: the state before the chunk
    o_ref,      # [Tp, block_v] float32: rows as q's
    final_ref,  # [Dk, block_v] float32: the state after the chunk
    snapped_ref,  # [Dk, block_v] float32: the state after the first snap tokens (s0 without a snapshot)
    *, chunk: int, delta: bool, dot_dtype):
  c = chunk
  n = len_ref[()]

  @pl.when(n > 0)
  def _():
    row0, off, snap = row_ref[()], off_ref[()], snap_ref[()]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    r = lax.broadcasted_iota(jnp.int32, (c,), 0)
    s0 = s0_ref[...].astype(jnp.float32)

    def tile(t, carry):
      s, snapped = carry
      src = row0 - off + t * c
      local = t * c + r - off                                             # [c]: index among the new tokens
      valid = (local >= 0) & (local < n)
      q = jnp.where(valid[:, None], q_ref[pl.ds(src, c), :], 0).astype(dot_dtype)     # [c, Dk]
      k = jnp.where(valid[:, None], k_ref[pl.ds(src, c), :], 0).astype(jnp.float32)   # [c, Dk]
      v = jnp.where(valid[:, None], v_ref[pl.ds(src, c), :], 0).astype(jnp.float32)   # [c, bv]
      g = jnp.where(valid, g_ref[pl.ds(src, c)], 0.0)
      beta = jnp.where(valid, beta_ref[pl.ds(src, c)], 0.0)
      gc = jnp.sum(jnp.where(cols <= rows, g[None, :], 0.0), axis=1)      # [c]: G, the decays' running sum
      decay = jnp.exp(jnp.where(cols <= rows, gc[:, None] - gc[None, :], NEG_INF))    # [c, c]
      kd = k.astype(dot_dtype)
      s_d = s.astype(dot_dtype)
      if delta:
        l = jnp.where(cols < rows, beta[:, None] * decay * _dot_t(kd, kd), 0.0)
        inv = unit_lower_inverse(l).astype(dot_dtype)
        w = _dot(inv, (k * (beta * jnp.exp(gc))[:, None]).astype(dot_dtype))         # [c, Dk]
        u = _dot(inv, (v * beta[:, None]).astype(dot_dtype)) - _dot(w.astype(dot_dtype), s_d)  # [c, bv]
      else:
        u = v
      u_d = u.astype(dot_dtype)
      qk = (_dot_t(q, kd) * decay).astype(dot_dtype)
      o = jnp.exp(gc)[:, None] * _dot(q, s_d) + _dot(qk, u_d)
      plgpu.store(o_ref.at[pl.ds(src, c), :], o, mask=valid[:, None])

      def state_at(cut):  # the state after the tile's first `cut` rows
        g_cut = jnp.sum(jnp.where(r == cut - 1, gc, 0.0))
        weight = jnp.where(r < cut, jnp.exp(g_cut - gc), 0.0)
        return jnp.exp(g_cut) * s + _t_dot((k * weight[:, None]).astype(dot_dtype), u_d)

      cut = snap + off - t * c
      snapped = jnp.where((snap > 0) & (cut > 0) & (cut <= c), state_at(cut), snapped)
      return state_at(c), snapped

    num_tiles = lax.div(off + n + c - 1, c)
    s, snapped = lax.fori_loop(0, num_tiles, tile, (s0, s0))
    final_ref[...] = s
    snapped_ref[...] = snapped


def gated_delta_chunks(q, k, v, g, beta, s0, cu_q_lens, q_lens, starts, snap, *, delta: bool = True,
                       chunk: int = 16, block_v: int | None = None, num_warps: int = 4, num_stages: int = 1,
                       interpret: bool = False):
  """The gated delta rule (delta=False: the plain gated update) over each sequence's new tokens.

  q, k [T, H, Dk], v [T, H, Dv], g, beta [T, H] float32 (g <= 0); s0 [S, H, Dk, Dv] float32, each sequence's state
  before its tokens; sequence s's q_lens[s] tokens are rows cu_q_lens[s]... (q_lens 0: not here), the first at
  absolute position starts[s]; snap [S]: a snapshot after that many of them (0: none).
  Returns (o [T, H, Dv] float32, final [S, H, Dk, Dv], snapped [S, H, Dk, Dv]); rows and states of sequences with
  q_len 0 are unspecified, and snapped is s0 where snap is 0. Dots take q's dtype (bfloat16 on a GPU), the state and
  its updates stay float32."""
  c = chunk
  num_tokens, num_heads, k_dim = q.shape
  v_dim = v.shape[-1]
  num_seqs = s0.shape[0]
  kp, vp = max(16, next_pow2(k_dim)), max(16, next_pow2(v_dim))
  block_v = min(vp, block_v or 32)
  dot_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype

  # One tile of padding at each end (the first and last tiles read past the rows), widths to powers of two.
  def padded(a, width=None):
    widths = [(c, c)] + [(0, 0)] * (a.ndim - 1)
    if width:
      widths[-1] = (0, width - a.shape[-1])
    return jnp.pad(a, widths)

  qp, kp_ = padded(q, kp), padded(k, kp)
  vpad = padded(v, vp)
  gp, bp = padded(g.astype(jnp.float32)), padded(beta.astype(jnp.float32))
  s0p = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, kp - k_dim), (0, vp - v_dim)))

  q_lens = jnp.maximum(q_lens, 0).astype(jnp.int32)
  off = (starts % c).astype(jnp.int32)
  row0 = (cu_q_lens[:-1] + c).astype(jnp.int32)

  scalar = pl.BlockSpec((None,), lambda s, h, j: (s,))
  rows_spec = lambda width: pl.BlockSpec((num_tokens + 2 * c, None, width), lambda s, h, j: (0, h, 0))  # noqa: E731
  head_spec = pl.BlockSpec((num_tokens + 2 * c, None), lambda s, h, j: (0, h))
  state_spec = pl.BlockSpec((None, None, kp, block_v), lambda s, h, j: (s, h, 0, j))
  kernel = functools.partial(_scan_kernel, chunk=c, delta=delta, dot_dtype=dot_dtype)
  o, final, snapped = pl.pallas_call(
      kernel,
      grid=(num_seqs, num_heads, vp // block_v),
      in_specs=[scalar] * 4 + [rows_spec(kp), rows_spec(kp),
                               pl.BlockSpec((num_tokens + 2 * c, None, block_v), lambda s, h, j: (0, h, j)),
                               head_spec, head_spec, state_spec],
      out_specs=[pl.BlockSpec((num_tokens + 2 * c, None, block_v), lambda s, h, j: (0, h, j)), state_spec,
                 state_spec],
      out_shape=[jax.ShapeDtypeStruct((num_tokens + 2 * c, num_heads, vp), jnp.float32),
                 jax.ShapeDtypeStruct(s0p.shape, jnp.float32), jax.ShapeDtypeStruct(s0p.shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="gated_delta_chunks",
  )(row0, off, q_lens, snap.astype(jnp.int32), qp, kp_, vpad, gp, bp, s0p)
  return o[c : c + num_tokens, :, :v_dim], final[:, :, :k_dim, :v_dim], snapped[:, :, :k_dim, :v_dim]
