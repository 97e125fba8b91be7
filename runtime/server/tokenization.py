"""POST /tokenize and POST /detokenize, with the tokenizer (and chat template) generation uses."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kiln.runtime.server.chat import render_chat
from kiln.runtime.server.errors import invalid
from kiln.runtime.server.protocol import DetokenizeRequest, TokenizeRequest
from kiln.runtime.server.responses import DetokenizeResponse, TokenizeResponse
from kiln.runtime.server.serving import state_of

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    state = state_of(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt and messages", "prompt")
    tok = state.engine.tokenizer
    if body.messages is not None:
        text = render_chat(state, body.messages, body.add_generation_prompt is not False)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids (special tokens kept)."""
    state = state_of(request)
    state.check_model(body.model)
    state.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(list(body.tokens), skip_special_tokens=False))
