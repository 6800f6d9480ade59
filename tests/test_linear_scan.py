"""The linear attention prefill kernel (pallas_kernels/linear_scan.py, interpret mode) against the rule token by
token in float64 numpy, on fresh random ragged batches: sequences with no new tokens, one, and many tiles; starts
not aligned to tiles; snapshots inside a tile, at a tile's end and at the chunk's end; padding rows and padded
sequence slots; widths that are not powers of two; the gated delta rule (Qwen3.5) and Mamba-2's update."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_scan
import fresh


def _rule_f64(q, k, v, g, beta, s0, delta):
    """The definition, one token at a time in float64: -> (o [n, H, Dv], state after each token [n, H, Dk, Dv])."""
    s, outs, states = s0.astype(np.float64), [], []
    for t in range(q.shape[0]):
        s = s * np.exp(g[t])[:, None, None]
        u = beta[t][:, None] * (v[t] - np.einsum("hkv,hk->hv", s, k[t])) if delta else v[t]
        s = s + k[t][:, :, None] * u[:, None, :]
        outs.append(np.einsum("hkv,hk->hv", s, q[t]))
        states.append(s)
    return np.asarray(outs).reshape(-1, *v.shape[1:]), np.asarray(states).reshape(-1, *s0.shape)


def _random_batch(rng, num_heads, k_dim, v_dim, chunk):
    """A ragged batch as the model hands it over: q, k unit rows (Mamba-2's B and C are not, but this scale suits
    both), decays g <= 0, write strengths beta in [0, 1]; lengths 0 (not here), 1, under a tile and over several."""
    lens = [int(rng.choice([0, 1, rng.integers(2, chunk), rng.integers(chunk, 5 * chunk)])) for _ in range(5)]
    lens[rng.integers(5)] = int(rng.integers(2 * chunk, 6 * chunk))  # at least one long chunk
    starts = [int(rng.integers(0, 3 * chunk)) for _ in lens]
    snaps = []
    for start, n in zip(starts, lens):
        cuts = [0, n] + ([int(rng.integers(1, n + 1))] if n else [])
        edge = chunk - start % chunk  # the end of the first tile
        cuts += [edge] if edge <= n else []
        snaps.append(int(rng.choice(cuts)) if n else 0)
    num_tokens = sum(lens) + int(rng.integers(0, 9))  # padding rows past the last sequence
    pad_seqs = int(rng.integers(0, 3))  # sequence slots past num_seqs, as the runner pads them
    cu = np.concatenate([[0], np.cumsum(lens), [sum(lens)] * pad_seqs]).astype(np.int32)
    lens, starts, snaps = lens + [0] * pad_seqs, starts + [0] * pad_seqs, snaps + [0] * pad_seqs
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((num_tokens, num_heads, k_dim))) * k_dim**-0.5
    k = unit(rng.standard_normal((num_tokens, num_heads, k_dim)))
    v = rng.standard_normal((num_tokens, num_heads, v_dim))
    g = -rng.exponential(0.3, (num_tokens, num_heads))
    beta = rng.uniform(0, 1, (num_tokens, num_heads))
    s0 = rng.standard_normal((len(lens), num_heads, k_dim, v_dim)) * 0.5
    return (q, k, v, g, beta, s0), cu, np.asarray(lens, np.int32), np.asarray(starts, np.int32), np.asarray(snaps, np.int32)


def check_kernel(rng, num_heads, k_dim, v_dim, chunk, delta, dtype, tol, interpret=True, **tiles):
    """The kernel on a fresh random batch against the rule in float64 (tests/test_kernels_gpu.py: compiled)."""
    inputs, cu, lens, starts, snaps = _random_batch(rng, num_heads, k_dim, v_dim, chunk)
    q, k, v, g, beta, s0 = inputs
    run = jax.jit(functools.partial(linear_scan.gated_delta_chunks, delta=delta, chunk=chunk, interpret=interpret,
                                    **tiles))
    o, final, snapped = run(*(jnp.asarray(a, dtype) for a in (q, k, v)), *(jnp.asarray(a, jnp.float32)
                            for a in (g, beta, s0)), *map(jnp.asarray, (cu, lens, starts, snaps)))
    o, final, snapped = (np.asarray(a, np.float64) for a in (o, final, snapped))
    # the reference sees the inputs as the kernel does (rounded to dtype)
    q, k, v = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (q, k, v))
    g, beta, s0 = (np.asarray(np.float32(a), np.float64) for a in (g, beta, s0))
    for s, n in enumerate(lens):
        if not n:
            continue
        rows = slice(cu[s], cu[s] + n)
        want_o, want_s = _rule_f64(q[rows], k[rows], v[rows], g[rows], beta[rows], s0[s], delta)
        scale = np.abs(want_o).max() + 1e-30
        np.testing.assert_allclose(o[rows], want_o, rtol=tol, atol=tol * scale, err_msg=f"sequence {s} outputs")
        np.testing.assert_allclose(final[s], want_s[-1], rtol=tol, atol=tol * np.abs(want_s[-1]).max(),
                                   err_msg=f"sequence {s} final state")
        want_snap = want_s[snaps[s] - 1] if snaps[s] else s0[s]
        np.testing.assert_allclose(snapped[s], want_snap, rtol=tol, atol=tol * np.abs(want_snap).max(),
                                   err_msg=f"sequence {s} snapshot after {snaps[s]} of {n}")


@pytest.mark.parametrize("delta", [True, False], ids=["gated_delta", "mamba2"])
@pytest.mark.parametrize("num_heads,k_dim,v_dim,chunk", [(3, 8, 12, 16), (2, 16, 16, 16), (2, 32, 64, 32),
                                                         (1, 128, 64, 16)])
def test_kernel_is_the_rule_token_by_token(num_heads, k_dim, v_dim, chunk, delta):
    rng = fresh.rng()
    for _ in range(2):
        check_kernel(rng, num_heads, k_dim, v_dim, chunk, delta, jnp.float32, 1e-5)


@pytest.mark.parametrize("delta", [True, False], ids=["gated_delta", "mamba2"])
def test_bfloat16_inputs(delta):
    """q, k, v in bfloat16 (the engine's on a GPU): dots on them, the state in float32, within 2e-2."""
    check_kernel(fresh.rng(), 4, 32, 32, 16, delta, jnp.bfloat16, 2e-2)


def test_value_blocks_are_only_a_knob():
    """The state's value columns cut over programs (block_v 16 of 64) or not: the same results."""
    rng = fresh.rng()
    check_kernel(rng, 2, 16, 64, 16, True, jnp.float32, 1e-5, block_v=16)
    check_kernel(rng, 2, 16, 64, 16, True, jnp.float32, 1e-5, block_v=64)


def test_unit_lower_inverse():
    rng = fresh.rng()
    c = 16
    l = np.tril(rng.standard_normal((c, c)), -1).astype(np.float32)
    got = np.asarray(jax.jit(linear_scan.unit_lower_inverse)(jnp.asarray(l))).astype(np.float64)
    a = np.eye(c) + l.astype(np.float64)
    # Each entry of got @ a - I within a few float32 roundings of the sums that make it: the inverse's entries are
    # products along chains of l's (up to ~1e3 for a standard normal l), so a fixed atol fails some draws
    # (RADIXLM_TEST_SEED=2051238650: 2.6e-4 against 1e-4, the inverse right to float32's precision).
    bound = 64 * np.finfo(np.float32).eps * (np.abs(got) @ np.abs(a)) + 1e-6
    assert (np.abs(got @ a - np.eye(c)) <= bound).all()
