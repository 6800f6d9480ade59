"""A request's prompt tokens as its replica will compute them, for the router to hash (`body_route`), and what it must
learn of the replicas to do so (`PromptFormat`, served by each replica at GET /v1/prompt_format).

A prefix is found in a replica's cache only when the router cuts and hashes exactly the tokens the replica prompts
with. So a chat request goes through the same chat template call as the server's (engine.openai_protocol's
`chat_template_call`: its tools, `chat_template_kwargs`, `reasoning_effort`, text parts joined, how the prompt ends),
Responses and Anthropic Messages bodies through the chat request they become on the replica, and a cross-encoder's pair
through the replica's pair format (its `model.score_template`); a chat with images up to its first image (the
replica widens each into positions only its vision preprocessing knows, and keys them by the pixels), and from there
on with each image as IMAGE_WEIGHT copies of a token drawn from its source (its URL or data URL): hashes no replica
holds, which the router keeps as affinity runs for the replica it sent the chat to (`RouteRequest.exact_pages`), so
another question about the same picture goes there too. The replica's page size, chat template (its
`model.chat_template` where set), score template, whether it cross-encodes pairs, whether it has a reasoning parser
(Anthropic's `thinking` then sets the template's enable_thinking) and its image placeholder come from its
/v1/prompt_format; a probe text's token
ids there tell whether the router's tokenizer is the replicas'. This module imports no JAX.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import ml_dtypes

from engine import multimodal
from engine.block_hash import cache_namespace, page_hashes
from engine.router.policy import RouteRequest

# Tokenized by the router and by each replica: different ids mean a different tokenizer, whose hashes never match.
PROBE_TEXT = "Prefix caching, 12345 tokens: émigré café, 漢字かな, Ελληνικά, emoji 🙂\n\tdone."
# The tokens an image stands for in the router's hashes past a chat's first image: about what a picture costs a
# replica to prefill (LLaVA-1.5: 576 positions; Gemma 3: 256), so a replica holding it weighs as one holding that text.
IMAGE_WEIGHT = 256


def image_token(source: Any) -> int:
    """The token (negative: no tokenizer's id) that stands for an image given by `source` (a URL, a data URL, a path):
    the same source, the same token."""
    digest = hashlib.blake2b(str(source).encode(), digest_size=8).digest()
    return -1 - (int.from_bytes(digest, "little") >> 2)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """What a replica does to a request's text before it hashes its pages."""
    page_size: int
    chat_template: str | None = None  # the one it renders chats with (its model's, or model.chat_template)
    score_template: str | None = None  # model.score_template
    cross_encoder: bool = False  # a pair is one prompt (a classifier of one label); else each text is embedded
    reasoning: bool = False  # server.reasoning_parser is set
    probe: tuple[int, ...] = ()  # its tokenizer's ids of PROBE_TEXT
    image_placeholder: int | None = None  # the token an image part renders as (a model that takes images)
    # A replica that takes prompt embeddings (model.enable_prompt_embeds): (its model's dtype, its vocabulary size),
    # what it keys a prompt's rows by (engine.prompt_embeds.row_ids)
    embeds: tuple[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "probe": list(self.probe),
                "embeds": list(self.embeds) if self.embeds is not None else None}

    @classmethod
    def from_json(cls, data: Any) -> PromptFormat:
        """ValueError naming what is wrong with a replica's answer."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        checks = {"page_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  "chat_template": lambda v: v is None or isinstance(v, str),
                  "score_template": lambda v: v is None or isinstance(v, str),
                  "cross_encoder": lambda v: isinstance(v, bool), "reasoning": lambda v: isinstance(v, bool),
                  "probe": lambda v: isinstance(v, list) and all(isinstance(t, int) for t in v),
                  "image_placeholder": lambda v: v is None or isinstance(v, int) and not isinstance(v, bool),
                  "embeds": lambda v: v is None or (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                                    and isinstance(v[1], int) and not isinstance(v[1], bool))}
        for key, ok in checks.items():
            if key in data and not ok(data[key]):
                raise ValueError(f"{key}: unexpected value {data[key]!r}")
        if "page_size" not in data:
            raise ValueError("page_size is missing")
        return cls(**{k: tuple(v) if k in ("probe", "embeds") and v is not None else v for k, v in data.items()
                      if k in checks})

    def differences(self, other: PromptFormat) -> list[str]:
        """The fields in which `other` prompts differently."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


class RequestTokens:
    """Request bodies -> the prompt token ids a replica of `fmt` computes (None: the tokenizer's own chat template,
    pairs embedded one text at a time, no reasoning parser)."""

    def __init__(self, tokenizer: Any, fmt: PromptFormat | None = None):
        self.format = fmt
        if fmt is not None and fmt.chat_template and fmt.chat_template != getattr(tokenizer, "chat_template", None) \
                and hasattr(tokenizer, "with_chat_template"):
            tokenizer = tokenizer.with_chat_template(fmt.chat_template)
        self.tokenizer = tokenizer
        self.pair_format = None
        if fmt is not None and fmt.cross_encoder:
            from engine.scoring import PairFormat

            self.pair_format = PairFormat(tokenizer, fmt.score_template)

    def __call__(self, body: dict, kind: str) -> list[int]:
        """The prompt ids the replica computes, as far as the router can know them (a chat with images: up to its first
        image). Raises on a body the replica would refuse (the router then routes it with no prefix)."""
        ids, exact = self.route_tokens(body, kind)
        return ids[:exact]

    def route_tokens(self, body: dict, kind: str) -> tuple[list[int], int]:
        """(the ids the router hashes, how many of them are the replica's own). A chat with images: the replica renders
        each as its placeholder, then widens that into the image's own positions, which only its vision preprocessing
        knows, so its ids are known up to its first image; past it, each image is IMAGE_WEIGHT `image_token`s of its
        source. Raises as __call__."""
        if kind in ("chat", "responses", "anthropic"):
            from engine.openai_protocol import chat_template_call

            messages, kwargs = chat_template_call(self._chat_request(body, kind))
            placeholder = None if self.format is None else self.format.image_placeholder
            if placeholder is None or not multimodal.has_images(messages):
                ids = list(self.tokenizer.encode_chat(messages, **kwargs))
                return ids, len(ids)
            messages, sources = multimodal.split_images(messages, multimodal.template_wants_parts(
                self.tokenizer.chat_template), self.tokenizer.decode([placeholder], skip_special_tokens=False))
            ids = list(self.tokenizer.encode_chat(messages, **kwargs))
            if placeholder not in ids:
                return ids, len(ids)
            exact, images, routed = ids.index(placeholder), iter(sources), []
            for token in ids:
                routed.extend([image_token(next(images, None))] * IMAGE_WEIGHT if token == placeholder else [token])
            return routed, exact
        ids = self._text_tokens(body, kind)
        return ids, len(ids)

    def _text_tokens(self, body: dict, kind: str) -> list[int]:
        if "prompt_embeds" in body and self.format is not None and self.format.embeds is not None:
            return self._embeds_tokens(body["prompt_embeds"])
        first = next(body[k] for k in ("prompt", "input", "text_1", "query") if k in body)
        if isinstance(first, list) and first and isinstance(first[0], (list, str)):
            first = first[0]  # a batch of prompts: routed by the first
        if kind == "pair" and self.pair_format is not None:
            second = next(body[k] for k in ("text_2", "documents") if k in body)
            second = second[0] if isinstance(second, list) else second
            return self.pair_format.prompt(first, second)  # the query's pair with the first document
        return self.tokenizer.encode(first) if isinstance(first, str) else [int(t) for t in first]

    def _embeds_tokens(self, payloads: str | list[str]) -> list[int]:
        """The ids a replica keys a completion's (first) prompt given as embeddings by: its rows decoded, cast to the
        replica's dtype and hashed as the replica does (engine.prompt_embeds)."""
        from engine import prompt_embeds

        dtype, vocab_size = self.format.embeds
        rows = prompt_embeds.decode(payloads if isinstance(payloads, str) else payloads[0])
        return prompt_embeds.row_ids(rows.astype(getattr(ml_dtypes, dtype, dtype)), vocab_size)[0]

    def _chat_request(self, body: dict, kind: str):
        """The ChatCompletionRequest a chat, Responses or Anthropic Messages body runs as on the replica (a Responses
        body without its stored history: one that continues a stored response goes where that is, not by prefix)."""
        from engine.openai_protocol import ChatCompletionRequest

        if kind == "chat":
            return ChatCompletionRequest.model_validate(body)
        if kind == "responses":
            from engine.openai_protocol import ResponsesRequest
            from engine.openai_responses import chat_body, input_messages

            request = ResponsesRequest.model_validate(body)
            return chat_body(request, input_messages(request.input))
        from engine.anthropic_messages import CountTokensRequest, chat_request

        return chat_request(CountTokensRequest.model_validate(body), self.format is not None and self.format.reasoning)


def path_kind(path: str) -> str:
    """How the body of a request to `path` becomes its prompt: "anthropic", "chat", "responses", "pair" or "text"."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith(("/score", "/rerank")):
        return "pair"
    return "text"


def body_route(body: dict, kind: str, tokens: RequestTokens, page_size: int, adapters=()) -> RouteRequest:
    """A request body's block hashes: its prompt tokens (`tokens`), full pages hashed in the request's cache namespace
    (its cache_salt, within the adapter its `model` names). A body the replica will refuse routes with no prefix (the
    replica answers it with the proper 4xx)."""
    try:
        ids, exact = tokens.route_tokens(body, kind)
        salt, model = body.get("cache_salt"), body.get("model")
        adapter = model if isinstance(model, str) and model in adapters else None
        hashes = page_hashes(ids, page_size, cache_namespace(salt if isinstance(salt, str) else None, adapter))
    except Exception:
        return RouteRequest((), 0)
    return RouteRequest(tuple(hashes), len(ids), None if exact == len(ids) else exact // page_size)
