"""``pysteer generate``: generate from a local model with a saved steering file."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "generate from a local HF model (or the embedded default) with a steering file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="local Hugging Face model directory, or 'default'")
    p.add_argument("--steer", metavar="FILE", help="steering file written by pysteer.save (safetensors)")
    p.add_argument("--config", help="which config of the file to use (default: its first)")
    p.add_argument("--alpha", type=float, help="override the strength of every intervention that has one")
    p.add_argument(
        "--positions",
        help="all | prompt | generated | last_prompt | last_prompt+generated (default: the file's)",
    )
    p.add_argument("--mode", default="auto", choices=["auto", "fold", "dynamic"])
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one batch row each)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None)
    p.add_argument(
        "--no-compile", action="store_true", help="use Hugging Face generate() instead of the fast path"
    )
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)


def run(args) -> int:
    import torch

    import pysteer
    from pysteer.default_model import load_model
    from pysteer.interventions import finite_number

    # Everything the command line names is checked before the model loads (seconds).
    empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.alpha is not None:
        finite_number(args.alpha, "--alpha")
    spec = None
    if args.steer:
        spec = pysteer.load(args.steer)
        if args.config:
            if args.config not in spec.configs:
                raise ValueError(f"{args.steer} has no config {args.config!r} (it has {list(spec.configs)})")
            spec.configs = {args.config: spec.configs[args.config]}
        else:
            first = next(iter(spec.configs))
            spec.configs = {first: spec.configs[first]}
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    handle = None
    if spec is not None:
        handle = pysteer.steer(model, spec, positions=args.positions, mode=args.mode, backend=args.backend)
        if args.alpha is not None:
            handle.set_alpha(args.alpha)
        print(f"steering: {handle}", file=sys.stderr)
    texts = args.prompt
    if not args.no_chat and getattr(tok, "chat_template", None):
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in texts
        ]
    if args.no_compile:
        batch = tok(texts, return_tensors="pt", padding=True).to(model.device)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_p=args.top_p,
                pad_token_id=tok.pad_token_id,
            )
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1] :]
        outputs = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
        tps = int((new != tok.pad_token_id).sum()) / seconds
    else:
        res = pysteer.generate(
            model,
            texts,
            tokenizer=tok,
            steering=handle if handle is not None and handle.mode == "dynamic" else None,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        outputs, tps = [t.strip() for t in res.texts], res.tokens_per_second
    for prompt, text in zip(args.prompt, outputs):
        print(f"=== {prompt}\n{text}")
    print(f"tokens/s: {tps:.1f}", file=sys.stderr)
    if handle is not None:
        handle.remove()
    return 0
