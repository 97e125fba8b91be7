"""API-key check as plain ASGI middleware (it must not buffer or wrap streaming responses)."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.runtime.server.errors import APIError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")
"""Path prefixes that need the key; /health, /metrics and /openapi.json stay open, as in vLLM."""


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


class APIKeyMiddleware:
    """401 for a protected path unless `Authorization: Bearer <key>` carries the key. The
    comparison is constant-time over fixed-length digests (no timing leak of key or length)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = _digest(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token.strip()), self._key):
            await self.app(scope, receive, send)
            return
        message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'."
        body = json.dumps(APIError(401, message, code="invalid_api_key").body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
