"""FP8 weights (`model.quantization: fp8` and `w8a8_fp8`; models/quant.py): the rounding and both matmuls against
float64 numpy on fresh random input, the forward against the dequantized model's, and an FP8 checkpoint kept as it is
stored (bit for bit) in the engine and across devices."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from models import llama, quant, sharding
from models.config import LlamaConfig
from models.loader import checkpoint_quantization, load_weights, tokenizer_source
from models.tokenizer import Tokenizer
from dense_reference import assert_argmax, dense_logits
from tests.test_weight_updates import GREEDY, SMOLLM2, _prompts, _state_dict
import fresh

FP8 = ml_dtypes.float8_e4m3fn
# every finite e4m3 value, for the nearest-value checks (independent of any cast)
E4M3 = np.unique(np.arange(256, dtype=np.uint8).view(FP8).astype(np.float64))
E4M3 = E4M3[np.isfinite(E4M3)]


def _is_nearest(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Whether each q is an e4m3 value nearest to x (ties either way)."""
    x = np.asarray(x, np.float64)
    best = np.abs(x[..., None] - E4M3).min(axis=-1)
    return np.abs(x - np.asarray(q, np.float64)) <= best


def fp8_blocks(w: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 codes, a float32 scale per block of rows x cols: its largest |w| / 448), as DeepSeek-V3's
    checkpoints store weights (blocks cut at the edges)."""
    out, inn = w.shape
    nb = (-(-out // rows), -(-inn // cols))
    padded = np.zeros((nb[0] * rows, nb[1] * cols), np.float32)
    padded[:out, :inn] = w
    amax = np.abs(padded.reshape(nb[0], rows, nb[1], cols)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    codes = (w / np.repeat(np.repeat(scale, rows, 0), cols, 1)[:out, :inn]).astype(FP8)
    return codes, scale


def test_fp8_weights_are_each_columns_nearest_e4m3_values_scaled_to_448():
    """quantize_weight(dtype=FP8): a float32 scale per output feature (and expert), its largest |w| / 448 (an all-zero
    column: 1); every value the e4m3 nearest to w / scale; so each weight within 1/16 of itself (e4m3's 3 mantissa
    bits) or, below e4m3's normals, within half its subnormal step."""
    rng = fresh.rng()
    w = rng.standard_normal((2, 3, 96, 40)).astype(np.float32) * np.exp(rng.uniform(-7, 7, (2, 3, 1, 40))).astype(
        np.float32)
    w[1, 2, :, 5] = 0
    values, scales = quant.quantize_weight(w, dtype=FP8)
    assert values.dtype == FP8 and scales.dtype == np.float32 and scales.shape == (2, 3, 40)
    amax = np.abs(w).max(axis=-2)
    np.testing.assert_array_equal(scales, np.where(amax > 0, amax / np.float32(448), 1))
    assert scales[1, 2, 5] == 1 and not values[1, 2, :, 5].astype(np.float32).any()
    scaled = w / scales[..., None, :]
    assert _is_nearest(scaled, values).all()
    np.testing.assert_array_equal(np.abs(values.astype(np.float32)).max(axis=-2)[amax > 0], 448)
    back = quant.dequantize_weight({"w": values, "w_scale": scales}, "w").astype(np.float64)
    tiny = scales[..., None, :] * 2.0**-10  # half of e4m3's subnormal step, 2^-9
    assert (np.abs(back - w) <= np.maximum(np.abs(w) / 16, tiny)).all()


def test_fp8_dots_are_e4m3_arithmetic():
    """llama.scaled_dot on e4m3 weights. W8A16: the weights converted, the dot, each column's scale: the dequantized
    weights' product within float32 rounding. W8A8 (`quantized_activations`): each row of h scaled to 448 (max |row| /
    448) and rounded to the nearest e4m3, an e4m3 x e4m3 dot summed in float32, both scales applied: that arithmetic
    in float64 numpy (a zero row stays zero); the same with the weight stored transposed (up to float32 sums)."""
    rng = fresh.rng()
    h = rng.standard_normal((9, 96)).astype(np.float32) * rng.uniform(0.1, 10, (9, 1)).astype(np.float32)
    h[3] = 0
    w, s = quant.quantize_weight(rng.standard_normal((1, 96, 40)).astype(np.float32), dtype=FP8)
    w64 = w[0].astype(np.float64)
    w16 = np.asarray(llama.scaled_dot(jnp.asarray(h), jnp.asarray(w[0]), jnp.asarray(s[0]), 0, False))
    want16 = h.astype(np.float64) @ (w64 * s[0])
    np.testing.assert_allclose(w16, want16, rtol=1e-5, atol=1e-5 * np.abs(want16).max())

    got = np.asarray(llama.scaled_dot(jnp.asarray(h), jnp.asarray(w[0]), jnp.asarray(s[0]), 0, True))
    hs = np.abs(h).max(axis=1, keepdims=True) / np.float32(448)
    hs[hs == 0] = 1
    x = h / hs
    hq = x.astype(FP8).astype(np.float64)  # round to nearest, ties to even (as XLA converts)
    assert _is_nearest(x, hq).all()
    want = (hq @ w64) * hs * s[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert not got[3].any()
    transposed = np.asarray(llama.scaled_dot(jnp.asarray(h), jnp.asarray(w[0].T.copy()), jnp.asarray(s[0]), 1, True))
    np.testing.assert_allclose(transposed, got, rtol=1e-6, atol=1e-6 * np.abs(want).max())  # float32 sums' order


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_block_fp8_matmul_kernel_matches_float64(dtype):
    """pallas_kernels/fp8_matmul.block_fp8_matmul (interpret mode) against float64 numpy on the same e4m3 values and
    block scales, and against XLA's path, on fresh random input: 1 to 130 rows (one to three row tiles, padding rows),
    square and oblong blocks of 32 to 128, every block its own magnitude; float32 within 1e-5 of the largest output,
    bfloat16 within 2e-2. Blocks the tiles cannot hold are refused by name."""
    from pallas_kernels import fp8_matmul

    rng = fresh.rng()
    for m, (k, n), (bk, bn) in [(1, (256, 384), (128, 128)), (7, (384, 256), (128, 128)), (16, (128, 256), (32, 64)),
                                (40, (256, 128), (128, 128)), (130, (128, 128), (64, 32))]:
        w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 4, (n // bn, 1, k // bk, 1))).repeat(bn, 0).reshape(
            n, k // bk, 1).repeat(bk, 2).reshape(n, k)
        codes, scale = fp8_blocks(w.astype(np.float32), bn, bk)  # [out, in] as a checkpoint stores it
        values, scales = codes.T.copy(), scale.T.copy()  # [in, out], [in / bk, out / bn]: as the engine keeps it
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        got = np.asarray(fp8_matmul.block_fp8_matmul(x, jnp.asarray(values), jnp.asarray(scales), interpret=True),
                         np.float64)
        exact = np.asarray(x, np.float64) @ (values.astype(np.float64) * np.repeat(np.repeat(scales, bk, 0), bn, 1))
        tol = (1e-5 if dtype == np.float32 else 2e-2) * np.abs(exact).max()
        assert got.shape == (m, n)
        np.testing.assert_allclose(got, exact, atol=tol, err_msg=f"{m} x {k} @ {k} x {n} in {bk} x {bn} blocks")
        xla = np.asarray(fp8_matmul.block_fp8_matmul_reference(x, jnp.asarray(values), jnp.asarray(scales)), np.float64)
        np.testing.assert_allclose(got, xla, atol=tol)
    empty = fp8_matmul.block_fp8_matmul(jnp.zeros((0, k), dtype), jnp.asarray(values), jnp.asarray(scales),
                                        interpret=True)
    assert empty.shape == (0, n)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fp8_matmul.block_fp8_matmul(jnp.zeros((2, 64)), jnp.zeros((64, 64), FP8), jnp.ones((8, 1)), interpret=True)


def _tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"architecture": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                          "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "max_position": 512,
                          **kw})


@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
def test_fp8_forward_is_the_dequantized_models(experts):
    """A model with fp8 projections (and experts) computes what the model holding their dequantized values computes,
    within float32 rounding; with e4m3 activations too (W8A8) it stays near that, and differs from it; the experts'
    grouped matmuls give what running every expert gives, with e4m3 activations too."""
    moe = {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": 32} if experts else {}
    cfg = _tiny(**moe)
    params = jax.device_get(llama.init_params(cfg, jax.random.key(fresh.seed())))
    fp8 = quant.quantize_params(params, "fp8")
    names = [n for n in quant.PROJECTIONS + quant.EXPERTS if n in params["layers"]]
    assert all(fp8["layers"][n].dtype == FP8 for n in names) and ("moe_up" in names) == bool(experts)
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 24), jnp.int32)
    got = np.asarray(llama.forward_dense(jax.device_put(fp8), cfg, ids))
    want = np.asarray(llama.forward_dense(jax.device_put(quant.dequantize_params(fp8)), cfg, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    w8a8 = np.asarray(llama.forward_dense(jax.device_put(fp8), dataclasses.replace(cfg, quantized_activations=True),
                                          ids))
    assert not np.array_equal(w8a8, got)
    # e4m3's rounding, up to 1/16 of each activation: on average a few % of the logits (a routed token whose expert
    # choice flips moves more, so the mean, not the largest)
    assert np.abs(w8a8 - got).mean() < 0.1 * np.abs(got).mean()
    if experts:
        grouped = np.asarray(llama.forward_dense(jax.device_put(fp8), dataclasses.replace(
            cfg, quantized_activations=True, moe_grouped=True), ids))
        np.testing.assert_allclose(grouped, w8a8, rtol=1e-4, atol=1e-4 * np.abs(w8a8).max())


def _write_fp8_checkpoint(directory, cfg: LlamaConfig, params: dict, tokenizer, layout: str, block=(32, 32)) -> dict:
    """An HF checkpoint of `params` with every projection in e4m3: "block" (DeepSeek-V3's `weight_scale_inv` per
    block, quantization_config.weight_block_size), "ct_block" (compressed-tensors' "block" strategy: `weight_scale`
    per block of its block_structure) or "channel" (compressed-tensors' `weight_scale` per row, but one for the whole
    tensor in layer 1's q_proj). Returns the stored tensors."""
    from safetensors.flax import save_file  # numpy's writer has no float8

    tensors = {}
    for name, w in _state_dict(cfg, params).items():
        if not name.endswith("proj.weight"):
            tensors[name] = np.asarray(w, np.float32)
        elif layout.endswith("block"):
            tensors[name], tensors[name + ("_scale_inv" if layout == "block" else "_scale")] = fp8_blocks(w, *block)
        else:
            whole = name == "model.layers.1.self_attn.q_proj.weight"
            codes, scale = fp8_blocks(w, *((w.shape[0], w.shape[1]) if whole else (1, w.shape[1])))
            tensors[name], tensors[name + "_scale"] = codes, scale.reshape(()) if whole else scale
    directory.mkdir()
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    strategy = {"strategy": "block", "block_structure": list(block)} if layout == "ct_block" else {"strategy": "channel"}
    quant_cfg = ({"quant_method": "fp8", "weight_block_size": list(block)} if layout == "block" else {
        "quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", **strategy}}}})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": 512,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
        "quantization_config": quant_cfg}))
    tokenizer.save_pretrained(str(directory))
    return tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """FP8 checkpoints of one random Llama over SmolLM2's vocabulary (32 x 32 blocks in either format; a scale per
    row)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = _tiny(vocab_size=tokenizer.vocab_size, tie_word_embeddings=False)
    params = jax.device_get(llama.init_params(cfg, jax.random.key(5), scale=0.5))
    root = tmp_path_factory.mktemp("fp8")
    return {layout: (root / layout, _write_fp8_checkpoint(root / layout, cfg, params, tokenizer, layout))
            for layout in ("block", "ct_block", "channel")}


@pytest.mark.parametrize("layout", ["block", "ct_block", "channel"])
def test_an_fp8_checkpoint_is_kept_as_stored(checkpoints, layout):
    """model.quantization: fp8 keeps an FP8 checkpoint's e4m3 weights bit for bit, each with its scales (a block's:
    `<name>_block_scale`; a row's, or the tensor's repeated: `<name>_scale`), and they stand for exactly the weights
    the checkpoint dequantized at load holds; w8a8_fp8 keeps only the per-row layout (it needs a scale per output)."""
    directory, stored = checkpoints[layout]
    cfg, kept = load_weights(str(directory), quantization="fp8")
    _, dequantized = load_weights(str(directory))
    blocks = layout.endswith("block")
    layers, suffix = kept["layers"], "_block_scale" if blocks else "_scale"
    for key, module in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"), ("w_down", "mlp.down_proj")):
        assert layers[key].dtype == FP8 and layers[key + suffix].dtype == np.float32
        for i in range(cfg.num_layers):
            name = f"model.layers.{i}.{module}.weight"
            np.testing.assert_array_equal(layers[key][i].view(np.uint8), stored[name].T.view(np.uint8))
            scale = stored[name + ("_scale_inv" if layout == "block" else "_scale")]
            want = scale.T if blocks else np.broadcast_to(scale.reshape(-1), (stored[name].shape[0],))
            np.testing.assert_array_equal(layers[key + suffix][i], want)
    if blocks:
        assert layers["wq_block_scale"].shape == (2, 64 // 32, 128 // 32)
    back = quant.dequantize_params(kept)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(dequantized)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
    assert quant.quantize_params(kept, "fp8")["layers"].keys() == layers.keys()  # nothing quantized twice
    _, for_w8a8 = load_weights(str(directory), quantization="w8a8_fp8")
    assert (for_w8a8["layers"]["wq"].dtype == FP8) == (layout == "channel")
    assert checkpoint_quantization(str(directory)) == "fp8"  # what model.quantization: auto serves it with
    assert checkpoint_quantization(SMOLLM2) == "none"


@pytest.mark.slow
def test_an_fp8_checkpoint_serves_its_dequantized_weights_tokens_at_tp_1_and_4(checkpoints):
    """The engine on an FP8 checkpoint kept as stored (32 x 32 blocks; model.quantization auto, the default, picks
    fp8 for it) gives the greedy tokens of the engine on the same checkpoint dequantized at load (none), with prefix
    hits; at 4 devices too (block scales split with their weights, the 2 KV heads' blocks repeated to 4), and with the
    Pallas FP8 matmul kernel (interpret mode) at 1 and 4 devices. A block
    size that spans two KV heads, or blocks that do not split over the devices, are refused by name."""
    directory, _ = checkpoints["block"]
    base = {"warmup": False, "model.path": str(directory), "cache.page_size": 8, "cache.num_pages": 96,
            "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "model.max_model_len": 128}
    prompts = _prompts(49152, 3)
    dequantized = LLM(EngineConfig().replace(**base, **{"model.quantization": "none"}), progress=False)
    want = [o.token_ids for o in dequantized.generate(prompts, GREEDY)]
    assert dequantized.engine.params["layers"]["wq"].dtype == np.float32
    for tp, quantization in ((1, "auto"), (4, "fp8")):
        llm = LLM(EngineConfig().replace(**base, **{"model.quantization": quantization, "parallel.tensor": tp}),
                  progress=False)
        assert llm.engine.config.model.quantization == "fp8"
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == want and sum(o.cached_tokens for o in outs) > 0
        layers = llm.engine.params["layers"]
        assert layers["w_up"].dtype == FP8 and layers["attn_norm"].dtype == np.float32
        if tp == 4:
            for name in ("wq", "wk", "wo", "w_down"):
                assert tuple(layers[name + "_block_scale"].sharding.spec) == tuple(layers[name].sharding.spec)
    # the Pallas kernel reading the e4m3 tiles (pallas_interpret here: attention and the FP8 matmuls alike), on one
    # device and per device of 4 (column-parallel outputs, row-parallel inputs and their all-reduce)
    for tp in (1, 4):
        llm = LLM(EngineConfig().replace(**base, **{"attention.backend": "pallas_interpret", "parallel.tensor": tp}),
                  progress=False)
        assert llm.engine.model_cfg.quant_kernels == "pallas_interpret"
        assert [o.token_ids for o in llm.generate(prompts[:2], GREEDY)] == want[:2]

    cfg = _tiny(num_kv_heads=4, head_dim=16)
    params = {"layers": {"wk": np.zeros((2, 64, 64), FP8), "wk_block_scale": np.ones((2, 1, 1), np.float32)}}
    with pytest.raises(sharding.ShardingError, match="blocks of wk span two KV heads"):
        sharding.prepare_for_tensor_parallel(dataclasses.replace(cfg, num_kv_heads=2), params, 4)
    params = {"layers": {"wq": np.zeros((2, 64, 64), FP8), "wq_block_scale": np.ones((2, 1, 2), np.float32)}}
    with pytest.raises(sharding.ShardingError, match="wq's 2 FP8 blocks of outputs do not split over parallel.tensor=4"):
        sharding.param_specs(cfg, params, 4)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_scaled_matmul_kernel_matches_ragged_dot(dtype):
    """pallas_kernels/fp8_matmul.grouped_scaled_matmul (interpret mode): rows grouped by expert (sizes drawn fresh,
    empty experts, lone rows and no rows at all among them) @ experts in 8 bits (e4m3 blocks of 16 to 128; int8 and e4m3 with a scale
    per output feature, dims that are multiples of 16 but not of 128) against float64 numpy per group and against
    XLA's ragged_dot over the dequantized experts; float32 within 1e-5 of the largest output, bfloat16 within 2e-2."""
    from pallas_kernels import fp8_matmul

    rng = fresh.rng()
    for num_experts, k, n, block, rows in [(6, 256, 384, 128, 9), (8, 128, 64, 32, 1), (3, 64, 128, 16, 150),
                                           (5, 128, 128, 64, 40), (6, 96, 48, "int8", 20), (4, 64, 80, "e4m3", 30)]:
        w = rng.standard_normal((num_experts, k, n)).astype(np.float32)
        if block in ("int8", "e4m3"):  # a scale per output feature (model.quantization int8 / fp8 on float experts)
            values, scales = (a[0] for a in quant.quantize_weight(w[None], dtype=np.int8 if block == "int8" else FP8))
        else:
            values, scales = quant.quantize_weight_fp8_blocks(w, block)
        sizes = np.bincount(rng.integers(0, num_experts, rows), minlength=num_experts)
        sizes[rng.integers(0, num_experts)] = 0  # an expert without rows
        x = jnp.asarray(rng.standard_normal((int(sizes.sum()), k)), dtype)
        got = np.asarray(fp8_matmul.grouped_scaled_matmul(x, jnp.asarray(values), jnp.asarray(scales),
                                                             jnp.asarray(sizes), interpret=True), np.float64)
        w = (quant.dequantize_weight({"w": values, "w_scale": scales}, "w") if scales.ndim == 2
             else quant.dequantize_fp8_blocks(values, scales)).astype(np.float64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        exact = np.concatenate([np.asarray(x[a:b], np.float64) @ w[e] for e, (a, b) in
                                enumerate(zip(bounds[:-1], bounds[1:]))]).reshape(-1, n)
        tol = (1e-5 if dtype == np.float32 else 2e-2) * np.abs(exact).max(initial=1e-30)
        np.testing.assert_allclose(got, exact, atol=tol, err_msg=f"sizes {sizes}")
        ragged = jax.lax.ragged_dot(x, jnp.asarray(w, dtype), jnp.asarray(sizes, jnp.int32),
                                    preferred_element_type=jnp.float32)
        np.testing.assert_allclose(got, np.asarray(ragged, np.float64), atol=tol)
    empty = fp8_matmul.grouped_scaled_matmul(jnp.zeros((0, k), dtype), jnp.asarray(values), jnp.asarray(scales),
                                             jnp.zeros(values.shape[0], jnp.int32), interpret=True)
    assert empty.shape == (0, n)  # no rows at all (every expert empty)


@pytest.mark.slow
def test_an_8bit_expert_model_serves_with_the_grouped_kernel(tmp_path):
    """A Qwen3-MoE checkpoint with every projection and expert in e4m3 (16 x 16 blocks): the engine with the grouped
    FP8 kernel reading the experts (and the dense kernel the attention projections; interpret mode, grouped experts)
    gives the greedy tokens of the engine on the checkpoint dequantized at load, at 2 devices (experts split by their
    intermediate blocks, the down projection's partial sums all-reduced); with int8 experts (a scale per output
    feature) the grouped kernel gives the XLA engine's tokens."""
    from safetensors.flax import save_file

    from tests.test_moe import tiny_moe

    cfg, params = tiny_moe()
    tensors = {}
    for name, w in _state_dict(cfg, jax.device_get(params)).items():
        if name.endswith("proj.weight") and "mlp.gate." not in name:
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(np.asarray(w, np.float32), 16, 16)
        else:
            tensors[name] = np.asarray(w, np.float32)
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": 512,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}))
    Tokenizer.load(tokenizer_source(SMOLLM2)).save_pretrained(str(tmp_path))
    base = {"warmup": False, "model.path": str(tmp_path), "cache.page_size": 8, "cache.num_pages": 64,
            "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "model.max_model_len": 128,
            "model.moe_backend": "grouped"}
    prompts, greedy = [p[:16] for p in _prompts(cfg.vocab_size, 4)][:2], dataclasses.replace(GREEDY, max_tokens=6)
    want = [o.token_ids for o in LLM(EngineConfig().replace(**base, **{"model.quantization": "none"}),
                                     progress=False).generate(prompts, greedy)]
    llm = LLM(EngineConfig().replace(**base, **{"attention.backend": "pallas_interpret", "parallel.tensor": 2}),
              progress=False)
    layers = llm.engine.params["layers"]
    assert llm.engine.model_cfg.quant_kernels == "pallas_interpret" and layers["moe_down"].dtype == FP8
    assert "moe_down_block_scale" in layers and layers["router"].dtype == np.float32
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want
    # int8 experts (a scale per output feature) through the same grouped kernel, on one device
    int8 = {**base, "model.quantization": "int8"}
    want = [o.token_ids for o in LLM(EngineConfig().replace(**int8), progress=False).generate(prompts, greedy)]
    llm = LLM(EngineConfig().replace(**int8, **{"attention.backend": "pallas_interpret"}), progress=False)
    assert llm.engine.model_cfg.quant_kernels == "pallas_interpret" and llm.engine.params["layers"]["moe_up"].dtype == np.int8
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want


def test_w8a8_serves_mixed_expert_models_and_w8a8_fp8_serves_them():
    """int8 W8A8 serves a model whose layers mix experts and dense MLPs, smoothed (test_moe.py checks the smoothing)
    or not (`model.smoothquant_alpha: 0`); e4m3 W8A8 needs no smoothing, and an expert model's engine (grouped
    experts) gives the dense forward's greedy tokens under it."""
    cfg = _tiny(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    base = {"warmup": False, "cache.page_size": 8, "cache.num_pages": 64, "model.moe_backend": "grouped"}
    mixed = dataclasses.replace(cfg, moe_layers=(False, True))
    mixed_model = (mixed, jax.device_get(llama.init_params(mixed, jax.random.key(0))), tokenizer)
    smoothed = LLM(EngineConfig().replace(**base, **{"model.quantization": "w8a8"}), progress=False, model=mixed_model)
    assert {smoothed.engine.params["layers"][k].dtype for k in ("moe_up", "dense_up", "wq")} == {np.dtype(np.int8)}
    assert not np.array_equal(smoothed.engine.params["layers"]["mlp_norm"], mixed_model[1]["layers"]["mlp_norm"])
    assert len(smoothed.generate([[5, 6, 7]], GREEDY)[0].token_ids) > 0
    unsmoothed = LLM(EngineConfig().replace(**base, **{"model.quantization": "w8a8", "model.smoothquant_alpha": 0}),
                     progress=False, model=mixed_model)
    assert unsmoothed.engine.params["layers"]["moe_up"].dtype == np.int8
    assert len(unsmoothed.generate([[5, 6, 7]], GREEDY)[0].token_ids) > 0
    llm = LLM(EngineConfig().replace(**base, **{"model.quantization": "w8a8_fp8"}), progress=False,
              model=(cfg, params, tokenizer))
    assert llm.engine.params["layers"]["moe_up"].dtype == FP8 and llm.engine.model_cfg.quantized_activations
    prompts = [p[:20] for p in _prompts(cfg.vocab_size, 8)]
    outs = llm.generate(prompts, GREEDY)
    served = jax.device_put(quant.quantize_params(params, "fp8"))
    run_cfg = dataclasses.replace(cfg, quantized_activations=True, moe_grouped=True)
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.token_ids
        logits = dense_logits(served, run_cfg, seq)
        assert_argmax(logits[len(prompt) - 1 : -1], out.token_ids)


def test_gpu_engines_leave_dense_fp8_blocks_to_xla_and_read_8bit_experts_with_the_kernel():
    """quant_kernel_mode: on a GPU only the experts go to the Pallas kernels (the dense block kernel ran 1.6x slower
    than XLA's dequantize-then-GEMM on an H200); interpreted, both; e4m3 experts only where Triton converts e4m3."""
    import types

    from engine.engine import quant_kernel_mode
    from models import llama

    hopper, ampere = (types.SimpleNamespace(compute_capability=c, device_kind="NVIDIA") for c in ("9.0", "8.0"))
    blocks = {"wq": np.zeros((2, 64, 64), FP8), "wq_block_scale": np.ones((2, 1, 1), np.float32)}
    fp8_experts = {"moe_up": np.zeros((2, 4, 64, 32), FP8), "moe_up_scale": np.ones((2, 4, 32), np.float32)}
    int8_experts = {"moe_up": np.zeros((2, 4, 64, 32), np.int8), "moe_up_scale": np.ones((2, 4, 32), np.float32)}
    assert quant_kernel_mode("pallas", blocks, hopper) == "none"
    assert quant_kernel_mode("pallas", blocks | fp8_experts, hopper) == "pallas_experts"
    assert quant_kernel_mode("pallas", fp8_experts, ampere) == "none"  # sm80 cannot convert e4m3 in Triton
    assert quant_kernel_mode("pallas", int8_experts, ampere) == "pallas_experts"
    assert quant_kernel_mode("pallas_interpret", blocks, hopper) == "pallas_interpret"
    assert quant_kernel_mode("xla", blocks | int8_experts, hopper) == "none"
    # "pallas_experts": a dense block-scaled projection is XLA's (no pallas_call), as with "none"
    rng = fresh.rng()
    p = {"w": jnp.asarray(rng.standard_normal((64, 32)), FP8), "w_block_scale": jnp.ones((1, 1), jnp.float32)}
    h = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda h: llama.linear(h, p, "w", quant_kernels="pallas_experts"))(h))
    assert "pallas_call" not in jaxpr
    np.testing.assert_array_equal(llama.linear(h, p, "w", quant_kernels="pallas_experts"), llama.linear(h, p, "w"))
