"""SmolLM3: a Llama with no positional embedding on every fourth layer (NoPE), as HF checkpoints and GGUFs in
llama.cpp's layout have it; against transformers."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import LlamaConfig
from models.loader import load_weights
from test_gguf_rope import _llama_cpp_tensors, _write_llama_gguf
from test_models import _engine_greedy_is_transformers, _hf_checkpoint_parity
import fresh


def _hf_smollm3(**overrides):
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(fresh.seed())
    cfg = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return SmolLM3ForCausalLM(SmolLM3Config(**{**cfg, **overrides})).eval()


def test_config_reads_the_nope_layers():
    base = {"model_type": "smollm3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert LlamaConfig.from_hf_config(base).rope_layers == (True, True, True, False) * 2  # every 4th: transformers'
    assert LlamaConfig.from_hf_config({**base, "no_rope_layers": [1, 0] * 4}).rope_layers == (True, False) * 4


@pytest.mark.slow
def test_checkpoint_and_gguf_match_transformers_and_serve(tmp_path):
    """A tiny random checkpoint: logits within 1e-4 of transformers' (NoPE layers, tied embeddings); the NoPE layers
    matter (RoPE on them moves the logits); a GGUF in llama.cpp's layout (Q/K permuted, no NoPE metadata) gives the
    same config and logits; through the engine (paged KV, prefix hits), transformers' argmax at every step."""
    model = _hf_smollm3()
    cfg, params, ids, _ = _hf_checkpoint_parity(model, tmp_path, 70, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.architecture == "smollm3" and cfg.rope_layers == (True, True, True, False) and cfg.tie_word_embeddings
    every_layer = llama.forward_dense(params, dataclasses.replace(cfg, rope_layers=()), jnp.asarray(ids, jnp.int32))
    assert float(jnp.abs(every_layer - llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32))).max()) > 1e-3

    from safetensors.numpy import load_file

    _write_llama_gguf(tmp_path / "m.gguf", cfg, _llama_cpp_tensors(load_file(str(tmp_path / "model.safetensors")), cfg),
                      arch="smollm3")
    gguf_cfg, gguf_params = load_weights(str(tmp_path / "m.gguf"))
    assert (gguf_cfg.architecture, gguf_cfg.rope_layers, gguf_cfg.tie_word_embeddings) == ("smollm3", cfg.rope_layers, True)
    got = llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(llama.forward_dense(params, cfg, jnp.asarray(ids, jnp.int32))),
                               atol=1e-5, rtol=1e-5)

    _engine_greedy_is_transformers(model, cfg, params, system_len=30)
