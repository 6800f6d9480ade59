"""YaRN RoPE scaling (models/config.py, models/llama.py): inverse frequencies and attention factor against
transformers' own rope init, the config.json and GGUF readers, and tiny random Qwen2 checkpoints with YaRN
against transformers past their original context."""
from __future__ import annotations

import copy
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import ConfigError, LlamaConfig, RopeScaling
from test_models import _hf_checkpoint_parity
import fresh


def _hf_fields(head_dim: int, theta: float, rope_scaling: dict, **top_level) -> dict:
    """config.json of a small Qwen2 with `rope_scaling` (transformers 4's layout: rope_theta beside it)."""
    return dict(model_type="qwen2", vocab_size=64, hidden_size=4 * head_dim, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=theta, rope_scaling={"rope_type": "yarn", **rope_scaling}, **top_level)


YARN_CASES = [  # (rope_scaling, top-level config.json fields)
    ({"factor": 4.0, "original_max_position_embeddings": 32}, {}),  # Qwen2.5 / Qwen3's form
    ({"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2}, {}),
    # DeepSeek's pair: cos and sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    ({"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707}, {}),
    ({"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}, {}),
    ({"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.5}, {}),  # one of the pair: the default
    ({"factor": 32.0, "original_max_position_embeddings": 4096, "attention_factor": 1.5, "mscale": 1.0,
      "mscale_all_dim": 0.5}, {}),  # an explicit attention factor wins
    ({"factor": 4.0, "original_max_position_embeddings": 1000, "truncate": False}, {}),
    ({"factor": None, "original_max_position_embeddings": 64}, {}),  # factor: 256 / 64
    ({"factor": 4.0, "original_max_position_embeddings": 32}, {"original_max_position_embeddings": 64}),  # top wins
]


@pytest.mark.parametrize("head_dim, theta", [(64, 1e4), (128, 1e6)])
@pytest.mark.parametrize("rope_scaling, top_level", YARN_CASES)
def test_yarn_matches_transformers_rope_init(head_dim, theta, rope_scaling, top_level):
    """Inverse frequencies (transformers computes them in float32: rtol 1e-6) and the attention factor (a Python
    float there too) equal `ROPE_INIT_FUNCTIONS["yarn"]`'s, read from transformers 4's `rope_scaling` and from
    transformers 5's `rope_parameters` alike."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = _hf_fields(head_dim, theta, rope_scaling, **top_level)
    hf_cfg = Qwen2Config.from_dict(copy.deepcopy(fields))
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    for source in (fields, hf_cfg.to_dict()):
        cfg = LlamaConfig.from_hf_config(source)
        np.testing.assert_allclose(cfg.rope_inv_freq(), want_inv_freq.double().numpy(), rtol=1e-6, atol=0)
        assert cfg.rope_attention_factor() == pytest.approx(want_factor, rel=1e-12, abs=0)
    assert cfg.rope_inv_freq()[0] == pytest.approx(1.0)  # the fastest pair always keeps its frequency
    assert cfg.rope_inv_freq()[-1] == pytest.approx(theta ** (-(head_dim - 2) / head_dim) / cfg.rope_scaling.factor)


def test_yarn_attention_factor_defaults():
    def factor_of(**rope):
        return LlamaConfig.from_hf_config(_hf_fields(64, 1e4, rope)).rope_attention_factor()

    assert factor_of(factor=4.0) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert factor_of(factor=40.0, mscale=1.0, mscale_all_dim=0.5) == pytest.approx(
        (0.1 * math.log(40.0) + 1) / (0.05 * math.log(40.0) + 1))
    assert factor_of(factor=40.0, mscale=0.707, mscale_all_dim=0.707) == 1.0
    assert factor_of(factor=1.0) == 1.0  # no stretch, no scale
    assert factor_of(factor=4.0, attention_factor=0.75) == 0.75


def test_windowed_layers_with_their_own_base_stay_unscaled():
    cfg = LlamaConfig(architecture="gemma3", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=1e6, rope_local_theta=1e4,
                      rope_scaling=RopeScaling("yarn", 8.0, original_max_position=64), sliding_window=16,
                      sliding_layers=(True, False))
    base = 1.0 / 1e4 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_array_equal(cfg.rope_inv_freq(local=True), base)
    assert cfg.rope_attention_factor(local=True) == 1.0
    assert cfg.rope_attention_factor() == pytest.approx(0.1 * math.log(8.0) + 1)
    # Windowed layers without a base of their own (Mistral) share the global layers' scaled RoPE.
    shared = dataclasses.replace(cfg, rope_local_theta=None)
    np.testing.assert_array_equal(shared.rope_inv_freq(local=True), shared.rope_inv_freq())
    assert shared.rope_attention_factor(local=True) == shared.rope_attention_factor()


# ------------------------------------------------------------------------------------------- readers
def _gguf_meta(tmp_path, rope: dict) -> tuple[dict, str]:
    """The metadata of a header-only qwen2 GGUF whose rope.scaling.* keys are `rope` (GGUFWriter method suffix ->
    value), as models.gguf_loader reads it."""
    import gguf

    from models.gguf_loader import read_gguf

    path = str(tmp_path / "yarn.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(64)
    w.add_context_length(256)
    w.add_rope_freq_base(1e6)
    for name, value in rope.items():
        getattr(w, "add_rope_scaling_" + name)(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, _ = read_gguf(path)
    return meta, path


def test_yarn_gguf_keys_are_the_gguf_packages():
    import gguf

    keys = {k.format(arch="qwen2") for k in (gguf.Keys.Rope.SCALING_TYPE, gguf.Keys.Rope.SCALING_FACTOR,
                                             gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, gguf.Keys.Rope.SCALING_YARN_BETA_FAST,
                                             gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, gguf.Keys.Rope.SCALING_YARN_LOG_MUL,
                                             gguf.Keys.Rope.SCALING_YARN_ATTN_FACTOR)}
    assert keys == {"qwen2.rope.scaling." + k for k in ("type", "factor", "original_context_length", "yarn_beta_fast",
                                                        "yarn_beta_slow", "yarn_log_multiplier", "yarn_attn_factor")}
    assert gguf.RopeScalingType.YARN.value == "yarn"


@pytest.mark.parametrize("hf, gguf_rope", [
    ({"factor": 4.0, "original_max_position_embeddings": 32768}, {"factor": 4.0, "orig_ctx_len": 32768}),
    ({"factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 16.0, "beta_slow": 2.0,
      "attention_factor": 1.25},
     {"factor": 4.0, "orig_ctx_len": 32768, "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0, "yarn_attn_factor": 1.25}),
    # llama.cpp's yarn_log_multiplier is mscale_all_dim with mscale 1
    ({"factor": 8.0, "original_max_position_embeddings": 8192, "mscale": 1.0, "mscale_all_dim": 0.5},
     {"factor": 8.0, "orig_ctx_len": 8192, "yarn_log_mul": 0.5}),
])
def test_hf_config_and_gguf_read_the_same_yarn(tmp_path, hf, gguf_rope):
    import gguf

    want = LlamaConfig.from_hf_config(_hf_fields(64, 1e6, hf))
    meta, path = _gguf_meta(tmp_path, {"type": gguf.RopeScalingType.YARN, **gguf_rope})
    got = LlamaConfig.from_gguf_metadata(meta, set(), path)
    assert got.rope_scaling == want.rope_scaling and got.rope_scaling.rope_type == "yarn"
    np.testing.assert_array_equal(got.rope_inv_freq(), want.rope_inv_freq())
    assert got.rope_attention_factor() == want.rope_attention_factor()
    assert LlamaConfig.from_dict(got.to_dict()) == got  # the orbax round trip keeps it


@pytest.mark.parametrize("rope, message", [
    ({"factor": 0.0}, "rope_scaling.factor must be > 0"),
    ({"factor": 4.0, "beta_fast": 0.5}, "rope_scaling.beta_fast must be >= beta_slow"),
    ({"factor": 4.0, "beta_slow": -1.0}, "rope_scaling.beta_slow must be > 0"),
    ({"factor": 4.0, "attention_factor": 0.0}, "rope_scaling.attention_factor must be > 0"),
    ({"factor": 4.0, "original_max_position_embeddings": -8}, "rope_scaling.original_max_position must be > 0"),
    ({"rope_type": "longrope", "factor": 4.0},
     r"c.json: rope_scaling type 'longrope' is not supported \(llama3, linear, yarn\)"),
])
def test_bad_hf_yarn_names_the_field(rope, message):
    fields = _hf_fields(64, 1e4, {"original_max_position_embeddings": 32, **rope})
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_config(fields, source="c.json")


@pytest.mark.parametrize("rope, message", [
    ({"type": "yarn", "orig_ctx_len": 64}, r"missing GGUF field 'qwen2.rope.scaling.factor'"),
    ({"type": "yarn", "factor": 0.0, "orig_ctx_len": 64}, "rope_scaling.factor must be > 0"),
    ({"type": "yarn", "factor": 4.0, "orig_ctx_len": 64, "yarn_beta_fast": 0.5}, "rope_scaling.beta_fast"),
    ({"type": "yarn", "factor": 4.0, "orig_ctx_len": 64, "yarn_ext_factor": 0.5},
     r"qwen2.rope.scaling.yarn_ext_factor=0.5 is not supported"),
    ({"type": "longrope", "factor": 4.0},
     r"qwen2.rope.scaling.type='longrope' is not supported \(none, linear, yarn\)"),
])
def test_bad_gguf_yarn_names_the_field(tmp_path, rope, message):
    import gguf

    rope = {**rope, "type": gguf.RopeScalingType(rope["type"])}
    meta, path = _gguf_meta(tmp_path, rope)
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_gguf_metadata(meta, set(), path)


# ------------------------------------------------------------------------------- HF parity (slow)
@pytest.mark.slow
@pytest.mark.parametrize("rope_scaling", [
    {"factor": 4.0},  # Qwen2.5 / Qwen3's form: attention factor 0.1 ln 4 + 1
    {"factor": 8.0, "beta_fast": 8.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
])
def test_qwen2_with_yarn_matches_transformers_past_the_original_context(tmp_path, rope_scaling):
    """A tiny random Qwen2 (head_dim 32: 16 pairs, some kept, some interpolated, some on the ramp) pretrained for 32
    positions and stretched by YaRN: logits to 1e-4 of transformers' over 100 tokens (measured < 1e-6). Without the
    attention factor, or without YaRN's frequencies, they differ by ~0.1 (the test sees either doing nothing)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(fresh.seed())
    hf_cfg = Qwen2Config(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e4,
                         max_position_embeddings=int(32 * rope_scaling["factor"]),
                         rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 32, **rope_scaling})
    model = Qwen2ForCausalLM(hf_cfg).eval()

    def noise(name):  # random biases and norms; larger q/k weights, so attention (and where RoPE puts it) matters
        if name.endswith("bias") or "norm" in name:
            return 0.1
        return 0.2 if "q_proj.weight" in name or "k_proj.weight" in name else 0

    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 100, noise)
    assert cfg.rope_scaling.rope_type == "yarn" and cfg.rope_scaling.original_max_position == 32
    assert cfg.head_dim == 32 and cfg.rope_attention_factor() > 1.05
    no_factor = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling, attention_factor=1.0))
    for other in (no_factor, dataclasses.replace(cfg, rope_scaling=None)):
        logits = np.asarray(llama.forward_dense(params, other, jnp.asarray(ids, jnp.int32)))
        assert np.abs(logits - ref).max() > 1e-2
