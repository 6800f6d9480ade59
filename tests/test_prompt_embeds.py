"""Prompts given as embeddings (engine/prompt_embeds.py): the tokens their ids would give, cached by their rows, over
the Python API and /v1/completions; bad input refused by name while the engine serves on."""
from __future__ import annotations

import base64
import io
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import fresh
from engine import prompt_embeds
from engine.config import EngineConfig, load_config
from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from models import llama
from models.config import LlamaConfig
from test_engine import SMALL, tokenizer  # noqa: F401

VOCAB = 1000


def _rows(rng: np.random.Generator, n: int, width: int = 8) -> np.ndarray:
    return rng.standard_normal((n, width)).astype(np.float32)


def test_ids_chain_the_rows_so_prompts_share_exactly_their_common_rows():
    rng = fresh.rng()
    a = _rows(rng, 40)
    b = np.concatenate([a[:17], _rows(rng, 30)])
    ids_a, digest_a = prompt_embeds.row_ids(a, VOCAB)
    ids_b, digest_b = prompt_embeds.row_ids(b, VOCAB)
    assert ids_a[:17] == ids_b[:17] and all(x != y for x, y in zip(ids_a[17:], ids_b[17:]))
    assert digest_a != digest_b and prompt_embeds.row_ids(a.copy(), VOCAB) == (ids_a, digest_a)
    assert all(VOCAB <= t < VOCAB + 2**30 for t in ids_a + ids_b)
    # a row moved is another prompt from there on, though the same rows come after
    assert prompt_embeds.row_ids(a[::-1], VOCAB)[0][:1] != ids_a[:1]
    # rows are cast to the model's dtype first: float32 copies of bfloat16 values are the same prompt
    half = a.astype(ml_dtypes.bfloat16)
    same = prompt_embeds.rows_of(half.astype(np.float32), 8, ml_dtypes.bfloat16)
    assert prompt_embeds.span_of(same, VOCAB)[0] == prompt_embeds.span_of(half, VOCAB)[0]


def test_rows_and_payloads_are_checked_by_name():
    rng = fresh.rng()
    rows = _rows(rng, 5)
    for bad, words in [(rows[:, :7], "[num_tokens, 8]"), (rows[0], "got shape [8]"), (rows[:0], "empty"),
                       (np.where(np.arange(5)[:, None] == 3, np.inf, rows), "row 3 is not finite"),
                       (np.ones((2, 8), np.int32), "must hold floats"), ([[1.0] * 8, [1.0]], "not an array")]:
        with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
            prompt_embeds.rows_of(bad, 8, np.float32)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    npy = io.BytesIO()
    np.save(npy, rows)
    assert np.array_equal(prompt_embeds.decode(b64(npy.getvalue())), rows)
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        got = prompt_embeds.decode(b64(save_safetensors({"embeds": rows.astype(dtype)})))
        assert got.dtype == dtype and np.array_equal(got, rows.astype(dtype))
    torch_like = io.BytesIO()
    with zipfile.ZipFile(torch_like, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for payload, words in [("not base64!", "not valid base64"), (b64(torch_like.getvalue()), "torch.save payload"),
                           (b64(pickled.getvalue()), "not a readable .npy"), (b64(b"plain bytes"), "neither a .npy"),
                           (b64(save_safetensors({"a": rows, "b": rows})), "holds 2 tensors")]:
        with pytest.raises(RequestError, match=words):
            prompt_embeds.decode(payload)


@pytest.fixture(scope="module")
def scaled_model(tokenizer):  # noqa: F811
    """A random Llama over SmolLM2's vocabulary whose embeddings are scaled (as Gemma's): a prompt's rows are the
    table's times the scale."""
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024, embed_scale=2.0)
    return cfg, llama.init_params(cfg, jax.random.key(fresh.seed(key=f"{__name__}.scaled_model")), scale=0.5), tokenizer


OPTIONS = {**SMALL, "cache.num_pages": 64, "model.enable_prompt_embeds": True}


@pytest.fixture(scope="module")
def llm(scaled_model):
    return LLM(EngineConfig().replace(**OPTIONS), progress=False, model=scaled_model)


def _texts(tokenizer, rng: np.random.Generator, num_words: list[int]) -> list[list[int]]:  # noqa: F811
    words = ["the", "river", "ran", "past", "a", "tall", "tower", "in", "spring", "and", "people", "came", "to", "see"]
    return [tokenizer.encode(" ".join(rng.choice(words, n))) for n in num_words]


def test_embeddings_of_a_prompts_tokens_give_its_outputs_cached_chunked_batched(llm, scaled_model,
                                                                              tokenizer):  # noqa: F811
    cfg, params, _ = scaled_model
    rng = fresh.rng()
    prompts = _texts(tokenizer, rng, [int(rng.integers(140, 200))] + [int(x) for x in rng.integers(3, 100, 5)])
    table = np.asarray(params["embed"])
    rows = [llm.token_embeddings(p) for p in prompts]
    for p, r in zip(prompts, rows):
        assert np.array_equal(r, table[np.asarray(p)] * np.float32(cfg.embed_scale))
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    want = llm.generate(prompts, greedy)
    # (rows and ids in one batch; prompts past max_batch_tokens (128) are prefilled in chunks)
    got = llm.generate([{"prompt_embeds": r} for r in rows] + prompts[:2], greedy)
    assert max(map(len, prompts)) > SMALL["scheduler.max_batch_tokens"]
    for w, g in zip(want + want[:2], got):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-5, atol=1e-5)
    assert got[0].text == want[0].text and got[0].prompt_tokens == len(prompts[0])
    # the same rows again come from the prefix cache (whole pages); rows agreeing in a prefix share its pages
    page = SMALL["cache.page_size"]
    [again] = llm.generate({"prompt_embeds": rows[1]}, greedy)
    assert again.token_ids == want[1].token_ids and again.cached_tokens >= (len(prompts[1]) - 1) // page * page
    longer = np.concatenate([rows[2], llm.token_embeddings(tokenizer.encode(" and then", add_special_tokens=False))])
    [extended] = llm.generate({"prompt_embeds": longer}, greedy)
    assert extended.cached_tokens == len(rows[2]) // page * page
    [by_ids] = llm.generate([prompts[2] + tokenizer.encode(" and then", add_special_tokens=False)], greedy)
    assert extended.token_ids == by_ids.token_ids
    # seeded sampling draws the same tokens as from the ids (no penalty reads the prompt: ids past the vocabulary)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=int(rng.integers(1 << 30)))
    assert [c.token_ids for c in llm.generate([{"prompt_embeds": rows[3]}], sampled)] == \
        [c.token_ids for c in llm.generate([prompts[3]], sampled)]
    # truncate_prompt_tokens keeps the last rows, as it keeps the last ids
    cut = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=20)
    assert llm.generate({"prompt_embeds": rows[4]}, cut)[0].token_ids == llm.generate([prompts[4]], cut)[0].token_ids


def test_bad_prompt_embeddings_are_refused_and_the_engine_serves_on(llm, scaled_model, tokenizer):  # noqa: F811
    rows = llm.token_embeddings("a short prompt")
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine = llm.engine
    for prompt, params, words in [
            ({"prompt_embeds": rows[:, :32]}, greedy, "must be"),
            ({"prompt_embeds": rows, "prompt": "x"}, greedy, "holds one of prompt, prompt_token_ids, prompt_embeds"),
            ({"prompt_embeds": rows, "multi_modal_data": {"image": "x.png"}}, greedy, r"no images \(multi_modal"),
            ({"prompt": "x", "multi_modal_data": {"image": "x.png"}}, greedy, "this model takes no images"),
            ({"prompt": "x", "multi_modal_data": {"video": "x.mp4"}}, greedy, "holds images only"),
            ({"prompt_tokens": [1, 2]}, greedy, "holds one of"),
            ({"prompt_embeds": np.full_like(rows, np.nan)}, greedy, "not finite"),
            ({"prompt_embeds": np.zeros((300, 64), np.float32)}, greedy, "the context allows at most"),
            ({"prompt_embeds": rows}, SamplingParams(max_tokens=4, prompt_logprobs=1), "prompt_logprobs")]:
        with pytest.raises(RequestError, match=words):
            engine.add_request(prompt, params)
    with pytest.raises(RequestError, match="takes no images"):
        engine.add_request({"prompt_embeds": rows}, greedy, images=["x.png"])
    [ok] = llm.generate({"prompt_embeds": rows}, greedy)
    want = llm.generate(["a short prompt"], greedy)[0].token_ids
    assert ok.token_ids == want
    # vLLM's other prompt dicts: TextPrompt, TokensPrompt
    assert [c.token_ids for c in llm.generate([{"prompt": "a short prompt"},
                                               {"prompt_token_ids": tokenizer.encode("a short prompt")}], greedy)] == \
        [want, want]
    plain = LLM(EngineConfig().replace(**{**OPTIONS, "model.enable_prompt_embeds": False}), progress=False,
                model=scaled_model)
    with pytest.raises(RequestError, match="set model.enable_prompt_embeds: true"):
        plain.generate({"prompt_embeds": rows}, greedy)


def test_completions_take_prompt_embeddings_as_safetensors_or_npy(scaled_model):
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    config = load_config(None, [f"{k}={v}" for k, v in {**OPTIONS, "server.model_name": "tiny"}.items()])
    engine = LLMEngine(config, progress=False, model=scaled_model)
    prompt = "the river ran past a tall tower in spring"
    rows = engine.token_embeddings(prompt)
    npy = io.BytesIO()
    np.save(npy, rows)
    as_npy = base64.b64encode(npy.getvalue()).decode()
    as_bf16 = base64.b64encode(save_safetensors({"e": rows.astype(ml_dtypes.bfloat16)})).decode()
    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(AsyncEngine(engine), config)) as client:
        want = client.post("/v1/completions", json={**greedy, "prompt": prompt}).json()["choices"][0]["text"]
        r = client.post("/v1/completions", json={**greedy, "prompt_embeds": [as_npy, as_npy]})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [want, want]
        assert r.json()["usage"]["prompt_tokens"] == 2 * len(rows)
        half = client.post("/v1/completions", json={**greedy, "prompt_embeds": as_bf16, "n": 2, "temperature": 1,
                                                    "seed": 7})
        assert half.status_code == 200 and len(half.json()["choices"]) == 2, half.text
        with client.stream("POST", "/v1/completions", json={**greedy, "prompt_embeds": as_npy, "stream": True}) as s:
            assert s.status_code == 200 and "data: [DONE]" in "".join(s.iter_text())
        for body, param, words in [
                ({"prompt": prompt, "prompt_embeds": as_npy}, "prompt", "prompt or prompt_embeds, not both"),
                ({}, "prompt", "required field is missing (or prompt_embeds"),
                ({"prompt_embeds": as_npy, "echo": True}, "echo", "echo is not available"),
                ({"prompt_embeds": base64.b64encode(b"PK\x03\x04rest").decode()}, "prompt_embeds", "torch.save"),
                ({"prompt_embeds": as_npy, "max_tokens": 250}, "max_tokens", "exceeds the context")]:
            r = client.post("/v1/completions", json={**greedy, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert words in r.json()["error"]["message"]
        wide = io.BytesIO()
        np.save(wide, np.zeros((3, 65), np.float32))
        r = client.post("/v1/completions", json={**greedy, "prompt_embeds": base64.b64encode(wide.getvalue()).decode()})
        assert r.status_code == 400 and "[num_tokens, 64]" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={**greedy, "prompt": prompt}).json()["choices"][0]["text"] == want
