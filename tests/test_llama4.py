"""Llama 4 (Scout, Maverick), served for text: chunked attention on the layers with RoPE, full attention and a
position-dependent query temperature on those without, q/k RMS-normed without weights after RoPE, experts whose
routing weight scales their input beside an ungated shared expert, dense and expert layers interleaved. The real
configs field by field with transformers' parameter counts, a tiny random checkpoint against transformers' logits and
through the engine on every backend."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, moe
from models.config import ConfigError, LlamaConfig
from test_models import _hf_checkpoint_parity, _serve_variants
import fresh

# meta-llama/Llama-4-Scout-17B-16E-Instruct's config.json text_config, the fields that shape the model
SCOUT = {
    "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
    "attention_chunk_size": 8192, "use_qk_norm": True, "attn_temperature_tuning": True, "floor_scale": 8192,
    "attn_scale": 0.1, "rms_norm_eps": 1e-05, "max_position_embeddings": 10485760, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False,
}
# meta-llama/Llama-4-Maverick-17B-128E-Instruct's: 128 experts on every other layer, no q/k norm
MAVERICK = {**SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
            "max_position_embeddings": 1048576, "rope_scaling": None}


def _hf_config(raw: dict):
    from transformers import Llama4TextConfig

    fields = {k: v for k, v in raw.items() if k not in ("model_type", "rope_scaling", "rope_theta")}
    rope = dict(raw["rope_scaling"] or {"rope_type": "default"}) | {"rope_theta": raw["rope_theta"]}
    return Llama4TextConfig(**fields, rope_parameters=rope)


@pytest.mark.parametrize("raw", [SCOUT, MAVERICK], ids=["scout", "maverick"])
def test_config_from_the_real_checkpoints(raw):
    """Every field that shapes the model and the parameter count as transformers builds it: Scout 16 experts on every
    layer (107,769,861,120 parameters of text), Maverick 128 on every other one; every 4th layer without RoPE and
    with full attention, the others chunked at 8,192. The multimodal config's text_config reads the same."""
    import torch
    from transformers import Llama4ForCausalLM

    cfg = LlamaConfig.from_hf_config(raw)
    scout = raw is SCOUT
    assert cfg.rope_layers == tuple((i + 1) % 4 != 0 for i in range(48)) == cfg.chunked_layers
    assert cfg.attention_chunk == 8192 and cfg.nope_temperature == (8192.0, 0.1)
    assert cfg.qk_norm_unweighted == scout and cfg.router_scales_input and not cfg.shared_expert_gate
    assert (cfg.moe_layers or (True,) * 48) == tuple(scout or i % 2 == 1 for i in range(48))  # (): every layer
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.intermediate_size) \
        == (raw["num_local_experts"], 8192, 8192, 16384)
    assert cfg.routing == moe.Routing(top_k=1, norm_topk_prob=False, scoring="sigmoid", scales_input=True)
    with torch.device("meta"):
        hf = Llama4ForCausalLM(_hf_config(raw))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    if scout:
        assert cfg.num_params() == 107_769_861_120
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    wrapped = {"model_type": "llama4", "text_config": {**raw, "model_type": "llama4_text"}, "vision_config": {}}
    assert LlamaConfig.from_hf_config(wrapped) == cfg
    with pytest.raises(ConfigError, match="layer_types"):
        LlamaConfig.from_hf_config({**raw, "layer_types": ["sliding_attention"] * 48})


def test_experts_weighted_at_their_input():
    """Routing.scales_input (Llama 4: each chosen expert runs on its routing weight times the token): both expert
    paths equal the experts computed on the scaled inputs in float64 numpy, on fresh random weights, top 1 and 2."""
    rng = fresh.rng()
    t, h, e, i = 7, 16, 4, 12
    x = rng.normal(size=(t, h)).astype(np.float32)
    p = {"router": rng.normal(size=(h, e)), "moe_gate": rng.normal(size=(e, h, i)) * 0.3,
         "moe_up": rng.normal(size=(e, h, i)) * 0.3, "moe_down": rng.normal(size=(e, i, h)) * 0.3}
    p = {k: np.asarray(v, np.float32) for k, v in p.items()}
    for top_k in (1, 2):
        routing = moe.Routing(top_k=top_k, norm_topk_prob=False, scoring="sigmoid", scales_input=True)
        logits = x.astype(np.float64) @ p["router"]
        want = np.zeros((t, h))
        for r in range(t):
            for j in np.argsort(-logits[r])[:top_k]:
                xs = x[r] / (1 + np.exp(-logits[r, j]))  # the expert's input: the token times its weight
                g, u = xs @ p["moe_gate"][j], xs @ p["moe_up"][j]
                want[r] += (g / (1 + np.exp(-g)) * u) @ p["moe_down"][j]
        for grouped in (False, True):
            got = moe.moe_mlp(jnp.asarray(x), jax.tree.map(jnp.asarray, p), routing, moe.swiglu, grouped)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def _hf_llama4():
    """A tiny random Llama 4 text model: 4 layers, RoPE and chunks of 8 on the even ones, NoPE with the temperature
    (floor_scale 8: it grows within these prompts) on the odd ones, 4 experts on the odd ones (top 1, a shared
    expert) and a wider dense MLP on the even ones, llama3 RoPE scaling, q/k norms."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(fresh.seed())
    return Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=211, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=8, attn_scale=0.1, no_rope_layer_interval=2,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 500000.0},
        attn_implementation="eager")).eval()


@pytest.mark.slow
def test_checkpoint_matches_transformers_and_serves_on_every_backend(tmp_path):
    """The tiny checkpoint's logits within 1e-4 of transformers' on 40 tokens (5 chunks); through the engine (prompts
    of 31-41 tokens over a shared 30-token prefix: prefix hits across chunk edges, chunked prefill, preemption)
    greedy tokens are transformers' argmax at every step, and the same on the Pallas kernels (interpret), split over
    2 devices, and with the experts as grouped matmuls."""
    model = _hf_llama4()
    cfg, params, _, _ = _hf_checkpoint_parity(model, tmp_path, 40, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == "llama4" and cfg.chunked_layers == (True, False, True, False)
    greedy = _serve_variants(model, cfg, params, [{}, {"attention.backend": "pallas_interpret"},
                                                   {"parallel.tensor": 2}, {"model.moe_backend": "grouped"}],
                             system_len=30, num_pages=12)
    assert all(g == greedy[0] for g in greedy[1:])


def _write_llama4_gguf(directory, hparams: dict) -> str:
    """The Llama 4 checkpoint in `directory` (F32) as llama.cpp's converter writes it (Llama4Model over LlamaModel):
    intermediate_size_mlp as feed_forward_length, the experts' intermediate_size as expert_feed_forward_length,
    interleave_moe_layer_step, llama3 RoPE scaling as a rope_freqs tensor; the experts' gate_up [E, in, 2 x out]
    transposed and cut into ffn_gate_exps / ffn_up_exps, down_proj transposed to ffn_down_exps, the shared expert under
    `shexp`, the router ffn_gate_inp, q/k rows as HF has them (undo_permute off)."""
    import gguf
    from safetensors.numpy import load_file
    from test_gguf_rope import _llama_cpp_rope_freqs

    sd = load_file(str(directory / "model.safetensors"))
    path = str(directory / "llama4.gguf")
    w = gguf.GGUFWriter(path, "llama4")
    for add, value in ((w.add_block_count, hparams["num_hidden_layers"]),
                       (w.add_context_length, hparams["max_position_embeddings"]),
                       (w.add_embedding_length, hparams["hidden_size"]),
                       (w.add_feed_forward_length, hparams["intermediate_size_mlp"]),
                       (w.add_head_count, hparams["num_attention_heads"]),
                       (w.add_head_count_kv, hparams["num_key_value_heads"]),
                       (w.add_rope_freq_base, hparams["rope_parameters"]["rope_theta"]),
                       (w.add_layer_norm_rms_eps, hparams["rms_norm_eps"]), (w.add_key_length, hparams["head_dim"]),
                       (w.add_value_length, hparams["head_dim"]), (w.add_rope_dimension_count, hparams["head_dim"]),
                       (w.add_vocab_size, hparams["vocab_size"]), (w.add_expert_count, hparams["num_local_experts"]),
                       (w.add_expert_used_count, hparams["num_experts_per_tok"]),
                       (w.add_interleave_moe_layer_step, hparams["interleave_moe_layer_step"]),
                       (w.add_expert_feed_forward_length, hparams["intermediate_size"])):
        add(value)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(hparams))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "feed_forward.gate_proj": "ffn_gate", "feed_forward.up_proj": "ffn_up", "feed_forward.down_proj": "ffn_down",
             "feed_forward.shared_expert.gate_proj": "ffn_gate_shexp", "feed_forward.shared_expert.up_proj": "ffn_up_shexp",
             "feed_forward.shared_expert.down_proj": "ffn_down_shexp", "feed_forward.router": "ffn_gate_inp"}
    for i in range(hparams["num_hidden_layers"]):
        for theirs, ours in names.items():
            if (x := sd.get(f"model.layers.{i}.{theirs}.weight")) is not None:
                w.add_tensor(f"blk.{i}.{ours}.weight", x)
        if (gate_up := sd.get(f"model.layers.{i}.feed_forward.experts.gate_up_proj")) is not None:
            gate, up = np.split(np.swapaxes(gate_up, -1, -2), 2, axis=-2)
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", np.ascontiguousarray(
                np.swapaxes(sd[f"model.layers.{i}.feed_forward.experts.down_proj"], -1, -2)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
def test_gguf_as_llama_cpp_writes_it(tmp_path):
    """A tiny random Llama 4 with the constants llama.cpp's graph fixes (chunks of 8,192 on three layers in four, the
    fourth without RoPE, the temperature's floor 8,192 and scale 0.1), written as its converter writes it: read to the
    HF directory's layers (chunks, NoPE layers, unweighted q/k norms, experts at their input and a shared expert, dense
    layers between) and to transformers' logits; a 128-expert file (Maverick's) has no q/k norms, one whose
    sliding_window is 0 neither chunks nor NoPE layers."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from models.gguf_loader import read_gguf
    from models.loader import load_weights

    hparams = dict(vocab_size=211, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                   interleave_moe_layer_step=2, attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1,
                   no_rope_layer_interval=4, rms_norm_eps=1e-5, max_position_embeddings=1024,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64, "rope_theta": 500000.0})
    torch.manual_seed(fresh.seed())
    model = Llama4ForCausalLM(Llama4TextConfig(**hparams, attn_implementation="eager")).eval()
    cfg, _, ids, ref = _hf_checkpoint_parity(model, tmp_path, 40, lambda n: 0.3 if "norm" in n else 0.05)
    gguf_cfg, params = load_weights(_write_llama4_gguf(tmp_path, {**hparams, "original_max_position_embeddings": 64}))
    same = ("architecture", "attention_chunk", "chunked_layers", "rope_layers", "qk_norm_unweighted", "nope_temperature",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "moe_layers",
            "norm_topk_prob", "shared_expert_intermediate_size", "shared_expert_gate", "router_scoring",
            "router_scales_input", "sliding_window")
    assert {k: getattr(gguf_cfg, k) for k in same} == {k: getattr(cfg, k) for k in same}
    assert gguf_cfg.rope_freq_factors and gguf_cfg.chunked_layers == (True, True, True, False)
    got = np.asarray(llama.forward_dense(jax.device_put(params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    meta, _ = read_gguf(str(tmp_path / "llama4.gguf"), tensors=False)
    names = {f"blk.{i}.{n}.weight" for i in range(4) for n in ("ffn_gate_shexp", "attn_q")}
    for change, want in (({"llama4.expert_count": 128}, dict(qk_norm_unweighted=False)),
                         ({"llama4.attention.sliding_window": 0}, dict(attention_chunk=0, chunked_layers=(),
                                                                       rope_layers=(), nope_temperature=()))):
        other = LlamaConfig.from_gguf_metadata({**meta, **change}, names, "x.gguf")
        assert {k: getattr(other, k) for k in want} == want
