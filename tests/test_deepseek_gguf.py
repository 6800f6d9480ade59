"""GGUF `deepseek2` (DeepSeek-V2 / V2-Lite / V3 / R1, Kimi K2) as llama.cpp's converter writes it
(convert_hf_to_gguf.py `DeepseekV2Model`): the real models' configs read back from the metadata it writes, and tiny
random HF checkpoints written in its layouts, old and new, loading with the HF directory's config and logits; and
`glm-dsa` (GLM-5: its `GlmMoeDsaModel`, deepseek2's layout with sparse attention's indexer).
No published DeepSeek or GLM-5 GGUF is small enough to install here."""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import ConfigError, LlamaConfig
from models.gguf_loader import read_gguf
from models.loader import load_weights
from test_deepseek import DEEPSEEK_V2_LITE, DEEPSEEK_V3, _hf_deepseek
from test_moe import moe_gguf_writer

# The converter's two layouts of latent attention. "split" (since llama.cpp's MLA cache, 2025): key_length and
# value_length describe the absorbed KV head (kv_lora_rank + rope, kv_lora_rank), key_length_mla / value_length_mla a
# query's and a value's head, attn_kv_b split per head into attn_k_b (transposed) and attn_v_b. "kv_b" (older files):
# key_length / value_length a query's and a value's head, the heads as decompressed, attn_kv_b whole, no yarn betas;
# V2 files from before V3 without expert_gating_func (softmax by default) and expert_weights_norm (false).
LAYOUTS = ("split", "kv_b")


def _deepseek2_writer(path, cfg: LlamaConfig, layout: str, arch: str = "deepseek2", num_nextn: int = 0):
    """moe_gguf_writer's common metadata, the heads stated as `layout` states them."""
    if layout == "kv_b":
        cfg = types.SimpleNamespace(**{**cfg.to_dict(), "num_kv_heads": cfg.num_heads,
                                       "head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim})
    return moe_gguf_writer(path, cfg, arch, num_nextn)


def _add_deepseek2_metadata(w, hf_config: dict, layout: str) -> None:
    """What DeepseekV2Model.set_gguf_parameters (and TextModel's, for groups, gating and YaRN) writes of a DeepSeek
    config.json beyond the common metadata; no multi-token-prediction block (it skips layers past
    num_hidden_layers and writes no nextn_predict_layers for deepseek2)."""
    import gguf

    rank, rope_dim = hf_config["kv_lora_rank"], hf_config["qk_rope_head_dim"]
    w.add_leading_dense_block_count(hf_config["first_k_dense_replace"])
    if hf_config.get("q_lora_rank") is not None:
        w.add_q_lora_rank(hf_config["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    if layout == "split":
        w.add_value_length(rank)
        w.add_key_length_mla(hf_config["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(hf_config["v_head_dim"])
    else:
        w.add_value_length(hf_config["v_head_dim"])
    w.add_expert_feed_forward_length(hf_config["moe_intermediate_size"])
    w.add_expert_shared_count(hf_config["n_shared_experts"])
    w.add_expert_weights_scale(hf_config["routed_scaling_factor"])
    sigmoid = hf_config["model_type"] in ("deepseek_v3", "glm_moe_dsa", "deepseek_v32")  # the real configs' scoring_func
    if layout == "split" or sigmoid:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
        if hf_config.get("norm_topk_prob"):  # (the split converter writes it where true only)
            w.add_expert_weights_norm(True)
    if hf_config.get("n_group") is not None:
        w.add_expert_group_count(hf_config["n_group"])
        w.add_expert_group_used_count(hf_config["topk_group"])
    w.add_rope_dimension_count(rope_dim)
    rope_params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope_params.get("rope_type", rope_params.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_params["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
        if layout == "split":
            w.add_rope_scaling_yarn_beta_fast(rope_params["beta_fast"])
            w.add_rope_scaling_yarn_beta_slow(rope_params["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope_params["mscale_all_dim"])
    if hf_config["model_type"] in ("glm_moe_dsa", "deepseek_v32"):  # GlmMoeDsaModel's / DeepseekV32Model's: the indexer
        w.add_indexer_head_count(hf_config["index_n_heads"])
        w.add_indexer_key_length(hf_config["index_head_dim"])
        w.add_indexer_top_k(hf_config["index_topk"])


def _write_deepseek2_gguf(hf_dir, cfg: LlamaConfig, path, layout: str, arch: str = "deepseek2",
                          num_nextn: int = 0) -> None:
    """An HF DeepSeek checkpoint's weights (F32) under llama.cpp's names and in its converter's layout: every row as
    HF has it (RoPE pairs still interleaved), experts stacked [E, out, in], the correction bias as exp_probs_b.bias,
    the first layers' MLP under the dense names, the shared experts under `shexp`; the latent's up-projection whole
    (`kv_b`) or per head as attn_k_b [heads, latent, nope] and attn_v_b [heads, v, latent] (`split`); glm-dsa's
    indexer under `indexer.` as HF has it; `num_nextn` multi-token-prediction layers after the model's (GLM-5's: its
    decoder layer as the others, plus `nextn.enorm`, `hnorm`, `eh_proj`, `shared_head_norm`)."""
    from safetensors.numpy import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    w = _deepseek2_writer(path, cfg, layout, arch, num_nextn)
    _add_deepseek2_metadata(w, json.loads((hf_dir / "config.json").read_text()), layout)
    if num_nextn:
        w.add_nextn_predict_layers(num_nextn)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    nope, v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
    for i in range(cfg.num_layers + num_nextn):
        hf, attn, layer = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", {}
        if i >= cfg.num_layers:
            for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                                 ("shared_head_norm", "shared_head.norm")):
                w.add_tensor(f"blk.{i}.nextn.{ours}.weight", sd[f"{hf}{theirs}.weight"])
        layer["attn_norm"] = sd[hf + "input_layernorm.weight"]
        layer["ffn_norm"] = sd[hf + "post_attention_layernorm.weight"]
        for ours, theirs in (("attn_q", "q_proj"), ("attn_q_a", "q_a_proj"), ("attn_q_a_norm", "q_a_layernorm"),
                             ("attn_q_b", "q_b_proj"), ("attn_kv_a_mqa", "kv_a_proj_with_mqa"),
                             ("attn_kv_a_norm", "kv_a_layernorm"), ("attn_output", "o_proj")):
            if f"{attn}{theirs}.weight" in sd:
                layer[ours] = sd[f"{attn}{theirs}.weight"]
        kv_b = sd[attn + "kv_b_proj.weight"]  # [heads x (nope + v), latent]
        if layout == "split":
            per_head = kv_b.reshape(cfg.num_heads, nope + v_dim, -1)
            layer["attn_k_b"] = np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2))
            layer["attn_v_b"] = np.ascontiguousarray(per_head[:, nope:])
        else:
            layer["attn_kv_b"] = kv_b
        if f"{hf}mlp.gate_proj.weight" in sd:  # a dense first layer
            for part in ("gate", "up", "down"):
                layer[f"ffn_{part}"] = sd[f"{hf}mlp.{part}_proj.weight"]
        else:
            layer["ffn_gate_inp"] = sd[hf + "mlp.gate.weight"]
            for part in ("gate", "up", "down"):
                layer[f"ffn_{part}_exps"] = np.stack([sd[f"{hf}mlp.experts.{e}.{part}_proj.weight"]
                                                      for e in range(cfg.num_experts)])
                layer[f"ffn_{part}_shexp"] = sd[f"{hf}mlp.shared_experts.{part}_proj.weight"]
        for ours, theirs in (("indexer.attn_q_b", "wq_b.weight"), ("indexer.attn_k", "wk.weight"),
                             ("indexer.k_norm", "k_norm.weight"), ("indexer.proj", "weights_proj.weight")):
            if f"{attn}indexer.{theirs}" in sd:
                layer[ours] = sd[f"{attn}indexer.{theirs}"]
        for name, x in layer.items():
            w.add_tensor(f"blk.{i}.{name}.weight", x)
        if f"{attn}indexer.k_norm.bias" in sd:
            w.add_tensor(f"blk.{i}.indexer.k_norm.bias", sd[f"{attn}indexer.k_norm.bias"])
        if f"{hf}mlp.gate.e_score_correction_bias" in sd:
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", sd[f"{hf}mlp.gate.e_score_correction_bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_same_config(got: LlamaConfig, want: LlamaConfig) -> None:
    """Every field that shapes the model; the softmax scale and YaRN's frequencies to float32's rounding of the
    metadata, the rest exactly."""
    for field in ("architecture", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                  "head_dim", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "shared_expert_gate",
                  "moe_layers", "routing", "router_score_bias", "rotary_dim", "rope_theta", "max_position",
                  "tie_word_embeddings", "vocab_size"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.num_params() == want.num_params()
    assert got.sm_scale == pytest.approx(want.sm_scale, rel=1e-6)
    assert got.rope_attention_factor() == pytest.approx(want.rope_attention_factor(), rel=1e-6)
    np.testing.assert_allclose(got.rope_inv_freq(), want.rope_inv_freq(), rtol=1e-12)
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)


def _assert_same_model(gguf_cfg: LlamaConfig, gguf_params, cfg: LlamaConfig, params) -> None:
    """The file's weights bit for bit the HF directory's, and its logits on 40 ids within 1e-5 of theirs."""
    assert jax.tree.structure(gguf_params) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gguf_params)[0], jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 40), jnp.int32)
    want = np.asarray(llama.forward_dense(jax.device_put(params), cfg, ids))
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, ids))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("raw", [DEEPSEEK_V3, DEEPSEEK_V2_LITE], ids=["v3", "v2_lite"])
def test_real_configs_read_back_from_the_converters_metadata(raw, layout, tmp_path):
    """DeepSeek-V3's and V2-Lite's config.json as the converter writes them (no tensors; those the config looks for
    named): the config the HF file gives, YaRN's mscale_all_dim (stored as 0.1 x it) squared in the softmax scale,
    V2's softmax routing unrenormalized, V3's sigmoid routing over groups with its correction bias; a file without
    its latent's rank is refused by name."""
    want = LlamaConfig.from_hf_config(raw)
    w = _deepseek2_writer(tmp_path / "m.gguf", want, layout)
    _add_deepseek2_metadata(w, raw, layout)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta, _ = read_gguf(str(tmp_path / "m.gguf"))
    first_expert_layer = raw["first_k_dense_replace"]
    tensor_names = {"output.weight"} | ({f"blk.{first_expert_layer}.exp_probs_b.bias"} if raw is DEEPSEEK_V3 else set())
    got = LlamaConfig.from_gguf_metadata(meta, tensor_names, source="m.gguf")
    _assert_same_config(got, want)
    assert got.rope_scaling.mscale_all_dim == pytest.approx(raw["rope_scaling"]["mscale_all_dim"], rel=1e-6)
    del meta["deepseek2.attention.kv_lora_rank"]
    with pytest.raises(ConfigError, match="m.gguf: missing GGUF field 'deepseek2.attention.kv_lora_rank'"):
        LlamaConfig.from_gguf_metadata(meta, tensor_names, source="m.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("kind,layout", [("v3", "split"), ("v2", "kv_b"), ("v2", "split"), ("v3", "kv_b")])
def test_gguf_in_llama_cpp_layout_loads_as_the_hf_checkpoint(kind, layout, tmp_path):
    """A tiny random V3 (queries through q_lora, YaRN with mscale_all_dim, sigmoid routing over 2 of 4 groups with a
    correction bias) or V2 (queries projected directly, softmax routing limited to the groups of the best experts)
    written as llama.cpp's converter writes it, in either layout: the HF directory's config, the same weights bit for
    bit (RoPE rows reordered, attn_k_b / attn_v_b joined), logits within 1e-5. The HF directory matches transformers
    (test_deepseek.py)."""
    model = _hf_deepseek(kind)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_deepseek2_gguf(tmp_path / "hf", cfg, tmp_path / "m.gguf", layout)
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    assert gguf_cfg.rope_scaling == cfg.rope_scaling and gguf_cfg.sm_scale == cfg.sm_scale
    assert jax.tree.structure(gguf_params) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gguf_params)[0], jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, 90), jnp.int32)  # past YaRN's 64
    want = np.asarray(llama.forward_dense(jax.device_put(params), cfg, ids))
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, ids))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_glm5_gguf_loads_as_the_hf_checkpoint(tmp_path):
    """GLM-5 written as llama.cpp's converter writes it (glm-dsa: deepseek2's split layout, the indexer's tensors and
    head count, key length and top-k): the HF directory's config, the same weights bit for bit (the indexer's RoPE
    rows reordered as the HF loader reorders them), logits within 1e-5; a file naming a layer that reuses another's
    top-k is refused."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, num_experts_per_tok=3, n_routed_experts=8,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, index_topk=8, index_n_heads=32, index_head_dim=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_deepseek2_gguf(tmp_path / "hf", cfg, tmp_path / "m.gguf", "split", arch="glm-dsa")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    assert gguf_cfg.index_rope_interleaved and gguf_cfg.index_topk == 8 and gguf_cfg.index_num_heads == 32
    _assert_same_model(gguf_cfg, gguf_params, cfg, params)
    meta, _ = read_gguf(str(tmp_path / "m.gguf"))
    meta = {**meta, "glm-dsa.attention.indexer.types": [True, False, True]}
    with pytest.raises(ConfigError, match=r"layers \[1\] reuse another layer's top-k"):
        LlamaConfig.from_gguf_metadata(meta, set(), "m.gguf")


@pytest.mark.slow
def test_v32_gguf_loads_as_the_hf_checkpoint_with_its_mtp_layer(tmp_path):
    """DeepSeek-V3.2 written as llama.cpp's converter writes it (deepseek32: deepseek2's split layout, the indexer's
    tensors and head count, key length and top-k, its MTP layer kept as a trailing block): the HF directory's config
    (the indexer's RoPE in halves, as V3.2's), the same weights bit for bit, logits within 1e-5, and the MTP layer
    `speculative.method: mtp` reads from the file the checkpoint's."""
    from models import mtp
    from test_mtp import _hf_with_mtp

    _hf_with_mtp("deepseek_v32", tmp_path / "hf")
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_deepseek2_gguf(tmp_path / "hf", cfg, tmp_path / "m.gguf", "split", arch="deepseek32", num_nextn=1)
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    assert not gguf_cfg.index_rope_interleaved and (gguf_cfg.index_topk, gguf_cfg.index_num_heads) == (
        cfg.index_topk, cfg.index_num_heads)
    _assert_same_model(gguf_cfg, gguf_params, cfg, params)
    hf_mcfg, hf_layer = mtp.load_mtp(str(tmp_path / "hf"), cfg)
    gguf_mcfg, gguf_layer = mtp.load_mtp(str(tmp_path / "m.gguf"), gguf_cfg)
    assert gguf_mcfg.layer.index_topk == hf_mcfg.layer.index_topk and gguf_mcfg.mask_first == hf_mcfg.mask_first
    jax.tree.map(np.testing.assert_array_equal, gguf_layer, hf_layer)


def test_glm5_config_reads_back_from_the_converters_metadata(tmp_path):
    """GLM-5's shapes (transformers' defaults) as GlmMoeDsaModel writes them (glm-dsa: deepseek2's split layout, the
    indexer's 32 heads of 128 and top 2,048): the config the HF one gives, indexer included; a file without the
    indexer's top-k is refused by name."""
    from transformers import GlmMoeDsaConfig

    raw = GlmMoeDsaConfig().to_dict()
    want = LlamaConfig.from_hf_config(raw)
    w = _deepseek2_writer(tmp_path / "m.gguf", want, "split", arch="glm-dsa")
    _add_deepseek2_metadata(w, raw, "split")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta, _ = read_gguf(str(tmp_path / "m.gguf"))
    tensor_names = {"output.weight", f"blk.{raw['first_k_dense_replace']}.exp_probs_b.bias"}
    got = LlamaConfig.from_gguf_metadata(meta, tensor_names, source="m.gguf")
    _assert_same_config(got, want)
    assert (got.index_topk, got.index_num_heads, got.index_head_dim, got.index_rope_interleaved) == \
        (want.index_topk, want.index_num_heads, want.index_head_dim, True) == (2048, 32, 128, True)
    del meta["glm-dsa.attention.indexer.top_k"]
    with pytest.raises(ConfigError, match="m.gguf: missing GGUF field 'glm-dsa.attention.indexer.top_k'"):
        LlamaConfig.from_gguf_metadata(meta, tensor_names, source="m.gguf")


@pytest.mark.slow
def test_glm5_gguf_mtp_layer_is_the_checkpoints(tmp_path):
    """A GLM-5 GGUF keeps its MTP layer as a trailing block (glm-dsa.nextn_predict_layers): the model's layers as the
    HF directory's, and the layer `speculative.method: mtp` reads from the file (its decoder layer, indexer included,
    and its nextn norms and projection) bit for bit the HF checkpoint's."""
    from models import mtp
    from test_mtp import _hf_with_mtp

    _hf_with_mtp("glm_moe_dsa", tmp_path / "hf")
    cfg, _ = load_weights(str(tmp_path / "hf"))
    _write_deepseek2_gguf(tmp_path / "hf", cfg, tmp_path / "m.gguf", "split", arch="glm-dsa", num_nextn=1)
    gguf_cfg, _ = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    hf_mcfg, hf_layer = mtp.load_mtp(str(tmp_path / "hf"), cfg)
    gguf_mcfg, gguf_layer = mtp.load_mtp(str(tmp_path / "m.gguf"), gguf_cfg)
    _assert_same_config(gguf_mcfg.layer, hf_mcfg.layer)  # (the metadata's epsilon: float32's)
    assert gguf_mcfg.layer.index_topk == 8 and gguf_mcfg.mask_first == hf_mcfg.mask_first
    assert jax.tree.structure(gguf_layer) == jax.tree.structure(hf_layer)
    jax.tree.map(np.testing.assert_array_equal, gguf_layer, hf_layer)
