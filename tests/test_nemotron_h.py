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
    are numbered by block. Dense and expert blocks in one model, latent experts, an MLP after an MLP or first, biases
    and other activations are refused by name."""
    assert nemotron_h_layers(["mamba", "mlp", "mamba", "attention", "mlp", "mamba", "mamba", "mlp"], "x") == (
        (True, True, False, True, True), (True, False, True, False, True), [0, 2, 3, 5, 6])
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
                          ({"hybrid_override_pattern": "MEME", "moe_latent_size": 16}, "moe_latent_size=16"),
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


@pytest.mark.parametrize("pattern", ["M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-", "MEMEM*EMEMEM*EMEMEME"])
def test_parameter_count_at_full_size(pattern):
    """transformers' NemotronHConfig defaults (Nemotron-H-8B's widths: 4096 hidden, Mamba-2 128 heads of 64 in 8
    groups, 32 query and 8 KV heads; 8 experts of 7,688 and a shared one) over a pattern with mixer blocks back to back,
    dense or with experts: our count is the model's (built on the meta device; the routers' correction biases are
    buffers there)."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    hf = transformers.NemotronHConfig(hybrid_override_pattern=pattern)
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(hf)
    cfg = LlamaConfig.from_hf_config(hf.to_dict())
    assert cfg.num_layers == pattern.count("M") + pattern.count("*")
    assert sum(cfg.mlp_layers) == pattern.count("-") + pattern.count("E")
    assert cfg.num_params() == _count(model)


def _count(model) -> int:
    """A transformers model's parameters, and its routers' correction biases (buffers)."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for name, b in model.named_buffers()
                                                             if name.endswith("e_score_correction_bias"))


# Nemotron 3's expert blocks in small: 8 experts of 32 (top 3 within the best of 2 groups, weights x 2.5) and a shared
# expert of 48
EXPERTS = dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=2.5)


def _hf_nemotron_h(pattern: str):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **{k: v for k, v in TINY.items() if k != "model_type"}, **EXPERTS, hybrid_override_pattern=pattern)).eval()
    with torch.no_grad():  # every weight away from its initial value (norms at 1, A_log, D, dt_bias, router biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("patterns,variants", [
    (("MM*-MM*-", "M-M*-MM-"), [{"attention.backend": "pallas_interpret"}, {"parallel.tensor": 2}]),
    (("MEM*EMME",), [{"model.moe_backend": "grouped", "parallel.tensor": 2}, {"parallel.tensor": 2,
                                                                              "parallel.expert": True}])],
    ids=["dense", "experts"])
def test_checkpoint_matches_transformers_and_serves(patterns, variants, tmp_path):
    """Tiny random checkpoints with layers without an MLP, one whose layer pattern repeats (scanned a period at a time)
    and one whose does not (a scan per run of like layers), and one with expert blocks: transformers' logits (float64;
    float32 with experts) over three pieces of Mamba-2's matrix form; then through the engine, prompts over a shared
    system prompt resumed from state snapshots, chunked and preempted: transformers' greedy tokens on xla, the same on
    the Pallas kernels and at tensor parallelism 2 (the experts: grouped, and whole on each device)."""
    pytest.importorskip("transformers")
    import torch

    from models.loader import load_weights
    from test_models import _serve_variants

    ids = list(fresh.rng().integers(0, TINY["vocab_size"], 150))
    for pattern in patterns:
        model = _hf_nemotron_h(pattern)
        model.save_pretrained(tmp_path / pattern)
        cfg, params = load_weights(str(tmp_path / pattern))
        assert cfg.num_params() == _count(model) and bool(cfg.num_experts) == ("E" in pattern)
        with torch.no_grad():  # (transformers' grouped expert matmuls take no float64)
            ref = (model if cfg.num_experts else model.double())(torch.tensor([ids])).logits[0].numpy()
            model.float()
        ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    greedy = _serve_variants(model, cfg, params, [{}, *variants])
    assert all(run == greedy[0] for run in greedy)
