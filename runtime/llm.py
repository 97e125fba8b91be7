"""The offline API, named as vLLM names it: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from kiln.runtime.engine import LLMEngine, Prompt
from kiln.runtime.lora import LoRARequest
from kiln.runtime.outputs import OutputAccumulator, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

Params = SamplingParams | Sequence[SamplingParams] | None
Adapters = LoRARequest | Sequence[LoRARequest | None] | None


class LLM:
    """A compiled artifact ready to generate. Keyword arguments go to LLMEngine:
    max_num_batched_tokens, max_num_seqs, block_size, enable_prefix_caching,
    kv_cache_memory_bytes, num_kv_blocks, max_model_len, device (default: the GPU for a cuda-target
    artifact when there is one, else the CPU), enforce_eager (no CUDA graphs), verify (False skips
    checking the artifact's content hashes), threads (CPU threads; default: the process's cores,
    see kiln.runtime.threads), enable_lora / max_loras / max_lora_rank (LoRA adapter slots, see
    kiln.runtime.lora_slots; generate then takes lora_request)."""

    def __init__(self, model: str | Path, **engine_kwargs):
        self.engine = LLMEngine(model, **engine_kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _add(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params, lora_request: Adapters) -> list[str]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if isinstance(lora_request, Sequence):
            if len(lora_request) != len(prompts):
                raise ValueError(f"{len(lora_request)} lora_requests for {len(prompts)} prompts")
            loras = list(lora_request)
        else:
            loras = [lora_request] * len(prompts)
        # Tokenize and validate everything before queueing anything; queue the token ids so no
        # prompt is tokenized twice.
        encoded = []
        for p in prompts:
            text, ids = self.engine.tokenize(p)
            encoded.append({"prompt_token_ids": ids, "prompt": text})
        return [self.engine.add_request(None, p, sp, lora) for p, sp, lora in zip(encoded, params, loras, strict=True)]

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params = None,
                 use_tqdm: bool = True, lora_request: Adapters = None) -> list[RequestOutput]:
        """Generate for every prompt (a string or {"prompt_token_ids": [...]}) together, with
        continuous batching; the final outputs in the order of the prompts. lora_request: one
        LoRARequest for every prompt, or one per prompt (None: the base model)."""
        ids = self._add(prompts, sampling_params, lora_request)
        final: dict[str, RequestOutput] = {}
        acc = OutputAccumulator()
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(final) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("requests were lost: the engine has nothing left to run")
                for out in map(acc.add, self.engine.step(final_only=True)):
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]

    def generate_stream(self, prompts: Prompt | Sequence[Prompt], sampling_params: Params = None,
                        lora_request: Adapters = None) -> Iterator[RequestOutput]:
        """Like generate, but yields every request's output after each step it progressed in:
        `outputs[i].delta_text` / `delta_token_ids` hold what is new, `text` / `token_ids` all
        so far; the last one for a request has finished=True. Each yielded output is a snapshot
        that later steps leave alone."""
        ids = set(self._add(prompts, sampling_params, lora_request))
        acc = OutputAccumulator()
        while ids:
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("requests were lost: the engine has nothing left to run")
            for out in map(acc.add, self.engine.step()):
                if out.request_id in ids:
                    if out.finished:
                        ids.discard(out.request_id)
                    yield out.snapshot()
