"""AsyncLLMEngine without HTTP: streams, early exit, coalescing, queue bound, failures."""

from __future__ import annotations

import asyncio

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.async_engine import AsyncLLMEngine, EngineError, QueueFullError
from kiln.runtime.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _started(engine: LLMEngine, **kw) -> AsyncLLMEngine:
    eng = AsyncLLMEngine(engine, **kw)
    eng.start()
    return eng


async def _idle(eng: AsyncLLMEngine) -> dict:
    for _ in range(500):
        s = eng.stats
        if not eng.engine.groups and s["num_free_kv_blocks"] == s["num_kv_blocks"] and eng.num_streams == 0:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(eng.stats)


def test_generate_equals_llm_and_coalesces_for_slow_readers(llama):
    expected = LLM(llama, num_kv_blocks=64).generate("hello", GREEDY, use_tqdm=False)[0].outputs[0]

    async def main():
        eng = await _started(LLMEngine(llama, num_kv_blocks=64))
        texts, ids, outputs = [], [], 0
        async for out in eng.generate("hello", GREEDY, "slow"):
            await asyncio.sleep(0.02)  # the engine runs ahead: queued outputs are merged
            outputs += 1
            texts.append(out.outputs[0].delta_text)
            ids += out.outputs[0].delta_token_ids
        final = out
        await _idle(eng)
        await eng.stop()
        return "".join(texts), ids, outputs, final

    text, ids, outputs, final = _run(main())
    assert text == expected.text and ids == expected.token_ids
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert outputs < len(ids)  # fewer, larger chunks than tokens


def test_leaving_early_aborts_and_frees_blocks(llama):
    async def main():
        eng = await _started(LLMEngine(llama, num_kv_blocks=64))
        params = SamplingParams(max_tokens=200, ignore_eos=True, n=4)
        async for _ in eng.generate("hi", params, "leaver"):
            break  # the reader stops: the request must be aborted at once
        stats = await _idle(eng)
        await eng.stop()
        return stats

    stats = _run(main())
    assert stats["finish_counts"]["abort"] == 4


def test_add_errors(llama):
    async def main():
        engine = LLMEngine(llama, num_kv_blocks=64, max_num_seqs=1)
        eng = await _started(engine, max_waiting=1)
        with pytest.raises(ValueError, match="context"):
            await eng.add_requests([("long", {"prompt_token_ids": [5] * 300}, GREEDY)])
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        first = await eng.add_requests([("a", "hi", long)])
        await first.__anext__()  # "a" runs and holds the only slot
        second = await eng.add_requests([("b", "hi", long)])  # waits (1 allowed)
        with pytest.raises(ValueError, match="in use"):
            await eng.add_requests([("b", "hi", long)])
        with pytest.raises(QueueFullError):
            await eng.add_requests([("c", "hi", long)])
        # all or nothing: a batch with one bad prompt queues none of them
        first.abort()
        second.abort()
        await _idle(eng)
        with pytest.raises(ValueError):
            await eng.add_requests([("d", "hi", GREEDY), ("e", {"prompt_token_ids": [10**6]}, GREEDY)])
        assert not engine.groups
        await eng.stop()
        with pytest.raises(EngineError, match="not running"):
            await eng.add_requests([("f", "hi", GREEDY)])

    _run(main())


def test_stop_aborts_what_is_left(llama):
    async def main():
        eng = await _started(LLMEngine(llama, num_kv_blocks=64))
        stream = await eng.add_requests([("x", "hi", SamplingParams(max_tokens=200, ignore_eos=True))])
        await eng.stop()
        outs = [o async for o in stream]
        return outs[-1]

    last = _run(main())
    assert last.finished and last.outputs[0].finish_reason == "abort"
