"""Request-body checks before any route sees a body: size, encoding, nesting, lone surrogates.

`BodyGuard` is a pure ASGI middleware. It reads a POST body (refusing it with 413 once it is
larger than `max_bytes`, from `Content-Length` before reading anything or while reading a
chunked body), and for a JSON body checks what FastAPI's parser reports only as "There was an
error parsing the body" (code null) or lets through to crash later:

    not UTF-8               400 invalid_encoding, with the byte offset
    not JSON                400 invalid_json (left to FastAPI's message, which has the position)
    nested too deeply       400 invalid_json (deeper than the JSON parser's recursion limit, ~1000
                            levels; OpenAI's bodies need 4)
    a lone surrogate        400 invalid_value naming the field ("a\\ud800b" is valid JSON but no
                            text: the tokenizer raises TypeError on it, and the response cannot
                            even be encoded)

Then the route gets the same bytes again through `receive`; later `receive` calls (disconnects)
go to the server as before.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.runtime.server.errors import APIError

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
"""Default request-body limit (`kiln serve --max-request-bytes`): 4 MiB, ~1M tokens of text."""
DRAIN_FACTOR = 16
"""A refused body is read (and dropped) up to this many times the limit before the 413 is sent."""
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _path(parts: list[str | int]) -> str:
    if not parts:
        return "body"
    return str(parts[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts[1:])


def check_json(body: bytes) -> None:
    """Raise APIError for a body that is not UTF-8, nested too deeply to parse, or holds a lone
    surrogate. Bodies that are not JSON at all are left to FastAPI (its message has the position)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}: {e.reason}); JSON "
                       "must be sent as UTF-8", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply to parse (hundreds of levels; "
                       "OpenAI's request bodies nest at most 4)", code="invalid_json") from None
    except ValueError:
        return
    if _SURROGATE_ESCAPE.search(body) is None:
        return
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:  # only for bodies with a surrogate escape: find the field to name
        value, where = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _text(k, where + [k])
                stack.append((v, where + [k]))
        elif isinstance(value, list):
            stack.extend((v, where + [i]) for i, v in enumerate(value))
        elif isinstance(value, str):
            _text(value, where)


def _text(s: str, where: list[str | int]) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        field = _path(where)
        raise APIError(400, f"{field}: the text holds a lone surrogate ({s[e.start]!r} at character "
                       f"{e.start}), which is not a Unicode character; send UTF-8 text (a \\ud800-\\udfff "
                       "escape must be half of a pair)", param=str(where[0]) if where else None,
                       code="invalid_value") from None


def _is_json(scope: Scope) -> bool:
    ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    return ctype == b"application/json" or (ctype.startswith(b"application/") and ctype.endswith(b"+json"))


class BodyGuard:
    """413 for a body over `max_bytes`; 400 (see `check_json`) for a JSON body FastAPI would
    answer unhelpfully or that would reach a route as text no tokenizer takes."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(413, f"the request body is too large{got}; this server accepts at most "
                        f"{self.max_bytes} bytes (kiln serve --max-request-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _drain(receive, DRAIN_FACTOR * self.max_bytes)
            await _reply(send, self._too_large(int(length)))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await _drain(receive, DRAIN_FACTOR * self.max_bytes)
                await _reply(send, self._too_large(None))
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        if _is_json(scope):
            try:
                check_json(body)
            except APIError as e:
                await _reply(send, e)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a refused body (up to `limit` bytes), so that a client still
    sending it reads the 413 instead of a connection reset; a larger one is cut off."""
    size, more = 0, True
    while more and size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _reply(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
