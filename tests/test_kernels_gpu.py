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
import fresh

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

MIXED = [(1, 9), (5, 5), (1, 1), (40, 70), (3, 300), (17, 17), (1, 129)]
DECODES = [(1, 9), (1, 1), (1, 333), (1, 16), (1, 1000), (1, 64)]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "backend",
                                             "decode_only", "attention_chunk"))
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


@pytest.mark.parametrize("decode_only", [False, True])
def test_pallas_gpu_sinks(decode_only):
  """Attention sinks (+10, -30 and moderate ones) with gpt-oss heads (64 q, 8 kv, head_dim 64) and
  its 128-token window, bfloat16."""
  seqs = DECODES if decode_only else MIXED
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), seqs,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=64, num_kv_heads=8,
      head_dim=64, page_size=16, dtype=jnp.bfloat16, sliding_window=128,
      sinks=testing.random_sinks(np.random.default_rng(2), 64), num_tokens=sum(q for q, _ in seqs) + 3)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float32])
def test_pallas_gpu_kv_limits(decode_only, dtype):
  """Per-row KV limits (Gemma 3's images: a span of a chunk's rows sees to the span's end) with Gemma 3 4B's heads
  (8 q, 4 kv, head_dim 256), its 1,024-token window scaled down to 37 so that it bites, and a soft cap."""
  rng = fresh.rng()
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), MIXED,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=8, num_kv_heads=4, head_dim=256,
      page_size=16, dtype=dtype, sliding_window=37, soft_cap=30.0, num_tokens=sum(q for q, _ in MIXED) + 3,
      kv_limits=lambda batch: testing.random_kv_limits(rng, batch, boundary=16), nan_padding=True)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_pallas_gpu_tree_masks(decode_only, sliding_window):
  """Draft-tree masks (tree speculative decoding: each row hides the other branches' nodes before it, and its window
  counts back from its depth) with Llama-3-8B heads, bfloat16; a window of 8 shorter than the trees' spans."""
  rng = fresh.rng()
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), MIXED,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=32, num_kv_heads=8, head_dim=128,
      page_size=16, dtype=jnp.bfloat16, sliding_window=sliding_window, num_tokens=sum(q for q, _ in MIXED) + 3,
      tree_masks=lambda batch: testing.random_tree_masks(rng, batch), nan_padding=True)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("chunk,trees", [(64, False), (48, True)])
def test_pallas_gpu_attention_chunks(decode_only, chunk, trees):
  """Llama 4's chunked attention (a row sees nothing before its chunk's first position) with Llama-3-8B heads,
  bfloat16: chunks of 64 (whole 16-position pages, the prefill's 128-position tiles crossing them) and 48 with draft
  trees (counted from a row's depth)."""
  rng = fresh.rng()
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), MIXED,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=32, num_kv_heads=8, head_dim=128,
      page_size=16, dtype=jnp.bfloat16, attention_chunk=chunk, num_tokens=sum(q for q, _ in MIXED) + 3,
      tree_masks=(lambda batch: testing.random_tree_masks(rng, batch)) if trees else None, nan_padding=True)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_pallas_gpu_8bit_cache(decode_only, kv_dtype):
  """8-bit pages with float32 scales (pallas_kernels/kv_quant.py), Llama-3-8B heads, bfloat16 q."""
  seqs = DECODES if decode_only else MIXED
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), seqs,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=32, num_kv_heads=8,
      head_dim=128, page_size=16, dtype=jnp.bfloat16, sliding_window=128, kv_dtype=kv_dtype,
      num_tokens=sum(q for q, _ in seqs) + 3)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("num_q_heads,kv_dtype", [(16, None), (128, None), (16, jnp.int8)])
def test_pallas_gpu_latent_cache(decode_only, num_q_heads, kv_dtype):
  """DeepSeek-V3's latent cache (one kv head: K pages a 64-wide RoPE key, V pages a 512-wide latent; q 576 wide),
  16 q heads (tensor parallel 8) and 128 (one device: the group cut over programs of 64 heads), bfloat16, 8-bit
  pages too, at the default latent tiles."""
  seqs = DECODES if decode_only else MIXED
  testing.check_attention(
      functools.partial(_attn, backend="pallas", decode_only=decode_only), seqs,
      reference_fn=functools.partial(_attn, backend="xla"), num_q_heads=num_q_heads, num_kv_heads=1,
      head_dim=576, latent_dims=(64, 512), page_size=16, dtype=jnp.bfloat16, kv_dtype=kv_dtype,
      num_tokens=sum(q for q, _ in seqs) + 3, nan_padding=True)


def test_write_kv_8bit_gpu():
  """The Pallas write of an 8-bit cache stores the same values and scales as the jnp scatter."""
  rng = np.random.default_rng(1)
  shape = (2, 8, 40, 16, 128)
  caches = [jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in range(2)]
  caches += [jnp.asarray(rng.uniform(size=shape[:-1]), jnp.float32) for _ in range(2)]
  k, v = (jnp.asarray(rng.standard_normal((64, 8, 128)), jnp.bfloat16) for _ in range(2))
  slots = rng.permutation(40 * 16)[:64].astype(np.int32)
  slots[::7] = -1
  args = (caches[0], caches[1], k, v, jnp.asarray(slots))
  opts = dict(layer=jnp.int32(1), k_scales=caches[2], v_scales=caches[3])
  want = pallas_kernels.write_kv(*args, backend="xla", **opts)
  got = jax.jit(functools.partial(pallas_kernels.write_kv, backend="pallas"))(*args, **opts)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


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


@pytest.mark.parametrize("decode_only", [False, True])
def test_stacked_cache_under_scan_gpu(decode_only):
  """The engine's call pattern, compiled: lax.scan over 4 layers of a stacked [L, Hkv, P, ps, D]
  cache carried (and donated) through the scan; each layer writes its new K/V and attends over
  them. Pallas == xla: caches bit for bit, outputs within bf16 tolerance."""
  num_layers, num_kv_heads, head_dim, page_size = 4, 8, 128, 16
  seqs = DECODES if decode_only else MIXED
  num_tokens = sum(q for q, _ in seqs) + 5
  rng = np.random.default_rng(1)
  batch = testing.random_ragged_batch(rng, seqs, num_q_heads=32, num_kv_heads=num_kv_heads,
                                      head_dim=head_dim, page_size=page_size,
                                      num_tokens=num_tokens, max_seqs=len(seqs) + 2)
  kv_lens, page_indices, cu_q_lens, num_seqs = map(jnp.asarray, batch.args[3:])
  pages_shape = (num_layers, *batch.k_pages.shape)
  k_all = jnp.asarray(rng.standard_normal(pages_shape), jnp.bfloat16)
  v_all = jnp.asarray(rng.standard_normal(pages_shape), jnp.bfloat16)
  from pallas_kernels.reference import token_metadata  # noqa: PLC0415
  seq_ids, positions, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
  pages = page_indices[seq_ids, jnp.maximum(positions, 0) // page_size]
  slots = jnp.where(valid, pages * page_size + positions % page_size, -1)
  new_shape = (num_layers, num_tokens, num_kv_heads, head_dim)
  qs = jnp.asarray(rng.standard_normal((num_layers, *batch.q.shape)), jnp.bfloat16)
  ks = jnp.asarray(rng.standard_normal(new_shape), jnp.bfloat16)
  vs = jnp.asarray(rng.standard_normal(new_shape), jnp.bfloat16)

  def run(backend):
    def layer_step(cache, xs):
      i, q_i, k_i, v_i = xs
      k_pages, v_pages = pallas_kernels.write_kv(*cache, k_i, v_i, slots, backend=backend, layer=i)
      out = pallas_kernels.ragged_paged_attention(
          q_i, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
          sm_scale=head_dim ** -0.5, sliding_window=64, backend=backend, decode_only=decode_only,
          layer=i)
      return (k_pages, v_pages), out

    forward = jax.jit(lambda k, v: jax.lax.scan(
        layer_step, (k, v), (jnp.arange(num_layers, dtype=jnp.int32), qs, ks, vs)),
        donate_argnums=(0, 1))
    return forward(jnp.copy(k_all), jnp.copy(v_all))

  (k_want, v_want), out_want = run("xla")
  (k_got, v_got), out_got = run("pallas")
  np.testing.assert_array_equal(np.asarray(k_got.astype(jnp.float32)),
                                np.asarray(k_want.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(v_got.astype(jnp.float32)),
                                np.asarray(v_want.astype(jnp.float32)))
  n = batch.num_valid_tokens
  np.testing.assert_allclose(np.asarray(out_got[:, :n].astype(jnp.float32)),
                             np.asarray(out_want[:, :n].astype(jnp.float32)),
                             **testing.tolerances(jnp.bfloat16))


# ---------------------------------------------------------------------------------------------
# The whole engine on the GPU (no model files there: a random Llama and a word-level tokenizer).

def engine_greedy_outputs(backends, *, arch: str = "llama", seed: int = 0):
  """Greedy token ids of the same ragged prompt set (shared prefixes, one prompt a prefix of
  another, long and short) through the engine with each attention backend, float32 weights.
  arch "llama": GQA 4, head_dim 64. "gemma3": one KV head, head_dim 256, windowed layers (window
  32) around a global one, so the kernels take the window as a traced per-layer scalar."""
  import random  # noqa: PLC0415

  from engine.config import EngineConfig  # noqa: PLC0415
  from engine.llm import LLM  # noqa: PLC0415
  from engine.request import SamplingParams  # noqa: PLC0415
  from models import llama  # noqa: PLC0415
  from models.config import LlamaConfig  # noqa: PLC0415
  from models.tokenizer import Tokenizer  # noqa: PLC0415

  if arch == "gemma3":
    cfg = LlamaConfig(architecture="gemma3", vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_layers=4, num_heads=4, num_kv_heads=1, head_dim=256, max_position=1024,
                      sliding_window=32, sliding_layers=(True, True, False, True),
                      rope_theta=1e6, rope_local_theta=1e4, hidden_act="gelu_tanh", qk_norm=True,
                      sandwich_norms=True, embed_scale=16.0, tie_word_embeddings=False)
  else:
    cfg = LlamaConfig(architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_position=1024)
  model = (cfg, llama.init_params(cfg, jax.random.key(seed), scale=0.5), Tokenizer.word_level(512))
  rng = random.Random(seed)
  shared = [rng.randrange(3, 512) for _ in range(70)]
  prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
             for _ in range(6)]
  prompts += [shared[:33], [rng.randrange(3, 512) for _ in range(150)], [7]]
  params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  outputs = {}
  for backend in backends:
    llm = LLM(EngineConfig().replace(**{
        "attention.backend": backend, "model.dtype": "float32", "cache.num_pages": 96,
        "cache.page_size": 16, "scheduler.max_batch_tokens": 64, "scheduler.max_running": 4,
        "model.max_model_len": 256}), progress=False, model=model)
    outputs[backend] = [out.token_ids for out in llm.generate(prompts, params)]
  return outputs


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_engine_greedy_outputs_identical_with_pallas_and_xla(arch):
  """The engine on the GPU: every prompt's greedy tokens are the same with the compiled Pallas
  kernels as with the xla path (full-precision float32 matmuls on both)."""
  outputs = engine_greedy_outputs(("xla", "pallas"), arch=arch)
  assert outputs["xla"] == outputs["pallas"]


@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_fp8_matmuls_on_the_gpu(tokens):
  """The FP8 weight paths as XLA compiles them on the GPU (models/quant.py): e4m3 weights converted for a bfloat16
  dot (fp8), e4m3 x e4m3 with a scale per token (w8a8_fp8: FP8 tensor cores, whose sums may be narrower than
  float32), and 128 x 128 blocks dequantized per layer (an FP8 checkpoint), each against float64 numpy on the same
  e4m3 values."""
  import ml_dtypes

  from models import llama, quant

  rng = np.random.default_rng(tokens)
  h = (rng.standard_normal((tokens, 512)) * rng.uniform(0.1, 4, (tokens, 1))).astype(np.float32)
  w = rng.standard_normal((1, 512, 384)).astype(np.float32) / 20
  values, scales = quant.quantize_weight(w, dtype=quant.FP8)
  hb = np.asarray(jnp.asarray(h, jnp.bfloat16).astype(jnp.float32), np.float64)
  exact = hb @ (values[0].astype(np.float64) * scales[0])
  tol = 2e-2 * np.abs(exact).max()
  w16 = jax.jit(lambda x, v, s: llama.scaled_dot(x, v, s, 0, False))(
      jnp.asarray(h, jnp.bfloat16), jnp.asarray(values[0]), jnp.asarray(scales[0]))
  np.testing.assert_allclose(np.asarray(w16, np.float64), exact, atol=tol)
  w8a8 = jax.jit(lambda x, v, s: llama.scaled_dot(x, v, s, 0, True))(
      jnp.asarray(h, jnp.bfloat16), jnp.asarray(values[0]), jnp.asarray(scales[0]))
  hs = np.abs(hb).max(axis=1, keepdims=True) / 448
  hq = (hb / hs).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  np.testing.assert_allclose(np.asarray(w8a8, np.float64), (hq @ values[0].astype(np.float64)) * hs * scales[0],
                             atol=tol)
  blocks, block_scales = quant.quantize_weight_fp8_blocks(w, 128)
  layer = {"w": jnp.asarray(blocks[0]), "w" + quant.BLOCK_SCALE_SUFFIX: jnp.asarray(block_scales[0])}
  out = jax.jit(lambda x, p: llama.linear(x, p, "w"))(jnp.asarray(h, jnp.bfloat16), layer)
  want = hb @ quant.dequantize_fp8_blocks(blocks[0], block_scales[0]).astype(np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol)


@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_block_fp8_matmul_kernel_on_the_gpu(m):
  """pallas_kernels/fp8_matmul.py compiled (where the GPU converts e4m3: sm89+, MI300) against float64 numpy on the
  same e4m3 values and 128 x 128 block scales, and against XLA's dequantize-then-GEMM path."""
  from models import quant
  from pallas_kernels import fp8_matmul

  if not fp8_matmul.supported(jax.devices()[0]):
    pytest.skip(f"{jax.devices()[0].device_kind} cannot convert e4m3 in Triton")
  rng = np.random.default_rng(m)
  values, scales = quant.quantize_weight_fp8_blocks(rng.standard_normal((1, 1024, 768)).astype(np.float32) / 30)
  x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
  got = np.asarray(fp8_matmul.block_fp8_matmul(x, jnp.asarray(values[0]), jnp.asarray(scales[0])), np.float64)
  exact = np.asarray(x, np.float64) @ quant.dequantize_fp8_blocks(values[0], scales[0]).astype(np.float64)
  tol = 2e-2 * np.abs(exact).max()
  np.testing.assert_allclose(got, exact, atol=tol)
  xla = fp8_matmul.block_fp8_matmul_reference(x, jnp.asarray(values[0]), jnp.asarray(scales[0]))
  np.testing.assert_allclose(got, np.asarray(xla, np.float64), atol=tol)


@pytest.mark.parametrize("rows", [8, 500])
def test_grouped_scaled_matmul_kernel_on_the_gpu(rows):
  """The grouped FP8 kernel compiled (experts' e4m3 weights in 128 x 128 blocks, rows grouped by expert, some experts
  empty) against XLA's ragged_dot over the dequantized experts."""
  from models import quant
  from pallas_kernels import fp8_matmul

  if not fp8_matmul.supported(jax.devices()[0]):
    pytest.skip(f"{jax.devices()[0].device_kind} cannot convert e4m3 in Triton")
  rng = np.random.default_rng(rows)
  values, scales = quant.quantize_weight_fp8_blocks(rng.standard_normal((16, 512, 256)).astype(np.float32) / 20)
  sizes = np.bincount(rng.integers(0, 12, rows), minlength=16)  # experts 12..15 get no rows
  x = jnp.asarray(rng.standard_normal((rows, 512)), jnp.bfloat16)
  got = fp8_matmul.grouped_scaled_matmul(x, jnp.asarray(values), jnp.asarray(scales), jnp.asarray(sizes))
  want = jax.lax.ragged_dot(x, jnp.asarray(quant.dequantize_fp8_blocks(values, scales), jnp.bfloat16),
                            jnp.asarray(sizes, jnp.int32), preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             atol=2e-2 * float(jnp.abs(want).max()))


def test_grouped_int8_experts_kernel_on_the_gpu():
  """The grouped kernel compiled on int8 experts with a scale per output feature (any GPU converts int8) against
  XLA's ragged_dot over the dequantized experts."""
  from models import quant
  from pallas_kernels import fp8_matmul

  rng = np.random.default_rng(3)
  values, scales = (a[0] for a in quant.quantize_weight(rng.standard_normal((1, 16, 512, 384)).astype(np.float32)))
  sizes = np.bincount(rng.integers(0, 10, 200), minlength=16)
  x = jnp.asarray(rng.standard_normal((200, 512)), jnp.bfloat16)
  got = fp8_matmul.grouped_scaled_matmul(x, jnp.asarray(values), jnp.asarray(scales), jnp.asarray(sizes))
  dequantized = quant.dequantize_weight({"w": values, "w_scale": scales}, "w")
  want = jax.lax.ragged_dot(x, jnp.asarray(dequantized, jnp.bfloat16), jnp.asarray(sizes, jnp.int32),
                            preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             atol=2e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("delta,num_heads,k_dim,v_dim", [(True, 4, 128, 128), (False, 4, 128, 64), (True, 3, 8, 12)],
                         ids=["qwen3.5", "granite4-h", "odd-widths"])
def test_linear_scan_kernel_on_the_gpu(delta, num_heads, k_dim, v_dim, dtype, tol):
  """The linear attention prefill kernel compiled (pallas_kernels/linear_scan.py) against the rule token by token in
  float64, on tests/test_linear_scan.py's random ragged batches (scripts/gpu_check.sh runs these in its "linear"
  step)."""
  from test_linear_scan import check_kernel

  rng = fresh.rng()
  for _ in range(2):
    check_kernel(rng, num_heads, k_dim, v_dim, 16, delta, dtype, tol, interpret=False)
