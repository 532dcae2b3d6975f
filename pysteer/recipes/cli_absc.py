"""``pysteer absc``: aspect-sentiment classification by model editing (trace the layers, train LoReFT
at the aspect token, compare with zero-shot, last-token LoReFT and LoRA)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "aspect-based sentiment by model editing: causal-trace layers, LoReFT at the aspect token, baselines"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--domain", default="restaurant", choices=("restaurant", "laptop"), help="training domain")
    p.add_argument(
        "--cross", nargs="*", help="other domains whose test split is also scored (default: the other one)"
    )
    p.add_argument("--methods", nargs="+", default=["zero_shot", "loreft_aspect", "loreft_last", "lora"])
    p.add_argument("--ranking", type=int, nargs="+", help="layers best first (skips the causal tracing)")
    p.add_argument("--trace-examples", type=int, default=4)
    p.add_argument("--trace-samples", type=int, default=3)
    p.add_argument(
        "--n-layers", type=int, nargs="+", default=[2, 4], help="numbers of top traced layers tried"
    )
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 2e-2], help="LoReFT learning rates tried")
    p.add_argument(
        "--lora-lrs", type=float, nargs="+", default=[1e-3, 5e-3], help="LoRA learning rates tried"
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--checkpoints", type=int, nargs="+", help="steps scored on validation (default: steps/2, steps)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument(
        "--max-examples", type=int, help="use only the first N examples of each split (smoke runs)"
    )
    p.add_argument(
        "--no-chat", action="store_true", help="plain prompt even when the tokenizer has a chat template"
    )
    p.add_argument(
        "--no-answer-start",
        action="store_true",
        help="end the prompt at the question (default: append the answer's start, so the label word is next)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="steering file of the chosen aspect-token LoReFT edit")
    p.add_argument("--png", help="causal-trace heatmap PNG (per-layer effects go to *_layers.png)")
    p.add_argument("--json-out", help="write every number here")
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    import torch

    from pysteer.default_model import load_model
    from pysteer.recipes.absc import DOMAINS, absc_edit, load_absc

    if args.threads:
        torch.set_num_threads(args.threads)
    cross = [d for d in DOMAINS if d != args.domain] if args.cross is None else list(args.cross)
    try:
        data = {}
        for d in {args.domain, *cross}:
            exs = load_absc(d)
            if args.max_examples:
                exs = [
                    e
                    for s in ("train", "validation", "test")
                    for e in [x for x in exs if x.split == s][: args.max_examples]
                ]
            data[d] = exs
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    r = absc_edit(
        model,
        tok,
        args.domain,
        cross_domains=cross,
        data=data,
        chat=not args.no_chat,
        answer=not args.no_answer_start,
        trace_examples=args.trace_examples,
        trace_samples=args.trace_samples,
        n_layers=args.n_layers,
        lrs=args.lrs,
        lora_lrs=args.lora_lrs,
        steps=args.steps,
        checkpoints=args.checkpoints,
        batch_size=args.batch_size,
        rank=args.rank,
        methods=args.methods,
        ranking=args.ranking,
        seed=args.seed,
        backend=args.backend,
        png=args.png,
        log=lambda s: print(s, flush=True),
    )
    print(f"{'method':15s} {'eval':11s} {'acc':>6s} {'macro-F1':>8s} {'params':>8s}")
    for row in r.table():
        print(
            f"{row['method']:15s} {row['eval']:11s} {row['accuracy']:6.3f} {row['macro_f1']:8.3f} {row['trained_params']:8d}"
        )
    summary = {"model": args.model, **r.to_json()}
    if args.out and r.interventions:
        summary["steering_file"] = str(r.save(args.out))
        print(f"wrote {args.out}")
    if args.png and "results" in r.trace:
        summary["png"] = args.png
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json_out}")
    return 0
