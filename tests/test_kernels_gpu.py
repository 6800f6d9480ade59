"""Compiled Pallas kernels (backend "pallas") on a real GPU vs float64 numpy and the xla reference.

Skipped unless JAX's default backend is a GPU. tests/conftest.py forces CPU by default, so run
with the platform named: `JAX_PLATFORMS=cuda pytest tests/test_kernels_gpu.py` (gpu_check.sh does).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import testing

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

MIXED = [(1, 9), (5, 5), (1, 1), (40, 70), (3, 300), (17, 17), (1, 129)]
DECODES = [(1, 9), (1, 1), (1, 333), (1, 16), (1, 1000), (1, 64)]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "backend",
                                             "decode_only"))
def _attn(*args, **kwargs):
  return pallas_kernels.ragged_paged_attention(*args, **kwargs)


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
  # XLA on GPU may run float32 dots as TF32 by default; the 1e-5 float32 check needs full precision.
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size,dtype", [
    (32, 8, 128, 16, jnp.bfloat16),
    (32, 8, 128, 16, np.float32),
    (12, 4, 64, 8, jnp.bfloat16),
    (8, 8, 256, 32, jnp.bfloat16),
    (16, 2, 128, 64, np.float32),
])
def test_pallas_gpu(decode_only, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
  seqs = DECODES if decode_only else MIXED
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), seqs,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype,
      num_tokens=sum(q for q, _ in seqs) + 7, max_seqs=len(seqs) + 2, nan_padding=True)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("sliding_window,soft_cap", [(37, None), (None, 30.0), (128, 20.0)])
def test_pallas_gpu_window_softcap(decode_only, sliding_window, soft_cap):
  seqs = DECODES if decode_only else MIXED
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), seqs,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=32, num_kv_heads=8,
      head_dim=128, page_size=16, dtype=jnp.bfloat16, sliding_window=sliding_window,
      soft_cap=soft_cap, num_tokens=sum(q for q, _ in seqs) + 3)


def test_write_kv_gpu():
  rng = np.random.default_rng(0)
  shape = (8, 40, 16, 128)
  k_pages = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v_pages = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((64, 8, 128)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((64, 8, 128)), jnp.bfloat16)
  slots = rng.permutation(40 * 16)[:64].astype(np.int32)
  slots[::7] = -1
  slots = jnp.asarray(slots)
  want = pallas_kernels.write_kv(k_pages, v_pages, k, v, slots, backend="xla")
  write = jax.jit(functools.partial(pallas_kernels.write_kv, backend="pallas"),
                  donate_argnums=(0, 1))
  got = write(k_pages, v_pages, k, v, slots)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                  np.asarray(w.astype(jnp.float32)))
