"""OpenAI-compatible HTTP API of one replica (FastAPI), over an `AsyncEngine`.

    POST /v1/completions, /v1/chat/completions   streamed (SSE) or not
    POST /v1/embeddings                          last-token pooling of the served model
    POST /v1/score, /v1/rerank                   a cross-encoder's pair scores, or the cosine similarity of those
                                                 embeddings (vLLM's; Jina's and Cohere's)
    POST /classify                               a sequence classifier's (reward model's) classes (vLLM's)
    POST /v1/responses, GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items
                                                 OpenAI's Responses API, on the chat path (engine/openai_responses.py)
    POST /v1/messages, /v1/messages/count_tokens Anthropic's Messages API, on the chat path (engine/anthropic_messages.py)
    GET  /v1/models, /health, /metrics, /load
    GET  /v1/cache_events?after=N, /v1/cache_state   the router's feed (engine/cache_feed.py)
    GET  /v1/prompt_format                       page size, chat and score templates: what the router hashes with
    POST /update_weights_from_disk, /v1/load_lora_adapter, /v1/unload_lora_adapter, /sleep, /wake_up
                                                 admin, with server.allow_weight_updates; GET /is_sleeping

Every error is an OpenAI error body (Anthropic's on /v1/messages) `{"error": {"message", "type", "param", "code"}}`; a request the
engine refuses is a 400 naming the problem, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import logging
import time
import uuid
from typing import AsyncIterator

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncEngine, EngineOverloaded, EngineStopped, GenerateRequest
from engine.config import EngineConfig
from engine.engine import EngineAsleep, RequestOutput
from engine.http_guard import RequestGuard
from engine.images import MediaPolicy
from engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from engine.openai_format import ChoiceFormatter, usage
from engine.openai_protocol import (
    MAX_N, ApiError, ChatCompletionRequest, ClassifyRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
    RerankRequest, ScoreRequest, TokenizeRequest, LoadAdapterRequest, UnloadAdapterRequest, UpdateWeightsRequest,
    chat_template_call, describe_validation_error, error_body,
)
from engine import anthropic_messages, multimodal, openai_responses
from engine.disaggregation import CACHED_ONLY, HEADER as PREFILL_ONLY_HEADER, PrefillDone, PrefillOnlyMarker, \
    cached_only, kv_offers, offer_cached, prefill_for_decode, prefill_only, receive_from_prefill
from engine import prompt_embeds, scoring, structured
from engine.reasoning import keeps_special_tokens
from engine.router.prompts import PROBE_TEXT, PromptFormat
from engine.tool_calls import ToolChoice
from engine.request import RequestError, SamplingParams, truncate_prompt, validate_prompt, with_defaults

log = logging.getLogger(__name__)

MAX_SAMPLES_PER_CALL = 4 * MAX_N  # prompts x n in one completions call
ABORTED = "request aborted: the server is shutting down, or replacing its weights (abort_all_requests)"
DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks that its client is still there


def create_app(engine: AsyncEngine, config: EngineConfig, api_key: str | None = None) -> FastAPI:
    """The ASGI app; starts the engine thread on start-up and stops it on shutdown."""
    server_cfg = config.server
    model_name = config.served_model_name
    llm = engine.engine
    tokenizer = llm.tokenizer
    max_model_len = llm.max_model_len
    sampling_defaults = getattr(llm, "sampling_defaults", {})  # the checkpoint's recommended sampling
    max_prompt_len = min(server_cfg.max_prompt_tokens or max_model_len - 1, max_model_len - 1)
    metrics = ServerMetrics(engine.stats)
    # What a chat's image parts may name: data: and http(s) URLs, files only under server.allowed_local_media_path
    media = MediaPolicy(local_root=server_cfg.allowed_local_media_path)
    engine.on_finished = metrics.on_finished
    created = int(time.time())

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="RadixLM", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of one RadixLM replica")
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(PrefillOnlyMarker)  # a prefill for a decode replica (engine/disaggregation.py)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=server_cfg.max_body_bytes, metrics=metrics)

    # -------------------------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(PrefillDone)
    async def _prefill_done(request: Request, e: PrefillDone):
        return JSONResponse(e.body)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        message, param = describe_validation_error(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    # -------------------------------------------------------------------------- generation
    def adapters() -> list[str]:  # LoRA adapters, served as models of their own names (vLLM's convention)
        return llm.adapter_names

    def check_model(model: str) -> None:
        if model != model_name and model not in adapters():
            served = ", ".join(repr(m) for m in [model_name, *adapters()])
            raise ApiError(404, f"model {model!r} does not exist; this server serves {served}",
                           "invalid_request_error", "model", "model_not_found")

    def check_prompt(prompt_ids: list[int], max_tokens: int, param: str, images: bool = False) -> None:
        if len(prompt_ids) > max_prompt_len:
            raise ApiError(400, f"prompt has {len(prompt_ids)} tokens; this server allows at most {max_prompt_len} "
                                f"(context: {max_model_len} tokens)", param=param, code="context_length_exceeded")
        try:
            validate_prompt(prompt_ids, llm.model_cfg.vocab_size, max_model_len, max_tokens, images)
        except RequestError as e:
            msg = str(e)
            raise ApiError(400, msg, param="max_tokens" if msg.startswith("prompt (") else param,
                           code="context_length_exceeded" if "context" in msg else None) from None

    def sampling_params(body, max_tokens: int, logprobs: int | None, i: int, tools: ToolChoice | None = None,
                        keep_special: bool = False) -> SamplingParams:
        """keep_special: special tokens stay in the text whatever the request says (the reasoning parser reads them)."""
        seed = None if body.seed is None else body.seed + i
        fields = dict(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=0 if body.top_k == -1 else body.top_k, min_p=body.min_p, seed=seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            ignore_eos=body.ignore_eos, logprobs=logprobs,  # echo returns the prompt's logprobs too:
            prompt_logprobs=_prompt_top(logprobs if getattr(body, "echo", False) else None, body.prompt_logprobs),
            logit_bias=body.logit_bias, min_tokens=body.min_tokens, bad_words=tuple(body.bad_words or ()),
            allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
            include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens and not keep_special,
            return_hidden_states=body.return_hidden_states,
        )
        fields = with_defaults(fields, sampling_defaults)
        try:
            fields["structured"] = structured.from_fields(
                {k: getattr(body, k) for k in structured.FIELDS})
            if tools is not None:
                fields["structured"] = tools.constrain(fields["structured"], "response_format / guided_*")
            return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
        except RequestError as e:
            raise ApiError(400, str(e), param=str(e).split()[0].rstrip(":")) from None

    async def submit(body, kind: str, prompts: list[list[int]], max_tokens: list[int], logprobs: int | None,
                     echo: list[str] | None = None, tools: ToolChoice | None = None, images: list[list] | None = None):
        """The call's requests to the engine -> (stream, formatter); a stream call's is entered, so that refusals
        become HTTP errors before the 200 goes out. echo (completions): each prompt's text, put before its choices'
        text (and its tokens' logprobs before theirs); with max_tokens 0 the choices carry the prompt only. images:
        each prompt's image spans (chat)."""
        n = body.n
        if body.stream and body.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs is not available with stream: true", param="prompt_logprobs")
        if len(prompts) * n > MAX_SAMPLES_PER_CALL:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_SAMPLES_PER_CALL} samples per call",
                           param="n")
        keep_special = kind == "chat" and keeps_special_tokens(config.server.reasoning_parser, tokenizer.special_texts,
                                                               tools is not None and tools.active)
        images = images or [[]] * len(prompts)
        reqs = [
            GenerateRequest(p, sampling_params(body, max(mt, 1), logprobs, j, tools, keep_special), body.cache_salt or None,
                            body.priority,
                            body.model if body.model in adapters() else None, tuple(im))
            for p, mt, im in zip(prompts, max_tokens, images) for j in range(n)
        ]
        if prefill_only():
            await prefill_for_decode_replica(reqs)
        if (offers := kv_offers()) is not None:  # a prefill replica computed the prompts: their pages, pulled
            reqs = await receive_from_prefill(engine, reqs, offers, config.cache.disk_read_timeout_s)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        call_id = f"{prefix}-{uuid.uuid4().hex}"
        as_ids = (lambda t: f"token_id:{t}") if body.return_tokens_as_token_ids else token_text
        fmt = ChoiceFormatter(kind, as_ids, call_id, body.model, int(time.time()), logprobs is not None,
                              echo=None if echo is None else [(text, ids) for text, ids in zip(echo, prompts)], n=n,
                              prompt_only=max_tokens[0] == 0, tools=tools, reasoning=config.server.reasoning_parser,
                              prompt_ids=prompts if body.return_token_ids else None,
                              prompt_logprobs=None if body.prompt_logprobs is None else (prompts, body.prompt_logprobs))
        stream = engine.submit(reqs, call_id, final_only=not body.stream)
        if body.stream:
            await enter(stream)
        return stream, fmt

    async def prefill_for_decode_replica(reqs: list[GenerateRequest]) -> None:
        """A call marked prefill-only (the router's, before it sends the call to a decode replica): its prompts are
        computed and their pages written to the shared disk tier, or offered for a pull (parallel.kv_transfer: jax);
        answered by PrefillDone, not a completion."""
        if cached_only():  # (the router's peer fetch: another replica pulls what this one holds)
            if llm.transfer is None:
                raise ApiError(400, f"an offer of cached pages ({PREFILL_ONLY_HEADER}: {CACHED_ONLY}) needs "
                                    "parallel.kv_transfer: jax on this replica", code="no_kv_transfer")
            raise PrefillDone(await offer_cached(engine, reqs))
        if llm.disk is None and llm.transfer is None:
            raise ApiError(400, f"a prefill for a decode replica ({PREFILL_ONLY_HEADER}) hands the prompt's KV over "
                                "through the disk tier or the network, and this replica has neither: set "
                                "cache.disk_path (the decode replicas' own) or parallel.kv_transfer: jax",
                           code="no_disk_tier")
        try:
            done = await prefill_for_decode(engine, reqs, config.cache.disk_read_timeout_s)
        except (RequestError, EngineStopped) as e:
            raise _engine_error(e) from None
        raise PrefillDone(done)

    async def enter(stream) -> None:
        """Waits for the engine to take a call's requests: its refusals become HTTP errors (before any 200 goes out)."""
        try:
            await stream.__aenter__()
        except (RequestError, EngineStopped) as e:
            raise _engine_error(e) from None

    async def run(request: Request, body, kind: str, prompts: list[list[int]], max_tokens: list[int],
                  logprobs: int | None, echo: list[str] | None = None, tools: ToolChoice | None = None,
                  images: list[list] | None = None):
        stream, fmt = await submit(body, kind, prompts, max_tokens, logprobs, echo, tools, images)
        n = body.n
        if not body.stream:
            return JSONResponse(await collect(request, stream, fmt, prompts, n))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats
        return StreamingResponse(sse(stream, fmt, prompts, n, include_usage, continuous), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(request: Request, stream, fmt: ChoiceFormatter, prompts, n: int) -> dict:
        finals = await gather(request, stream)
        if finals is None:
            return {}
        finals = {i: fmt.final(out) for i, out in finals.items()}
        choices = [fmt.choice(i, finals[i]) for i in sorted(finals)]
        return fmt.response(choices, usage(finals, prompts, n), finals)

    async def gather(request: Request, stream) -> dict[int, RequestOutput] | None:
        """The final output of each of the stream's requests, by index; None if the client left (they are aborted)."""
        finals: dict[int, RequestOutput] = {}
        try:
            async with stream:
                it, loop = stream.__aiter__(), asyncio.get_running_loop()
                checked_s = loop.time()
                while True:
                    try:
                        index, out = await asyncio.wait_for(it.__anext__(), timeout=DISCONNECT_POLL_S)
                        if out.finished:
                            finals[index] = out
                    except asyncio.TimeoutError:
                        pass
                    except StopAsyncIteration:
                        break
                    # NOTE: uvicorn does not cancel a handler whose client left; poll, and abort.
                    if loop.time() - checked_s >= DISCONNECT_POLL_S:
                        checked_s = loop.time()
                        if await request.is_disconnected():
                            return None  # leaving the block aborts the requests
        except (RequestError, EngineStopped) as e:
            raise _engine_error(e) from None
        if any(out.finish_reason == "abort" for out in finals.values()):
            raise ApiError(503, ABORTED, "server_error")
        return finals

    async def sse(stream, fmt: ChoiceFormatter, prompts, n: int, include_usage: bool,
                  continuous_usage: bool = False) -> AsyncIterator[str]:
        """The call's SSE stream; continuous_usage (vLLM's stream_options.continuous_usage_stats): every chunk's usage
        counts the tokens so far (prompt tokens once per prompt, generated ones over every choice)."""
        finals: dict[int, RequestOutput] = {}
        prompt_tokens, generated = sum(map(len, prompts)), collections.Counter()

        def so_far() -> dict | None:
            if not continuous_usage:
                return None
            total = sum(generated.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total}

        try:
            async with stream:
                if fmt.kind == "chat":
                    for i in range(len(stream.request_ids)):
                        yield _sse(fmt.chunk([fmt.role_delta(i)], include_usage, so_far(), first=i == 0))
                async for index, out in stream:
                    if out.finish_reason == "abort":
                        yield _sse(error_body(ABORTED, "server_error"))
                        break
                    generated[index] += len(out.delta_token_ids)
                    if out.finished:
                        finals[index] = fmt.final(out)
                        generated[index] = len(finals[index].token_ids)
                    delta = fmt.delta(index, out)
                    if delta is not None:
                        yield _sse(fmt.chunk([delta], include_usage, so_far()))
                else:
                    if include_usage:
                        yield _sse(fmt.chunk([], include_usage, usage(finals, prompts, n)))
        except EngineStopped as e:
            yield _sse(error_body(str(e), "server_error"))
        except RuntimeError as e:
            log.error("stream failed: %s", e)
            yield _sse(error_body(str(e), "server_error"))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions", response_model=None, summary="Text completion (OpenAI-compatible)")
    async def completions(request: Request, body: CompletionRequest):
        check_model(body.model)
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: the prompt and its logprobs)", param="max_tokens")
        if body.prompt is None and body.prompt_embeds is None:
            raise ApiError(400, "prompt: required field is missing (or prompt_embeds, the prompt as embeddings)",
                           param="prompt")
        if body.prompt is not None and body.prompt_embeds is not None:
            raise ApiError(400, "give prompt or prompt_embeds, not both", param="prompt")
        if body.prompt_embeds is not None:
            return await embeds_completions(request, body, max_tokens)
        p = body.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        # Tokenized in a worker thread (the tokenizer lets go of the GIL): a long prompt does not hold up the streams
        # this event loop is sending.
        given = await asyncio.to_thread(lambda: [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p])
        prompts = [truncate_prompt(ids, body.truncate_prompt_tokens, max_model_len, max(max_tokens, 1)) for ids in given]
        for ids in prompts:
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            check_prompt(ids, max(max_tokens, 1), "prompt")
        echo = [x if isinstance(x, str) and len(ids) == len(whole) else tokenizer.decode(ids, skip_special_tokens=False)
                for x, ids, whole in zip(p, prompts, given)] if body.echo else None
        return await run(request, body, "text", prompts, [max_tokens] * len(prompts), body.logprobs, echo)

    async def embeds_completions(request: Request, body: CompletionRequest, max_tokens: int):
        """Completions of prompts given as embeddings (engine/prompt_embeds.py): each decoded and hashed in a worker
        thread, its rows passed to the engine as its prompt's span."""
        if body.echo:
            raise ApiError(400, "echo is not available with prompt_embeds (the prompt has no text)", param="echo")
        if body.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs is not available with prompt_embeds (the prompt has no tokens)",
                           param="prompt_logprobs")
        payloads = [body.prompt_embeds] if isinstance(body.prompt_embeds, str) else body.prompt_embeds
        rules = SamplingParams(max_tokens=max_tokens, truncate_prompt_tokens=body.truncate_prompt_tokens)

        def prepare(payload: str):
            return llm.embeds_prompt({"prompt_embeds": prompt_embeds.decode(payload)}, rules)

        try:
            prepared = await asyncio.to_thread(lambda: [prepare(x) for x in payloads])
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt_embeds") from None
        for ids, _ in prepared:
            check_prompt(ids, max_tokens, "prompt_embeds", images=True)
        return await run(request, body, "text", [ids for ids, _ in prepared], [max_tokens] * len(prepared),
                         body.logprobs, images=[spans for _, spans in prepared])

    def chat_ids(body: ChatCompletionRequest) -> tuple[list[int], ToolChoice, list]:
        """A chat request's (prompt ids through the chat template, tools, the sources of its images)."""
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        messages, kwargs = chat_template_call(body)
        try:
            choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
            tools = ToolChoice(kwargs.get("tools", []), choice)
        except RequestError as e:
            raise ApiError(400, str(e), param=str(e).split(":")[0].split()[0]) from None
        try:
            prompt_ids, sources = llm.encode_chat(messages, **kwargs)
        except RequestError as e:  # image parts where the model takes none, or of a kind it does not read
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # template errors (roles out of order, ...) are the caller's
            raise ApiError(400, f"messages: cannot apply the chat template: {e}", param="messages") from None
        if not prompt_ids:
            raise ApiError(400, "messages render to an empty prompt", param="messages")
        return prompt_ids, tools, sources

    async def prepared(ids: list[int], sources: list) -> tuple[list[int], list]:
        """(prompt ids with its images' positions, their spans: engine.multimodal), the images loaded (remote ones
        fetched) off the event loop; the ids as they are and no spans without images."""
        if not sources:
            return ids, []
        try:
            return await asyncio.to_thread(llm.image_prompts.prepare, ids, sources, media)
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from None

    async def counted_ids(ids: list[int], sources: list) -> list[int]:
        """Prompt ids with each image's positions as its placeholder token, as HF's processor writes them (what a
        prompt with images counts)."""
        ids, spans = await prepared(ids, sources)
        return multimodal.text_ids(ids, llm.model_cfg.vocab_size, llm.image_prompts.vcfg.image_token_id) if spans \
            else ids

    async def chat_token_ids(body: ChatCompletionRequest) -> list[int]:
        ids, _, sources = await asyncio.to_thread(chat_ids, body)
        return await counted_ids(ids, sources)

    async def chat_prompt(body: ChatCompletionRequest) -> tuple[list[int], int, ToolChoice, int | None, list]:
        """A chat request up to the engine: (prompt ids through the chat template, max tokens, tools, logprobs, the
        images' spans (engine.multimodal: loaded, remote ones fetched, off the event loop)); tokenized off the event
        loop too."""
        prompt_ids, tools, sources = await asyncio.to_thread(chat_ids, body)
        prompt_ids, spans = await prepared(prompt_ids, sources)
        requested = body.max_completion_tokens or body.max_tokens
        prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, max_model_len, requested or 1)
        max_tokens = requested or max(1, max_model_len - len(prompt_ids))
        check_prompt(prompt_ids, max_tokens, "messages", bool(spans))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return prompt_ids, max_tokens, tools, logprobs, spans

    @app.post("/v1/chat/completions", response_model=None, summary="Chat completion (OpenAI-compatible)")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        prompt_ids, max_tokens, tools, logprobs, spans = await chat_prompt(body)
        return await run(request, body, "chat", [prompt_ids], [max_tokens], logprobs, tools=tools, images=[spans])

    async def start_chat(body: ChatCompletionRequest):  # /v1/responses and /v1/messages run as chat requests
        prompt_ids, max_tokens, tools, logprobs, spans = await chat_prompt(body)
        return (prompt_ids, *await submit(body, "chat", [prompt_ids], [max_tokens], logprobs, tools=tools,
                                          images=[spans]))

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    app.include_router(openai_responses.routes(openai_responses.ChatPath(start_chat, gather, count_tokens, enter,
                                                                         server_cfg.reasoning_parser != "none"),
                                               openai_responses.ResponseStore(server_cfg.max_stored_responses)))
    app.include_router(anthropic_messages.routes(anthropic_messages.ChatPath(
        start_chat, gather, chat_token_ids, server_cfg.reasoning_parser != "none")))

    async def embed(request: Request, body, texts: list, param: str) -> tuple[list[RequestOutput], int] | None:
        """Embedding requests' final outputs for texts (strings or token ids: `embedding`, the unit vector, and on a
        sequence classifier `classification`) and their token count; None if the client left."""
        if any(not t for t in texts):
            raise ApiError(400, f"{param} is empty", param=param)
        prompts = [tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
        for ids in prompts:
            check_prompt(ids, 1, param)
        adapter = body.model if body.model in adapters() else None
        reqs = [GenerateRequest(p, SamplingParams.embedding(), body.cache_salt or None, body.priority, adapter)
                for p in prompts]
        finals = await gather(request, engine.submit(reqs, f"embd-{uuid.uuid4().hex}", final_only=True))
        if finals is None:
            return None
        return [finals[i] for i in range(len(prompts))], sum(map(len, prompts))

    @app.post("/v1/embeddings", response_model=None, summary="Embeddings by last-token pooling (OpenAI-compatible)")
    async def embeddings(request: Request, body: EmbeddingRequest):
        check_model(body.model)
        x = body.input
        if isinstance(x, str) or (x and isinstance(x[0], int)):
            x = [x]
        width = llm.model_cfg.hidden_size
        if body.dimensions is not None and body.dimensions > width:
            raise ApiError(400, f"dimensions={body.dimensions} is more than the model's {width}", param="dimensions")
        embedded = await embed(request, body, x, "input")
        if embedded is None:
            return JSONResponse({})
        outputs, num_tokens = embedded
        data = []
        for i, vector in enumerate(out.embedding for out in outputs):
            if body.dimensions is not None:  # Matryoshka: the first dimensions, unit length again
                vector = vector[: body.dimensions] / max(float(np.linalg.norm(vector[: body.dimensions])), 1e-12)
            value = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                     else vector.astype(float).tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    async def pair_scores(request: Request, body, text_1: list[str], text_2: list[str]
                          ) -> tuple[list[float], int] | None:
        """Scores of each pair (engine.scoring): a cross-encoder's, each pair one prompt; else the cosine similarity
        of embeddings, each distinct text embedded once (pairs sharing a query share its prefix in the cache anyway);
        -> (scores, tokens computed), None if the client left."""
        try:
            cross = scoring.cross_encodes(llm.score_head)
        except ValueError as e:
            raise ApiError(400, str(e), param="model") from None
        try:
            pairs = scoring.pairs(text_1, text_2)
        except ValueError as e:
            raise ApiError(400, str(e), param="text_1") from None
        if cross:
            embedded = await embed(request, body, [llm.pair_format.prompt(a, b) for a, b in pairs], "text")
            return None if embedded is None else ([scoring.relevance(out.classification) for out in embedded[0]],
                                                  embedded[1])
        texts = scoring.distinct(pairs)
        embedded = await embed(request, body, list(texts.values()), "text")
        if embedded is None:
            return None
        return scoring.cosines(pairs, dict(zip(texts, (out.embedding for out in embedded[0])))), embedded[1]

    @app.post("/v1/score", response_model=None,
              summary="Pair scores: a cross-encoder's, or the cosine similarity of embeddings (vLLM's)")
    async def score(request: Request, body: ScoreRequest):
        check_model(body.model)
        text_1 = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        text_2 = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        scored = await pair_scores(request, body, text_1, text_2)
        if scored is None:
            return JSONResponse({})
        scores, num_tokens = scored
        return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": [{"index": i, "object": "score", "score": x}
                                                           for i, x in enumerate(scores)],
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    @app.post("/v1/rerank", response_model=None, summary="Documents by relevance to a query (Jina's, Cohere's)")
    async def rerank(request: Request, body: RerankRequest):
        check_model(body.model)
        scored = await pair_scores(request, body, [body.query], body.documents)
        if scored is None:
            return JSONResponse({})
        scores, num_tokens = scored
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": body.documents[i]}} if body.return_documents else {})} for i in order]
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": body.model, "results": results,
                             "usage": {"total_tokens": num_tokens}})

    @app.post("/classify", response_model=None, summary="A sequence classifier's classes of each input (vLLM's)")
    async def classify(request: Request, body: ClassifyRequest):
        check_model(body.model)
        if llm.score_head is None:
            raise ApiError(400, "the served model is a language model, not a sequence classifier (an HF "
                                "*ForSequenceClassification checkpoint, or model.classifier_from_token)", param="model")
        x = body.input
        if isinstance(x, str) or (x and isinstance(x[0], int)):
            x = [x]
        embedded = await embed(request, body, x, "input")
        if embedded is None:
            return JSONResponse({})
        outputs, num_tokens = embedded
        labels = llm.score_head.labels
        data = []
        for i, out in enumerate(outputs):
            logits = out.classification.astype(np.float64)
            if len(logits) == 1:  # a reward model: its sigmoid, as vLLM gives it
                probs = 1 / (1 + np.exp(-logits))
            else:  # the softmax over the labels
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
            data.append({"index": i, "object": "classification", "label": labels[int(np.argmax(logits))],
                         "probs": probs.tolist(), "logits": logits.tolist(), "num_classes": len(logits)})
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": data,
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    for alias, endpoint in (("/score", score), ("/rerank", rerank), ("/v2/rerank", rerank),  # vLLM serves these too
                            ("/v1/classify", classify)):
        app.add_api_route(alias, endpoint, methods=["POST"], response_model=None, include_in_schema=False)

    # ----------------------------------------------------------------------------- tokenizer
    @app.post("/tokenize", summary="Token ids of a prompt, or of chat messages after the chat template")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            try:
                messages, kwargs = chat_template_call(body)
                ids, sources = llm.encode_chat(messages, **kwargs)
            except RequestError as e:
                raise ApiError(400, str(e), param="messages") from None
            except Exception as e:  # template errors (roles out of order, ...) are the caller's
                raise ApiError(400, f"messages: cannot apply the chat template: {e}", param="messages") from None
            ids = await counted_ids(ids, sources)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize", summary="The text of token ids")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        bad = next((t for t in body.tokens if t >= tokenizer.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"tokens: id {bad} is outside the vocabulary (size {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # -------------------------------------------------------------------------------- admin
    def check_admin() -> None:
        if not server_cfg.allow_weight_updates:
            raise ApiError(403, "weight and adapter updates are off; start the server with server.allow_weight_updates: "
                                "true", "permission_error")

    @app.post("/update_weights_from_disk", summary="Serve new weights of the same architecture (server.allow_weight_updates)")
    async def update_weights_from_disk(body: UpdateWeightsRequest):
        check_admin()
        try:
            update = await engine.update_weights(body.model_path, body.abort_all_requests)
        except EngineStopped as e:
            raise _engine_error(e) from None
        except RequestError as e:  # another update is waiting
            raise ApiError(409, str(e)) from None
        except (ValueError, OSError) as e:  # a bad path or checkpoint, or other weights: the old ones keep serving
            raise ApiError(400, str(e), param="model_path") from None
        return {"success": True, "message": f"serving {body.model_path} (weights version {update.weights_version}); "
                                            "prefix cache emptied", "weights_version": update.weights_version,
                "seconds": round(update.seconds, 3), "waited_for_requests": update.waited_for,
                "aborted_requests": update.aborted}

    @app.post("/v1/load_lora_adapter", summary="Serve a LoRA adapter by name (vLLM's; lora.max_adapters slots)")
    async def load_lora_adapter(body: LoadAdapterRequest):
        check_admin()
        try:
            await engine.load_adapter(body.lora_name, body.lora_path)
        except EngineStopped as e:
            raise _engine_error(e) from None
        except (ValueError, OSError) as e:
            raise ApiError(400, str(e)) from None
        return {"success": True, "message": f"LoRA adapter {body.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter", summary="Stop serving a LoRA adapter (vLLM's)")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        check_admin()
        try:
            await engine.unload_adapter(body.lora_name)
        except EngineStopped as e:
            raise _engine_error(e) from None
        except ValueError as e:
            raise ApiError(404 if str(e).startswith("no LoRA adapter") else 400, str(e), param="lora_name") from None
        return {"success": True, "message": f"LoRA adapter {body.lora_name!r} unloaded"}

    @app.post("/sleep", summary="Free the KV cache (and the weights) for another job on the devices (vLLM's)")
    async def sleep(level: int = Query(1, ge=1, le=2), abort_all_requests: bool = False):
        check_admin()
        try:
            await engine.sleep(level, abort_all_requests)
        except EngineStopped as e:
            raise _engine_error(e) from None
        except ValueError as e:  # already asleep, or another sleep or update waiting
            raise ApiError(409, str(e)) from None
        return {"success": True, "sleep_level": level}

    @app.post("/wake_up", summary="Allocate the KV cache and restore the weights (vLLM's)")
    async def wake_up():
        check_admin()
        try:
            await engine.wake_up()
        except EngineStopped as e:
            raise _engine_error(e) from None
        except ValueError as e:  # level 2 without new weights
            raise ApiError(409, str(e)) from None
        return {"success": True}

    @app.get("/is_sleeping", summary="Whether the engine sleeps (vLLM's)")
    async def is_sleeping():
        level = llm.sleep_level
        return {"is_sleeping": level > 0, "sleep_level": level}

    # ------------------------------------------------------------------------------- status
    @app.get("/v1/models", summary="The model this server serves, and its LoRA adapters")
    async def models():
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "radixlm", "max_model_len": max_model_len}
        return {"object": "list", "data": [base] + [
            {**base, "id": name, "parent": model_name} for name in adapters()]}

    @app.get("/health", summary="200 while the engine runs, 503 otherwise")
    async def health():
        if not engine.accepting:
            raise ApiError(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/load", summary="Queue and page counts, for the router")
    async def load():
        s = engine.stats()
        return {"running": s["num_running"], "waiting": s["num_waiting"], "waiting_tokens": s["waiting_tokens"],
                "pages_free": s["pages_free"], "pages_total": s["pages_total"], "weights": s["weights_source"]}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/cache_events", summary="Radix-cache events with seq > after (router feed)")
    async def cache_events(after: int = Query(0, ge=0, le=2**63 - 1)):
        return engine.feed.events_after(after)

    @app.get("/v1/cache_state", summary="Every block hash the cache holds now, by namespace (router resync)")
    async def cache_state():
        return engine.feed.state()

    @app.get("/v1/prompt_format", summary="How this server turns requests into prompt tokens (the router hashes so)")
    async def prompt_format():
        return prompt_format_of(llm, config).as_json()

    return app


def prompt_format_of(llm, config: EngineConfig) -> PromptFormat:
    """What a router must know to hash this server's requests as it prompts them (engine/router/prompts.py)."""
    from models.chat_template import read_chat_template

    score = config.model.score_template
    return PromptFormat(page_size=config.cache.page_size, chat_template=llm.tokenizer.chat_template,
                        score_template=read_chat_template(score, "model.score_template") if score else None,
                        cross_encoder=llm.score_head is not None and llm.score_head.num_labels == 1,
                        reasoning=config.server.reasoning_parser != "none",
                        probe=tuple(llm.tokenizer.encode(PROBE_TEXT)),
                        image_placeholder=None if llm.image_prompts is None else llm.image_prompts.placeholder_id,
                        embeds=(np.dtype(llm.dtype).name, llm.model_cfg.vocab_size)
                        if config.model.enable_prompt_embeds else None)


def _prompt_top(*ks: int | None) -> int | None:
    """The engine's prompt_logprobs for fields that each ask for prompt logprobs with k alternatives (None: not)."""
    asked = [k for k in ks if k is not None]
    return max(asked) if asked else None


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, EngineOverloaded):  # clients (and the router, on another replica) may try again
        return ApiError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, (EngineStopped, EngineAsleep)):
        return ApiError(503, str(e), "server_error")
    return ApiError(400, str(e))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
