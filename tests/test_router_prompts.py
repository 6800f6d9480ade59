"""The router hashes a request's prompt as its replica computes it (engine/router/prompts.py), learning how the
replica prompts from GET /v1/prompt_format: chats with tools, text parts, template variables, `reasoning_effort` and a
chat template the replica sets (model.chat_template); Responses and Anthropic Messages bodies; a reranker's pairs
through its score template. Checked against the replica itself: after it has served a request, every page hash the
router computes for that request is in the replica's cache (GET /v1/cache_state)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.block_hash import page_hashes
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.router.prompts import PROBE_TEXT, PromptFormat, RequestTokens, body_route, path_kind
from engine.server import create_app
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer
from tests.test_generate import SMOLLM2, tiny_checkpoint  # noqa: F401 (fixture)

import fresh

PAGE = 8
# Tools and the reasoning effort in a system turn of their own, first (as Qwen's and Hermes' templates put tools):
# a router that leaves them out hashes none of the replica's pages.
TEMPLATE = ("{%- if tools %}<|im_start|>system\nYou may call:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
            "{% if reasoning_effort %}\nReasoning: {{ reasoning_effort }}{% endif %}<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
SCORE_TEMPLATE = "<|im_start|>system\nJudge the document.<|im_end|>\nQuery: {{ query }}\nDocument: {{ document }}\nAnswer:"
BASE = {"warmup": False, "cache.page_size": PAGE, "cache.num_pages": 256, "model.max_model_len": 512,
        "server.model_name": "m"}


def _words(rng, n: int) -> str:
    return " ".join(rng.choice("river city north tower museum bread wine train bridge harbour".split(), n))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(tokenizer_source(SMOLLM2))  # the router's: SmolLM2's own chat template


def _replica(config):
    return TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config))


def _check_hashes_cached(client, tokenizer, path: str, body: dict) -> int:
    """Serves `body` at `path`, then checks every page hash the router computes for it (with the format the replica
    tells) is in the replica's cache; -> how many there were."""
    fmt = PromptFormat.from_json(client.get("/v1/prompt_format").json())
    routed = body_route(body, path_kind(path), RequestTokens(tokenizer, fmt), fmt.page_size)
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    cached = {h for hashes in client.get("/v1/cache_state").json()["block_hashes"].values() for h in hashes}
    assert routed.block_hashes and set(routed.block_hashes) <= cached, path
    return len(routed.block_hashes)


def test_the_router_hashes_chats_as_the_replica_renders_them(tiny_checkpoint, tokenizer):  # noqa: F811
    rng = fresh.rng()
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": _words(rng, 12),
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}} for i in range(2)]
    system = "You are a careful assistant. " + _words(rng, 30)
    config = EngineConfig().replace(**BASE, **{"model.path": tiny_checkpoint, "model.chat_template": TEMPLATE,
                                               "server.reasoning_parser": "qwen3"})
    with _replica(config) as client:
        fmt = PromptFormat.from_json(client.get("/v1/prompt_format").json())
        assert (fmt.page_size, fmt.chat_template, fmt.reasoning, fmt.cross_encoder) == (PAGE, TEMPLATE, True, False)
        assert list(fmt.probe) == tokenizer.encode(PROBE_TEXT)
        chat = {"model": "m", "max_tokens": 1, "tools": tools, "reasoning_effort": "low",
                "chat_template_kwargs": {"enable_thinking": False},
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": [{"type": "text", "text": _words(rng, 9)},
                                                          {"type": "text", "text": " " + _words(rng, 9)}]}]}
        _check_hashes_cached(client, tokenizer, "/v1/chat/completions", chat)
        # /tokenize renders tools and template variables as a chat request does.
        plain = {k: v for k, v in chat.items() if k != "reasoning_effort"}
        ids = client.post("/tokenize", json={k: plain[k] for k in ("model", "messages", "tools", "chat_template_kwargs")})
        assert ids.json()["tokens"] == RequestTokens(tokenizer, fmt)(plain, "chat")
        # A router rendering the messages alone (text parts joined) through its own template finds none of those
        # pages; through the replica's template without the tools, none either.
        joined = [{"role": "system", "content": system},
                  {"role": "user", "content": "".join(part["text"] for part in chat["messages"][1]["content"])}]
        served = {h for hs in client.get("/v1/cache_state").json()["block_hashes"].values() for h in hs}
        for naive in (tokenizer, tokenizer.with_chat_template(TEMPLATE)):
            hashes = page_hashes(naive.encode_chat(joined), PAGE)
            assert len(hashes) > 4 and not set(hashes) & served
        # The Responses API's instructions, input items and function tools; a prefilled reply continued.
        _check_hashes_cached(client, tokenizer, "/v1/responses", {
            "model": "m", "max_output_tokens": 1, "instructions": system, "store": False,
            "tools": [{"type": "function", **t["function"]} for t in tools],
            "input": [{"role": "user", "content": [{"type": "input_text", "text": _words(rng, 20)}]}]})
        _check_hashes_cached(client, tokenizer, "/v1/chat/completions", {
            "model": "m", "max_tokens": 1, "continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": _words(rng, 20)},
                         {"role": "assistant", "content": "Sure: " + _words(rng, 12)}]})
        # Anthropic's system blocks, client tools, and thinking (enable_thinking, as the replica has a reasoning parser)
        _check_hashes_cached(client, tokenizer, "/v1/messages", {
            "model": "m", "max_tokens": 1, "system": [{"type": "text", "text": system}],
            "thinking": {"type": "disabled"},
            "tools": [{"name": t["function"]["name"], "description": t["function"]["description"],
                       "input_schema": t["function"]["parameters"]} for t in tools],
            "messages": [{"role": "user", "content": [{"type": "text", "text": _words(rng, 15)}]}]})
        assert _check_hashes_cached(client, tokenizer, "/v1/completions", {
            "model": "m", "max_tokens": 1, "prompt": system, "cache_salt": "tenant"}) >= 4


def test_the_router_hashes_a_rerankers_pairs_through_its_score_template(tiny_checkpoint, tokenizer):  # noqa: F811
    rng = fresh.rng()
    config = EngineConfig().replace(**BASE, **{"model.path": tiny_checkpoint, "model.score_template": SCORE_TEMPLATE,
                                               "model.classifier_from_token": ["no", "yes"]})
    query = "what is " + _words(rng, 40)
    docs = [_words(rng, int(n)) for n in rng.integers(5, 30, 4)]
    with _replica(config) as client:
        fmt = PromptFormat.from_json(client.get("/v1/prompt_format").json())
        assert fmt.cross_encoder and fmt.score_template == SCORE_TEMPLATE
        rerank = {"model": "m", "query": query, "documents": docs}
        assert _check_hashes_cached(client, tokenizer, "/v1/rerank", rerank) > 4
        _check_hashes_cached(client, tokenizer, "/v1/score", {"model": "m", "text_1": query, "text_2": docs[::-1]})
        # Without the score template the router would hash the bare query, which the replica never prompts with.
        bare = body_route(rerank, "pair", RequestTokens(tokenizer), PAGE)
        served = {h for hs in client.get("/v1/cache_state").json()["block_hashes"].values() for h in hs}
        assert len(bare.block_hashes) >= 4 and not set(bare.block_hashes) & served


def test_prompt_format_answers_are_checked():
    good = PromptFormat(16, "{{ x }}", None, True, False, (1, 2)).as_json()
    assert PromptFormat.from_json(good) == PromptFormat(16, "{{ x }}", None, True, False, (1, 2))
    for bad, error in (({**good, "page_size": 0}, "page_size"), ({**good, "probe": ["a"]}, "probe"),
                       ({"chat_template": None}, "page_size is missing"), ([], "expected an object")):
        with pytest.raises(ValueError, match=error):
            PromptFormat.from_json(bad)
    assert PromptFormat(16).differences(PromptFormat(32, "{{ x }}")) == ["page_size", "chat_template"]
    embeds = PromptFormat(16, embeds=("bfloat16", 1000))
    assert PromptFormat.from_json(json.loads(json.dumps(embeds.as_json()))) == embeds
    with pytest.raises(ValueError, match="embeds"):
        PromptFormat.from_json({**embeds.as_json(), "embeds": ["bfloat16"]})


def test_the_router_hashes_prompt_embeddings_as_the_replica_keys_them(tiny_checkpoint, tokenizer):  # noqa: F811
    """A completion's prompt given as embeddings: the router decodes its rows and keys them as the replica does (cast
    to the replica's dtype, bfloat16 here, and chained), so its pages are the replica's own."""
    import base64
    import io

    import numpy as np

    config = EngineConfig().replace(**BASE, **{"model.path": tiny_checkpoint, "model.enable_prompt_embeds": True,
                                               "model.dtype": "bfloat16"})
    engine = LLMEngine(config, progress=False)
    rng = fresh.rng()
    rows = engine.token_embeddings(tokenizer.encode(_words(rng, 30))).astype(np.float32)
    rows += rng.standard_normal(rows.shape).astype(np.float32) * 0.01
    npy = io.BytesIO()
    np.save(npy, rows)
    body = {"model": "m", "prompt_embeds": [base64.b64encode(npy.getvalue()).decode()], "max_tokens": 2}
    with TestClient(create_app(AsyncEngine(engine), config)) as client:
        assert client.get("/v1/prompt_format").json()["embeds"] == ["bfloat16", engine.model_cfg.vocab_size]
        assert _check_hashes_cached(client, tokenizer, "/v1/completions", body) == len(rows) // PAGE


def test_the_example_tool_template_lists_the_tools_after_the_system_prompt(tokenizer):
    """examples/chatml_tools.jinja (scripts/route_bench.py --chat-template): ChatML with the tools in the system
    turn, after the system prompt, and tool calls and results in the conversation."""
    from engine.router.loadgen import group_tools
    from models.chat_template import read_chat_template

    tools = group_tools(3, 2)
    chat = tokenizer.with_chat_template(read_chat_template("examples/chatml_tools.jinja"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is order 7?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": tools[0]["function"]["name"], "arguments": {"id": "7"}}}]},
                {"role": "tool", "content": "shipped"}]
    text = chat.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions.")
    assert all(json.dumps(t) in text for t in tools) and text.endswith("<|im_start|>assistant\n")
    assert f'{{"name": "{tools[0]["function"]["name"]}", "arguments": {{"id": "7"}}}}' in text
    assert "<tool_response>\nshipped\n</tool_response>" in text
    assert chat.apply_chat_template(messages[:2], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is order 7?<|im_end|>\n")
