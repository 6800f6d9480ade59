"""Kimi Linear (`kimi_linear`): Kimi Delta Attention layers (the gated delta rule with a decay per key channel;
models/gated_delta.py, linear_kind "kda") among DeepSeek-V3 latent attention layers without RoPE, V3's experts. The
matrix form against the token-by-token rule on fresh random input with fast-decaying channels; the config mapped field
by field against transformers' (parameter counts equal on a 48B-A3B-shaped config); a tiny random checkpoint against
transformers' logits, then through the engine (prefix hits resuming a state snapshot, preemption, the Pallas backend,
an int8 cache, two devices) to transformers' argmax."""
from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gated_delta, llama
from models.config import ConfigError, LlamaConfig
import fresh

# A config.json shaped as moonshotai/Kimi-Linear-48B-A3B-Instruct's: 27 layers 2,304 wide, three KDA layers (32 heads of
# 128) to one latent attention layer, 256 experts of 1,024 (8 routed, 1 shared) after a dense first layer
KIMI_LINEAR_48B = {
    "model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "vocab_size": 163840, "hidden_size": 2304,
    "intermediate_size": 9216, "moe_intermediate_size": 1024, "num_hidden_layers": 27, "num_attention_heads": 32,
    "num_key_value_heads": 32, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True, "num_experts": 256, "num_experts_per_token": 8,
    "num_shared_experts": 1, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "moe_layer_freq": 1, "use_grouped_topk": True,
    "num_expert_group": 1, "topk_group": 1, "rms_norm_eps": 1e-5, "model_max_length": 1048576,
    "tie_word_embeddings": False, "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "kda_layers": [i for i in range(1, 28) if i % 4 and i != 27],
        "num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4},
}  # fmt: skip


def test_channel_decays_in_matrix_form_are_the_recurrence():
    """`chunk_rule` with a decay per key channel (some channels losing e^-40 a token, others almost nothing) equals the
    rule token by token from a random state, on a piece cut short (rows past it change nothing)."""
    rng = fresh.rng()
    c, h, dk, dv, valid = 64, 3, 16, 8, int(rng.integers(20, 64))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    q, k = (unit(rng.normal(size=(c, h, dk))).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(c, h, dv)).astype(np.float32)
    g = -np.exp(rng.normal(size=(c, h, dk)) * 1.5 - 1).astype(np.float32)
    g[:, 0, : dk // 4] = -rng.uniform(40, 60, size=(c, dk // 4))  # channels losing e^-40 and more a token
    beta = (1 / (1 + np.exp(-rng.normal(size=(c, h))))).astype(np.float32)
    s0 = rng.normal(size=(h, dk, dv)).astype(np.float32)
    o, s = gated_delta.chunk_rule(q, k, v, g, beta, s0, jnp.arange(c) < valid)
    ref_o, ref_s = gated_delta.recurrent_reference(q[:valid], k[:valid], v[:valid], g[:valid], beta[:valid], s0)
    np.testing.assert_allclose(np.asarray(o)[:valid], ref_o, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s, ref_s, atol=2e-5, rtol=1e-4)


def test_config_counts_transformers_parameters():
    """A 48B-A3B-shaped config.json: KDA where `kda_layers` says, latent attention without RoPE where
    `full_attn_layers` does (1-based), the MLPs as DeepSeek-V3's; the parameter count is transformers' (its
    correction biases are buffers there)."""
    from accelerate import init_empty_weights
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    cfg = LlamaConfig.from_hf_config(KIMI_LINEAR_48B, "kimi")
    assert cfg.architecture == "kimi_linear" and cfg.linear_kind == "kda" and cfg.mla
    assert [i + 1 for i, linear in enumerate(cfg.linear_layers) if not linear] == [4, 8, 12, 16, 20, 24, 27]
    assert cfg.rope_layers == (False,) * 27 and cfg.moe_layers == (False,) + (True,) * 26
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.routing.scoring, cfg.router_score_bias) == (256, 8, "sigmoid",
                                                                                                       True)
    assert cfg.query_pre_attn_scalar == 192 and cfg.max_position == 1048576
    with init_empty_weights():
        model = KimiLinearForCausalLM(KimiLinearConfig(**{**KIMI_LINEAR_48B, "pad_token_id": 0}))
    biases = sum(b.numel() for name, b in model.named_buffers() if "e_score_correction_bias" in name)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters()) + biases == 49_122_681_728


def test_config_refuses_what_it_cannot_run():
    for change, match in [({"mla_use_nope": False}, "mla_use_nope=False"),
                          ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func='softmax'"),
                          ({"linear_attn_config": {**KIMI_LINEAR_48B["linear_attn_config"], "kda_layers": [1, 28]}},
                           "names layer 28 of 27")]:
        with pytest.raises(ConfigError, match=match):
            LlamaConfig.from_hf_config({**KIMI_LINEAR_48B, **change}, "kimi")


def _hf_kimi_linear():
    """Tiny random Kimi Linear: KDA, KDA, latent attention, KDA (4 heads of 16); a dense first layer, then 4 experts
    (top 2 by sigmoid with a correction bias that changes the choice) and a shared one."""
    import torch
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(fresh.seed())
    model = KimiLinearForCausalLM(KimiLinearConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=24, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        linear_attn_config={"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4, "kda_layers": [1, 2, 4],
                            "full_attn_layers": [3]},
        first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt_bias" not in name:
                p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    return model


@pytest.mark.slow
def test_checkpoint_matches_transformers_and_serves(tmp_path):
    """A tiny random checkpoint as transformers writes it: logits within 1e-4 of transformers' over 150 tokens (three
    pieces of the matrix form); the dense layer's MLP found under `mlp` too (Kimi's own checkpoints); through the
    engine (8-token pages, a shared prefix resumed from a state snapshot, preemption) greedy tokens are transformers'
    argmax at every step, the same on the Pallas backend (interpret mode: KDA's rule in XLA beside the kernels'
    attention) and with an int8 cache; split over two devices by head, the same tokens."""
    import torch
    from safetensors.numpy import load_file, save_file

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax, _serve_variants

    model = _hf_kimi_linear()
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    assert cfg.linear_layers == (True, True, False, True) and cfg.moe_layers == (False, True, True, True)
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 150))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    params = jax.device_put(params)
    ours = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    own = tmp_path / "own"  # the dense layer's MLP under `mlp`, as Kimi's checkpoints keep it
    own.mkdir()
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({n.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): t for n, t in tensors.items()},
              own / "model.safetensors", metadata={"format": "pt"})
    (own / "config.json").write_text((tmp_path / "config.json").read_text())
    again = load_weights(str(own))[1]
    assert all(np.array_equal(again["layers"][k], params["layers"][k]) for k in ("dense_gate", "gdn_qkv", "gdn_conv"))

    greedy = _serve_variants(model, cfg, params, [{}, {"attention.backend": "pallas_interpret"},
                                                  {"cache.kv_dtype": "int8"}])
    assert greedy[0] == greedy[1]
    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(30)]
    prompts = [system + [5, 6], system + [7, 8, 9]]
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
        "warmup": False, "cache.num_pages": 32, "cache.page_size": 8, "model.max_model_len": 96, "parallel.tensor": 2})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    _assert_greedy_is_argmax(model, prompts, outs)


def test_config_json_round_trip(tmp_path):
    """What transformers writes for its KimiLinearConfig reads back as the config it was made from: the layer kinds
    from `layer_types` (transformers' own field) where a checkpoint has them."""
    from transformers import KimiLinearConfig

    KimiLinearConfig(**{**KIMI_LINEAR_48B, "pad_token_id": 0}).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["layer_types"][3] == "full_attention"
    assert LlamaConfig.from_hf_config(written, "written") == LlamaConfig.from_hf_config(KIMI_LINEAR_48B, "kimi")
