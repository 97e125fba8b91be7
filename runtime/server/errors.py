"""OpenAI's error format, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Handlers turn what a request can get wrong into that body with the right status: `APIError`
raised by the routes, FastAPI's validation errors (malformed JSON, a wrong type: 400 naming the
parameter) and Starlette's HTTP errors (unknown route 404, wrong method 405).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "server_error"}


class APIError(Exception):
    """An error to return to the client, as OpenAI returns it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        """The error as a Server-Sent Event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid(message: str, param: str | None) -> APIError:
    """A 400 for a request parameter the server cannot accept."""
    return APIError(400, message, param=param, code="invalid_value")


_PARAM = re.compile(r"SamplingParams\.(\w+)")


def from_value_error(e: ValueError, default_param: str | None, renames: dict[str, str] | None = None) -> APIError:
    """A 400 for a ValueError raised by the runtime at the request boundary; a SamplingParams
    message names its field, which is mapped back to the request's name for it."""
    message = str(e)
    m = _PARAM.search(message)
    param = default_param
    if m:
        param = (renames or {}).get(m.group(1), m.group(1))
        message = message.replace(m.group(0), param)
    return invalid(message, param)


_TOKEN_ID_FIELDS = ("prompt", "tokens", "stop_token_ids")
_TAG_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
              "list[str]": "a list of strings", "list[int]": "a list of integers",
              "list[list[int]]": "a list of lists of integers", "dict[str,float]": "an object of numbers",
              "list[ContentPart]": "a list of content parts"}


def _is_tag(part: object) -> bool:
    """A union member's name in a pydantic error location (not a field name or an index)."""
    return isinstance(part, str) and (part in _TAG_WORDS or "[" in part or part[:1].isupper())


def _validation_error(exc: RequestValidationError, vocab_size: int | None = None) -> APIError:
    errors = exc.errors()
    if not errors:
        return invalid("the request is invalid", None)
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if not loc:
        hint = " sent with Content-Type: application/json" if isinstance(first.get("input"), bytes) else ""
        return invalid(f"the request body must be a JSON object{hint} ({first.get('msg', '')})", None)
    param = str(loc[0])
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    more = len(errors) - 1
    if any(_is_tag(p) for p in loc):  # a union: say which forms it takes, once
        cut = next(i for i, p in enumerate(loc) if _is_tag(p))
        loc = loc[:cut]
        same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:cut] == loc]
        forms = []
        for e in same:
            tag = [p for p in e.get("loc", ()) if p != "body"][cut]
            word = _TAG_WORDS.get(str(tag).replace(" ", ""), str(tag))
            if word not in forms:
                forms.append(word)
        msg = f"must be {' or '.join(forms)}; got {first.get('input')!r:.40}"
        more = len(errors) - len(same)
    where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if param in _TOKEN_ID_FIELDS and vocab_size is not None and (param != "prompt" or "token id" in msg):
        msg += f"; token ids are integers in [0, {vocab_size})"
    tail = f" (and {more} more errors)" if more > 0 else ""
    if not msg.startswith(where):  # a validator's own message may name the element already
        msg = f"{where}: {msg}"
    return invalid(msg + tail, param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error a request can cause through the OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        state = getattr(request.app.state, "kiln", None)
        return _validation_error(exc, state.vocab_size if state is not None else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error").response()
