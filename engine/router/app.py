"""The router: an OpenAI-compatible HTTP proxy in front of N replicas, as a FastAPI app (`create_app`).

    engine/router/forward.py   a request's life: tokenized once, hashed, routed by the policy, forwarded (retried
                               before its first byte), stored responses sent to their replica (`Router`)
    engine/router/fleet.py     the replicas: health checks, cache feeds into the index, admin calls to all of them,
                               catch-up of a replica coming back (`Fleet`)

Client endpoints (/v1/completions, /v1/chat/completions, /v1/embeddings, /v1/score, /v1/rerank, /classify,
/v1/responses and its stored responses, /v1/messages and /v1/messages/count_tokens) are forwarded; the admin
endpoints go to every replica that is up; /v1/models is the first replica's that answers; /health, /replicas and /metrics are the
router's own.
"""
from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from engine.router.config import RouterConfig
from engine.router.fleet import BROADCAST, FORWARD_HEADERS
from engine.router.forward import Router


def create_app(cfg: RouterConfig, tokenizer: Any = None):
    """The FastAPI app; `tokenizer` overrides cfg.tokenizer (tests)."""
    from contextlib import asynccontextmanager

    router = Router(cfg, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="RadixLM router", lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.forward("/v1/completions", await request.body(), dict(request.headers))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router.forward("/v1/chat/completions", await request.body(), dict(request.headers))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await router.forward("/v1/embeddings", await request.body(), dict(request.headers))

    # routed by text_1 / the query (pairs sharing it share its pages); a classifier's inputs as embeddings' are
    for path in ("/v1/score", "/v1/rerank", "/classify", "/v1/classify"):
        async def pooled(request: Request, path: str = path):
            return await router.forward(path, await request.body(), dict(request.headers))

        app.add_api_route(path, pooled, methods=["POST"])

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await router.forward("/v1/responses", await request.body(), dict(request.headers))

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await router.forward("/v1/messages", await request.body(), dict(request.headers))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        return await router.forward("/v1/messages/count_tokens", await request.body(), dict(request.headers))

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    async def stored_response(request: Request, response_id: str):
        return await router.stored_response(request.method, response_id, dict(request.headers))

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(request: Request, response_id: str):
        return await router.stored_response("GET", response_id, dict(request.headers), "/input_items",
                                            request.url.query)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(request: Request, response_id: str):
        return await router.stored_response("POST", response_id, dict(request.headers), "/cancel")

    for path in BROADCAST:
        async def admin(request: Request):
            return await router.fleet.broadcast(request.url.path, request.url.query, await request.body(),
                                          dict(request.headers))

        app.add_api_route(path, admin, methods=["POST"], summary="sent to every replica that is up")

    @app.get("/v1/models")
    async def models(request: Request):
        fwd = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}
        for slot, st in enumerate(router.states):
            if st.up:
                try:
                    r = await router.client.get(f"{router.urls[slot]}/v1/models", headers=fwd,
                                                timeout=cfg.connect_timeout_s)
                    return Response(r.content, status_code=r.status_code, media_type="application/json")
                except httpx.HTTPError:
                    continue
        return JSONResponse({"error": {"message": "no replica is up", "type": "upstream_unavailable"}},
                            status_code=503)

    @app.get("/health")
    async def health():
        up = sum(st.up for st in router.states)
        return JSONResponse({"status": "ok" if up else "no replica up", "replicas_up": up,
                             "replicas": len(router.states)}, status_code=200 if up else 503)

    @app.get("/replicas")
    async def replicas():
        return {"policy": router.policy.name, "replicas": router.fleet.describe()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for slot, url in enumerate(router.urls):
            router.metrics.index_blocks.labels(url).set(router.index.num_confirmed(slot))
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
