"""Attention kernels vs float64 numpy attention and vs the xla reference, on fresh random batches.

Every Pallas case runs in interpret mode on CPU; shapes are tiny and block sizes are forced small
so that the loops over query blocks, KV tiles and KV splits all take several steps. Nearly all the
time goes into compiling, so each case covers several features at once (GQA x head_dim x dtype x
window / soft cap), kernels are checked against float64 numpy (the xla reference is checked
against it too, and against the kernels in the public-entry and `lax.scan` tests), and XLA
compiles without backend optimisation. The engine's stacked cache (a traced layer index) has its
own group; a last group lowers each kernel for CUDA (Pallas -> Triton IR, no GPU needed).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import decode_kernel, gpu_compile, kv_quant, ragged_kernel, reference, testing
import fresh

# Decodes, a one-token chunk, chunks longer than a page over cached prefixes, lengths that are
# not page multiples, and a whole prompt as one chunk.
MIXED = [(1, 9), (5, 5), (1, 1), (11, 20), (3, 40)]
DECODES = [(1, 9), (1, 1), (1, 33), (1, 16), (1, 50)]

# Tiny programs compile ~2x faster without LLVM's backend optimisations; results are unchanged.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_OPTS = ("sm_scale", "sliding_window", "soft_cap")


@functools.partial(_jit, static_argnames=(*_OPTS, "backend", "decode_only"))
def _attn(*args, **kwargs):
  return pallas_kernels.ragged_paged_attention(*args, **kwargs)


def _public(backend, decode_only=False):
  return functools.partial(_attn, backend=backend, decode_only=decode_only)


def _ragged(block_q, block_kv, block_h=None):
  """The prefill kernel in interpret mode with small blocks (many q blocks and KV tiles; block_h:
  a GQA group cut over programs)."""
  return _jit(functools.partial(ragged_kernel.ragged_paged_attention, interpret=True,
                                block_q=block_q, block_kv=block_kv, block_h=block_h), static_argnames=_OPTS)


def _decode(block_kv, num_splits, block_h=None):
  return _jit(functools.partial(decode_kernel.decode_attention, interpret=True, block_kv=block_kv,
                                num_splits=num_splits, block_h=block_h), static_argnames=_OPTS)


def _random_seqs(rng, max_num_seqs=5, max_kv_len=40, decode_only=False):
  seqs = []
  for _ in range(int(rng.integers(1, max_num_seqs + 1))):
    kv_len = int(rng.integers(1, max_kv_len))
    seqs.append((1 if decode_only else int(rng.integers(1, kv_len + 1)), kv_len))
  return seqs


# Each case: (q heads, kv heads, head_dim, dtype, sliding_window, soft_cap). Together: GQA 1/3/4/8,
# head_dim 64/128/256, float32 (1e-5) and bfloat16 (2e-2), window, soft cap, both, neither.
FEATURES = [
    pytest.param(2, 2, 64, np.float32, 5, None, id="gqa1-d64-f32-window"),
    pytest.param(3, 1, 128, np.float32, None, 2.0, id="gqa3-d128-f32-softcap"),
    pytest.param(8, 2, 256, jnp.bfloat16, 13, 3.0, id="gqa4-d256-bf16-window-softcap"),
    pytest.param(8, 1, 64, jnp.bfloat16, None, None, id="gqa8-d64-bf16"),
]


def _features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap):
  return dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
              sliding_window=sliding_window, soft_cap=soft_cap)


# ---------------------------------------------------------------------------------------------
# Backend names.

def test_resolve_backend():
  assert pallas_kernels.resolve_backend("xla") == "xla"
  assert pallas_kernels.resolve_backend("pallas_interpret") == "pallas_interpret"
  assert pallas_kernels.resolve_backend("auto") == ("pallas" if jax.default_backend() == "gpu"
                                                    else "xla")
  with pytest.raises(ValueError, match="auto, xla, pallas, pallas_interpret"):
    pallas_kernels.resolve_backend("cuda")
  # The widths the kernels tile: a cached K and V vector's (LlamaConfig.kv_dims). DeepSeek's latent cache (64, 512)
  # tiles, though a query is 576 wide; Triton's tiles need powers of two >= 16, and asking for pallas says which.
  gpu = jax.default_backend() == "gpu"
  assert pallas_kernels.resolve_backend("auto", (64, 512)) == ("pallas" if gpu else "xla")
  assert pallas_kernels.resolve_backend("pallas", (64, 512)) == "pallas"
  for dims, bad in (((96, 96), 96), ((8, 32), 8), ((64, 576), 576)):
    assert pallas_kernels.resolve_backend("auto", dims) == "xla"
    assert pallas_kernels.resolve_backend("pallas_interpret", dims) == "pallas_interpret"
    with pytest.raises(ValueError, match=f"powers of two >= 16.*cache has {bad} "):
      pallas_kernels.resolve_backend("pallas", dims)


# ---------------------------------------------------------------------------------------------
# xla reference vs float64 numpy.

def test_reference_random():
  """Random lengths, padding rows and padding sequences."""
  seqs = _random_seqs(fresh.rng())
  num_valid = sum(q for q, _ in seqs)
  testing.check_attention(_public("xla"), seqs, num_tokens=num_valid + 3, max_seqs=len(seqs) + 2)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype,sliding_window,soft_cap",
                         FEATURES)
def test_reference_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap):
  testing.check_attention(
      _public("xla"), MIXED, seed=fresh.seed(), num_tokens=24, max_seqs=7, nan_padding=True,
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


@pytest.mark.parametrize("dtype,kv_dtype", [(np.float32, None), (jnp.bfloat16, None), (np.float32, "int8")])
@pytest.mark.parametrize("num_q_heads,latent_dims,sliding_window", [(4, (8, 32), None), (16, (16, 64), 9),
                                                                     (3, (8, 24), None)])
def test_reference_latent_cache(num_q_heads, latent_dims, sliding_window, dtype, kv_dtype):
  """A latent cache (DeepSeek's MLA): K pages hold a RoPE key, V pages a latent; each position's key is
  both, its value the latent. Ragged batches with padding, one KV head for 3 to 16 q heads, 8-bit pages."""
  testing.check_attention(
      _public("xla"), MIXED, seed=fresh.seed(), num_tokens=24, max_seqs=7, nan_padding=True,
      num_q_heads=num_q_heads, num_kv_heads=1, head_dim=sum(latent_dims), latent_dims=latent_dims,
      dtype=dtype, kv_dtype=kv_dtype, sliding_window=sliding_window)


# Latent caches on the kernels: (q heads, (Dk, Dv), dtype, sliding_window, soft_cap, kv_dtype, sinks, block_h). One
# kv head throughout (DeepSeek's); block_h 4 cuts the group of 16 over 4 programs.
LATENT = [
    pytest.param(4, (8, 32), np.float32, 7, 3.0, None, False, None, id="g4-8x32-f32-window-softcap"),
    pytest.param(16, (16, 64), jnp.bfloat16, None, None, None, True, 4, id="g16-16x64-bf16-sinks-split4"),
    pytest.param(16, (16, 64), np.float32, 9, None, jnp.int8, False, 8, id="g16-16x64-f32-int8-window-split2"),
]


@pytest.mark.parametrize("num_q_heads,latent_dims,dtype,sliding_window,soft_cap,kv_dtype,sinks,block_h", LATENT)
@pytest.mark.parametrize("kernel", ["ragged", "decode"])
def test_kernels_latent_cache(kernel, num_q_heads, latent_dims, dtype, sliding_window, soft_cap, kv_dtype, sinks,
                              block_h):
  """Both kernels on a latent cache (K pages a RoPE key, V pages a latent; scores over both, values the latent)
  against float64 numpy and the xla reference: decodes and chunks, lengths not page multiples, padding rows (NaN)
  and sequences, small blocks so that q blocks, KV tiles, KV splits and head blocks all take several steps."""
  fn = _ragged(2, 16, block_h) if kernel == "ragged" else _decode(16, 3, block_h)
  testing.check_attention(
      fn, MIXED, seed=fresh.seed(), num_tokens=24, max_seqs=7, nan_padding=True, num_q_heads=num_q_heads,
      num_kv_heads=1, head_dim=sum(latent_dims), latent_dims=latent_dims, dtype=dtype, kv_dtype=kv_dtype,
      sliding_window=sliding_window, soft_cap=soft_cap, page_size=8,
      sinks=testing.random_sinks(fresh.rng(), num_q_heads) if sinks else None,
      reference_fn=functools.partial(_attn, backend="xla"))


@pytest.mark.parametrize("seqs,decode_only", [([(1, 9), (3, 20)], False), ([(1, 9), (1, 40)], True)])
def test_latent_cache_real_widths(seqs, decode_only):
  """DeepSeek-V3's widths (a 64-wide RoPE key and a 512-wide latent, 16 q heads as at TP 8) through the public
  entry point at the default tiles, bfloat16, against float64 numpy and the xla reference."""
  testing.check_attention(
      _public("pallas_interpret", decode_only), seqs, seed=fresh.seed(), num_q_heads=16,
      num_kv_heads=1, head_dim=576, latent_dims=(64, 512), page_size=16, dtype=jnp.bfloat16,
      num_tokens=sum(q for q, _ in seqs) + 2, max_seqs=len(seqs) + 1,
      reference_fn=functools.partial(_attn, backend="xla"))


def test_latent_cache_large_group():
  """128 q heads on the latent cache's one kv head (DeepSeek-V3 on one device): the default decode tiles cut the
  group over 2 programs of 64 heads, the prefill tiles over 2 programs of 64 heads a token."""
  for decode_only in (True, False):
    testing.check_attention(
        _public("pallas_interpret", decode_only), [(1, 12), (2, 7)], seed=fresh.seed(), num_q_heads=128,
        num_kv_heads=1, head_dim=48, latent_dims=(16, 32), page_size=4, dtype=jnp.bfloat16, num_tokens=4,
        max_seqs=3, reference_fn=functools.partial(_attn, backend="xla"))


def test_latent_widths_are_checked():
  batch = testing.random_ragged_batch(fresh.rng(), [(2, 5)], num_q_heads=4, num_kv_heads=1,
                                      head_dim=40, page_size=4, latent_dims=(8, 32))
  for backend in ("xla", "pallas_interpret"):
    with pytest.raises(ValueError, match="k and v pages 8 and 30"):
      pallas_kernels.ragged_paged_attention(jnp.asarray(batch.q), jnp.asarray(batch.k_pages),
                                            jnp.asarray(batch.v_pages[..., :30]), *map(jnp.asarray, batch.args[3:]),
                                            sm_scale=0.1, backend=backend)


def test_reference_block_size_is_only_a_knob():
  rng = fresh.rng()
  batch = testing.random_ragged_batch(rng, MIXED, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      page_size=4, num_tokens=24)
  n = batch.num_valid_tokens
  want = testing.attention_f64(batch, sm_scale=0.25, sliding_window=7)
  # Row by row with one-page KV blocks; 2-token query blocks with 3-page KV blocks (the default
  # sizes run in every other reference test).
  for pages_per_block, block_q in ((1, 1), (3, 2)):
    fn = _jit(functools.partial(reference.ragged_paged_attention, sm_scale=0.25,
                                sliding_window=7, pages_per_block=pages_per_block,
                                block_q=block_q))
    out = fn(*batch.args)
    np.testing.assert_allclose(np.asarray(out)[:n], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Pallas ragged (prefill + decode) kernel, interpret mode.

def test_ragged_kernel_random():
  rng = fresh.rng()
  seqs = _random_seqs(rng)
  num_valid = sum(q for q, _ in seqs)
  testing.check_attention(_ragged(4, 16), seqs, page_size=8, num_tokens=num_valid + 5,
                          max_seqs=len(seqs) + 2)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype,sliding_window,soft_cap",
                         FEATURES)
def test_ragged_kernel_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window,
                                soft_cap):
  testing.check_attention(
      _ragged(4, 16), MIXED, seed=fresh.seed(), num_tokens=24, max_seqs=7, nan_padding=True,
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


def test_ragged_kernel_long_chunk_over_prefix():
  """One chunk spanning many q blocks and KV tiles, plus a decode, page_size 8."""
  testing.check_attention(_ragged(8, 16), [(37, 61), (1, 30)], seed=fresh.seed(), page_size=8,
                          num_tokens=40, max_seqs=4, sliding_window=20)


@pytest.mark.parametrize("sliding_window", [None, 70])
def test_ragged_kernel_unmasked_interior_tiles(sliding_window):
  """Chunks over prefixes many 16-position tiles long, so that walk_tiles runs all three of its
  loops: masked tiles at the window's start, whole tiles without a mask, masked diagonal tiles."""
  testing.check_attention(_ragged(8, 16), [(37, 200), (5, 90), (1, 130), (16, 16)], seed=fresh.seed(),
                          page_size=8, num_tokens=64, max_seqs=5, sliding_window=sliding_window,
                          nan_padding=True)


def test_hopper_defaults_follow_the_target():
  """Hopper (H100/H200) prefill tiles: 128 KV positions over 3 stages for bf16 D=128 (measured on
  an H200, docs/kernels.md); elsewhere 64 over 2. The target is the chip lowered for."""
  assert not ragged_kernel.hopper_target()  # this CPU
  for name, hopper in (("sm90", True), ("sm80", False), ("gfx942", False)):
    with gpu_compile.lowering_device(gpu_compile.TARGETS[name]):
      assert ragged_kernel.hopper_target() is hopper, name
  assert ragged_kernel.default_block_sizes(4, 128, 2, hopper=True) == (32, 128, 3)
  assert ragged_kernel.default_block_sizes(4, 128, 2) == (32, 64, 2)


def test_ragged_kernel_more_sequences_than_tokens():
  """A bucket with few token rows and many (mostly padding) sequence slots."""
  testing.check_attention(_ragged(4, 16), [(1, 5), (2, 7)], seed=fresh.seed(), num_tokens=4, max_seqs=9)


@pytest.mark.parametrize("seqs,num_tokens,max_seqs,sinks", [
    (MIXED, 24, 7, False),              # ragged kernel
    ([(3, 9), (1, 4)], 4, 8, False),    # decode kernel, chosen because T <= S
    (MIXED, 24, 7, True),               # ragged kernel, attention sinks
])
def test_public_pallas_interpret(seqs, num_tokens, max_seqs, sinks):
  """Default block sizes through the public entry point, against numpy and the xla reference."""
  testing.check_attention(_public("pallas_interpret"), seqs, seed=fresh.seed(), num_tokens=num_tokens,
                          max_seqs=max_seqs, dtype=jnp.bfloat16,
                          sinks=testing.random_sinks(fresh.rng(), 4) if sinks else None,
                          reference_fn=functools.partial(_attn, backend="xla"))


# ---------------------------------------------------------------------------------------------
# Pallas split-KV decode kernel, interpret mode.

@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_kernel_random(num_splits):
  """Random decode batches; 1 split, splits that do not divide the tiles, more splits than tiles."""
  rng = np.random.default_rng(300 + num_splits)
  seqs = _random_seqs(rng, max_kv_len=60, decode_only=True)
  testing.check_attention(_decode(16, num_splits), seqs, seed=fresh.seed(), page_size=8,
                          num_tokens=len(seqs) + 2, max_seqs=len(seqs) + 3, nan_padding=True,
                          **_features(*FEATURES[num_splits % 4].values))


def test_decode_kernel_is_correct_on_chunks_too():
  """Rows are independent, so decode_only is only a performance hint."""
  testing.check_attention(_decode(16, 2), MIXED, seed=fresh.seed(), num_tokens=24,
                          **_features(*FEATURES[2].values))


# ---------------------------------------------------------------------------------------------
# Attention sinks (gpt-oss): one value-less logit per q head joins every softmax.

def test_attention_f64_sinks():
  """The float64 attention itself: sinks=None is the plain softmax (bit for bit a sink of -inf), a
  sink of -30 changes nothing, and a row that sees one position weighs it by e^s / (e^s + e^sink)."""
  batch = testing.random_ragged_batch(fresh.rng(), MIXED, num_q_heads=4,
                                      num_kv_heads=2, head_dim=16, page_size=4, dtype=np.float64)
  opts = dict(sm_scale=0.25, sliding_window=7, soft_cap=3.0)
  plain = testing.attention_f64(batch, **opts)
  np.testing.assert_array_equal(testing.attention_f64(batch, sinks=np.full(4, -np.inf), **opts), plain)
  np.testing.assert_allclose(testing.attention_f64(batch, sinks=np.full(4, -30.0), **opts), plain,
                             rtol=1e-9, atol=1e-9)
  sinks = np.array([10.0, -30.0, 0.5, -2.0])
  out = testing.attention_f64(batch, sinks=sinks, **opts)
  # MIXED's third sequence, (1, 1), is row 6: one position, its scale and cap applied, not the sink's.
  page = batch.page_indices[2, 0]
  k, v = np.repeat(batch.k_pages[:, page, 0], 2, axis=0), np.repeat(batch.v_pages[:, page, 0], 2, axis=0)
  s = 3.0 * np.tanh((batch.q[6] * k).sum(-1) * 0.25 / 3.0)                # [Hq]
  np.testing.assert_allclose(out[6], v / (1.0 + np.exp(sinks - s))[:, None], rtol=1e-12)


# Each case: (q heads, kv heads, head_dim, dtype, sliding_window, soft_cap); GQA 1/4/8, float32 and
# bfloat16, a soft cap (which must not touch the +10 sink), windows.
SINK_FEATURES = [
    pytest.param(4, 4, 64, np.float32, 5, None, id="gqa1-d64-f32-window"),
    pytest.param(8, 2, 128, jnp.bfloat16, 13, 3.0, id="gqa4-d128-bf16-window-softcap"),
    pytest.param(8, 1, 64, np.float32, None, 2.0, id="gqa8-d64-f32-softcap"),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype,sliding_window,soft_cap",
                         SINK_FEATURES)
@pytest.mark.parametrize("kernel", ["xla", "ragged", "decode"])
def test_sinks(kernel, num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap):
  """Each backend with sinks (random_sinks: +10, -30, moderate) on decodes and chunks against float64
  attention with sinks; the decode kernel's splits merge with the sink (3 splits)."""
  fn = {"xla": _public("xla"), "ragged": _ragged(4, 16), "decode": _decode(16, 3)}[kernel]
  testing.check_attention(
      fn, MIXED, seed=fresh.seed(), num_tokens=24, max_seqs=7, nan_padding=True,
      sinks=testing.random_sinks(fresh.rng(), num_q_heads),
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


# ---------------------------------------------------------------------------------------------
# Per-row KV limits (Gemma 3's bidirectional image tokens): row t sees up to kv_limits[t] >= its
# position; a window still starts from the position.

# Decodes, a whole prompt and chunks over prefixes whose positions cross a 16-position KV tile (two
# 8-position pages), so that a span can cross tiles, pages and 4-token q blocks; padding rows and
# sequences around them.
SPAN_SEQS = [(1, 9), (20, 20), (1, 1), (13, 37), (9, 40), (1, 50)]


def _span_limits(batch):
  """Random image spans (testing.random_kv_limits), each chunk's first crossing a 16-position tile."""
  return testing.random_kv_limits(fresh.rng(), batch, boundary=16)


def test_attention_f64_kv_limits():
  """The float64 attention itself: limits at each row's own position are the causal result bit for bit, and
  limits at kv_len - 1 make every row of a sequence see all of it (a dense softmax over the sequence)."""
  batch = testing.random_ragged_batch(fresh.rng(), SPAN_SEQS, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      page_size=8, dtype=np.float64)
  positions = testing.row_positions(batch)
  causal = testing.attention_f64(batch, sm_scale=0.25, soft_cap=3.0)
  np.testing.assert_array_equal(testing.attention_f64(batch, sm_scale=0.25, soft_cap=3.0, kv_limits=positions),
                                causal)
  seq_ids = np.searchsorted(batch.cu_q_lens[1:], np.arange(batch.num_valid_tokens), side="right")
  full = testing.attention_f64(batch, sm_scale=0.25, kv_limits=batch.kv_lens[seq_ids] - 1)
  s = 3  # (13, 37): 13 new tokens over 24 cached
  rows = slice(int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1]))
  pages = batch.page_indices[s, :5]
  k = np.repeat(batch.k_pages[:, pages].reshape(2, -1, 16)[:, :37], 2, axis=0)  # [Hq, 37, D]
  v = np.repeat(batch.v_pages[:, pages].reshape(2, -1, 16)[:, :37], 2, axis=0)
  scores = np.einsum("thd,hld->htl", batch.q[rows], k) * 0.25
  p = np.exp(scores - scores.max(-1, keepdims=True))
  np.testing.assert_allclose(full[rows], np.einsum("htl,hld->thd", p / p.sum(-1, keepdims=True), v), rtol=1e-12, atol=1e-12)


# xla: the reference with small blocks, so that its tile range follows the limits (the public entry, whose
# 256-position KV blocks hold these contexts whole, is each kernel's reference_fn).
_LIMIT_KERNELS = {
    "xla": _jit(functools.partial(reference.ragged_paged_attention, block_q=4, pages_per_block=2),
                static_argnames=_OPTS),
    "ragged": _ragged(4, 16),
    "decode": _decode(16, 3),
    "public": _public("pallas_interpret"),  # the dispatcher, default ragged tiles
}


# Each case: (q heads, kv heads, head_dim, dtype, sliding_window, soft_cap, kv_dtype, sinks). GQA 1/4/8, head_dim
# 64/128, float32 and bfloat16, a window of 3 and 5 (shorter than the spans: rows see back only from their own
# position), soft caps, int8 pages, sinks.
KV_LIMITS = [
    pytest.param(2, 2, 64, np.float32, 3, None, None, False, id="gqa1-d64-f32-window3"),
    pytest.param(8, 2, 128, jnp.bfloat16, None, 2.0, jnp.int8, False, id="gqa4-d128-bf16-softcap-int8"),
    pytest.param(8, 1, 64, np.float32, 5, 3.0, None, True, id="gqa8-d64-f32-window5-softcap-sinks"),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype,sliding_window,soft_cap,kv_dtype,sinks",
                         KV_LIMITS)
@pytest.mark.parametrize("kernel", ["xla", "ragged", "decode"])
def test_kv_limits(kernel, num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap, kv_dtype, sinks):
  """Each backend with random image spans (zero, one or two a chunk, crossing pages, KV tiles and q blocks) against
  float64 attention with the same limits, the kernels against the public xla entry too; padding rows (NaN, junk
  limits) and sequences; small blocks, 3 KV splits."""
  fn = {"xla": _LIMIT_KERNELS["xla"], "ragged": _ragged(4, 16), "decode": _decode(16, 3)}[kernel]
  testing.check_attention(
      fn, SPAN_SEQS, seed=fresh.seed(), page_size=8, num_tokens=48, max_seqs=8, nan_padding=True,
      kv_limits=_span_limits, kv_dtype=kv_dtype,
      sinks=testing.random_sinks(fresh.rng(), num_q_heads) if sinks else None,
      reference_fn=None if kernel == "xla" else functools.partial(_attn, backend="xla"),
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


@pytest.mark.parametrize("kernel", ["ragged", "decode"])
def test_kv_limits_latent_cache(kernel):
  """Per-row limits on a latent cache (16 q heads on one kv head, Dk/Dv = 16/64, the group cut in 2 head blocks)
  with int8 pages and a window of 5, against float64 attention and the xla reference."""
  fn = _ragged(2, 16, 8) if kernel == "ragged" else _decode(16, 3, 8)
  testing.check_attention(
      fn, SPAN_SEQS, seed=fresh.seed(), page_size=8, num_tokens=48, max_seqs=8, nan_padding=True,
      kv_limits=_span_limits, num_q_heads=16, num_kv_heads=1, head_dim=80, latent_dims=(16, 64),
      kv_dtype=jnp.int8, sliding_window=5, reference_fn=functools.partial(_attn, backend="xla"))


@pytest.mark.parametrize("kernel", _LIMIT_KERNELS)
def test_kv_limits_at_own_positions_are_causal(kernel):
  """Limits at each row's own position (junk on padding rows) give the causal result bit for bit. Random spans
  give float64 attention's result, which differs from the causal one on every row whose limit passes its
  position (so the comparison can fail), and change no other row beyond rounding. Limits out of range are
  clamped into [pos, kv_len - 1]: bit for bit the same result."""
  rng = fresh.rng()
  batch = testing.random_ragged_batch(rng, SPAN_SEQS, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                      page_size=8, num_tokens=48, max_seqs=8)
  n = batch.num_valid_tokens
  positions = testing.row_positions(batch)
  positions[n:] = rng.integers(-5, 1000, len(positions) - n)
  limits = _span_limits(batch)
  # Below the position on rows outside spans, past kv_len where a limit is the sequence's last position (every
  # decode; a span that ends its chunk: an image cut by the chunk's end).
  seq_ids = np.searchsorted(batch.cu_q_lens[1:], np.arange(len(limits)), side="right")
  last = batch.kv_lens[seq_ids.clip(max=len(batch.kv_lens) - 1)] - 1        # [T]: each row's kv_len - 1
  wild = np.where(limits > positions, limits, positions - rng.integers(0, 4, len(limits)))
  wild = np.where(wild == last, wild + rng.integers(1, 100, len(limits)), wild)
  opts = dict(sm_scale=0.125, sliding_window=3, soft_cap=3.0)
  args = [jnp.asarray(a) for a in batch.args]
  fn = _LIMIT_KERNELS[kernel]
  causal = np.asarray(fn(*args, **opts))[:n]
  np.testing.assert_array_equal(np.asarray(fn(*args, kv_limits=jnp.asarray(positions), **opts))[:n], causal)
  got = np.asarray(fn(*args, kv_limits=jnp.asarray(limits), **opts))[:n]
  tol = testing.tolerances(np.float32)
  np.testing.assert_allclose(got, testing.attention_f64(batch, kv_limits=limits, **opts), **tol)
  span_rows = limits[:n] > testing.row_positions(batch)[:n]
  assert span_rows.sum() >= 2, limits
  assert (np.abs(got - causal)[span_rows].max(axis=(1, 2)) > 1e3 * tol["atol"]).all()
  np.testing.assert_allclose(got[~span_rows], causal[~span_rows], **tol)
  np.testing.assert_array_equal(np.asarray(fn(*args, kv_limits=jnp.asarray(wild), **opts))[:n], got)


# ---------------------------------------------------------------------------------------------
# Draft-tree masks (tree speculative decoding): bit b of a row's mask hides KV position pos - 1 - b (a node of
# another branch); a window counts back from pos - popcount(mask), the row's depth in its tree.

# Decodes, a 40-token chunk over a 50-position prefix whose last 33 tokens are a tree (bits up to 31 back; its
# 4-token q blocks reach past 32 positions of whole 16-position KV tiles, the ragged kernel's unmasked interior), a
# 9-token tree over a prefix, a whole 5-token prompt as a tree; padding rows and sequences around them.
TREE_SEQS = [(1, 9), (40, 90), (1, 1), (9, 30), (5, 5), (1, 50)]


def _tree_masks(batch):
  """Random draft trees (testing.random_tree_masks), junk on padding rows."""
  return testing.random_tree_masks(fresh.rng(), batch)


def test_attention_f64_tree_masks():
  """The float64 attention itself: all-zero masks are the causal result bit for bit, and a hand-built tree (with a
  window of 3 too) against a softmax over each row's own list of visible positions: the prefix, the row's
  ancestors and itself, with a window the last 3 of those."""
  batch = testing.random_ragged_batch(fresh.rng(), [(1, 5), (6, 10)], num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      page_size=4, num_tokens=9, max_seqs=3, dtype=np.float64)
  causal = testing.attention_f64(batch, sm_scale=0.25, soft_cap=3.0)
  zeros = np.zeros(9, np.int32)
  np.testing.assert_array_equal(testing.attention_f64(batch, sm_scale=0.25, soft_cap=3.0, tree_masks=zeros), causal)
  # Sequence 1: prefix 0..3, then the tree's nodes at positions 4..9 in DFS preorder: root 4, 5 under 4, 6 under 5,
  # 7 under 4, 8 under 7, 9 under 4. Bit b hides position pos - 1 - b: node 7 hides 6 and 5 (bits 0, 1), node 8
  # hides 6 and 5 (bits 1, 2), node 9 hides 8, 7, 6, 5 (bits 0 to 3).
  masks = np.array([0, 0, 0, 0, 0b11, 0b110, 0b1111, 123, -1], np.int32)   # the last two rows are padding
  paths = [[4], [4, 5], [4, 5, 6], [4, 7], [4, 7, 8], [4, 9]]
  pages = batch.page_indices[1, :3]
  k = np.repeat(batch.k_pages[:, pages].reshape(2, -1, 16), 2, axis=0)     # [Hq, 12, D]
  v = np.repeat(batch.v_pages[:, pages].reshape(2, -1, 16), 2, axis=0)
  for window in (None, 3):
    got = testing.attention_f64(batch, sm_scale=0.25, sliding_window=window, tree_masks=masks)
    np.testing.assert_array_equal(got[0], testing.attention_f64(batch, sm_scale=0.25, sliding_window=window)[0])
    for i, path in enumerate(paths):
      seen = [0, 1, 2, 3, *path][-window if window else 0:]
      scores = np.einsum("hd,hld->hl", batch.q[1 + i], k[:, seen]) * 0.25
      p = np.exp(scores - scores.max(-1, keepdims=True))
      np.testing.assert_allclose(got[1 + i], np.einsum("hl,hld->hd", p / p.sum(-1, keepdims=True), v[:, seen]),
                                 rtol=1e-12, atol=1e-12)


# Each case: (q heads, kv heads, head_dim, dtype, sliding_window, soft_cap, kv_dtype, sinks, kv_limits). GQA 1/4/8,
# head_dim 64/128, float32 and bfloat16; a window of 8 (shorter than the trees' spans, so that a deep node's window
# counted from its position would miss ancestors its depth keeps) and of 5, soft caps, int8 pages, sinks, image
# spans (kv_limits) over the same chunks.
TREE_MASKS = [
    pytest.param(2, 2, 64, np.float32, 8, None, None, False, False, id="gqa1-d64-f32-window8"),
    pytest.param(8, 2, 128, jnp.bfloat16, None, 2.0, jnp.int8, False, True, id="gqa4-d128-bf16-softcap-int8-limits"),
    pytest.param(8, 1, 64, np.float32, 5, 3.0, None, True, True, id="gqa8-d64-f32-window5-softcap-sinks-limits"),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype,sliding_window,soft_cap,kv_dtype,sinks,kv_limits",
                         TREE_MASKS)
@pytest.mark.parametrize("kernel", ["xla", "ragged", "decode"])
def test_tree_masks(kernel, num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap, kv_dtype, sinks,
                    kv_limits):
  """Each backend with random draft trees against float64 attention with the same masks, the kernels against the
  public xla entry too; padding rows (NaN, junk masks) and sequences; small blocks, 3 KV splits."""
  fn = {"xla": _LIMIT_KERNELS["xla"], "ragged": _ragged(4, 16), "decode": _decode(16, 3)}[kernel]
  testing.check_attention(
      fn, TREE_SEQS, seed=fresh.seed(), page_size=8, num_tokens=64, max_seqs=8, nan_padding=True,
      tree_masks=_tree_masks, kv_limits=_span_limits if kv_limits else None, kv_dtype=kv_dtype,
      sinks=testing.random_sinks(fresh.rng(), num_q_heads) if sinks else None,
      reference_fn=None if kernel == "xla" else functools.partial(_attn, backend="xla"),
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


# Llama 4's chunked attention layers: chunks of 8 (two 4-token pages), 12 (not a page multiple) and 48 (whole
# 16-position KV tiles inside a chunk: the ragged kernel's unmasked interior), alone, with a window, a draft tree's
# masks, int8 pages.
CHUNKS = [
    pytest.param(8, None, False, None, id="chunk8"),
    pytest.param(12, 5, False, None, id="chunk12-window5"),
    pytest.param(48, None, False, jnp.int8, id="chunk48-int8"),
    pytest.param(12, 8, True, None, id="chunk12-window8-trees"),
    pytest.param(12, None, True, None, id="chunk12-trees"),
]


@pytest.mark.parametrize("chunk,sliding_window,trees,kv_dtype", CHUNKS)
@pytest.mark.parametrize("kernel", ["xla", "ragged", "decode"])
def test_attention_chunks(kernel, chunk, sliding_window, trees, kv_dtype):
  """Each backend with an attention chunk, static (the kernels) and traced (xla), against float64 attention (a row
  sees nothing before its chunk's first position, (pos // chunk) x chunk; a tree row's from its depth) and the
  kernels against the xla entry; chunks crossing pages and KV tiles, padding rows of NaN."""
  fn = {"xla": _public("xla"), "ragged": _jit(functools.partial(
      ragged_kernel.ragged_paged_attention, interpret=True, block_q=4, block_kv=16), static_argnames=(
          *_OPTS, "attention_chunk")), "decode": _jit(functools.partial(
              decode_kernel.decode_attention, interpret=True, block_kv=16, num_splits=3), static_argnames=(
                  *_OPTS, "attention_chunk"))}[kernel]
  testing.check_attention(
      fn, TREE_SEQS + [(37, 200)], seed=fresh.seed(), page_size=4 if chunk < 16 else 8, num_tokens=104,
      max_seqs=8, nan_padding=True, attention_chunk=chunk, sliding_window=sliding_window, kv_dtype=kv_dtype,
      tree_masks=_tree_masks if trees else None,
      reference_fn=None if kernel == "xla" else functools.partial(_attn, backend="xla"))


def test_attention_f64_chunks():
  """The float64 attention's chunks themselves: a row sees exactly the positions of its own chunk up to itself, by
  a softmax over that list; a chunk past the context is the causal result bit for bit."""
  batch = testing.random_ragged_batch(fresh.rng(), [(10, 14)], num_q_heads=2, num_kv_heads=1, head_dim=8,
                                      page_size=4, dtype=np.float64)
  causal = testing.attention_f64(batch, sm_scale=0.3)
  np.testing.assert_array_equal(testing.attention_f64(batch, sm_scale=0.3, attention_chunk=64), causal)
  got = testing.attention_f64(batch, sm_scale=0.3, attention_chunk=5)
  k = np.repeat(batch.k_pages[:, batch.page_indices[0, :4]].reshape(1, -1, 8), 2, axis=0)
  v = np.repeat(batch.v_pages[:, batch.page_indices[0, :4]].reshape(1, -1, 8), 2, axis=0)
  for i, pos in enumerate(range(4, 14)):
    seen = list(range(pos // 5 * 5, pos + 1))
    scores = np.einsum("hd,hld->hl", batch.q[i], k[:, seen]) * 0.3
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(got[i], np.einsum("hl,hld->hd", p / p.sum(-1, keepdims=True), v[:, seen]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["ragged", "decode"])
def test_tree_masks_latent_cache(kernel):
  """Draft trees on a latent cache (16 q heads on one kv head, Dk/Dv = 16/64, the group cut in 2 head blocks) with
  int8 pages and a window of 8, against float64 attention and the xla reference."""
  fn = _ragged(2, 16, 8) if kernel == "ragged" else _decode(16, 3, 8)
  testing.check_attention(
      fn, TREE_SEQS, seed=fresh.seed(), page_size=8, num_tokens=64, max_seqs=8, nan_padding=True,
      tree_masks=_tree_masks, num_q_heads=16, num_kv_heads=1, head_dim=80, latent_dims=(16, 64),
      kv_dtype=jnp.int8, sliding_window=8, reference_fn=functools.partial(_attn, backend="xla"))


def test_tree_blocks_bound_what_the_masks_hide():
  """The ragged kernel's per-block tree scalars (tree_blocks), against a brute force over each block's rows and their
  masks' set bits: the unmasked interior ends at the lowest position any row hides (first_pos + 1 when none hides
  anything; never below 0), and a window starts from the lowest pos - popcount. Masks with random top bits (bit 31
  too), so that the lowest hidden position lands anywhere, and a block of zero masks."""
  rng = fresh.rng()
  batch = testing.random_ragged_batch(rng, TREE_SEQS, num_q_heads=2, num_kv_heads=1, head_dim=16, page_size=8,
                                      num_tokens=64, max_seqs=8)
  top = rng.integers(0, 32, 64)
  masks = ((rng.integers(0, 2**32, 64) & ((1 << top) - 1)) | (1 << top)).astype(np.uint32).view(np.int32)
  masks[rng.random(64) < 0.3] = 0
  masks[37:41] = 0                                     # block 10: the last 4 rows of the 40-token chunk (rows 1..40)
  args = [jnp.asarray(a) for a in (batch.cu_q_lens, batch.kv_lens, batch.num_seqs)]
  blocks = reference.query_blocks(*args, 64, 4)
  tree = reference.row_tree_masks(jnp.asarray(masks), *args, 64)
  interior_end, _, window_first, _ = map(np.asarray, ragged_kernel.tree_blocks(tree, blocks, 2, has_window=True))
  positions = testing.row_positions(batch)
  for b in range(int((np.asarray(blocks.num_rows) > 0).sum())):
    rows = np.asarray(blocks.row_tokens[b, :int(blocks.num_rows[b])])
    first = int(blocks.first_pos[b])
    hidden = [p - 1 - bit for p, m in zip(positions[rows], masks[rows].view(np.uint32)) for bit in range(32)
              if int(m) >> bit & 1]
    assert interior_end[b] == max(0, min([first + 1, *hidden])), (b, rows)
    popcounts = np.array([bin(int(m)).count("1") for m in masks[rows].view(np.uint32)])
    assert window_first[b] == (positions[rows] - popcounts).min(), (b, rows)
  assert interior_end[10] == int(blocks.first_pos[10]) + 1


# ---------------------------------------------------------------------------------------------
# 8-bit KV cache (pallas_kernels/kv_quant.py): every backend reads the same quantized pages.

KV_QUANT = [
    pytest.param(jnp.int8, jnp.bfloat16, 4, 2, 64, 7, None, False, id="int8-bf16-gqa2-window"),
    pytest.param(jnp.float8_e4m3fn, np.float32, 8, 1, 128, None, 2.0, True,
                 id="fp8-f32-gqa8-softcap-sinks"),
]


@pytest.mark.parametrize(
    "kv_dtype,dtype,num_q_heads,num_kv_heads,head_dim,sliding_window,soft_cap,sinks", KV_QUANT)
@pytest.mark.parametrize("kernel", ["xla", "ragged", "decode"])
def test_quantized_cache(kernel, kv_dtype, dtype, num_q_heads, num_kv_heads, head_dim,
                         sliding_window, soft_cap, sinks):
  """Each backend on quantized pages (garbage slots quantized too) against float64 attention over
  the dequantized pages, and against the xla reference, at the cache's dtype tolerance."""
  fn = {"xla": _public("xla"), "ragged": _ragged(4, 16), "decode": _decode(16, 3)}[kernel]
  seqs = DECODES if kernel == "decode" else MIXED
  testing.check_attention(
      fn, seqs, seed=fresh.seed(), page_size=8, num_tokens=sum(q for q, _ in seqs) + 3, max_seqs=7,
      kv_dtype=kv_dtype, reference_fn=None if kernel == "xla" else functools.partial(_attn, backend="xla"),
      sinks=testing.random_sinks(fresh.rng(), num_q_heads) if sinks else None,
      **_features(num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, soft_cap))


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_quantize_error_bound(kv_dtype):
  """int8: every element within half a step (scale / 2); e4m3: within 2^-4 of its magnitude (3
  mantissa bits), or of the smallest normal step. The largest element is exact; zeros stay zero."""
  rng = fresh.rng()
  x = rng.standard_normal((64, 4, 32)) * rng.uniform(1e-3, 1e3, (64, 4, 1))
  x[3, 1] = 0.0
  values, scales = kv_quant.quantize(jnp.asarray(x, jnp.float32), kv_dtype)
  assert values.dtype == kv_quant.storage_dtype(kv_dtype) and scales.dtype == jnp.float32 and scales.shape == (64, 4)
  back = kv_quant.dequantize_np(values, scales)
  err = np.abs(back - x)
  s = np.asarray(scales, np.float64)[..., None]
  if kv_dtype == jnp.int8:
    assert (err <= 0.5001 * s).all()
  else:
    assert (err <= np.maximum(np.abs(x) * 2.0**-4, s * 2.0**-9) * 1.0001).all()
  top = np.abs(x).argmax(-1)[..., None]
  np.testing.assert_allclose(np.take_along_axis(back, top, -1), np.take_along_axis(x, top, -1), rtol=1e-6)
  assert (back[3, 1] == 0).all() and np.asarray(scales)[3, 1] == 1.0


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_write_kv_quantized(backend):
  """Both backends write the same values and scales (quantized from the new rows), into the traced
  layer only; padding slots are skipped."""
  rng = fresh.rng()
  num_kv_heads, num_pages, page_size, head_dim, num_tokens = 2, 5, 4, 16, 9
  shape = (NUM_LAYERS, num_kv_heads, num_pages, page_size, head_dim)
  k_pages = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
  v_pages = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
  k_scales = jnp.asarray(rng.uniform(size=shape[:-1]), jnp.float32)
  v_scales = jnp.asarray(rng.uniform(size=shape[:-1]), jnp.float32)
  k = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
  slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
  slots[[2, 7]] = [-1, -5]
  layer = int(rng.integers(NUM_LAYERS))
  got = _jit(functools.partial(pallas_kernels.write_kv, backend=backend))(
      k_pages, v_pages, k, v, jnp.asarray(slots), layer=jnp.int32(layer), k_scales=k_scales,
      v_scales=v_scales)
  want = [np.array(a) for a in (k_pages, v_pages, k_scales, v_scales)]
  (kq, ks), (vq, vs) = kv_quant.quantize(k, jnp.int8), kv_quant.quantize(v, jnp.int8)
  for t, slot in enumerate(slots):
    if slot >= 0:
      for arr, new in zip(want, (kq, vq, ks, vs)):
        arr[layer, :, slot // page_size, slot % page_size] = np.asarray(new[t])
  assert [a.dtype for a in got] == [jnp.int8, jnp.int8, jnp.float32, jnp.float32]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w)
  with pytest.raises(ValueError, match="8-bit cache"):
    pallas_kernels.write_kv(k_pages, v_pages, k, v, jnp.asarray(slots), layer=jnp.int32(0), backend=backend)


# ---------------------------------------------------------------------------------------------
# write_kv.

@pytest.mark.parametrize("backend,dtype,stacked", [
    ("xla", np.float32, True),
    ("pallas_interpret", np.float32, False),
    ("pallas_interpret", jnp.bfloat16, True),
])
def test_write_kv(backend, dtype, stacked):
  """Into NaN pages: exactly the new rows land, nothing else changes. stacked: a [L, ...] cache
  and a random traced layer; only that layer may change."""
  rng = fresh.rng()
  num_kv_heads, num_pages, page_size, head_dim, num_tokens = 2, 5, 4, 16, 9
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  if stacked:
    shape = (NUM_LAYERS, *shape)
  layer = int(rng.integers(NUM_LAYERS)) if stacked else None
  # Untouched slots are NaN and must stay NaN; touched ones must hold exactly the new rows.
  k_pages, v_pages = np.full(shape, np.nan), np.full(shape, np.nan)
  k = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
  v = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
  slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
  slots[[2, 7]] = [-1, -5]  # padding rows; -5 would wrap onto a real slot if not dropped
  write = _jit(functools.partial(pallas_kernels.write_kv, backend=backend),
               donate_argnums=(0, 1))
  got_k, got_v = write(jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
                       jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                       jnp.asarray(slots), layer=None if layer is None else jnp.int32(layer))
  assert got_k.dtype == dtype and got_k.shape == shape
  want_k, want_v = k_pages.copy(), v_pages.copy()
  want_k_layer = want_k if layer is None else want_k[layer]  # views: writes land in want_*
  want_v_layer = want_v if layer is None else want_v[layer]
  for t, slot in enumerate(slots):
    if slot >= 0:
      want_k_layer[:, slot // page_size, slot % page_size] = k[t]
      want_v_layer[:, slot // page_size, slot % page_size] = v[t]
  # rounded from the float32 rows the kernel gets (float64 -> bfloat16 at once can round the other way)
  round_ = lambda x: np.asarray(jnp.asarray(np.float32(x), dtype).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(got_k.astype(jnp.float32)), round_(want_k))
  np.testing.assert_array_equal(np.asarray(got_v.astype(jnp.float32)), round_(want_v))


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.int8])
def test_write_kv_latent(kv_dtype):
  """A latent cache's rows (K a RoPE key of 16, V a latent of 64): the Pallas write stores what the jnp scatter
  stores, bit for bit (values and, 8-bit, scales), into the traced layer only; padding slots skipped."""
  rng = fresh.rng()
  num_pages, page_size, num_tokens, layer = 5, 4, 9, 1
  storage = kv_quant.storage_dtype(kv_dtype)
  cache = [jnp.asarray(rng.integers(0, 100, (NUM_LAYERS, 1, num_pages, page_size, d)), storage) for d in (16, 64)]
  if kv_quant.is_quantized(storage):
    cache += [jnp.asarray(rng.uniform(size=(NUM_LAYERS, 1, num_pages, page_size)), jnp.float32)] * 2
  k = jnp.asarray(rng.standard_normal((num_tokens, 1, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((num_tokens, 1, 64)), jnp.float32)
  slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
  slots[[2, 7]] = [-1, -5]
  outs = [_jit(functools.partial(pallas_kernels.write_kv, backend=backend))(
      cache[0], cache[1], k, v, jnp.asarray(slots), layer=jnp.int32(layer), **kv_quant.scale_kwargs(cache))
      for backend in ("xla", "pallas_interpret")]
  for want, got, old in zip(*outs, cache):
    assert got.shape == old.shape and got.dtype == old.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got)[layer - 1], np.asarray(old)[layer - 1])  # other layers untouched
  assert not np.array_equal(np.asarray(outs[1][1]), np.asarray(cache[1]))


# ---------------------------------------------------------------------------------------------
# Triton lowering (Pallas -> Triton IR for CUDA and ROCm) at production-like shapes: catches
# unsupported primitives and indexing on a machine without a GPU. tests/test_kernels_compile.py
# goes on to machine code where the triton package is installed.

@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size,dtype", [
    (32, 8, 128, 16, jnp.bfloat16),   # Llama-3-8B
    (12, 4, 64, 8, jnp.bfloat16),     # GQA 3, small pages
    (8, 1, 256, 32, jnp.float32),
    (4, 4, 128, 128, jnp.bfloat16),   # GQA 1, big pages
])
def test_lowers_to_triton(num_q_heads, num_kv_heads, head_dim, page_size, dtype):
  """Every kernel, in the engine's form: stacked [L, ...] cache and a traced layer index."""
  rng = fresh.rng()
  batch = testing.random_ragged_batch(rng, [(1, 9), (20, 300)], num_q_heads=num_q_heads,
                                      num_kv_heads=num_kv_heads, head_dim=head_dim,
                                      page_size=page_size, num_tokens=32, max_seqs=4)
  pages = jax.ShapeDtypeStruct((NUM_LAYERS, *batch.k_pages.shape), dtype)
  layer = jax.ShapeDtypeStruct((), jnp.int32)
  args = [jax.ShapeDtypeStruct(batch.q.shape, dtype), pages, pages,
          *map(jnp.asarray, batch.args[3:])]
  new = jax.ShapeDtypeStruct((32, num_kv_heads, head_dim), dtype)
  slots = jax.ShapeDtypeStruct((32,), jnp.int32)
  for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
    names = []
    for decode_only in (False, True):
      fn = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=0.1,
                             sliding_window=64, soft_cap=30.0, backend="pallas",
                             decode_only=decode_only)
      names += [m.name for m in gpu_compile.triton_modules(fn, *args, layer=layer, target=target)]
    fn = functools.partial(pallas_kernels.write_kv, backend="pallas")
    modules = gpu_compile.triton_modules(fn, pages, pages, new, new, slots, layer=layer,
                                         target=target)
    assert all("tt.func" in m.text for m in modules)
    names += [m.name for m in modules]
    assert names == ["ragged_paged_attention", "ragged_paged_decode_attention", "write_kv"], names


@pytest.mark.parametrize("heads,rows", [((4, 1, 256), ("kv_limits",)), ((8, 2, 128), ("kv_limits", "tree_masks")),
                                         ((8, 2, 128), ("tree_masks",))])
def test_per_row_inputs_lower_to_triton(heads, rows):
  """Both attention kernels with per-row inputs, in the engine's form: per-row limits (one more [rows] / per-row int32
  input) at Gemma 3's heads (one kv head of 256, a traced window); draft-tree masks (the masks and, with a window,
  their popcounts) at Llama-3-8B's (GQA 4, 128 wide), with limits and a traced window, and alone. They lower for CUDA
  and ROCm, and their wrappers add no loop around the kernels. tests/test_kernels_compile.py compiles the kernels
  without them to machine code."""
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  num_q_heads, num_kv_heads, head_dim = heads
  num_tokens, max_seqs = 64, 8
  windowed = "kv_limits" in rows
  pages = jax.ShapeDtypeStruct((NUM_LAYERS, num_kv_heads, 64, 16, head_dim), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), jnp.bfloat16), pages, pages, i32(max_seqs),
          i32(max_seqs, 8), i32(max_seqs + 1), i32(1))
  for decode_only in (False, True):
    def attend(window, layer, *xs, decode_only=decode_only):
      return pallas_kernels.ragged_paged_attention(
          *xs[len(rows):], sm_scale=head_dim ** -0.5, sliding_window=window if windowed else None,
          soft_cap=30.0 if windowed else None, backend="pallas", decode_only=decode_only, layer=layer,
          **dict(zip(rows, xs)))
    inputs = (i32(), i32(), *[i32(num_tokens)] * len(rows), *args)
    assert gpu_compile.loops_outside_kernels(jax.make_jaxpr(attend)(*inputs).jaxpr) == []
    for target in (gpu_compile.TARGETS["sm90"], gpu_compile.TARGETS["gfx942"]):
      [module] = gpu_compile.triton_modules(attend, *inputs, target=target)
      assert "tt.func" in module.text
      assert module.name == ("ragged_paged_decode_attention" if decode_only else "ragged_paged_attention")


# ---------------------------------------------------------------------------------------------
# No loop outside the kernels. On a GPU, XLA runs a while loop from the host, one iteration's
# kernels at a time; in the attention's prologue that is per layer per step (it sat inside the
# layer scan: jnp.searchsorted's default method, log2(sequence slots) iterations).

def test_bucket_of_matches_searchsorted():
  """The unrolled search the kernels' wrappers use, against numpy's, on fresh random sorted arrays
  with repeats (empty sequences), values below, inside and past them."""
  rng = fresh.rng()
  for size in (1, 2, 7, 8, 9, 64, 65, 257):
    ends = np.sort(rng.integers(0, 3 * size, size)).astype(np.int32)
    values = rng.integers(-2, 3 * size + 2, 300).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(reference.bucket_of(jnp.asarray(ends), jnp.asarray(values))),
                                  np.searchsorted(ends, values, side="right"))


def test_no_loop_outside_the_kernels():
  """The Pallas wrappers (both attention kernels, the KV write, the grouped expert matmul) add no
  loop around their kernels, and a model step's only loop outside them is the layer scan: Llama
  (GQA 4) and Gemma 3 (one KV head, windowed and global layers: a traced window), with the
  decode kernel and with the ragged one. The searchsorted loop this replaced is caught."""
  from engine import runner  # noqa: PLC0415
  from models import llama  # noqa: PLC0415
  from models.config import LlamaConfig  # noqa: PLC0415

  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  num_tokens, max_seqs, max_pages = 32, 16, 8
  batch_args = (i32(max_seqs), i32(max_seqs, max_pages), i32(max_seqs + 1), i32(1))
  pages = jax.ShapeDtypeStruct((NUM_LAYERS, 2, 64, 16, 64), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((num_tokens, 8, 64), jnp.bfloat16)
  new = jax.ShapeDtypeStruct((num_tokens, 2, 64), jnp.bfloat16)
  for decode_only in (True, False):
    def attend(window, layer, *args, decode_only=decode_only):
      return pallas_kernels.ragged_paged_attention(*args, sm_scale=0.1, sliding_window=window, backend="pallas",
                                                   decode_only=decode_only, layer=layer)
    assert gpu_compile.loops_outside_kernels(jax.make_jaxpr(attend)(i32(), i32(), q, pages, pages, *batch_args).jaxpr) == []
  write = lambda layer, *args: pallas_kernels.write_kv(*args, backend="pallas", layer=layer)  # noqa: E731
  assert gpu_compile.loops_outside_kernels(jax.make_jaxpr(write)(i32(), pages, pages, new, new, i32(num_tokens)).jaxpr) == []
  from pallas_kernels import fp8_matmul  # noqa: PLC0415
  experts = jax.ShapeDtypeStruct((64, 128, 256), jnp.int8)
  grouped = jax.make_jaxpr(fp8_matmul.grouped_scaled_matmul)(
      jax.ShapeDtypeStruct((48, 128), jnp.bfloat16), experts, jax.ShapeDtypeStruct((64, 256), jnp.float32), i32(64))
  assert gpu_compile.loops_outside_kernels(grouped.jaxpr) == []
  # The step. What this replaced shows up: searchsorted's default method as a scan over its levels.
  assert gpu_compile.loops_outside_kernels(jax.make_jaxpr(
      lambda a, b: jnp.searchsorted(a, b, side="right"))(i32(max_seqs), i32(num_tokens)).jaxpr) == ["scan[5]"]
  llama_cfg = LlamaConfig(architecture="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=8, num_kv_heads=2, head_dim=64, max_position=512)
  gemma_cfg = LlamaConfig(architecture="gemma3", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4,
                          num_heads=4, num_kv_heads=1, head_dim=256, max_position=512, sliding_window=32,
                          sliding_layers=(True, True, False, True), rope_theta=1e6, rope_local_theta=1e4,
                          hidden_act="gelu_tanh", qk_norm=True, sandwich_norms=True, embed_scale=16.0)
  for cfg in (llama_cfg, gemma_cfg):
    params = jax.eval_shape(functools.partial(llama.init_params, cfg), jax.random.key(0))
    caches = tuple(jax.ShapeDtypeStruct(shape, dtype)
                   for shape, dtype in runner.cache_arrays(cfg, (64, 16), np.dtype(jnp.bfloat16)))
    inputs = llama.ModelInputs(i32(num_tokens), i32(num_tokens), i32(num_tokens), *batch_args, i32(max_seqs))
    for decode_only in (True, False):
      step = functools.partial(llama.forward, cfg=cfg, attn_backend="pallas", decode_only=decode_only)
      loops = gpu_compile.loops_outside_kernels(jax.make_jaxpr(step)(params, kv_caches=caches, inputs=inputs).jaxpr)
      assert loops == [f"scan[{cfg.num_layers}]"], (cfg.architecture, decode_only, loops)


# ---------------------------------------------------------------------------------------------
# The engine's stacked cache: [L, Hkv, P, ps, D] with a traced layer index, read and written in
# place. Every layer holds different random content, so reading the wrong layer shows up.

NUM_LAYERS = 3


def _stacked_batch(seed, seqs, *, num_tokens, max_seqs, dtype=np.float32, **shape):
  """A random batch whose k/v pages are stacked over NUM_LAYERS layers of different content."""
  rng = np.random.default_rng(seed)
  batch = testing.random_ragged_batch(rng, seqs, num_tokens=num_tokens, max_seqs=max_seqs,
                                      **shape)
  k_all = np.stack([batch.k_pages] + [rng.standard_normal(batch.k_pages.shape)
                                      for _ in range(NUM_LAYERS - 1)])
  v_all = np.stack([batch.v_pages] + [rng.standard_normal(batch.v_pages.shape)
                                      for _ in range(NUM_LAYERS - 1)])
  perm = rng.permutation(NUM_LAYERS)  # the batch's own pages land in a random layer
  k_all, v_all = jnp.asarray(k_all[perm], dtype), jnp.asarray(v_all[perm], dtype)
  rest = [jnp.asarray(a) for a in batch.args[3:]]
  return jnp.asarray(batch.q, dtype), k_all, v_all, rest


_LAYER_KERNELS = {
    "xla": functools.partial(reference.ragged_paged_attention, block_q=2, pages_per_block=2),
    "ragged": functools.partial(ragged_kernel.ragged_paged_attention, interpret=True, block_q=4,
                                block_kv=16),
    "decode": functools.partial(decode_kernel.decode_attention, interpret=True, block_kv=16,
                                num_splits=3),
}


@pytest.mark.parametrize("kernel", _LAYER_KERNELS)
def test_stacked_cache_reads_the_layer(kernel):
  """attention(k_all, layer=l) == attention(k_all[l]) for a random traced layer l, with attention
  sinks (the layer's own [Hq] row either way)."""
  q, k_all, v_all, rest = _stacked_batch(fresh.seed(), MIXED, num_tokens=24, max_seqs=7, num_q_heads=4,
                                         num_kv_heads=2, head_dim=32, page_size=4)
  opts = dict(sm_scale=32 ** -0.5, sliding_window=13, soft_cap=3.0)
  fn = _jit(functools.partial(_LAYER_KERNELS[kernel], **opts))
  sinks = jnp.asarray(testing.random_sinks(fresh.rng(), 4))
  for layer in fresh.rng().permutation(NUM_LAYERS)[:2]:
    got = fn(q, k_all, v_all, *rest, layer=jnp.int32(layer), sinks=sinks)
    want = fn(q, k_all[layer], v_all[layer], *rest, sinks=sinks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", _LAYER_KERNELS)
def test_traced_window_equals_static_window(kernel):
  """A per-layer window passed as a traced int32 (Gemma 3 under lax.scan) gives what the static
  int gives, and a window wider than any context equals no window."""
  q, k_all, v_all, rest = _stacked_batch(fresh.seed(), MIXED, num_tokens=24, max_seqs=7, num_q_heads=4,
                                         num_kv_heads=2, head_dim=32, page_size=4)
  base = functools.partial(_LAYER_KERNELS[kernel], sm_scale=32 ** -0.5, soft_cap=3.0)
  traced = _jit(lambda window, *xs, layer: base(*xs, sliding_window=window, layer=layer))
  layer = jnp.int32(1)
  for window in (3, 17):
    want = _jit(functools.partial(base, sliding_window=window))(q, k_all, v_all, *rest, layer=layer)
    got = traced(jnp.int32(window), q, k_all, v_all, *rest, layer=layer)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  want = _jit(functools.partial(base, sliding_window=None))(q, k_all, v_all, *rest, layer=layer)
  got = traced(jnp.int32(1 << 30), q, k_all, v_all, *rest, layer=layer)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", _LAYER_KERNELS)
def test_tree_masks_stacked_cache_traced_window(kernel):
  """Draft-tree masks in the engine's form (stacked cache, traced layer, a traced window): all-zero masks (junk on
  padding rows) give the result without masks bit for bit; random trees, and random 32-bit masks (any bit, the sign
  bit too: the contract holds for any mask), give float64 attention's over that layer, with a window of 8 and one
  wider than any context (the ragged kernel's unmasked interior)."""
  q, k_all, v_all, rest = _stacked_batch(fresh.seed(), TREE_SEQS, num_tokens=64, max_seqs=8, num_q_heads=4,
                                         num_kv_heads=2, head_dim=32, page_size=8)
  opts = dict(sm_scale=32 ** -0.5, soft_cap=3.0)
  fn = _jit(lambda window, *xs, **kw: _LAYER_KERNELS[kernel](*xs, sliding_window=window, **opts, **kw))
  rng = fresh.rng()
  layer = int(rng.integers(NUM_LAYERS))
  batch = testing.RaggedBatch(*map(np.asarray, (q, k_all[layer], v_all[layer], *rest)))
  n = batch.num_valid_tokens
  junk = rng.integers(-2**31, 2**31, 64).astype(np.int32)
  zeros = np.where(np.arange(64) < n, 0, junk)
  trees = testing.random_tree_masks(rng, batch)
  random_bits = rng.integers(-2**31, 2**31, 64).astype(np.int32)
  tol = testing.tolerances(np.float32)
  for window in (8, 1 << 30):
    args = (jnp.int32(window), q, k_all, v_all, *rest)
    causal = np.asarray(fn(*args, layer=jnp.int32(layer)))[:n]
    np.testing.assert_array_equal(np.asarray(fn(*args, layer=jnp.int32(layer), tree_masks=jnp.asarray(zeros)))[:n],
                                  causal)
    for masks in (trees, random_bits):
      got = np.asarray(fn(*args, layer=jnp.int32(layer), tree_masks=jnp.asarray(masks)))[:n]
      want = testing.attention_f64(batch, sliding_window=window, tree_masks=masks, **opts)
      np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3])
def test_xla_write_kv_updates_the_cache_in_place(num_kv_heads):
  """The engine's pattern (scan over layers, stacked cache donated as the carry): XLA allocates no
  temporary anywhere near the cache's size, i.e. it never copies the cache. With one KV head (MQA,
  Gemma 3 270M) a flat-slot reshape used to cost a full copy per layer (5 s per step there)."""
  shape = (NUM_LAYERS, num_kv_heads, 512, 16, 64)
  pages = jax.ShapeDtypeStruct(shape, jnp.float32)
  new = jax.ShapeDtypeStruct((16, num_kv_heads, 64), jnp.float32)
  slots = jax.ShapeDtypeStruct((16,), jnp.int32)

  def stacked(k_pages, v_pages, k, slots):
    body = lambda kv, i: (reference.write_kv(*kv, k, k, slots, layer=i), None)
    return jax.lax.scan(body, (k_pages, v_pages), jnp.arange(NUM_LAYERS))[0]

  def one_layer(k_pages, v_pages, k, slots):
    return reference.write_kv(k_pages, v_pages, k, k, slots)

  layer_pages = jax.ShapeDtypeStruct(shape[1:], jnp.float32)
  for fn, cache in ((stacked, pages), (one_layer, layer_pages)):
    stats = jax.jit(fn, donate_argnums=(0, 1)).lower(cache, cache, new, slots).compile() \
        .memory_analysis()
    cache_bytes = np.prod(cache.shape) * 4
    assert stats.alias_size_in_bytes == 2 * cache_bytes  # both caches updated in their buffers
    assert stats.temp_size_in_bytes < cache_bytes / 16, (fn.__name__, stats.temp_size_in_bytes)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.bfloat16])
def test_xla_cache_storage_is_never_copied(kv_dtype):
  """The engine's cache storage under its scan: the write (values, and scales when 8-bit) stays in
  place and the attention read gathers only its blocks. A float8 or bfloat16 cache array made XLA's
  CPU backend upcast, i.e. copy, the whole cache at every write and read; they are stored as their
  uint8 / uint16 bits (kv_quant.storage_dtype)."""
  shape = (NUM_LAYERS, 2, 4096, 16, 64)  # 25 MB of 8-bit values: the attention's own blocks are far smaller
  storage = kv_quant.storage_dtype(kv_dtype)
  cache = (jax.ShapeDtypeStruct(shape, storage),) * 2
  if kv_quant.is_quantized(storage):
    cache += (jax.ShapeDtypeStruct(shape[:-1], jnp.float32),) * 2
  new = jax.ShapeDtypeStruct((16, 2, 64), jnp.float32)
  q = jax.ShapeDtypeStruct((16, 4, 64), jnp.float32)
  meta = (jnp.full(4, 300, jnp.int32), jnp.arange(4 * 20, dtype=jnp.int32).reshape(4, 20),
          jnp.asarray([0, 4, 8, 12, 16], jnp.int32), jnp.asarray([4], jnp.int32))

  def step(kv, q, k, slots):
    def body(kv, i):
      kv = reference.write_kv(kv[0], kv[1], k, k, slots, layer=i, **kv_quant.scale_kwargs(kv))
      return kv, reference.ragged_paged_attention(q, kv[0], kv[1], *meta, sm_scale=0.1, layer=i,
                                                  **kv_quant.scale_kwargs(kv))
    return jax.lax.scan(body, kv, jnp.arange(NUM_LAYERS))

  stats = jax.jit(step, donate_argnums=0).lower(cache, q, new, jax.ShapeDtypeStruct((16,), jnp.int32)) \
      .compile().memory_analysis()
  cache_bytes = sum(np.prod(c.shape) * c.dtype.itemsize for c in cache)
  assert stats.alias_size_in_bytes == cache_bytes
  assert stats.temp_size_in_bytes < np.prod(shape) / 16, stats.temp_size_in_bytes  # 8-bit values / 16


def test_stacked_cache_under_scan():
  """The engine's call pattern: lax.scan over layers, the stacked cache as the (donated) carry;
  each step writes its layer's new K/V (write_kv) and attends over it. Pallas (interpret; the
  ragged and the decode kernel) == xla, caches bit for bit."""
  seqs = MIXED
  num_tokens, max_seqs, head_dim, page_size = 24, 7, 32, 4
  q, k_all, v_all, (kv_lens, page_indices, cu_q_lens, num_seqs) = _stacked_batch(
      fresh.seed(), seqs, num_tokens=num_tokens, max_seqs=max_seqs, num_q_heads=4, num_kv_heads=2,
      head_dim=head_dim, page_size=page_size)
  rng = fresh.rng()
  # Each layer's new tokens (queries, keys, values) and their slots; padding rows get slot -1.
  seq_ids, positions, valid = reference.token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  pages = page_indices[seq_ids, jnp.maximum(positions, 0) // page_size]
  slots = jnp.where(valid, pages * page_size + positions % page_size, -1)
  qs = jnp.asarray(rng.standard_normal((NUM_LAYERS, *q.shape)), q.dtype)
  ks = jnp.asarray(rng.standard_normal((NUM_LAYERS, num_tokens, 2, head_dim)), q.dtype)
  vs = jnp.asarray(rng.standard_normal((NUM_LAYERS, num_tokens, 2, head_dim)), q.dtype)

  def run(backend, decode_only=False):
    def layer_step(cache, xs):
      k_pages, v_pages = cache
      i, q_i, k_i, v_i = xs
      k_pages, v_pages = pallas_kernels.write_kv(k_pages, v_pages, k_i, v_i, slots,
                                                 backend=backend, layer=i)
      out = pallas_kernels.ragged_paged_attention(
          q_i, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
          sm_scale=head_dim ** -0.5, sliding_window=9, backend=backend, decode_only=decode_only,
          layer=i)
      return (k_pages, v_pages), out

    @functools.partial(_jit, donate_argnums=(0, 1))
    def forward(k_pages, v_pages):
      layer_ids = jnp.arange(NUM_LAYERS, dtype=jnp.int32)
      return jax.lax.scan(layer_step, (k_pages, v_pages), (layer_ids, qs, ks, vs))

    return forward(jnp.copy(k_all), jnp.copy(v_all))

  (k_want, v_want), out_want = run("xla")
  n = int(cu_q_lens[int(num_seqs[0])])
  for decode_only in (False, True):
    (k_got, v_got), out_got = run("pallas_interpret", decode_only)
    np.testing.assert_array_equal(np.asarray(k_got), np.asarray(k_want))
    np.testing.assert_array_equal(np.asarray(v_got), np.asarray(v_want))
    np.testing.assert_allclose(np.asarray(out_got)[:, :n], np.asarray(out_want)[:, :n],
                               **testing.tolerances(np.float32))


def test_check_offsets_refuses_arrays_whose_offsets_wrap():
  """1-byte arrays of more than 2**31 and at most 2**32 elements are indexed with wrapping 32-bit
  offsets by JAX's Triton lowering (it switches to 64 bits past 2**32 bytes): refused by name, by
  every kernel (through stacked_cache), before any memory is touched. Shapes only, no data."""
  def pages(num_pages, dtype):
    return jax.ShapeDtypeStruct((2, 8, num_pages, 16, 128), dtype)  # 2**15 elements a page

  for num_pages, dtype, ok in ((2**16, jnp.int8, True),             # 2**31 elements: the last offset fits
                               (2**16 + 1, jnp.int8, False),
                               (2**17, jnp.int8, False),            # exactly 4 GiB: still 32-bit offsets
                               (2**17 + 1, jnp.int8, True),         # past 4 GiB: 64-bit offsets
                               (2**17, jnp.bfloat16, True)):
    if ok:
      ragged_kernel.check_offsets(pages(num_pages, dtype))
    else:
      with pytest.raises(ValueError, match="32-bit offsets"):
        ragged_kernel.check_offsets(pages(num_pages, dtype))
  k = pages(2**17, jnp.int8)
  scales = jax.ShapeDtypeStruct(k.shape[:-1], jnp.float32)
  with pytest.raises(ValueError, match="cache array of 4294967296 elements"):
    jax.eval_shape(functools.partial(ragged_kernel.stacked_cache, layer=jnp.int32(0)), k, k,
                   k_scales=scales, v_scales=scales)


@pytest.mark.parametrize("memory_gb,backend,want_pages", [
    (6.0, "pallas_interpret", 4096),   # an int8 K array of 2**31 elements at most (2 GiB), not 2.9 GiB
    (3.0, "pallas_interpret", None),   # under 2 GiB: all of cache.memory_gb
    (9.0, "pallas_interpret", None),   # over 4 GiB: all of it (64-bit offsets)
    (6.0, "xla", None),                # the xla backend has no such limit
])
def test_kv_plan_sizes_8bit_caches_around_the_offset_limit(memory_gb, backend, want_pages):
  from engine.config import EngineConfig  # noqa: PLC0415
  from engine.kv_plan import plan_kv_cache  # noqa: PLC0415
  from models.config import LlamaConfig  # noqa: PLC0415

  cfg = LlamaConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=32,
                    num_heads=32, num_kv_heads=8, head_dim=128)  # int8 K or V: 2**19 elements a page
  config = EngineConfig().replace(**{"attention.backend": backend, "cache.memory_gb": memory_gb})
  plan = plan_kv_cache(config, cfg, 4096, np.dtype(np.int8))
  by_budget = int(memory_gb * 2**30) // plan.page_bytes
  assert plan.num_pages == (want_pages or by_budget)
  with pytest.raises(Exception, match="cannot index"):
    plan_kv_cache(config.replace(**{"attention.backend": "pallas_interpret", "cache.num_pages": 5000}), cfg, 4096,
                  np.dtype(np.int8))
