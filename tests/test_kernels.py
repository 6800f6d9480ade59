"""Attention kernels vs float64 numpy attention and vs each other, on fresh random ragged batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import testing

# A mixed batch: decodes, a one-token chunk, chunks longer than a page, lengths not page multiples.
MIXED = [(1, 9), (5, 5), (1, 1), (11, 20), (3, 40)]


def _tol(dtype):
  return (1e-5, 1e-5) if dtype == np.float32 else (2e-2, 2e-2)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "backend",
                                             "decode_only"))
def _attn(*args, **kwargs):
  return pallas_kernels.ragged_paged_attention(*args, **kwargs)


def _check_attention(seed, seqs, *, backend, num_q_heads=4, num_kv_heads=2, head_dim=32,
                     page_size=4, dtype=np.float32, sliding_window=None, soft_cap=None,
                     num_tokens=None, max_seqs=None, decode_only=False, compare_xla=True):
  rng = np.random.default_rng(seed)
  batch = testing.random_ragged_batch(
      rng, seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      page_size=page_size, num_tokens=num_tokens, max_seqs=max_seqs, dtype=np.float32)
  args = [jnp.asarray(a) for a in batch.args]
  args[:3] = [a.astype(dtype) for a in args[:3]]
  sm_scale = head_dim ** -0.5
  opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
  out = _attn(*args, backend=backend, decode_only=decode_only, **opts)
  assert out.shape == batch.q.shape and out.dtype == dtype
  n = batch.num_valid_tokens
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all(), "padding rows must not be NaN/inf"
  # Float64 reference on the same (possibly rounded) inputs.
  rounded = testing.RaggedBatch(*[np.asarray(a.astype(jnp.float32)) if i < 3 else np.asarray(a)
                                  for i, a in enumerate(args)])
  want = testing.attention_f64(rounded, **opts)
  rtol, atol = _tol(dtype)
  np.testing.assert_allclose(out[:n], want, rtol=rtol, atol=atol)
  if compare_xla and backend != "xla":
    ref = np.asarray(_attn(*args, backend="xla", **opts).astype(jnp.float32))
    np.testing.assert_allclose(out[:n], ref[:n], rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Backend names.

def test_resolve_backend():
  assert pallas_kernels.resolve_backend("xla") == "xla"
  assert pallas_kernels.resolve_backend("pallas_interpret") == "pallas_interpret"
  assert pallas_kernels.resolve_backend("auto") in ("xla", "pallas")
  with pytest.raises(ValueError, match="auto, xla, pallas, pallas_interpret"):
    pallas_kernels.resolve_backend("cuda")


# ---------------------------------------------------------------------------------------------
# xla reference vs float64 numpy.

@pytest.mark.parametrize("seed", range(3))
def test_reference_mixed_random(seed):
  rng = np.random.default_rng(100 + seed)
  seqs = []
  for _ in range(rng.integers(1, 6)):
    kv_len = int(rng.integers(1, 40))
    seqs.append((int(rng.integers(1, kv_len + 1)), kv_len))
  num_valid = sum(q for q, _ in seqs)
  _check_attention(seed, seqs, backend="xla", num_tokens=num_valid + 3, max_seqs=len(seqs) + 2)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2), (8, 1)])
def test_reference_gqa(num_q_heads, num_kv_heads):
  _check_attention(1, MIXED, backend="xla", num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("sliding_window,soft_cap", [(5, None), (None, 2.0), (8, 3.0)])
def test_reference_window_softcap(sliding_window, soft_cap):
  _check_attention(2, MIXED, backend="xla", sliding_window=sliding_window, soft_cap=soft_cap,
                   num_tokens=24, max_seqs=7)


def test_reference_bfloat16():
  _check_attention(3, MIXED, backend="xla", dtype=jnp.bfloat16, num_tokens=24)


def test_reference_small_blocks_match_large():
  """The KV block size is a tuning knob only."""
  rng = np.random.default_rng(4)
  batch = testing.random_ragged_batch(rng, MIXED, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      page_size=4, num_tokens=24)
  outs = [np.asarray(pallas_kernels.reference.ragged_paged_attention(
      *batch.args, sm_scale=0.25, sliding_window=7, pages_per_block=ppb)) for ppb in (1, 3, 16)]
  n = batch.num_valid_tokens
  np.testing.assert_allclose(outs[0][:n], outs[1][:n], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0][:n], outs[2][:n], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# write_kv.

@pytest.mark.parametrize("backend", ["xla"])
def test_write_kv(backend):
  rng = np.random.default_rng(5)
  num_kv_heads, num_pages, page_size, head_dim, num_tokens = 2, 5, 4, 16, 9
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  k_pages, v_pages = rng.standard_normal(shape), rng.standard_normal(shape)
  k = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
  v = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
  slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
  slots[[2, 7]] = [-1, -5]  # padding rows, including one that would wrap to a real slot
  write = jax.jit(functools.partial(pallas_kernels.write_kv, backend=backend), donate_argnums=(0, 1))
  got_k, got_v = write(jnp.asarray(k_pages, jnp.float32), jnp.asarray(v_pages, jnp.float32),
                       jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(slots))
  want_k, want_v = k_pages.copy(), v_pages.copy()
  for t, slot in enumerate(slots):
    if slot >= 0:
      want_k[:, slot // page_size, slot % page_size] = k[t]
      want_v[:, slot // page_size, slot % page_size] = v[t]
  np.testing.assert_allclose(np.asarray(got_k), want_k, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-6)
