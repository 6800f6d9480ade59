"""GGUF `qwen35`, `qwen35moe` and `qwen3next` (Qwen3.5 dense and MoE, Qwen3-Next) and `granitehybrid` (Granite 4.0-H)
as llama.cpp's converter writes them (conversion/qwen.py: Qwen3NextModel, and Qwen3_5TextModel / Qwen3_5MoeTextModel
over _LinearAttentionVReorderBase and _Qwen35MRopeMixin; conversion/granite.py: GraniteHybridModel over Mamba2Model and
GraniteMoeModel): test_gated_delta's tiny random HF checkpoints written in its layout, F32 and Q8_0, load with the HF
directory's config and weights, logits and greedy tokens; files the loader cannot read are refused by name. No
published GGUF of these is small enough to install here."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import LlamaConfig
from models.errors import ConfigError
from models.gguf_loader import read_gguf
from models.loader import load_weights
from test_gated_delta import GRANITE4, TINY, _hf_granite4, _hf_qwen3_5
import fresh

# (GGUF architecture, file layout) -> test_gated_delta._hf_qwen3_5's arguments. Qwen3-Next's files: "split" (the
# converter now cuts in_proj_qkvz into attn_qkv and attn_gate, regrouped) or "legacy" (ssm_in, grouped by key head).
KINDS = {("qwen35", "split"): {}, ("qwen35moe", "split"): dict(moe=True), ("qwen3next", "split"): dict(next_=True),
         ("qwen3next", "legacy"): dict(next_=True)}
# The converter's forced-F32 tensors among the 2-D ones (TextModel.prepare_tensors: the router, the convolution)
KEEP_F32 = ("ffn_gate_inp.weight", "ssm_conv1d.weight")


def _tiled(x: np.ndarray, axis: int, start: int, hk: int, r: int, width: int) -> np.ndarray:
    """_LinearAttentionVReorderBase._reorder_v_heads: the value heads past `start` along `axis`, grouped by key head
    ([hk, r, width]), reordered to tiled order ([r, hk, width])."""
    x = np.moveaxis(x, axis, 0)
    v = x[start:].reshape(hk, r, width, *x.shape[1:])
    v = np.swapaxes(v, 0, 1).reshape(x[start:].shape)
    return np.moveaxis(np.concatenate([x[:start], v]), 0, axis)


def _converted_tensors(sd: dict, hf: dict, arch: str, layout: str, fuse_gate_up: bool = False) -> dict[str, np.ndarray]:
    """An HF checkpoint's tensors (torch orientation) under the names and in the layout llama.cpp's converter writes:
    Qwen3NextModel.modify_tensors (A_log -> ssm_a = -exp(A_log), dt_bias -> ssm_dt.bias, conv1d squeezed to
    [conv_dim, K], every norm but linear_attn.norm + 1; Qwen3-Next's in_proj_qkvz cut into attn_qkv [q, k, v] and
    attn_gate, or kept whole as ssm_in), after _LinearAttentionVReorderBase's reorder of Qwen3.5's value heads (V rows
    of in_proj_qkv and conv1d, rows of in_proj_z / b / a, A_log, dt_bias, out_proj's columns), then Qwen2MoeModel's
    experts stacked [E, out, in] (fuse_gate_up: its --fuse-gate-up-exps, gate and up in one tensor, gate rows first)
    and the tensor map's names (the pre-MLP norm post_attention_norm)."""
    import torch

    hk, hv = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    dk, dv, r = hf["linear_key_head_dim"], hf["linear_value_head_dim"], hv // hk
    reorder = arch != "qwen3next" and hk != hv
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1,
           "output.weight": sd["lm_head.weight"]}
    for i in range(hf["num_hidden_layers"]):
        p, b, t = f"model.layers.{i}.", f"blk.{i}.", {}
        t["attn_norm.weight"] = sd[p + "input_layernorm.weight"] + 1
        t["post_attention_norm.weight"] = sd[p + "post_attention_layernorm.weight"] + 1
        if p + "self_attn.q_proj.weight" in sd:  # q_proj's rows per head [query, gate], as HF has them
            for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
                t[ours + ".weight"] = sd[f"{p}self_attn.{theirs}.weight"]
            t["attn_q_norm.weight"] = sd[p + "self_attn.q_norm.weight"] + 1
            t["attn_k_norm.weight"] = sd[p + "self_attn.k_norm.weight"] + 1
        else:
            la = p + "linear_attn."
            a_log, dt_bias, conv = sd[la + "A_log"], sd[la + "dt_bias"], sd[la + "conv1d.weight"][:, 0, :]
            out_proj = sd[la + "out_proj.weight"]
            if arch == "qwen3next":
                qkvz = sd[la + "in_proj_qkvz.weight"]
                if layout == "legacy":
                    t["ssm_in.weight"] = qkvz
                else:  # [q, k, v, z] per key head -> [every q, every k, every v] and [every z]
                    sizes = [dk, dk, r * dv, r * dv]
                    parts = np.split(qkvz.T.reshape(-1, hk, sum(sizes)), np.cumsum(sizes)[:-1], axis=-1)
                    q, k, v, z = (part.reshape(qkvz.shape[1], -1) for part in parts)
                    t["attn_qkv.weight"] = np.concatenate([q, k, v], axis=-1).T
                    t["attn_gate.weight"] = z.T
                t["ssm_ba.weight"] = sd[la + "in_proj_ba.weight"]
            else:
                qkv, z = sd[la + "in_proj_qkv.weight"], sd[la + "in_proj_z.weight"]
                beta, alpha = sd[la + "in_proj_b.weight"], sd[la + "in_proj_a.weight"]
                if reorder:
                    qkv, conv = (_tiled(x, 0, 2 * hk * dk, hk, r, dv) for x in (qkv, conv))
                    z, out_proj = _tiled(z, 0, 0, hk, r, dv), _tiled(out_proj, 1, 0, hk, r, dv)
                    beta, alpha, a_log, dt_bias = (_tiled(x, 0, 0, hk, r, 1) for x in (beta, alpha, a_log, dt_bias))
                t |= {"attn_qkv.weight": qkv, "attn_gate.weight": z, "ssm_beta.weight": beta, "ssm_alpha.weight": alpha}
            t |= {"ssm_a": (-torch.exp(torch.from_numpy(np.ascontiguousarray(a_log)))).numpy(), "ssm_dt.bias": dt_bias,
                  "ssm_conv1d.weight": conv, "ssm_norm.weight": sd[la + "norm.weight"], "ssm_out.weight": out_proj}
        if p + "mlp.gate.weight" in sd:
            t["ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
            for part in ("gate", "up", "down"):
                t[f"ffn_{part}_exps.weight"] = np.stack([sd[f"{p}mlp.experts.{e}.{part}_proj.weight"]
                                                        for e in range(hf["num_experts"])])
                t[f"ffn_{part}_shexp.weight"] = sd[f"{p}mlp.shared_expert.{part}_proj.weight"]
            t["ffn_gate_inp_shexp.weight"] = sd[p + "mlp.shared_expert_gate.weight"]
            if fuse_gate_up:
                t["ffn_gate_up_exps.weight"] = np.concatenate([t.pop("ffn_gate_exps.weight"),
                                                               t.pop("ffn_up_exps.weight")], axis=1)
        else:
            for part in ("gate", "up", "down"):
                t[f"ffn_{part}.weight"] = sd[f"{p}mlp.{part}_proj.weight"]
        out |= {b + name: x for name, x in t.items()}
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def _gguf_writer(path, arch: str, hf: dict):
    """A GGUFWriter holding the metadata the converter writes of a Qwen3.5 / Qwen3-Next config.json:
    TextModel.set_gguf_parameters (sizes, RoPE base, M-RoPE sections where rope_parameters has them, norm epsilon,
    expert counts, head_dim as key/value length), Qwen2MoeModel's (expert sizes), Qwen3NextModel's (ssm.*, the
    attention interval, the rotated dims), _Qwen35MRopeMixin's (qwen35*: sections [11, 11, 10, 0] where none are
    given). The caller adds the tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    rope = hf.get("rope_parameters") or {}
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    if hf.get("intermediate_size") is not None:
        w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    if "mrope_section" in rope:
        w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0] * 4)[:4])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if hf.get("num_experts") is not None:
        w.add_expert_count(hf["num_experts"])
        w.add_expert_used_count(hf["num_experts_per_tok"])
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    w.add_key_length(hf["head_dim"])
    w.add_value_length(hf["head_dim"])
    w.add_ssm_conv_kernel(hf["linear_conv_kernel_dim"])
    w.add_ssm_state_size(hf["linear_key_head_dim"])
    w.add_ssm_group_count(hf["linear_num_key_heads"])
    w.add_ssm_time_step_rank(hf["linear_num_value_heads"])
    w.add_ssm_inner_size(hf["linear_value_head_dim"] * hf["linear_num_value_heads"])
    w.add_full_attention_interval(hf.get("full_attention_interval") or 4)
    w.add_rope_dimension_count(int(hf["head_dim"] * hf.get("partial_rotary_factor", 0.25)))
    if arch != "qwen3next" and "mrope_section" not in rope:
        w.add_rope_dimension_sections([11, 11, 10, 0])
    return w


def _write_gguf(hf_dir, path, arch: str, layout: str = "split", qtype: str = "F32", dequantized: bool = False,
                fuse_gate_up: bool = False) -> None:
    """The HF checkpoint in `hf_dir` as a GGUF in llama.cpp's layout (`_converted_tensors`). qtype "Q8_0": the 2-D
    and expert weights in Q8_0 where their rows are whole blocks of 32, else F16 (the converter's fallback), norms,
    vectors, the router and the convolution in F32; dequantized: those weights written back as F32 after the round
    trip (the values a Q8_0 file holds)."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    w = _gguf_writer(path, arch, hf)
    for name, x in _converted_tensors(load_file(str(hf_dir / "model.safetensors")), hf, arch, layout,
                                          fuse_gate_up).items():
        raw = None
        if qtype != "F32" and x.ndim >= 2 and name.endswith(".weight") and not name.endswith(("_norm.weight", *KEEP_F32)):
            raw = gguf.GGMLQuantizationType.Q8_0 if x.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16
            x = gguf.quants.quantize(x, raw)
            if dequantized:
                x, raw = gguf.quants.dequantize(x, raw).astype(np.float32), None
        w.add_tensor(name, x, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Config fields GGUF metadata holds in float32
FLOAT32_FIELDS = ("rms_norm_eps", "attention_multiplier", "residual_multiplier", "embed_scale", "logits_scaling")


def _assert_same_config(got: LlamaConfig, want: LlamaConfig, **changes) -> None:
    """`want` with `changes`, field for field: exactly, but FLOAT32_FIELDS to float32's rounding."""
    want = dataclasses.replace(want, **changes)
    assert got == dataclasses.replace(want, **{field: getattr(got, field) for field in FLOAT32_FIELDS})
    for field in FLOAT32_FIELDS:
        if getattr(want, field) is None:  # (Granite's attention_multiplier only)
            assert getattr(got, field) is None, field
        else:
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-7), field


def _with_files_a_log(params: dict, gguf_params: dict) -> dict:
    """The checkpoint's weights with the file's A_log: its rounding (`_assert_same_params`) moves logits by up to
    ~5e-5 and can flip a near tie of an expert router, so logits are compared over these (the norms' float32 epsilon
    the only difference left)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a, b: b if "gdn_a_log" in jax.tree_util.keystr(path) else a, params, gguf_params)


def _assert_same_params(got: dict, want: dict) -> None:
    """Every weight bit for bit, but the decay's log rate: float64's log of the file's -exp(A_log) is A_log to within
    float32's rounding of exp (a relative 2^-23, an absolute one in the log) and of the log (half an ulp of A_log, under
    2^-23 where |A_log| < 4); 1.2e-7 at most over 2M draws like the checkpoints'."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        a, b, where = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        if "gdn_a_log" in where:
            np.testing.assert_allclose(a, b, rtol=0, atol=2.4e-7, err_msg=where)
        else:
            np.testing.assert_array_equal(a, b, where)


@pytest.mark.slow
@pytest.mark.parametrize("arch,layout", list(KINDS))
def test_gguf_in_llama_cpp_layout_loads_as_the_hf_checkpoint(arch, layout, tmp_path):
    """A tiny random Qwen3.5 (2 key heads, 4 value heads: the converter's value-head reorder matters), Qwen3.5-MoE or
    Qwen3-Next (both layouts) written as llama.cpp's converter writes it, F32 (Qwen3.5-MoE's experts also with gate
    and up fused, the converter's --fuse-gate-up-exps): the HF directory's config (its norm
    epsilon as float32 keeps it), its weights bit for bit, its logits; transformers' logits (the dense kinds); through
    the engine (qwen35 and qwen3next), greedy tokens that are transformers' argmax, a shared prefix resumed from
    snapshots."""
    import torch

    from test_models import _engine_greedy_is_transformers

    model = _hf_qwen3_5(**KINDS[arch, layout])
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_gguf(tmp_path / "hf", tmp_path / "m.gguf", arch, layout)
    assert ("blk.0.ssm_in.weight" in read_gguf(str(tmp_path / "m.gguf"))[1]) == (layout == "legacy")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg)
    _assert_same_params(gguf_params, params)
    if arch == "qwen35moe":  # and with each layer's expert gate and up in one tensor
        _write_gguf(tmp_path / "hf", tmp_path / "fused.gguf", arch, layout, fuse_gate_up=True)
        _assert_same_params(load_weights(str(tmp_path / "fused.gguf"))[1], params)
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 100))  # two pieces of the matrix form
    # (with the file's A_log: its float32 rounding alone moved a logit 4.3e-5, RADIXLM_TEST_SEED=1978185816,
    # [qwen35-split])
    want = np.asarray(llama.forward_dense(jax.device_put(_with_files_a_log(params, gguf_params)), cfg,
                                          jnp.asarray(ids, jnp.int32)))
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if not cfg.num_experts:  # (the MoE checkpoint against transformers: test_gated_delta, whose loader this one matches)
        with torch.no_grad():  # test_gated_delta's bound in float64
            ref = model.double()(torch.tensor([ids])).logits[0].numpy()
            model.float()
        np.testing.assert_allclose(got, ref, atol=4e-4, rtol=1e-4)
    if arch != "qwen35moe" and layout == "split":  # (the MoE's engine path: test_gated_delta)
        _engine_greedy_is_transformers(model, gguf_cfg, gguf_params)


@pytest.mark.parametrize("arch,layout", [("qwen35", "split"), ("qwen3next", "legacy")])
def test_q8_0_gguf_loads_as_its_dequantized_values(arch, layout, tmp_path):
    """The converter's --outtype q8_0 (F16 where rows are not whole blocks: the value heads' 48 columns of ssm_out,
    the experts' 24 of ffn_down_exps): the weights read are the file's dequantized values, bit for bit the F32 file
    holding them, through the same reorders."""
    model = _hf_qwen3_5(**KINDS[arch, layout])
    model.save_pretrained(tmp_path / "hf")
    _write_gguf(tmp_path / "hf", tmp_path / "q.gguf", arch, layout, "Q8_0")
    _write_gguf(tmp_path / "hf", tmp_path / "d.gguf", arch, layout, "Q8_0", dequantized=True)
    _, tensors = read_gguf(str(tmp_path / "q.gguf"))
    assert {t.tensor_type.name for t in tensors.values()} == {"Q8_0", "F16", "F32"}
    q_cfg, q_params = load_weights(str(tmp_path / "q.gguf"))
    d_cfg, d_params = load_weights(str(tmp_path / "d.gguf"))
    assert q_cfg == d_cfg
    assert jax.tree.structure(q_params) == jax.tree.structure(d_params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(q_params)[0], jax.tree.leaves(d_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))


def _metadata(tmp_path, arch: str = "qwen35", **changes) -> dict:
    """The metadata the converter writes of test_gated_delta's tiny config (Qwen3.5's, or with Qwen3.5-MoE's
    experts), read back; `changes`: key (after `<arch>.`) -> value, None to leave it out."""
    hf = {**TINY, "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25},
          "linear_conv_kernel_dim": 4}
    if arch != "qwen35":
        hf |= dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2)
    w = _gguf_writer(tmp_path / "m.gguf", arch, hf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta, _ = read_gguf(str(tmp_path / "m.gguf"))
    meta[f"{arch}.vocab_size"] = hf["vocab_size"]  # (load_gguf's, from token_embd's rows)
    for key, value in changes.items():
        if value is None:
            del meta[f"{arch}.{key}"]
        else:
            meta[f"{arch}.{key}"] = value
    return meta


def test_metadata_reads_as_the_hf_config_and_unsupported_files_are_refused_by_name(tmp_path):
    """The converter's metadata of the tiny Qwen3.5 and Qwen3.5-MoE configs give from_hf_config's configs (no
    tensors; those the config looks at named); the layer kinds follow `full_attention_interval` (4 where absent, as
    llama.cpp defaults it) or a per-layer `attention.recurrent_layers` array; multi-token-prediction blocks counted
    in block_count are not layers. A file without an ssm.* field, with value heads that do not divide
    ssm.inner_size, or a MoE kind without experts is refused, naming the file and the field."""
    names = {"output.weight", "blk.3.attn_q_norm.weight"}  # (the first attention layer's q/k norms)
    for arch, model_type in (("qwen35", "qwen3_5_text"), ("qwen35moe", "qwen3_5_moe_text")):
        hf = {**TINY, "model_type": model_type, "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25}}
        if arch == "qwen35moe":
            hf = {k: v for k, v in hf.items() if k != "intermediate_size"} | dict(
                moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2)
        want = LlamaConfig.from_hf_config(hf)
        meta = _metadata(tmp_path, arch, **({"feed_forward_length": None} if arch == "qwen35moe" else {}))
        got = LlamaConfig.from_gguf_metadata(meta, names, source="m.gguf")
        _assert_same_config(got, want)
    read = lambda **changes: LlamaConfig.from_gguf_metadata(_metadata(tmp_path, **changes), names, source="m.gguf")  # noqa: E731
    assert read(full_attention_interval=2, block_count=6).linear_layers == (True, False) * 3
    assert read(full_attention_interval=None).linear_layers == (True, True, True, False)
    pattern = [True, False, True, True]
    assert read(**{"attention.recurrent_layers": pattern + [False]}).linear_layers == tuple(pattern)
    assert read(block_count=5, nextn_predict_layers=1).num_layers == 4
    for change, message in (({"ssm.state_size": None}, "missing GGUF field 'qwen35.ssm.state_size'"),
                            ({"ssm.conv_kernel": None}, "missing GGUF field 'qwen35.ssm.conv_kernel'"),
                            ({"ssm.inner_size": 50}, "qwen35.ssm.inner_size=50 is not a multiple of"),
                            ({"attention.recurrent_layers": [True, False]}, "qwen35.attention.recurrent_layers has 2 entries")):
        with pytest.raises(ConfigError, match="m.gguf: " + message):
            read(**change)
    meta = _metadata(tmp_path, "qwen35moe", expert_count=None)
    with pytest.raises(ConfigError, match="m.gguf: missing GGUF field 'qwen35moe.expert_count'"):
        LlamaConfig.from_gguf_metadata(meta, names, source="m.gguf")


def _granite_hybrid_tensors(sd: dict, hf: dict) -> dict[str, np.ndarray]:
    """A Granite 4.0-H checkpoint's tensors as GraniteHybridModel.modify_tensors writes them: Mamba-2 layers as
    Mamba2Model's (dt_bias -> ssm_dt.bias, conv1d squeezed to [conv_dim, K], A_log and D as [heads, 1] with A_log ->
    -exp(A_log), the norm as [groups, inner / groups], in_proj whole as ssm_in), attention layers as LlamaModel's
    (undo_permute: q and k rows permuted for llama.cpp's RoPE), MLPs as GraniteMoeModel's (input_linear cut into gate
    and up: the experts' ffn_{gate,up}_exps, the shared MLP's ffn_{gate,up}_shexp, or ffn_gate / ffn_up without
    experts)."""
    import torch

    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    groups, inner = hf["mamba_n_groups"], hf["mamba_expand"] * hf["hidden_size"]
    experts = bool(hf.get("num_local_experts"))

    def permute(x, n):  # LlamaModel.permute
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(hf["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", {}
        t["attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        t["ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if p + "self_attn.q_proj.weight" in sd:
            t["attn_q.weight"] = permute(sd[p + "self_attn.q_proj.weight"], heads)
            t["attn_k.weight"] = permute(sd[p + "self_attn.k_proj.weight"], kv_heads)
            t["attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
            t["attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        else:
            m = p + "mamba."
            a_log = torch.from_numpy(np.ascontiguousarray(sd[m + "A_log"])).reshape(-1, 1)
            t |= {"ssm_in.weight": sd[m + "in_proj.weight"], "ssm_conv1d.weight": sd[m + "conv1d.weight"][:, 0, :],
                  "ssm_conv1d.bias": sd[m + "conv1d.bias"], "ssm_dt.bias": sd[m + "dt_bias"],
                  "ssm_a": (-torch.exp(a_log)).numpy(), "ssm_d": sd[m + "D"].reshape(-1, 1),
                  "ssm_norm.weight": sd[m + "norm.weight"].reshape(groups, inner // groups),
                  "ssm_out.weight": sd[m + "out_proj.weight"]}
        gate, up = np.split(sd[p + "shared_mlp.input_linear.weight"], 2, axis=-2)
        down = sd[p + "shared_mlp.output_linear.weight"]
        if experts:
            t |= {"ffn_gate_shexp.weight": gate, "ffn_up_shexp.weight": up, "ffn_down_shexp.weight": down}
            t["ffn_gate_inp.weight"] = sd[p + "block_sparse_moe.router.layer.weight"]
            t["ffn_gate_exps.weight"], t["ffn_up_exps.weight"] = np.split(
                sd[p + "block_sparse_moe.input_linear.weight"], 2, axis=-2)
            t["ffn_down_exps.weight"] = sd[p + "block_sparse_moe.output_linear.weight"]
        else:
            t |= {"ffn_gate.weight": gate, "ffn_up.weight": up, "ffn_down.weight": down}
        out |= {f"blk.{i}.{name}": x for name, x in t.items()}
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def _granite_hybrid_writer(path, hf: dict):
    """A GGUFWriter holding the metadata GraniteHybridModel.set_gguf_parameters writes: GraniteMoeModel's (TextModel's
    sizes, LlamaModel's vocab size and rotated dims, head_dim left out, the multipliers as scales, the shared MLP's
    size), then the Mamba-2 layers' ssm.*, head_count_kv as a list per layer (0 on the Mamba-2 ones), no RoPE
    (rope.scaling.finetuned false) and a context of 2^20 (both overwriting what came before)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "granitehybrid")
    rope = hf.get("rope_parameters") or {}
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", hf.get("rope_theta")))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_expert_count(hf["num_local_experts"])
    w.add_expert_used_count(hf["num_experts_per_tok"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_rope_dimension_count(hf["hidden_size"] // hf["num_attention_heads"])
    for add, key in ((w.add_attention_scale, "attention_multiplier"), (w.add_embedding_scale, "embedding_multiplier"),
                     (w.add_residual_scale, "residual_multiplier"), (w.add_logit_scale, "logits_scaling"),
                     (w.add_expert_shared_feed_forward_length, "shared_intermediate_size")):
        if hf.get(key):
            add(hf[key])
    w.add_ssm_conv_kernel(hf["mamba_d_conv"])
    w.add_ssm_state_size(hf["mamba_d_state"])
    w.add_ssm_group_count(hf["mamba_n_groups"])
    w.add_ssm_inner_size(hf["mamba_expand"] * hf["hidden_size"])
    w.add_ssm_time_step_rank(hf["mamba_n_heads"])
    types = hf["layer_types"]
    w.add_head_count_kv([hf["num_key_value_heads"] if t in ("attention", "full_attention") else 0 for t in types])
    w.add_rope_scaling_finetuned(False)
    w.add_context_length(2**20)
    return w


def _write_granite_hybrid_gguf(hf_dir, path) -> None:
    from safetensors.numpy import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    w = _granite_hybrid_writer(path, hf)
    for name, x in _granite_hybrid_tensors(load_file(str(hf_dir / "model.safetensors")), hf).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
@pytest.mark.parametrize("experts", [0, 4])
def test_granite_hybrid_gguf_in_llama_cpp_layout_loads_as_the_hf_checkpoint(experts, tmp_path):
    """Granite 4.0-H (Mamba-2 layers in 2 B/C groups around an attention layer without RoPE; the shared MLP alone, or
    4 experts beside it) written as the converter writes it, F32: the HF directory's config but for the context the
    converter writes of a model without RoPE (2^20) and the norm epsilon's float32, its weights bit for bit (A_log to
    float32's rounding), its logits; transformers' logits and greedy tokens through the engine (the dense model)."""
    import torch

    from test_models import _engine_greedy_is_transformers

    model = _hf_granite4(experts, shared_intermediate_size=80)  # (its own size: the dense model's MLP is this one)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_weights(str(tmp_path / "hf"))
    _write_granite_hybrid_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    assert gguf_cfg.max_position == 2**20 and gguf_cfg.linear_kind == "mamba2"
    _assert_same_config(gguf_cfg, cfg, max_position=2**20)
    _assert_same_params(gguf_params, params)
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 100))
    if experts:
        params = _with_files_a_log(params, gguf_params)
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    want = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if not experts:  # (with experts against transformers: test_gated_delta, whose loader this one matches)
        with torch.no_grad():  # test_gated_delta's bound, float64
            ref = model.double()(torch.tensor([ids])).logits[0].numpy()
            model.float()
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
        _engine_greedy_is_transformers(model, gguf_cfg, gguf_params)


def test_granite_hybrid_metadata_is_refused_by_name_where_it_cannot_be_read(tmp_path):
    """The converter's metadata of test_gated_delta's Granite 4.0-H config gives its layer kinds and Mamba-2 sizes; a
    head_count_kv that is not a list per layer, or a missing ssm.* field, is refused naming the file and the field."""
    hf = {**GRANITE4, "model_type": "granitemoehybrid", "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e4}}
    w = _granite_hybrid_writer(tmp_path / "m.gguf", hf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta, _ = read_gguf(str(tmp_path / "m.gguf"))
    names = {"output.weight", "blk.0.ssm_conv1d.bias"}
    got = LlamaConfig.from_gguf_metadata(meta, names, source="m.gguf")
    want = LlamaConfig.from_hf_config(hf)
    _assert_same_config(got, want, max_position=2**20)
    for key, value, message in (
            ("attention.head_count_kv", 2, "granitehybrid.attention.head_count_kv=2 must list 4 layers"),
            ("ssm.state_size", None, "missing GGUF field 'granitehybrid.ssm.state_size'"),
            ("ssm.inner_size", 100, "granitehybrid.ssm.inner_size=100 is not a multiple")):
        changed = {k: v for k, v in meta.items() if k != f"granitehybrid.{key}"}
        if value is not None:
            changed[f"granitehybrid.{key}"] = value
        with pytest.raises(ConfigError, match="m.gguf: " + message):
            LlamaConfig.from_gguf_metadata(changed, names, source="m.gguf")
