"""Gated DeltaNet layers (Qwen3.5, Qwen3-Next): linear attention over a recurrent state instead of a KV cache.

A layer projects each token to q, k (linear_num_key_heads x linear_key_head_dim), v (linear_num_value_heads x
linear_value_head_dim), an output gate z, and per value head a write strength beta and a decay g. q, k and v first go
through a causal depthwise convolution over the last `linear_conv_kernel` tokens. Each value head keeps a state
S [Dk, Dv], updated by the gated delta rule:

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t

(q and k unit length, q scaled by Dk^-1/2), then o is RMS-normed per head, multiplied by silu(z) and projected out.

A sequence's memory is therefore two arrays per layer, whatever its length: the convolution's last K - 1 inputs
and S per value head. The engine keeps them in state slots (`States`), one per running sequence, stacked over the
linear layers like the KV cache over the attention layers; a step reads and writes each sequence's slot.

Two ways through a ragged batch (`mix`), both exact:
- a sequence with one new token (a decode) takes the rule's single step, every such sequence at once;
- a longer chunk goes through in pieces of `CHUNK` tokens, aligned to absolute positions that are multiples of
  CHUNK, one piece after another (`lax.while_loop`: as many iterations as there are pieces). Within a piece the rule
  is solved in matrix form (the WY representation of the gated delta rule): with G the decays' running sum from the
  piece's start and the strictly lower triangle A[i, j] = beta_i exp(G_i - G_j) k_i . k_j,
      (I + A) U = beta (V - exp(G) K S0)                      (a unit lower triangular solve)
      O = exp(G) Q S0 + (Q K^T * exp(G_i - G_j), j <= i) U
      S = exp(G_last) S0 + sum_i exp(G_last - G_i) k_i u_i^T
  which is the token-by-token rule (`recurrent_reference`) reassociated: matrix products instead of a loop. On the
  Pallas backends the same form runs inside a kernel (`pallas_kernels/linear_scan.py`: a program per sequence and
  value head walks its tiles of 16 tokens), which leaves a GPU no loop to drive from the host.

A sequence may also ask for a snapshot of its state after its first n new tokens (`Batch.snapshot_offsets`: the
prefix cache's, engine.state_snapshots): the chunk's pieces are cut there too, and the state (and the convolution's
inputs) at that point written to a second slot.

Mamba-2 layers (Granite 4.0-H; cfg.linear_kind "mamba2") are the same machinery without the delta: per head,

    S <- exp(dt_t A) S;   S <- S + B_t (dt_t x_t)^T;   y_t = S^T C_t + D x_t

with dt_t = softplus(dt_raw + dt_bias) (clamped to linear_dt_limit, if any), A = -exp(A_log), and B, C shared by the
heads of a group. So q = C, k = B, v = dt x, g = dt A, and the update writes v unchanged (u_t = v_t: no triangular
solve in the matrix form, `delta=False`). Its convolution runs over x, B and C (with a bias); y goes through an RMS
norm per group of the inner width after the silu(z) gate (transformers' GraniteMoeHybridRMSNormGated), then out.

Kimi Delta Attention layers (Kimi Linear; cfg.linear_kind "kda") are the gated delta rule with a decay per key
channel: g_t [H, Dk] = -exp(A_log) softplus(f_b f_a h_t + dt_bias), S <- diag(exp(g_t)) S before the read, as many key
heads as value heads; q, k, v from one projection (the checkpoint's three, joined at load) through the convolution,
the output RMS-normed per head and multiplied by sigmoid(g_b g_a h). The matrix form takes exp(G_i - G_j) per channel
inside each dot (`_channel_chunk_rule`); it runs in XLA on every backend.

LFM2's short convolution layers (cfg.linear_kind "short_conv") are the convolution alone: one projection gives B, C
and x (each hidden_size wide), the causal depthwise convolution (no activation) runs over B x, and C times its output
is projected out. Their state is the convolution's last inputs; the ssm state has no elements.

Everything here runs in float32, and both states are kept in float32.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig
from pallas_kernels.reference import bucket_of

CHUNK = 64  # tokens per piece of a prefill chunk (the matrix form's block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class States:
    """Every linear layer's recurrent state, by state slot, float32: conv [Lg, N, K - 1, conv_dim] (the convolution's
    last inputs, oldest first) and ssm [Lg, N, Hv, Dk, Dv]."""

    conv: jax.Array
    ssm: jax.Array


def state_shapes(cfg: LlamaConfig, num_slots: int) -> States:
    """The shape of each state array for `num_slots` slots."""
    lg = sum(cfg.linear_layers)
    return States(conv=(lg, num_slots, cfg.linear_conv_kernel - 1, cfg.linear_conv_dim),
                  ssm=(lg, num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim))


def conv_sections(cfg: LlamaConfig) -> tuple[int, int, int]:
    """The widths of what the convolution mixes, in its channel order: (q, k, v) for Gated DeltaNet, (x, B, C) for
    Mamba-2 (`mix` slices them in this order)."""
    key, value = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_value_dim
    return (value, key, key) if cfg.linear_kind == "mamba2" else (key, key, value)


def state_bytes_per_slot(cfg: LlamaConfig) -> int:
    """Bytes one state slot takes over every linear layer."""
    shapes = state_shapes(cfg, 1)
    return 4 * (math.prod(shapes.conv) + math.prod(shapes.ssm))


def allocate(cfg: LlamaConfig, num_slots: int) -> States:
    shapes = state_shapes(cfg, num_slots)
    return States(conv=jnp.zeros(shapes.conv, jnp.float32), ssm=jnp.zeros(shapes.ssm, jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Where each sequence's tokens are in a ragged batch (the fields of `llama.ModelInputs` this needs)."""

    cu_q_lens: jax.Array  # [S + 1] int32 (padded with the total past num_seqs)
    kv_lens: jax.Array  # [S] int32: each sequence's length after this step
    num_seqs: jax.Array  # [1] int32
    slots: jax.Array  # [S] int32: each sequence's state slot
    # A snapshot of a sequence's state after its first `snapshot_offsets[s]` new tokens (0: none), written to slot
    # `snapshot_slots[s]` as well (the prefix cache's states at page boundaries: engine.state_snapshots)
    snapshot_offsets: jax.Array | None = None  # [S] int32
    snapshot_slots: jax.Array | None = None  # [S] int32
    # Speculative decoding: slot j of a sequence's row takes its state after its first j + 1 new tokens (its real token
    # and j drafts; out of range: none), so a rejected draft's state can be put back (engine/speculative.py). A
    # sequence with such slots goes through the rule token by token (K + 1 steps written out), not in pieces.
    draft_slots: jax.Array | None = None  # [S, K] int32
    # Static: a step of decodes, every sequence with one new token or a real token and its drafts (draft_slots), so
    # only the rule's single steps are compiled: no piece loop, whose trip count a GPU reads back to the host at every
    # linear layer even when it is zero.
    decode_step: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static: the attention backend; on the Pallas ones a prefill chunk goes through `pallas_kernels.linear_scan`
    # (each sequence's pieces walked inside one program) instead of the XLA piece loop.
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))


def one_sequence(num_tokens: int) -> Batch:
    """A batch of one sequence from position 0 in slot 0 (the dense reference)."""
    return Batch(cu_q_lens=jnp.asarray([0, num_tokens], jnp.int32), kv_lens=jnp.asarray([num_tokens], jnp.int32),
                 num_seqs=jnp.ones((1,), jnp.int32), slots=jnp.zeros((1,), jnp.int32))


def _l2norm(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def mix(cfg: LlamaConfig, p: dict, h: jax.Array, states: States, layer, batch: Batch, proj) -> tuple[jax.Array, States]:
    """One Gated DeltaNet layer's token mixing: h [T, hidden] (normed) -> (out [T, hidden], states), linear layer
    `layer`'s states read at each sequence's slot (zero for a sequence starting at position 0) and written back.
    The stacked arrays are indexed [layer, slot] in place: slicing out a layer's [N, ...] would copy every slot's
    state, snapshots included, at every layer. `proj(h, name)`: the layer's projection `name` applied to h."""
    conv_state, ssm_state = states.conv, states.ssm
    t = h.shape[0]
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, kw = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
    cu, num = batch.cu_q_lens, batch.num_seqs[0]
    s_count = batch.kv_lens.shape[0]
    q_lens = cu[1:] - cu[:-1]  # [S]; 0 past num_seqs
    starts = batch.kv_lens - q_lens
    live = jnp.arange(s_count) < num
    fresh = starts == 0
    rows = jnp.arange(t, dtype=jnp.int32)
    seq_of_row = jnp.clip(bucket_of(cu[1:], rows), 0, s_count - 1)
    local = rows - cu[seq_of_row]  # each row's index among its sequence's new tokens

    # The causal depthwise convolution, its first K - 1 inputs from the sequence's conv state.
    short = cfg.linear_kind == "short_conv"
    x = proj(h, "gdn_qkv")  # [T, conv_dim] (LFM2's: [T, 3 x hidden], B, C and x; B x is convolved)
    if short:
        b_in, c_out, x = jnp.split(x, 3, axis=-1)
        x = b_in * x
    prev = jnp.where(fresh[:, None, None], 0, conv_state[layer, batch.slots]).astype(x.dtype)  # [S, K - 1, conv_dim]
    w = p["gdn_conv"].astype(jnp.float32)  # [K, conv_dim]
    acc = jnp.zeros(x.shape, jnp.float32) + (p["gdn_conv_bias"].astype(jnp.float32) if cfg.linear_conv_bias else 0.0)
    for o in range(kw):
        rel = local - (kw - 1) + o  # the input's index among the sequence's new tokens (< 0: from the state)
        val = jnp.where((rel >= 0)[:, None], x[jnp.clip(rows - (kw - 1) + o, 0, t - 1)],
                        prev[seq_of_row, jnp.clip(kw - 1 + rel, 0, kw - 2)])
        acc = acc + val.astype(jnp.float32) * w[o]
    mixed = (acc if short else jax.nn.silu(acc)).astype(x.dtype)

    def conv_after(n):
        """Each sequence's conv state after its first n [S] new tokens: the last K - 1 of (its state, those inputs)."""
        c = n[:, None] + jnp.arange(kw - 1)[None, :]  # [S, K - 1] indices into that concatenation
        return jnp.where((c < kw - 1)[..., None], prev[jnp.arange(s_count)[:, None], jnp.clip(c, 0, kw - 2)],
                         x[jnp.clip(cu[:-1, None] + c - (kw - 1), 0, t - 1)]).astype(conv_state.dtype)

    n_slots = conv_state.shape[1]
    conv_state = conv_state.at[layer, jnp.where(live, batch.slots, n_slots)].set(conv_after(q_lens), mode="drop")
    drafted = None
    if batch.draft_slots is not None:
        drafted = live & (q_lens > 1) & (batch.draft_slots[:, 0] < n_slots)
        for j in range(batch.draft_slots.shape[1]):  # the state after the first j + 1 tokens, the last one's excepted
            keep = drafted & (j + 1 < q_lens)
            conv_state = conv_state.at[layer, jnp.where(keep, batch.draft_slots[:, j], n_slots)].set(
                conv_after(jnp.full_like(q_lens, j + 1)), mode="drop")
    snap = jnp.zeros_like(q_lens) if batch.snapshot_offsets is None else jnp.where(live, batch.snapshot_offsets, 0)
    snap_slots = jnp.where(snap > 0, batch.slots if batch.snapshot_slots is None else batch.snapshot_slots, n_slots)
    if batch.snapshot_offsets is not None:
        conv_state = conv_state.at[layer, snap_slots].set(conv_after(snap), mode="drop")
    if short:  # LFM2: C times the convolution, projected out; no recurrent state beyond the convolution's
        return proj(c_out * mixed, "gdn_out"), States(conv_state, ssm_state)

    key_dim, mamba, kda = hk * dk, cfg.linear_kind == "mamba2", cfg.linear_kind == "kda"
    if kda:  # a decay per key channel, from a low-rank projection: -exp(A_log) softplus(f_b f_a h + dt_bias)
        rate = jax.nn.softplus(proj(proj(h, "gdn_fa"), "gdn_fb").astype(jnp.float32).reshape(t, hk, dk)
                               + p["gdn_dt_bias"].astype(jnp.float32).reshape(hk, dk))  # [T, H, Dk]
        g = -jnp.exp(p["gdn_a_log"].astype(jnp.float32))[:, None] * rate
    else:
        rate = jax.nn.softplus(proj(h, "gdn_a").astype(jnp.float32) + p["gdn_dt_bias"].astype(jnp.float32))  # [T, Hv]
        if cfg.linear_dt_limit:  # (Mamba-2's only)
            rate = jnp.clip(rate, *cfg.linear_dt_limit)
        g = -jnp.exp(p["gdn_a_log"].astype(jnp.float32)) * rate
    if mamba:  # x, B, C: q = C, k = B, v = dt x, written as they are (module docstring)
        xs = mixed[:, : hv * dv].reshape(t, hv, dv).astype(jnp.float32)
        k = mixed[:, hv * dv : hv * dv + key_dim].reshape(t, hk, dk).astype(jnp.float32)
        q = mixed[:, hv * dv + key_dim :].reshape(t, hk, dk).astype(jnp.float32)
        v, beta = xs * rate[..., None], jnp.ones_like(rate)
    else:
        q = _l2norm(mixed[:, :key_dim].reshape(t, hk, dk).astype(jnp.float32)) * dk**-0.5
        k = _l2norm(mixed[:, key_dim : 2 * key_dim].reshape(t, hk, dk).astype(jnp.float32))
        v = mixed[:, 2 * key_dim :].reshape(t, hv, dv).astype(jnp.float32)
        beta = jax.nn.sigmoid(proj(h, "gdn_b").astype(jnp.float32))  # [T, Hv]
    q, k = jnp.repeat(q, hv // hk, axis=1), jnp.repeat(k, hv // hk, axis=1)  # each key head serves hv / hk value heads

    out, ssm_state = _delta_rule(q, k, v, g, beta, ssm_state, layer, cu, q_lens, starts, fresh, live, batch.slots,
                                 snap, snap_slots, delta=not mamba, decode_step=batch.decode_step,
                                 drafted=drafted, draft_slots=batch.draft_slots, backend=batch.backend,
                                 seq_of_row=seq_of_row,
                                 dot_dtype=h.dtype)

    if kda:  # RMS norm per head (float32 weight), times sigmoid of a low-rank gate per channel, projected out
        gate = proj(proj(h, "gdn_ga"), "gdn_gb").astype(jnp.float32).reshape(t, hv, dv)
        normed = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        normed = normed * p["gdn_norm"].astype(jnp.float32) * jax.nn.sigmoid(gate)
        return proj(normed.astype(h.dtype).reshape(t, hv * dv), "gdn_out"), States(conv_state, ssm_state)
    z = proj(h, "gdn_z").astype(jnp.float32)
    if mamba:  # the skip, then silu(z), then an RMS norm per group of the inner width, projected out
        y = (out + p["gdn_d"].astype(jnp.float32)[:, None] * xs).reshape(t, hv * dv) * jax.nn.silu(z)
        y = y.reshape(t, hk, -1)
        y = (y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + cfg.rms_norm_eps)).reshape(t, hv * dv)
        normed = p["gdn_norm"].astype(jnp.float32) * y
    else:  # RMS norm per head (weight in the model's dtype, as transformers), times silu(z), projected out
        normed = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        normed = (normed.astype(h.dtype) * p["gdn_norm"]).astype(jnp.float32) * jax.nn.silu(z.reshape(t, hv, dv))
    return proj(normed.astype(h.dtype).reshape(t, hv * dv), "gdn_out"), States(conv_state, ssm_state)


def _delta_rule(q, k, v, g, beta, ssm, layer, cu, q_lens, starts, fresh, live, slots, snap, snap_slots, *,
                delta: bool = True, decode_step: bool = False, drafted=None, draft_slots=None, backend: str = "xla",
                dot_dtype=jnp.float32, seq_of_row=None):
    """The gated delta rule over a ragged batch: q, k [T, Hv, Dk], v [T, Hv, Dv], g, beta [T, Hv] float32; ssm
    [Lg, N, Hv, Dk, Dv] the states by layer and slot; the state after each sequence's first snap [S] tokens also
    written to snap_slots [S] (out of range: none). Returns (o [T, Hv, Dv], ssm). delta=False: the plain gated
    update (Mamba-2's), which writes v itself (beta unused). drafted [S] (or None): the sequences whose tokens go
    through the rule one at a time (a real token and its drafts, at most K + 1 for draft_slots [S, K]), each state
    after the first j + 1 of them (but the last) written to draft_slots[:, j]. decode_step (static): every sequence has
    one new token or is drafted, so the chunk path is left out. backend (static): "pallas" / "pallas_interpret" run
    the chunks through `pallas_kernels.linear_scan` instead of the piece loop, its dots on q, k, v in dot_dtype (the
    model's: bfloat16 on a GPU; the states stay float32), which puts its rows back by seq_of_row [T] (each row's
    sequence).

    The batch's states are gathered once ([S, ...]) and scattered back once: the piece loop carries only those (a
    loop that carried `ssm` itself would copy every slot's state at every piece)."""
    t, n_slots = q.shape[0], ssm.shape[1]
    s0 = jnp.where(fresh[:, None, None, None], 0.0, ssm[layer, slots])  # [S, Hv, Dk, Dv]

    def step(s, j):
        """Every sequence's state after its token j [S, Hv, Dk, Dv] from s, and that token's output [S, Hv, Dv]."""
        r = jnp.clip(cu[:-1] + j, 0, t - 1)
        s = _decayed(s, g[r])
        u = beta[r][..., None] * (v[r] - jnp.einsum("shkv,shk->shv", s, k[r])) if delta else v[r]
        s = s + k[r][..., None] * u[:, :, None, :]
        return s, jnp.einsum("shkv,shk->shv", s, q[r]), r

    # Decodes: one token each, every such sequence in one step.
    one = live & (q_lens == 1)
    first = step(s0, 0)  # every sequence's first token: the decodes' only one, the drafted sequences' real one
    s1, o_dec, r = first
    out = jnp.zeros(v.shape, jnp.float32).at[jnp.where(one, r, t)].set(o_dec, mode="drop")
    if drafted is not None:  # a real token and its drafts, token by token: the state after each kept
        s_draft = s0
        for j in range(draft_slots.shape[1] + 1):
            active = drafted & (j < q_lens)
            s_next, o_j, r = first if j == 0 else step(s_draft, j)
            s_draft = jnp.where(active[:, None, None, None], s_next, s_draft)
            out = out.at[jnp.where(active, r, t)].set(o_j, mode="drop")
            if j < draft_slots.shape[1]:
                ssm = ssm.at[layer, jnp.where(active & (j + 1 < q_lens), draft_slots[:, j], n_slots)].set(
                    s_next, mode="drop")
            ssm = ssm.at[layer, jnp.where(active & (snap == j + 1), snap_slots, n_slots)].set(s_next, mode="drop")
        ssm = ssm.at[layer, jnp.where(drafted, slots, n_slots)].set(s_draft, mode="drop")
    longer = live & (q_lens > 1) & (True if drafted is None else ~drafted)
    if decode_step:  # no longer chunks
        return out, _write_states(ssm, layer, one, jnp.zeros_like(one), s1, s1, s1, slots, snap, snap_slots)
    if backend in ("pallas", "pallas_interpret") and g.ndim == 2:  # each sequence's pieces walked in one program
        from pallas_kernels import linear_scan

        o_long, cur, snapped = linear_scan.gated_delta_chunks(
            *(a.astype(dot_dtype) for a in (q, k, v)), g, beta, s0, cu, jnp.where(longer, q_lens, 0), starts,
            jnp.where(longer, snap, 0), delta=delta, interpret=backend == "pallas_interpret")
        out = jnp.where(longer[seq_of_row][:, None, None], o_long, out)
        return out, _write_states(ssm, layer, one, longer, s1, cur, snapped, slots, snap, snap_slots)

    # Longer chunks: pieces of up to CHUNK tokens aligned to absolute positions, one after another, over two segments
    # per sequence (2s: its first snap tokens, 2s + 1: the rest), so that a piece ends where a snapshot is taken.
    c = CHUNK
    seg_lens = jnp.where(longer[:, None], jnp.stack([snap, q_lens - snap], axis=1), 0).reshape(-1)  # [2S]
    seg_offsets = jnp.stack([jnp.zeros_like(snap), snap], axis=1).reshape(-1)
    seg_seq = jnp.repeat(jnp.arange(q_lens.shape[0]), 2)
    first = jnp.minimum(seg_lens, c - (starts[seg_seq] + seg_offsets) % c)
    pieces = jnp.where(seg_lens > 0, 1 + (seg_lens - first + c - 1) // c, 0)
    ends = jnp.cumsum(pieces)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((c,) + a.shape[1:], a.dtype)])  # noqa: E731 (slices stay in range)
    q, k, v, g, beta, out = map(pad, (q, k, v, g, beta, out))

    def piece(i, carry):
        out, cur, snapped = carry  # cur, snapped [S, Hv, Dk, Dv]: each sequence's state so far, and at its snapshot
        seg = bucket_of(ends, i)
        s = seg_seq[seg]
        nth = i - (ends[seg] - pieces[seg])
        within = jnp.where(nth == 0, 0, first[seg] + (nth - 1) * c)
        length = jnp.where(nth == 0, first[seg], jnp.minimum(c, seg_lens[seg] - within))
        offset = seg_offsets[seg] + within
        row0 = cu[s] + offset
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, row0, c)  # noqa: E731
        o, s_last = chunk_rule(take(q), take(k), take(v), take(g), take(beta),
                               jax.lax.dynamic_index_in_dim(cur, s, keepdims=False), jnp.arange(c) < length, delta=delta)
        mask = (jnp.arange(c) < length)[:, None, None]
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask, o, take(out)), row0, 0)
        at_snapshot = (seg % 2 == 0) & (offset + length == snap[s])  # the last piece of the first segment
        kept = jnp.where(at_snapshot, s_last, jax.lax.dynamic_index_in_dim(snapped, s, keepdims=False))
        return (out, jax.lax.dynamic_update_index_in_dim(cur, s_last, s, 0),
                jax.lax.dynamic_update_index_in_dim(snapped, kept, s, 0))

    out, cur, snapped = jax.lax.fori_loop(0, ends[-1], piece, (out, s0, s0))
    return out[:t], _write_states(ssm, layer, one, longer, s1, cur, snapped, slots, snap, snap_slots)


def _write_states(ssm, layer, one, longer, s1, cur, snapped, slots, snap, snap_slots):
    """ssm with each sequence's state after the step written to its slot, and at its snapshot to the snapshot's:
    s1 [S, ...] for the decodes (`one`), cur and snapped for the `longer` chunks."""
    n_slots = ssm.shape[1]
    final = jnp.where(one[:, None, None, None], s1, cur)
    ssm = ssm.at[layer, jnp.where(one | longer, slots, n_slots)].set(final, mode="drop")
    at = jnp.where(one[:, None, None, None], s1, snapped)
    return ssm.at[layer, jnp.where((one | longer) & (snap > 0), snap_slots, n_slots)].set(at, mode="drop")


def chunk_rule(q, k, v, g, beta, s0, valid, *, delta: bool = True):
    """The gated delta rule over one piece of C tokens from state s0 [H, Dk, Dv] in matrix form: q, k [C, H, Dk],
    v [C, H, Dv], g, beta [C, H]; rows not `valid` [C] change nothing. Returns (o [C, H, Dv], final state).
    delta=False: the plain gated update, U = V (Mamba-2's state space duality)."""
    if g.ndim == 3:
        return _channel_chunk_rule(q, k, v, g, beta, s0, valid)
    c = q.shape[0]
    g = jnp.where(valid[:, None], g, 0.0).T  # [H, C]
    beta = jnp.where(valid[:, None], beta, 0.0).T
    k = jnp.where(valid[:, None, None], k, 0.0)
    gc = jnp.cumsum(g, axis=-1)  # [H, C]
    i, j = np.arange(c)[:, None], np.arange(c)[None, :]
    decay = jnp.exp(jnp.where(j <= i, gc[:, :, None] - gc[:, None, :], -jnp.inf))  # [H, C, C]: exp(G_i - G_j), j <= i
    if delta:
        kk = jnp.einsum("ihd,jhd->hij", k, k)
        a = jnp.where(j < i, beta[:, :, None] * decay * kk, 0.0)
        rhs = beta[:, :, None] * (jnp.swapaxes(v, 0, 1) - jnp.exp(gc)[:, :, None] * jnp.einsum("ihd,hde->hie", k, s0))
        u = jax.scipy.linalg.solve_triangular(a + jnp.eye(c), rhs, lower=True, unit_diagonal=True)  # [H, C, Dv]
    else:
        u = jnp.swapaxes(jnp.where(valid[:, None, None], v, 0.0), 0, 1)
    qk = jnp.einsum("ihd,jhd->hij", q, k) * decay
    o = jnp.exp(gc)[:, :, None] * jnp.einsum("ihd,hde->hie", q, s0) + jnp.einsum("hij,hje->hie", qk, u)
    last = gc[:, -1]
    s = jnp.exp(last)[:, None, None] * s0 + jnp.einsum("hi,ihd,hie->hde", jnp.exp(last[:, None] - gc), k, u)
    return jnp.swapaxes(o, 0, 1), s


def _decayed(s, g):
    """States s [..., H, Dk, Dv] times exp(g): g [..., H], a decay per head, or [..., H, Dk], one per key channel
    (Kimi Delta Attention's)."""
    e = jnp.exp(g)
    return s * (e[..., None] if e.ndim == s.ndim - 1 else e[..., None, None])


def _channel_chunk_rule(q, k, v, g, beta, s0, valid):
    """`chunk_rule` with a decay per key channel, g [C, H, Dk] (Kimi Delta Attention): the same matrix form with
    exp(G_i - G_j) inside each dot over the key channels. Each pair's decay is taken from its own difference of running
    sums ([H, C, C, Dk], every exponent <= 0), never as exp(G_i) times exp(-G_j), which overflows float32 for a
    channel that decays fast."""
    c = q.shape[0]
    g = jnp.swapaxes(jnp.where(valid[:, None, None], g, 0.0), 0, 1)  # [H, C, Dk]
    beta = jnp.where(valid[:, None], beta, 0.0).T  # [H, C]
    k = jnp.swapaxes(jnp.where(valid[:, None, None], k, 0.0), 0, 1)  # [H, C, Dk]
    q = jnp.swapaxes(q, 0, 1)
    gc = jnp.cumsum(g, axis=1)
    i, j = np.arange(c)[:, None], np.arange(c)[None, :]
    decay = jnp.exp(jnp.where((j <= i)[None, :, :, None], gc[:, :, None, :] - gc[:, None, :, :], -jnp.inf))
    kk = jnp.einsum("hid,hjd,hijd->hij", k, k, decay)
    a = jnp.where(j < i, beta[:, :, None] * kk, 0.0)
    rhs = beta[:, :, None] * (jnp.swapaxes(v, 0, 1) - jnp.einsum("hid,hde->hie", jnp.exp(gc) * k, s0))
    u = jax.scipy.linalg.solve_triangular(a + jnp.eye(c), rhs, lower=True, unit_diagonal=True)  # [H, C, Dv]
    qk = jnp.einsum("hid,hjd,hijd->hij", q, k, decay)
    o = jnp.einsum("hid,hde->hie", jnp.exp(gc) * q, s0) + jnp.einsum("hij,hje->hie", qk, u)
    last = gc[:, -1]  # [H, Dk]
    s = jnp.exp(last)[:, :, None] * s0 + jnp.einsum("hid,hie->hde", jnp.exp(last[:, None, :] - gc) * k, u)
    return jnp.swapaxes(o, 0, 1), s


def recurrent_reference(q, k, v, g, beta, s0, *, delta: bool = True):
    """The rule token by token (the definition, for tests): q, k [T, H, Dk], v [T, H, Dv], g [T, H] (or [T, H, Dk]: a
    decay per key channel, KDA's), beta [T, H], s0 [H, Dk, Dv] -> (o [T, H, Dv], final state). delta=False: the plain
    gated update."""

    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        s = _decayed(s, gt)
        u = bt[:, None] * (vt - jnp.einsum("hkv,hk->hv", s, kt)) if delta else vt
        s = s + kt[:, :, None] * u[:, None, :]
        return s, jnp.einsum("hkv,hk->hv", s, qt)

    s, o = jax.lax.scan(step, s0, (q, k, v, g, beta))
    return o, s
