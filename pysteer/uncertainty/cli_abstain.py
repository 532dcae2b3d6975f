"""``pysteer abstain``: abstention fine-tuning from semantic entropy (LoRA and a LoReFT steering edit)
against the base model, the SE gate and the SEP gate, on the shipped question set; writes a JSON
summary and the accuracy-vs-engagement PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "abstention fine-tuning from semantic entropy (LoRA, LoReFT) vs SE / SEP gates: accuracy, abstention, AED"
)

# --quick: a few questions, samples and steps; checks the plumbing end to end, not the figures
QUICK = {"per_split": [6, 4, 4], "samples": 3, "steps": 2, "max_new_tokens": 4, "thresholds": [0.5, 1.0]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .abstain import METHODS, PAPER_THRESHOLDS
    from .cli import add_question_arguments, add_run_arguments

    add_question_arguments(p, "sampled answers per question for SE")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=list(PAPER_THRESHOLDS),
        help="SE thresholds tried (default: the paper's 0.25 ... 2.25)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps per threshold")
    p.add_argument("--lr", type=float, default=2e-3, help="LoReFT learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8, help="training batch")
    p.add_argument("--gen-batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--reft-layers", type=int, nargs="+", help="LoReFT layers (default: middle and 2/3 depth)")
    p.add_argument("--min-layers", type=int, default=5, help="narrowest SEP probe layer range")
    p.add_argument("--no-chat", action="store_true", help="plain prompt even with a chat template")
    p.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    p.add_argument("--out", required=True, help="JSON path; the PNG goes beside it")
    add_run_arguments(p)


def run(args) -> int:
    import os
    import time

    import torch

    from pysteer.default_model import load_model
    from pysteer.uncertainty.abstain import AbstainConfig, abstain_study, engagement_png
    from pysteer.uncertainty.cli import _subset
    from pysteer.uncertainty.entailment import make_entailment
    from pysteer.uncertainty.questions import load_questions

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.per_split is not None and min(args.per_split) < 1:
        raise ValueError(f"--per-split {args.per_split}: every split needs at least one question")
    config = AbstainConfig(
        n_samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        strict=args.strict,
        thresholds=tuple(args.thresholds),
        methods=tuple(args.methods),
        steps=args.steps,
        lr=args.lr,
        lora_lr=args.lora_lr,
        batch_size=args.batch_size,
        gen_batch_size=args.gen_batch_size,
        reft_layers=tuple(args.reft_layers) if args.reft_layers else None,
        min_layers=args.min_layers,
        chat=not args.no_chat,
        seed=args.seed,
    )
    config.check()  # before the model loads
    questions = _subset(load_questions(args.questions), args.per_split)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    entailment = make_entailment(args.entailment, model, tok)
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    result = abstain_study(model, tok, questions, entailment, config, log=lambda s: print(s, flush=True))
    result = {
        "model": args.model,
        "entailment_spec": args.entailment,
        "per_split": args.per_split,
        "quick": bool(args.quick),
        "threads": torch.get_num_threads(),
        "wall_seconds_excluding_model_load": time.perf_counter() - t0,
        "loadavg_start_end": [load_start, list(os.getloadavg())],
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["png"] = str(engagement_png(result, out.with_suffix(".png")))
    out.write_text(json.dumps(result, indent=1))
    _print_summary(result)
    print(f"wrote {out}")
    return 0


def _print_summary(result: dict) -> None:
    print(
        f"{'method':10s} {'acc(ans)':>8s} {'abstain':>8s} {'AED':>6s} {'s/q':>7s} {'tok/q':>7s}   (test split)"
    )
    for name, m in result["test"].items():
        acc = "n/a" if m["accuracy_answered"] is None else f"{m['accuracy_answered']:.3f}"
        print(
            f"{name:10s} {acc:>8s} {m['abstention_rate']:8.3f} {m['aed']:6.3f} "
            f"{m['seconds_per_question']:7.2f} {m['forward_tokens_per_question']:7.1f}"
        )
