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
from models.safetensors_loader import nemotron_h_stored

# Nemotron-H's blocks in small: Mamba-2 (8 heads of 16 in 2 B/C groups, state 16), attention (4 heads, 2 KV heads of 16)
TINY = dict(model_type="nemotron_h", vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
            conv_kernel=4, chunk_size=32, max_position_embeddings=256)


def test_blocks_pair_into_layers_and_what_is_refused():
    """Each mixer block starts a layer and the MLP block right after it is that layer's MLP; the checkpoint's names
    are numbered by block. An expert block, an MLP after an MLP or first, biases and other activations are refused by
    name."""
    assert nemotron_h_layers(["mamba", "mlp", "mamba", "attention", "mlp", "mamba", "mamba", "mlp"], "x") == (
        (True, True, False, True, True), (True, False, True, False, True), [0, 2, 3, 5, 6])
    cfg = LlamaConfig.from_hf_config({**TINY, "hybrid_override_pattern": "M-M*-MM-"})
    assert cfg.linear_layers == (True, True, False, True, True) and cfg.mlp_layers == (True, False, True, False, True)
    assert cfg.rope_layers == (False,) * 5 and not cfg.gated_mlp and cfg.hidden_act == "relu2"
    stored = nemotron_h_stored(cfg)
    assert [stored(f"backbone.layers.{i}.mixer_block.norm.weight") for i in range(5)] == [
        f"backbone.layers.{b}.norm.weight" for b in (0, 2, 3, 5, 6)]
    assert stored("backbone.layers.2.mlp_block.mixer.up_proj.weight") == "backbone.layers.4.mixer.up_proj.weight"
    same = LlamaConfig.from_hf_config({**TINY, "layers_block_type": ["linear_attention", "mlp", "linear_attention",
                                                                     "full_attention", "mlp", "mamba", "mamba", "mlp"]})
    assert same == cfg
    for change, match in (({"hybrid_override_pattern": "M-ME"}, "block 3 is a mixture of experts"),
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


def test_parameter_count_at_full_size():
    """transformers' NemotronHConfig defaults (Nemotron-H-8B's widths: 4096 hidden, Mamba-2 128 heads of 64 in 8
    groups, 32 query and 8 KV heads) over a 45-block pattern with mixer blocks back to back: our count is the model's
    (built on the meta device)."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    pattern = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-"
    hf = transformers.NemotronHConfig(hybrid_override_pattern=pattern)
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(hf)
    cfg = LlamaConfig.from_hf_config(hf.to_dict())
    assert cfg.num_layers == pattern.count("M") + pattern.count("*") and sum(cfg.mlp_layers) == pattern.count("-")
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def _hf_nemotron_h(pattern: str):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **{k: v for k, v in TINY.items() if k != "model_type"}, hybrid_override_pattern=pattern)).eval()
    with torch.no_grad():  # every weight away from its initial value (norms at 1, A_log, D, dt_bias)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.slow
def test_checkpoint_matches_transformers_and_serves(tmp_path):
    """Tiny random checkpoints, one whose layer pattern repeats (scanned a period at a time) and one whose does not
    (a scan per run of like layers), both with layers without an MLP: transformers' logits (float64) over three
    pieces of Mamba-2's matrix form; then through the engine, prompts over a shared system prompt resumed from state
    snapshots, chunked and preempted: transformers' greedy tokens on xla, the same on the Pallas kernels and at tensor
    parallelism 2."""
    pytest.importorskip("transformers")
    import torch

    from models.loader import load_weights
    from test_models import _serve_variants

    ids = list(fresh.rng().integers(0, TINY["vocab_size"], 150))
    for pattern in ("MM*-MM*-", "M-M*-MM-"):
        model = _hf_nemotron_h(pattern)
        model.save_pretrained(tmp_path / pattern)
        cfg, params = load_weights(str(tmp_path / pattern))
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            ref = model.double()(torch.tensor([ids])).logits[0].numpy()
            model.float()
        ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    greedy = _serve_variants(model, cfg, params, [{}, {"attention.backend": "pallas_interpret"},
                                                  {"parallel.tensor": 2}])
    assert greedy[0] == greedy[1] == greedy[2]
