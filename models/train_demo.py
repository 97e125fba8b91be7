"""Train kiln's bundled demo model: a small Llama that writes Python, on CPU, in under an hour.

    python -m kiln.models.train_demo --out models/demo --minutes 40 --seed 0

The corpus is this interpreter's standard library (:mod:`kiln.models.demo_data`). Given ``--seed``
and ``--steps`` the run is deterministic on a given machine (fixed file order, seeded init and
batch offsets). Without ``--steps`` the step count is derived from ``--minutes`` by timing the
first steps, which all fall inside the linear warm-up, so the run equals the one with the
printed ``--steps``; the model card records that command. Writes the checkpoint (safetensors,
config, generation config, tokenizer) and ``README.md`` (the model card) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from . import demo_data

TIMED_STEPS = (5, 30)  # steps [5, 30) time the per-step cost when --steps is not given
CARD_PROMPTS = ("def fibonacci(n):", "class Stack:\n", "import os\n\n\ndef ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kiln.models.train_demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    p.add_argument("--minutes", type=float, default=40.0, help="training-time budget")
    p.add_argument("--steps", type=int, default=0, help="schedule length (0: fit --minutes)")
    p.add_argument("--stop-step", type=int, default=0, help="stop early at this step (0: --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch and tokenizer threads")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for matmuls (weights stay float32)")
    p.add_argument("--eval-windows", type=int, default=256, help="fixed windows per split")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.warmup < TIMED_STEPS[1]:
        raise ValueError(
            f"--warmup must be >= {TIMED_STEPS[1]} so the timed steps are schedule-free"
        )
    return args


def build_model(args: argparse.Namespace, vocab_size: int, tok) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.context,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)  # float32 weights, sdpa attention


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``--lr``, then cosine down to ``--lr * --min-lr-ratio`` at ``total``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` ``[n, T]``, in float32."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk).logits[:, :-1].float()  # [B, T-1, V]
        targets = chunk[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    model.train()
    return total / count


def greedy(model: LlamaForCausalLM, tok, prompt: str, new_tokens: int = 96) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def train(args: argparse.Namespace) -> dict:
    """Run the whole pipeline; returns the numbers the model card reports."""
    torch.set_num_threads(args.threads)
    t_start = time.time()
    corpus = demo_data.load_corpus()
    tok = demo_data.train_tokenizer(corpus.train_texts, args.vocab)
    train_ids = demo_data.encode_stream(tok, corpus.train_texts)
    val_ids = demo_data.encode_stream(tok, corpus.val_texts)
    print(f"corpus: {len(corpus.train_paths)} train files ({corpus.train_bytes / 1e6:.2f} MB, "
          f"{len(train_ids):,} tokens), {len(corpus.val_paths)} val files "
          f"({len(val_ids):,} tokens); tokenizer {len(tok)} ids; "
          f"{time.time() - t_start:.0f}s", flush=True)

    model = build_model(args, len(tok), tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=False)
    gen = torch.Generator().manual_seed(args.seed)
    val_windows = demo_data.fixed_windows(val_ids, args.eval_windows, args.context)
    train_windows = demo_data.fixed_windows(train_ids, args.eval_windows, args.context)

    total = args.steps or 10**9
    stop = min(args.stop_step or total, total)
    budget_s = args.minutes * 60
    history: list[tuple[int, float]] = []
    bar = tqdm(total=None if not args.steps else stop, unit="step", disable=not sys.stderr.isatty())
    t_train = time.time()
    t_timed = smoothed = None
    step, eval_s = 0, 0.0  # eval time is not charged to the training budget
    model.train()
    while step < stop:
        if step == TIMED_STEPS[0]:
            t_timed = time.time()
        if step == TIMED_STEPS[1] and not args.steps:
            per_step = (time.time() - t_timed) / (TIMED_STEPS[1] - TIMED_STEPS[0])
            # plan for 95% of the budget: the other 5% absorbs a slower machine later on
            total = stop = step + int((0.95 * budget_s - (time.time() - t_train)) / per_step)
            bar.reset(total=total)
            bar.update(step)
            print(f"{per_step:.2f}s/step -> --steps {total}", flush=True)
        if time.time() - t_train - eval_s > budget_s:
            print(f"time budget reached at step {step} of {total}", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        batch = demo_data.random_batch(train_ids, args.batch, args.context, gen)  # [B, T]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.log_every == 0 or step == stop:
            elapsed = time.time() - t_train - eval_s
            tok_s = step * args.batch * args.context / elapsed
            eta = f"{elapsed / step * (stop - step) / 60:.1f}m" if total < 10**9 else "?"
            line = (f"step {step}/{stop if total < 10**9 else '?'} loss {smoothed:.3f} "
                    f"lr {lr_at(step - 1, total, args):.2e} {tok_s:,.0f} tok/s "
                    f"elapsed {elapsed / 60:.1f}m ETA {eta}")
            bar.set_postfix_str(f"loss {smoothed:.3f} {tok_s:,.0f} tok/s")
            if bar.disable:
                print(line, flush=True)
            else:
                bar.write(line)
        if step % args.eval_every == 0 and step < stop:
            t_eval = time.time()
            history.append((step, mean_loss(model, val_windows, args.batch)))
            eval_s += time.time() - t_eval
            print(f"step {step}: val loss {history[-1][1]:.3f}", flush=True)
    bar.close()
    train_minutes = (time.time() - t_train - eval_s) / 60
    model.eval()
    result = {
        "args": args, "corpus": corpus, "tok": tok, "model": model, "n_params": n_params,
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "steps": step, "total": total,
        "train_minutes": train_minutes, "history": history,
        "train_loss": mean_loss(model, train_windows, args.batch),
        "val_loss": mean_loss(model, val_windows, args.batch),
        "unigram": demo_data.unigram_cross_entropy(train_ids, val_ids, len(tok)),
        "samples": [(p, greedy(model, tok, p)) for p in CARD_PROMPTS],
    }
    result["history"].append((step, result["val_loss"]))
    result["wall_minutes"] = (time.time() - t_start) / 60
    return result


def save(result: dict) -> None:
    args, model, tok = result["args"], result["model"], result["tok"]
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128,
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tok.model_max_length = args.context
    tok.save_pretrained(args.out)
    (args.out / "README.md").write_text(demo_data.render_card(result, reproduce_command(result)))


def reproduce_command(result: dict) -> str:
    args = result["args"]
    parts = ["python -m kiln.models.train_demo", "--out models/demo", f"--seed {args.seed}",
             f"--steps {result['total']}", f"--minutes {args.minutes:g}",
             f"--threads {args.threads}"]
    if result["steps"] < result["total"]:
        parts.append(f"--stop-step {result['steps']}")
    defaults = vars(parse_args([]))
    for key in ("batch", "context", "vocab", "hidden", "layers", "heads", "kv_heads",
                "intermediate", "lr", "min_lr_ratio", "warmup", "weight_decay", "bf16",
                "eval_windows"):
        if getattr(args, key) != defaults[key]:
            flag = "--" + key.replace("_", "-")
            value = getattr(args, key)
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            else:
                parts.append(f"{flag} {value}")
    return " ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizers thread pool
    result = train(args)
    result["invocation"] = " ".join(["python -m kiln.models.train_demo", *(argv or sys.argv[1:])])
    result["machine"] = f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}"
    save(result)
    print(f"train loss {result['train_loss']:.3f}  val loss {result['val_loss']:.3f}  "
          f"unigram baseline {result['unigram']:.3f} nats/token; wrote {args.out}", flush=True)
    for prompt, text in result["samples"]:
        print(f"--- {prompt!r}\n{text}")


if __name__ == "__main__":
    main()
