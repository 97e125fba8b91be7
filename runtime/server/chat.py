"""POST /v1/chat/completions: messages rendered with the artifact's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kiln.runtime.async_engine import RequestStream
from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.server.chat_template import ChatTemplateError
from kiln.runtime.server.errors import APIError, invalid
from kiln.runtime.server.logprobs import TokenTexts, chat_logprobs, delta_entries
from kiln.runtime.server.protocol import ChatCompletionRequest, ChatMessage
from kiln.runtime.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    Usage,
)
from kiln.runtime.server.serving import (
    EventStream,
    ServerState,
    add,
    check_prompt_length,
    collect,
    encode,
    finish_error,
    guarded,
    new_id,
    sampling_params,
    sse,
    state_of,
    unless_disconnected,
)

router = APIRouter()


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template sees them: content as one string (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            bad = next((p.type for p in content if p.type != "text" or p.text is None), None)
            if bad is not None:
                raise invalid(f"content part type '{bad}' is not supported (only 'text' with a text field)",
                              f"messages[{i}].content")
            content = "\n".join(p.text for p in content)
        d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The conversation as prompt text; 400 when the model has no template or it refuses."""
    if state.chat_template is None:
        raise APIError(400, f"The model '{state.model_name}' has no chat template, so it cannot take chat "
                       "messages; send a plain prompt to /v1/completions instead.", param="messages",
                       code="chat_template_missing")
    try:
        return state.chat_template.render(message_dicts(messages), add_generation_prompt)
    except ChatTemplateError as e:
        raise invalid(f"the chat template rejected the messages: {e}", "messages") from None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Answer a conversation; `stream: true` sends chunks as Server-Sent Events ending with [DONE]."""
    state = state_of(request)
    lora = state.check_model(body.model)
    if body.tools:
        raise invalid("tools are not supported", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid("only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    text = render_chat(state, body.messages, body.add_generation_prompt is not False)
    state.check_sequences(body.n or 1, "n")
    ids = (await encode(state, [text], "messages", add_special_tokens=False))[0]
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = check_prompt_length(state, len(ids), requested, "messages", max_param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(state, body, max_tokens=max_tokens, logprobs=logprobs,
                             renames={"max_tokens": max_param, "logprobs": "top_logprobs"})
    rid = new_id("chatcmpl")
    stream = await add(state, [(rid, {"prompt_token_ids": ids, "prompt": text}, params)], "messages", lora)
    ctx = _Context(state, body, rid, len(ids), logprobs, state.model_of(lora))
    if body.stream:
        return EventStream(guarded(lambda: _events(ctx, stream)), stream)
    async with stream:
        finals = await unless_disconnected(request, collect(stream))
    return Response(_response(ctx, finals[rid]).model_dump_json(), media_type="application/json")


class _Context:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, rid: str, prompt_tokens: int,
                 top: int | None, model: str):
        self.state, self.body, self.rid, self.prompt_tokens, self.top = state, body, rid, prompt_tokens, top
        self.model = model
        self.texts = TokenTexts(state.engine.tokenizer)

    def logprobs(self, token_ids: list[int], entries: list) -> ChatLogprobs | None:
        if self.top is None:
            return None
        return ChatLogprobs(content=chat_logprobs(self.texts, token_ids, entries, self.top))


def _response(ctx: _Context, final: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for c in final.outputs:
        if (err := finish_error(c.finish_reason)) is not None:
            raise err
        choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                                  logprobs=ctx.logprobs(c.token_ids, c.logprobs or []),
                                  finish_reason=c.finish_reason))
    generated = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(id=ctx.rid, model=ctx.model, choices=choices,
                                  usage=Usage.of(ctx.prompt_tokens, generated))


def _delta_chunk(ctx: _Context, c: CompletionOutput) -> ChatChunkChoice | None:
    ids, entries = delta_entries(c.token_ids, c.delta_token_ids, c.logprobs)
    lp = ctx.logprobs(ids, entries) if ids else None
    if c.finish_reason is None and not c.delta_text and lp is None:
        return None
    return ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.delta_text or None), logprobs=lp,
                           finish_reason=c.finish_reason)


async def _events(ctx: _Context, stream: RequestStream) -> AsyncIterator[str]:
    model, n = ctx.model, ctx.body.n or 1

    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=ctx.rid, model=model, choices=[choice]))

    for i in range(n):
        yield chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
    done: set[int] = set()
    generated = 0
    async for out in stream:
        for c in out.outputs:
            if c.index in done:
                continue
            if (err := finish_error(c.finish_reason)) is not None:
                raise err
            choice = _delta_chunk(ctx, c)
            if choice is None:
                continue
            if c.finish_reason is not None:
                done.add(c.index)
                generated += len(c.token_ids)
            yield chunk(choice)
    if ctx.body.stream_options and ctx.body.stream_options.include_usage:
        usage = Usage.of(ctx.prompt_tokens, generated)
        yield sse(ChatCompletionChunk(id=ctx.rid, model=model, choices=[], usage=usage))
