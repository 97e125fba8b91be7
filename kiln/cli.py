"""Command line: `compile-model`, `kiln inspect`, `kiln generate`, `kiln chat`, `kiln serve` (and `kiln compile`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from kiln.codegen.targets import MODEL_DTYPES, TARGETS
from kiln.codegen.tune import add_arguments as tune_arguments
from kiln.errors import KilnError


def _add_compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer) "
                   "or a GGUF file")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--target", default="reference", choices=TARGETS)
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--passes", default=None,
                   help="comma list replacing the target's pipeline, or +name/-name edits of it")
    p.add_argument("--dump-ir", default=None, metavar="DIR", help="write the IR after each pass into DIR")
    p.add_argument("--verify", action="store_true",
                   help="run every pass's output against its input on random inputs; fail on a mismatch")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--quantize", default=None, metavar="{int8,fp8,int4}",
                   help="quantize the linear layers: int8 (W8A8, per-channel weights, per-token activations), "
                   "fp8 (float8_e4m3fn weights and activations), int4 (weight-only, groups of 128); "
                   "the LM head and embeddings stay in --dtype")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text for int4's activation-aware scales (AWQ); without it int4 rounds to nearest")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too (by default it stays in --dtype)")
    p.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                   help="serve LoRA adapters of rank <= R (PEFT format, loaded at run time into slots)")
    p.add_argument("--lora-targets", default=None, metavar="M,M,...",
                   help="modules LoRA adapters may target (default: q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj); needs --max-lora-rank")


def _compile(args: argparse.Namespace) -> int:
    import kiln

    out = kiln.compile(args.model_dir, args.output, target=args.target, dtype=args.dtype, passes=args.passes,
                       dump_ir=args.dump_ir, verify_passes=args.verify, overwrite=args.force,
                       quantize=args.quantize, calibration=args.calibration,
                       quantize_lm_head=args.quantize_lm_head, max_lora_rank=args.max_lora_rank,
                       lora_targets=args.lora_targets.split(",") if args.lora_targets else None)
    print(f"wrote {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kiln.runtime.inspect import describe

    text, ok = describe(args.artifact, verify=args.verify)
    print(text)
    return 0 if ok else 1


def _tune(args: argparse.Namespace) -> int:
    from kiln.codegen.tune import main_text

    print(main_text(args.artifact, budget=args.budget, kernels=args.kernels))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
        stop=args.stop or None, ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.artifact, **({"num_kv_blocks": args.num_kv_blocks} if args.num_kv_blocks else {}),
              **_engine_kwargs(args))
    if args.echo:
        sys.stdout.write(args.prompt)
    finish = None
    for out in llm.generate_stream(args.prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
        finish = out.outputs[0].finish_reason
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[finish_reason={finish}]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from kiln.chat import run_chat
    from kiln.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    engine_kwargs = {"max_num_seqs": 4, "kv_cache_memory_bytes": args.kv_cache_memory_bytes, **_engine_kwargs(args)}
    return run_chat(args.artifact, message=args.message, system=args.system, params=params, **engine_kwargs)


def _serve(args: argparse.Namespace) -> int:
    from kiln.runtime.server.launch import serve
    from kiln.runtime.server.lora import parse_lora_module

    lora_modules = [parse_lora_module(v) for v in args.lora_modules or ()]
    engine_kwargs = {
        k: getattr(args, k)
        for k in ("max_num_batched_tokens", "max_num_seqs", "block_size", "num_kv_blocks", "kv_cache_memory_bytes",
                  "max_loras", "max_lora_rank")
        if getattr(args, k) is not None
    } | _engine_kwargs(args)
    if args.enable_lora or lora_modules:
        engine_kwargs["enable_lora"] = True
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    return serve(args.artifact, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("KILN_API_KEY"),
                 served_model_name=args.served_model_name, max_waiting=args.max_waiting,
                 shutdown_timeout=args.shutdown_timeout, log_level="debug" if args.verbose else "info",
                 engine_kwargs=engine_kwargs, max_request_bytes=args.max_request_bytes, enable_docs=args.enable_docs,
                 lora_modules=lora_modules)


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return fn(args)
    except (KilnError, ValueError, FileExistsError, FileNotFoundError) as e:
        if args.debug or os.environ.get("KILN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact's content hashes while loading (faster, trusts the files)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Options every command that runs an artifact takes (besides its own)."""
    _no_verify(p)
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: the GPU for a cuda-target artifact when there is one, else cpu)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step runs eagerly")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: the cores this process may use; a cpu-target artifact gives "
                   "them to its TVM kernels and one to torch)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """Engine keyword arguments from _engine_args' options (only those given)."""
    kw: dict = {}
    if args.no_verify:
        kw["verify"] = False
    if args.device is not None:
        kw["device"] = args.device
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.threads is not None:
        kw["threads"] = args.threads
    return kw


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def compile_model_main(argv: Sequence[str] | None = None) -> int:
    """`compile-model MODEL_DIR -o OUT ...`"""
    p = argparse.ArgumentParser(prog="compile-model", description="Compile a Hugging Face checkpoint into a kiln artifact.")
    _add_compile_args(p)
    _common(p)
    return _run(_compile, p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """`kiln SUBCOMMAND ...`"""
    p = argparse.ArgumentParser(prog="kiln", description="kiln: compile and run LLM artifacts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a checkpoint (same as compile-model)")
    _add_compile_args(c)
    _common(c)
    c.set_defaults(fn=_compile)
    i = sub.add_parser("inspect", help="summarize an artifact")
    i.add_argument("artifact")
    i.add_argument("--verify", action="store_true",
                   help="also check every file's content hash; exit 1 on a mismatch")
    _common(i)
    i.set_defaults(fn=_inspect)
    t = sub.add_parser("tune", help="fit an artifact's kernels to this machine (cpu: search schedules; cuda: build on this GPU)")
    tune_arguments(t)
    _common(t)
    t.set_defaults(fn=_tune)
    g = sub.add_parser("generate", help="complete a prompt with an artifact, streaming to the terminal")
    g.add_argument("artifact")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    _engine_args(g)
    _common(g)
    g.set_defaults(fn=_generate)
    ch = sub.add_parser("chat", help="chat with an artifact in the terminal (its chat template; /reset, /exit)")
    ch.add_argument("artifact")
    ch.add_argument("--message", default=None, help="answer this one message and exit")
    ch.add_argument("--system", default=None, help="a system message (default: the template's own, if any)")
    ch.add_argument("--max-tokens", type=int, default=256, help="longest answer, in tokens")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20, help="KV cache size in bytes")
    _engine_args(ch)
    _common(ch)
    ch.set_defaults(fn=_chat)
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $KILN_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the artifact directory's name)")
    s.add_argument("--max-waiting", type=int, default=1024,
                   help="requests that may wait beyond the running batch; more get 503")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    s.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted (default 4 MiB); larger ones get 413")
    s.add_argument("--enable-docs", action="store_true",
                   help="serve /docs and /redoc (their pages load Swagger UI / ReDoc from a CDN)")
    s.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    s.add_argument("--max-num-seqs", type=int, default=None, help="sequences in the running batch")
    s.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    s.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache size in bytes")
    s.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (an artifact compiled with --max-lora-rank); implied by --lora-modules")
    s.add_argument("--max-loras", type=int, default=None, metavar="N", help="adapter slots: adapters in one batch")
    s.add_argument("--max-lora-rank", type=int, default=None, metavar="R", help="the highest adapter rank served")
    s.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="PEFT adapters to serve, each chosen by the request's model field: name=path or "
                   "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    _engine_args(s)
    _common(s)
    s.set_defaults(fn=_serve)
    args = p.parse_args(argv)
    return _run(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
