"""Nemotron-H (NVIDIA's Nemotron-H and Nemotron Nano 2, `nemotron_h`): blocks of one kind each behind an RMSNorm,
Mamba-2, attention without positional embeddings or an MLP without a gate, read as layers of a token mixer block and
the MLP block after it, where a layer may have no MLP (`LlamaConfig.mlp_layers`); checked against transformers'
NemotronHForCausalLM."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fresh
from models import llama
from models.config import ConfigError, LlamaConfig, nemotron_h_layers
from models.safetensors_loader import nemotron_h_renamed

# Nemotron-H's blocks in small: Mamba-2 (8 heads of 16 in 2 B/C groups, state 16), attention (4 heads, 2 KV heads of 16)
TINY = dict(model_type="nemotron_h", vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
            conv_kernel=4, chunk_size=32, max_position_embeddings=256)


def test_blocks_pair_into_layers_and_what_is_refused():
    """Each mixer block starts a layer and the MLP block right after it is that layer's MLP; the checkpoint's names
    are numbered by block. Dense and expert blocks in one model, more than one shared expert, an MLP after an MLP or
    first, biases and other activations are refused by name."""
    assert nemotron_h_layers(["mamba", "mlp", "mamba", "attention", "mlp", "mamba", "mamba", "mlp"], "x") == (
        (True, True, False, True, True), (True, False, True, False, True))
    cfg = LlamaConfig.from_hf_config({**TINY, "hybrid_override_pattern": "M-M*-MM-"})
    assert cfg.linear_layers == (True, True, False, True, True) and cfg.mlp_layers == (True, False, True, False, True)
    assert cfg.rope_layers == (False,) * 5 and not cfg.gated_mlp and cfg.hidden_act == "relu2"
    renamed = nemotron_h_renamed(cfg)
    assert [renamed(f"backbone.layers.{b}.norm.weight") for b in (0, 2, 3, 5, 6)] == [
        f"backbone.layers.{i}.mixer_block.norm.weight" for i in range(5)]
    assert renamed("backbone.layers.4.mixer.up_proj.weight") == "backbone.layers.2.mlp_block.mixer.up_proj.weight"
    assert renamed("backbone.norm_f.weight") == "backbone.norm_f.weight"
    same = LlamaConfig.from_hf_config({**TINY, "layers_block_type": ["linear_attention", "mlp", "linear_attention",
                                                                     "full_attention", "mlp", "mamba", "mamba", "mlp"]})
    assert same == cfg
    for change, match in (({"hybrid_override_pattern": "M-ME"}, "dense MLP .-. and expert .E. blocks"),
                          ({"hybrid_override_pattern": "ME*E", "n_shared_experts": 2}, "n_shared_experts=2"),
                          ({"hybrid_override_pattern": "M--"}, "block 2 is an MLP that follows no token mixer"),
                          ({"hybrid_override_pattern": "-M"}, "block 0 is an MLP that follows no token mixer"),
                          ({"hybrid_override_pattern": "M-X"}, r"block kinds \['X'\]"),
                          ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
                          ({"use_bias": True}, "use_bias=true"),
                          ({"hybrid_override_pattern": None}, "missing field 'hybrid_override_pattern'")):
        with pytest.raises(ConfigError, match=match):
            LlamaConfig.from_hf_config({**TINY, "hybrid_override_pattern": "M-*-", **change})
    with pytest.raises(ConfigError, match="layers without an MLP are supported in hybrid models"):
        LlamaConfig(architecture="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=1,
                    num_kv_heads=1, head_dim=8, mlp_layers=(True, False))


@pytest.mark.parametrize("pattern,latent", [("M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-", None),
                                            ("MEMEM*EMEMEM*EMEMEME", None), ("MEMEM*EMEMEM*EMEMEME", 1024)])
def test_parameter_count_at_full_size(pattern, latent):
    """transformers' NemotronHConfig defaults (Nemotron-H-8B's widths: 4096 hidden, Mamba-2 128 heads of 64 in 8
    groups, 32 query and 8 KV heads; 8 experts of 7,688 and a shared one) over a pattern with mixer blocks back to back,
    dense, with experts, and with experts in a latent space of 1,024: our count is the model's (built on the meta
    device; the routers' correction biases are buffers there)."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    hf = transformers.NemotronHConfig(hybrid_override_pattern=pattern, moe_latent_size=latent)
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(hf)
    cfg = LlamaConfig.from_hf_config(hf.to_dict())
    assert cfg.num_layers == pattern.count("M") + pattern.count("*")
    assert sum(cfg.mlp_layers) == pattern.count("-") + pattern.count("E") and cfg.moe_latent_size == (latent or 0)
    assert cfg.num_params() == _count(model)


def _count(model) -> int:
    """A transformers model's parameters, and its routers' correction biases (buffers)."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for name, b in model.named_buffers()
                                                             if name.endswith("e_score_correction_bias"))


# Nemotron 3's expert blocks in small: 8 experts of 32 (top 3 within the best of 2 groups, weights x 2.5) and a shared
# expert of 48
EXPERTS = dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=2.5)


def _hf_nemotron_h(pattern: str, **changes):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**{
        **{k: v for k, v in TINY.items() if k != "model_type"}, **EXPERTS, **changes,
        "hybrid_override_pattern": pattern})).eval()
    with torch.no_grad():  # every weight away from its initial value (norms at 1, A_log, D, dt_bias, router biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints,variants", [
    ((("MM*-MM*-", {}), ("M-M*-MM-", {})), [{"attention.backend": "pallas_interpret"}, {"parallel.tensor": 2}]),
    ((("MEM*EMME", {}), ("MEM*EMME", {"moe_latent_size": 24})),
     [{"model.moe_backend": "grouped", "parallel.tensor": 2}, {"parallel.tensor": 2, "parallel.expert": True}])],
    ids=["dense", "experts"])
def test_checkpoint_matches_transformers_and_serves(checkpoints, variants, tmp_path):
    """Tiny random checkpoints with layers without an MLP, one whose layer pattern repeats (scanned a period at a time)
    and one whose does not (a scan per run of like layers), and with expert blocks, their experts in a latent space of
    24 or not: transformers' logits (float64; float32 with experts) over three pieces of Mamba-2's matrix form; then
    through the engine (the last checkpoint), prompts over a shared system prompt resumed from state snapshots, chunked
    and preempted: transformers' greedy tokens on xla, the same on the Pallas kernels and at tensor parallelism 2 (the
    experts: grouped, and whole on each device)."""
    pytest.importorskip("transformers")
    import torch

    from models.loader import load_weights
    from models.safetensors_loader import params_from_state_dict
    from test_models import _serve_variants

    ids = list(fresh.rng().integers(0, TINY["vocab_size"], 150))
    for n, (pattern, changes) in enumerate(checkpoints):
        model = _hf_nemotron_h(pattern, **changes)
        model.save_pretrained(tmp_path / str(n))
        cfg, params = load_weights(str(tmp_path / str(n)))
        assert cfg.num_params() == _count(model) and bool(cfg.num_experts) == ("E" in pattern)
        assert cfg.moe_latent_size == changes.get("moe_latent_size", 0)
        # a trainer's state dict, as transformers holds it (`model.`, not the files' `backbone.`): the same weights
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        jax.tree.map(np.testing.assert_array_equal, params_from_state_dict(cfg, state), params)
        with torch.no_grad():  # (transformers' grouped expert matmuls take no float64)
            ref = (model if cfg.num_experts else model.double())(torch.tensor([ids])).logits[0].numpy()
            model.float()
        ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    greedy = _serve_variants(model, cfg, params, [{}, *variants])
    assert all(run == greedy[0] for run in greedy)


def _nemotron_h_gguf(hf_dir, path) -> None:
    """The checkpoint in `hf_dir` (F32) as llama.cpp's converter writes it (NemotronHModel over GraniteHybridModel and
    Mamba2Model): a block each, the per-block lists head_count_kv and feed_forward_length (0 where the block has none),
    ssm.*, key_length, no RoPE and a context of 2^20; the block's norm attn_norm, Mamba-2 as ssm_* (A as -exp(A_log)
    and D as [heads, 1], the norm as [groups, inner / groups], the convolution [conv_dim, K]), Q/K rows permuted as
    LlamaModel does, the MLP ffn_up / ffn_down; expert blocks' router ffn_gate_inp and its bias exp_probs_b, the experts
    stacked, the shared one *_shexp (nemotron_h_moe)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    hf = json.loads((hf_dir / "config.json").read_text())
    kinds = hf["layers_block_type"]
    moe = "moe" in kinds
    w = gguf.GGUFWriter(str(path), "nemotron_h_moe" if moe else "nemotron_h")
    heads, kv, head_dim = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    width = hf["moe_intermediate_size"] if moe else hf["intermediate_size"]
    w.add_block_count(len(kinds))
    w.add_embedding_length(hf["hidden_size"])
    w.add_head_count(heads)
    w.add_head_count_kv([kv if k == "full_attention" else 0 for k in kinds])
    w.add_feed_forward_length([width if k in ("mlp", "moe") else 0 for k in kinds])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(hf["layer_norm_epsilon"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_ssm_conv_kernel(hf["conv_kernel"])
    w.add_ssm_state_size(hf["ssm_state_size"])
    w.add_ssm_group_count(hf["n_groups"])
    w.add_ssm_inner_size(hf["mamba_num_heads"] * hf["mamba_head_dim"])
    w.add_ssm_time_step_rank(hf["mamba_num_heads"])
    w.add_rope_scaling_finetuned(False)
    w.add_context_length(2**20)
    if moe:
        w.add_expert_used_count(hf["num_experts_per_tok"])
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(hf["moe_shared_expert_intermediate_size"])
        w.add_expert_count(hf["n_routed_experts"])
        w.add_expert_shared_count(hf["n_shared_experts"])
        w.add_expert_weights_norm(hf["norm_topk_prob"])
        w.add_expert_weights_scale(hf["routed_scaling_factor"])
        w.add_expert_group_count(hf["n_group"])
        if hf.get("moe_latent_size") is not None:
            w.add_moe_latent_size(hf["moe_latent_size"])

    def permute(x, n):  # LlamaModel.permute
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    tensors = {"token_embd.weight": sd["backbone.embeddings.weight"], "output.weight": sd["lm_head.weight"],
               "output_norm.weight": sd["backbone.norm_f.weight"]}
    for b, kind in enumerate(kinds):
        p, t = f"backbone.layers.{b}.", {"attn_norm.weight": sd[f"backbone.layers.{b}.norm.weight"]}
        m = p + "mixer."
        if kind == "linear_attention":
            t |= {"ssm_in.weight": sd[m + "in_proj.weight"], "ssm_conv1d.weight": sd[m + "conv1d.weight"][:, 0],
                  "ssm_conv1d.bias": sd[m + "conv1d.bias"], "ssm_dt.bias": sd[m + "dt_bias"],
                  "ssm_a": -np.exp(sd[m + "A_log"]).reshape(-1, 1), "ssm_d": sd[m + "D"].reshape(-1, 1),
                  "ssm_norm.weight": sd[m + "norm.weight"].reshape(hf["n_groups"], -1),
                  "ssm_out.weight": sd[m + "out_proj.weight"]}
        elif kind == "full_attention":
            t |= {"attn_q.weight": permute(sd[m + "q_proj.weight"], heads),
                  "attn_k.weight": permute(sd[m + "k_proj.weight"], kv), "attn_v.weight": sd[m + "v_proj.weight"],
                  "attn_output.weight": sd[m + "o_proj.weight"]}
        elif kind == "mlp":
            t |= {"ffn_up.weight": sd[m + "up_proj.weight"], "ffn_down.weight": sd[m + "down_proj.weight"]}
        else:
            experts = range(hf["n_routed_experts"])
            t |= {"ffn_gate_inp.weight": sd[m + "gate.weight"],
                  "exp_probs_b.bias": sd[m + "gate.e_score_correction_bias"],
                  "ffn_up_exps.weight": np.stack([sd[f"{m}experts.{e}.up_proj.weight"] for e in experts]),
                  "ffn_down_exps.weight": np.stack([sd[f"{m}experts.{e}.down_proj.weight"] for e in experts]),
                  "ffn_up_shexp.weight": sd[m + "shared_experts.up_proj.weight"],
                  "ffn_down_shexp.weight": sd[m + "shared_experts.down_proj.weight"]}
            if hf.get("moe_latent_size") is not None:
                t |= {"ffn_latent_down.weight": sd[m + "fc1_latent_proj.weight"],
                      "ffn_latent_up.weight": sd[m + "fc2_latent_proj.weight"]}
        tensors |= {f"blk.{b}.{name}": x for name, x in t.items()}
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pattern,latent", [("M-M*-MM-", None), ("MEM*EMME", None), ("MEM*EMME", 24)],
                         ids=["dense", "experts", "latent_experts"])
def test_gguf_in_llama_cpp_layout_loads_as_the_hf_checkpoint(pattern, latent, tmp_path):
    """A tiny random checkpoint written as llama.cpp's converter writes it, F32 (nemotron_h, nemotron_h_moe): the HF
    directory's config but for the converter's context of 2^20 and the norm epsilon's float32, its weights bit for bit
    (A_log to float32's rounding), the same logits. Metadata it cannot read is refused naming the field."""
    pytest.importorskip("transformers")
    from models.gguf_loader import read_gguf
    from models.loader import load_weights
    from test_gguf_hybrid import _assert_same_config, _assert_same_params, _with_files_a_log

    # (the converter writes no expert_group_used_count: one group)
    model = _hf_nemotron_h(pattern, n_group=1, topk_group=1, moe_latent_size=latent)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_weights(str(tmp_path / "hf"))
    _nemotron_h_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    _assert_same_config(gguf_cfg, cfg, max_position=2**20)
    _assert_same_params(gguf_params, params)
    ids = jnp.asarray(fresh.rng().integers(0, cfg.vocab_size, 100), jnp.int32)
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, ids))
    want = np.asarray(llama.forward_dense(jax.device_put(_with_files_a_log(params, gguf_params)), cfg, ids))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    meta, tensors = read_gguf(str(tmp_path / "m.gguf"))
    arch = meta["general.architecture"]
    for key, value, match in (("attention.head_count_kv", 2, "must list each of the 8 blocks"),
                              ("ssm.inner_size", 100, "inner_size=100 is not a multiple"),
                              ("ssm.state_size", None, f"missing GGUF field '{arch}.ssm.state_size'"),
                              *([("expert_group_count", 2, "without expert_group_used_count")] if "E" in pattern
                                else [])):
        changed = {k: v for k, v in meta.items() if k != f"{arch}.{key}"} | (
            {} if value is None else {f"{arch}.{key}": value})
        with pytest.raises(ConfigError, match=match):
            LlamaConfig.from_gguf_metadata(changed, set(tensors), source="m.gguf")
