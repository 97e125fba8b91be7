"""Multi-LoRA end to end: tiny PEFT adapters of ranks 4, 8, 8 and 16 (one rslora, one on some
modules only) served in one batch with the base model; each request's greedy tokens equal
transformers + PEFT with its adapter, on the reference and cpu targets, with adapters evicted
and reloaded when slots run out; adapters or engines that do not fit are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import kiln
from kiln import LLM, LoRARequest, SamplingParams
from kiln.models.checkpoint import load_reference_model
from kiln.runtime.request import Request

ADAPTERS = {  # name: (r, lora_alpha, use_rslora, target_modules)
    "r4": (4, 8, False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r8-rslora": (8, 16, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r8-qv": (8, 8, False, ["q_proj", "v_proj"]),
    "r16-mlp": (16, 32, False, ["o_proj", "up_proj", "down_proj"]),
}
PROMPTS = [list(range(3, 14)), [7, 200, 31, 5, 99, 12, 64, 8, 150]]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, LoRARequest]:
    """The four adapters saved in PEFT's format, random A and nonzero B."""
    out = {}
    for i, (name, (r, alpha, rslora, targets)) in enumerate(ADAPTERS.items()):
        model = get_peft_model(load_reference_model(checkpoint("llama")),
                               LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:  # PEFT starts B at zero: both random here
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        path = tmp_path_factory.mktemp(f"lora-{name}")
        model.save_pretrained(path)
        out[name] = LoRARequest(name, i + 1, str(path))
    return out


@pytest.fixture(scope="module")
def expected(checkpoint, adapters) -> dict[tuple[str | None, int], list[int]]:
    """Greedy tokens of transformers (+ PEFT) per (adapter or None, prompt index)."""
    out = {}
    for name in [None, *adapters]:
        model = load_reference_model(checkpoint("llama"))
        if name is not None:
            model = PeftModel.from_pretrained(model, adapters[name].lora_path).eval()
        for k, prompt in enumerate(PROMPTS):
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(MAX_TOKENS):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out[name, k] = ids[len(prompt):]
    return out


def _run(llm: LLM, adapters: dict[str, LoRARequest], order: list[str | None]):
    """One generate call over every (adapter, prompt) pair in `order` x PROMPTS."""
    pairs = [(name, k) for name in order for k in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[k]} for _, k in pairs],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False,
                        lora_request=[adapters[name] if name else None for name, _ in pairs])
    return {pair: out.outputs[0].token_ids for pair, out in zip(pairs, outs, strict=True)}


@pytest.mark.parametrize("target", ["reference", "cpu", "cuda"])
def test_mixed_batch_matches_peft(artifact, adapters, expected, target):
    """cuda: Triton's interpreter on the CPU without a GPU (the lora kernels and the cuda
    lowering end to end), the compiled kernels with one."""
    llm = LLM(artifact("llama", target=target, max_lora_rank=16), enable_lora=True, max_loras=4, max_lora_rank=16)
    got = _run(llm, adapters, [None, *adapters])
    assert got == expected
    assert all(expected[name, 0] != expected[None, 0] for name in adapters)  # every adapter changes the tokens
    assert llm.engine.lora.num_loads == len(adapters)


def test_preempted_requests_keep_their_adapters(artifact, adapters, expected):
    """A KV cache of 6 blocks of 4 tokens holds two of these prompts but not their growth: the ten run by
    preempting and recomputing, and every request still decodes with its own adapter."""
    llm = LLM(artifact("llama", target="reference", max_lora_rank=16), enable_lora=True, max_loras=4,
              max_lora_rank=16, num_kv_blocks=6, block_size=4)
    got = _run(llm, adapters, [None, *adapters])
    assert llm.engine.scheduler_stats()["preemptions"] > 0
    assert got == expected


def test_adapters_evicted_and_reloaded(artifact, adapters, expected):
    """Two slots for four adapters, each asked for twice: they take turns, reloaded from disk;
    the prefix cache keys blocks by adapter."""
    llm = LLM(artifact("llama", max_lora_rank=16), enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4)
    order = [*adapters, None, *adapters]
    got = _run(llm, adapters, order)
    assert got == {pair: expected[pair] for pair in got}
    assert llm.engine.lora.num_loads > len(adapters)
    assert all(users == 0 for users in llm.engine.lora.users)
    # Each prompt's blocks are reused by its second run with the same adapter, never by another
    # adapter's (the tokens above would differ from PEFT's).
    assert llm.engine.kv.stats.hits > 0


def _edit(src: LoRARequest, dst: Path, fn) -> LoRARequest:
    """A copy of an adapter with its tensors changed by fn(name, tensor)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((Path(src.lora_path) / "adapter_config.json").read_text())
    tensors = load_file(Path(src.lora_path) / "adapter_model.safetensors")
    save_file({k: fn(k, v).contiguous() for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return LoRARequest(dst.name, 99, str(dst))


def test_errors(artifact, adapters, expected, tmp_path):
    art = artifact("llama", max_lora_rank=16)
    p = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    base = LLM(art)  # compiled with LoRA, served without: the base model
    assert base.generate({"prompt_token_ids": PROMPTS[0]}, p, use_tqdm=False)[0].outputs[0].token_ids == \
        expected[None, 0]
    with pytest.raises(ValueError, match="enable_lora=True"):
        base.generate({"prompt_token_ids": PROMPTS[0]}, p, lora_request=adapters["r4"], use_tqdm=False)
    with pytest.raises(ValueError, match="compiled without LoRA"):
        LLM(artifact("llama"), enable_lora=True)
    with pytest.raises(ValueError, match="ranks up to 16"):
        LLM(art, enable_lora=True, max_lora_rank=32)
    llm = LLM(art, enable_lora=True, max_loras=2, max_lora_rank=8)
    with pytest.raises(ValueError, match="rank 16, above max_lora_rank=8"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, p, lora_request=adapters["r16-mlp"], use_tqdm=False)
    narrow = tmp_path / "narrow"
    bad = _edit(adapters["r4"], narrow, lambda k, v: v[:, :-1] if "lora_A" in k else v)
    with pytest.raises(ValueError, match="another hidden size"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, p, lora_request=bad, use_tqdm=False)
    qv = LLM(artifact("llama", max_lora_rank=8, lora_targets=["q_proj", "v_proj"]), enable_lora=True, max_lora_rank=8)
    with pytest.raises(ValueError, match="not compiled with LoRA for.*q_proj, v_proj"):
        qv.generate({"prompt_token_ids": PROMPTS[0]}, p, lora_request=adapters["r4"], use_tqdm=False)
    got = qv.generate({"prompt_token_ids": PROMPTS[0]}, p, lora_request=adapters["r8-qv"], use_tqdm=False)
    assert got[0].outputs[0].token_ids == expected["r8-qv", 0]
    with pytest.raises(ValueError, match="lora_requests for"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, p, lora_request=[None], use_tqdm=False)


def test_slots_evict_least_recent_idle_adapter_in_place(artifact, adapters):
    llm = LLM(artifact("llama", max_lora_rank=16), enable_lora=True, max_loras=2, max_lora_rank=16)
    slots = llm.engine.lora
    ptrs = {n: t.data_ptr() for n, t in slots.stacks.items()}
    for a in adapters.values():
        slots.register(a)
    r1, r2, r3, r1b = (Request(str(i), [1], SamplingParams(), adapter_id=a) for i, a in enumerate((1, 2, 3, 1)))
    assert slots.admit(r1) and slots.admit(r2) and slots.admit(r1b) and not slots.admit(r3)  # both slots in use
    slots.release(r1)
    assert not slots.admit(r3)  # adapter 1 still runs r1b
    slots.release(r2)
    assert slots.admit(r3) and r3.lora_slot == 1 and slots.held == [1, 3]
    assert {n: t.data_ptr() for n, t in slots.stacks.items()} == ptrs  # filled in place: CUDA graphs stay valid
    with pytest.raises(ValueError, match="needs another id"):
        slots.register(LoRARequest("other", 1, adapters["r8-qv"].lora_path))


def test_quantized_base(checkpoint, adapters, tmp_path):
    """int8 weights: each lora adds its update to a quantized_linear's result; --verify runs random
    adapters through the passes after lora; adapters change the tokens."""
    art = kiln.compile(checkpoint("llama"), tmp_path / "int8", quantize="int8", max_lora_rank=16, verify_passes=True)
    graph = json.loads((art / "graph.json").read_text())
    ops = [n.get("op") for n in graph["nodes"]]
    assert ops.count("lora") == 8 and "quantized_linear" in ops
    llm = LLM(art, enable_lora=True, max_loras=4, max_lora_rank=16)
    got = _run(llm, adapters, [None, *adapters])
    assert all(got[name, 0] != got[None, 0] for name in adapters)
