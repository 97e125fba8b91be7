"""POST /v1/completions: one or more prompts, n completions each, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kiln.runtime.async_engine import RequestStream
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.server.errors import invalid
from kiln.runtime.server.logprobs import TokenTexts, completion_logprobs, delta_entries
from kiln.runtime.server.protocol import CompletionRequest
from kiln.runtime.server.responses import CompletionChoice, CompletionResponse, Usage
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
Prompt = tuple[str, list[int]]


async def _prompts(state: ServerState, prompt: Any, n: int) -> list[Prompt]:
    """(text, token ids) of each prompt of the request; texts are tokenized off the event loop."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    state.check_sequences(len(prompt) * n, "prompt")
    if isinstance(prompt[0], str):
        return list(zip(prompt, await encode(state, prompt, "prompt"), strict=True))
    out = []
    tok = state.engine.tokenizer
    for p in prompt:
        state.check_token_ids(p, "prompt")
        if len(p) >= state.max_model_len:  # refused below; not worth decoding
            out.append(("", list(p)))
        else:
            out.append((tok.decode(p), list(p)))
    return out


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Complete the prompt(s); `stream: true` sends Server-Sent Events ending with [DONE]."""
    state = state_of(request)
    lora = state.check_model(body.model)
    n = body.n or 1
    if body.suffix is not None:
        raise invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != n:
        raise invalid(f"best_of must equal n ({n}): ranking completions is not supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise invalid("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
    prompts = await _prompts(state, body.prompt, n)
    rid = new_id("cmpl")
    reqs = []
    for i, (text, ids) in enumerate(prompts):
        max_tokens = check_prompt_length(state, len(ids), body.max_tokens, "prompt", "max_tokens")
        params = sampling_params(state, body, max_tokens=max_tokens, logprobs=body.logprobs, renames={})
        reqs.append((f"{rid}-{i}", {"prompt_token_ids": ids, "prompt": text}, params))
    stream = await add(state, reqs, "prompt", lora)
    ctx = _Context(state, body, rid, prompts, n, [r[0] for r in reqs], state.model_of(lora))
    if body.stream:
        return EventStream(guarded(lambda: _events(ctx, stream)), stream)
    async with stream:
        finals = await unless_disconnected(request, collect(stream))
    return Response(_response(ctx, finals).model_dump_json(), media_type="application/json")


class _Context:
    def __init__(self, state: ServerState, body: CompletionRequest, rid: str, prompts: list[Prompt], n: int,
                 request_ids: list[str], model: str):
        self.state, self.body, self.rid, self.prompts, self.n, self.model = state, body, rid, prompts, n, model
        self.position = {r: i for i, r in enumerate(request_ids)}
        self.texts = TokenTexts(state.engine.tokenizer)
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)

    def echo(self, i: int) -> str:
        return self.prompts[i][0] if self.body.echo else ""


def _response(ctx: _Context, finals: dict[str, RequestOutput]) -> CompletionResponse:
    choices, generated = [], 0
    for rid, i in sorted(ctx.position.items(), key=lambda kv: kv[1]):
        for c in finals[rid].outputs:
            if (err := finish_error(c.finish_reason)) is not None:
                raise err
            generated += len(c.token_ids)
            lp = None
            if ctx.body.logprobs is not None:
                lp = completion_logprobs(ctx.texts, c.token_ids, c.logprobs or [], ctx.body.logprobs, 0)
            choices.append(CompletionChoice(index=i * ctx.n + c.index, text=ctx.echo(i) + c.text,
                                            logprobs=lp, finish_reason=c.finish_reason))
    return CompletionResponse(id=ctx.rid, model=ctx.model, choices=choices,
                              usage=Usage.of(ctx.prompt_tokens, generated))


async def _events(ctx: _Context, stream: RequestStream) -> AsyncIterator[str]:
    model, generated = ctx.model, 0
    offsets: dict[int, int] = {}
    done: set[int] = set()

    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        return sse(CompletionResponse(id=ctx.rid, model=model, choices=[choice]))

    if ctx.body.echo:
        for i in range(len(ctx.prompts)):
            for j in range(ctx.n):
                yield chunk(i * ctx.n + j, ctx.echo(i))
    async for out in stream:
        i = ctx.position[out.request_id]
        for c in out.outputs:
            index = i * ctx.n + c.index
            if index in done:
                continue
            if (err := finish_error(c.finish_reason)) is not None:
                raise err
            lp = None
            if ctx.body.logprobs is not None:
                ids, entries = delta_entries(c.token_ids, c.delta_token_ids, c.logprobs)
                lp = completion_logprobs(ctx.texts, ids, entries, ctx.body.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                if not ids:
                    lp = None
            if c.finish_reason is None and not c.delta_text and lp is None:
                continue
            if c.finish_reason is not None:
                done.add(index)
                generated += len(c.token_ids)
            yield chunk(index, c.delta_text, lp, c.finish_reason)
    if ctx.body.stream_options and ctx.body.stream_options.include_usage:
        usage = Usage.of(ctx.prompt_tokens, generated)
        yield sse(CompletionResponse(id=ctx.rid, model=model, choices=[], usage=usage))
