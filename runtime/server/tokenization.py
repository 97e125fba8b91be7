"""POST /tokenize and POST /detokenize, with the tokenizer (and chat template) generation uses."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kiln.runtime.server.chat import render_chat
from kiln.runtime.server.errors import invalid
from kiln.runtime.server.protocol import DetokenizeRequest, TokenizeRequest
from kiln.runtime.server.responses import DetokenizeResponse, TokenizeResponse
from kiln.runtime.server.serving import encode, state_of

router = APIRouter()


def _tokens_json(count: int, max_model_len: int, ids: list[int], chunk: int = 1 << 13) -> bytes:
    """TokenizeResponse's JSON, written in slices so that, in a worker thread, it lets the event
    loop run between them (one `model_dump_json` of a million ids holds the GIL ~0.1 s)."""
    parts = [",".join(map(str, ids[i:i + chunk])) for i in range(0, len(ids), chunk)]
    return f'{{"count":{count},"max_model_len":{max_model_len},"tokens":[{",".join(parts)}]}}'.encode()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    state = state_of(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        text = render_chat(state, body.messages, body.add_generation_prompt is not False)
        ids = (await encode(state, [text], "messages", add_special_tokens=False, check_context=False))[0]
    else:
        ids = (await encode(state, [body.prompt], "prompt", add_special_tokens=body.add_special_tokens is not False,
                            check_context=False))[0]
    content = await asyncio.to_thread(_tokens_json, len(ids), state.max_model_len, ids)
    return Response(content, media_type="application/json")


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids (special tokens kept)."""
    state = state_of(request)
    state.check_model(body.model)
    state.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(list(body.tokens), skip_special_tokens=False))
