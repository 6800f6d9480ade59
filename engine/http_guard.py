"""ASGI middleware in front of the API: API key on /v1/* and the admin endpoints, request body size limit, request counts.

The key comes as `Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key: <key>` (Anthropic's); errors on
/v1/messages are Anthropic's error body, elsewhere OpenAI's.

It runs before FastAPI parses anything, so a missing key is a 401 and an oversized body a 413 even
when the body is not valid JSON; chunked bodies are counted as they arrive, never buffered past the limit.
"""
from __future__ import annotations

import json
import secrets

from engine.anthropic_messages import error_body as anthropic_error_body
from engine.metrics import ServerMetrics
from engine.openai_protocol import error_body


class RequestGuard:
    """ASGI middleware: API key on /v1/* and the admin endpoints, body size limit, request counts by endpoint and
    status."""

    _ADMIN = {"/update_weights_from_disk", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up"}
    _ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/classify", "/v1/responses", "/v1/messages",
                  "/v1/messages/count_tokens", "/v1/models", "/health",
                  "/metrics", "/load", "/v1/cache_events", "/v1/cache_state", "/tokenize", "/detokenize", "/openapi.json",
                  "/docs", *_ADMIN}

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        anthropic = path.startswith("/v1/messages")
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and (path.startswith("/v1/") or path in self._ADMIN) and not self._authorized(scope):
                message = "invalid or missing API key (send Authorization: Bearer <key>, or x-api-key: <key>)"
                return await _send_json(send_counted, 401, anthropic_error_body(401, message) if anthropic else
                                        error_body(message, "authentication_error", code="invalid_api_key"))
            headers = dict(scope.get("headers") or ())
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await _send_json(send_counted, 413, self._too_large(anthropic))
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, more, too_large = bytearray(), True, False
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        status["code"] = 499  # client closed the request (nginx's name for it)
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body_bytes:
                        too_large = True
                        break
                if too_large:
                    return await _send_json(send_counted, 413, self._too_large(anthropic))
                receive = _replay(bytes(body), receive)
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = (path if path in self._ENDPOINTS else
                        "/v1/responses/{id}" if path.startswith("/v1/responses/") else "other")
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        """The key in either header is enough."""
        key, sent = self.api_key.encode("utf-8"), []
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                sent.append(token.strip().encode("latin-1") if scheme.lower() == "bearer" else None)
            elif name == b"x-api-key":
                sent.append(value.strip())
        return any(token is not None and secrets.compare_digest(token, key) for token in sent)

    def _too_large(self, anthropic: bool = False) -> dict:
        message = f"request body is larger than server.max_body_bytes={self.max_body_bytes}"
        return anthropic_error_body(413, message) if anthropic else error_body(message, code="request_too_large")


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
