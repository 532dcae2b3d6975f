"""``pysteer jola``: train HardConcrete-gated head edits, fold them into o_proj, save a steering file."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "train JoLA gated per-head scale+bias edits on a label-word task and save them (foldable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--data", help="JSON lines with text and label (default: the shipped topic task)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to edit (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.33)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--gate-lr", type=float, default=0.1)
    p.add_argument("--lambda-l0", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init-log-alpha", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="jola.safetensors", help="steering file to write")
    p.add_argument("--png", help="gate heatmap PNG (default: next to --out; a loss curve is drawn beside it)")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from pysteer.default_model import load_model
    from pysteer.recipes.jola_gates import evaluate_topics, fold_check, jola, load_topics, split_examples

    try:
        train, test = split_examples(load_topics(args.data), args.test_fraction, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    before = {"train": evaluate_topics(model, tok, train), "test": evaluate_topics(model, tok, test)}
    print(f"unedited: test accuracy {before['test']['accuracy']:.3f}, CE {before['test']['ce']:.3f}")
    out = Path(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    try:
        r = jola(
            model,
            tok,
            train,
            layers=args.layers,
            steps=args.steps,
            lr=args.lr,
            gate_lr=args.gate_lr,
            lambda_l0=args.lambda_l0,
            batch_size=args.batch_size,
            init_log_alpha=args.init_log_alpha,
            seed=args.seed,
            backend=args.backend,
            png=png,
            log_every=max(1, args.steps // 6),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    after = {"train": evaluate_topics(model, tok, train, r), "test": evaluate_topics(model, tok, test, r)}
    r.metrics = {"before": before, "after": after}
    check = fold_check(model, tok, r, test)
    print(
        f"JoLA: test accuracy {after['test']['accuracy']:.3f}, CE {after['test']['ce']:.3f}; "
        f"open gates {r.n_open()}/{r.n_gates()}"
    )
    print(
        f"folded vs hooked logits: max |diff| {check['max_abs_diff_fold']:.3g} "
        f"(max |logit| {check['max_abs_logit']:.3g}); dynamic vs hooked {check['max_abs_diff_dynamic']:.3g}"
    )
    summary = {
        "model": args.model,
        "n_train": len(train),
        "n_test": len(test),
        "before": before,
        "after": after,
        "open_gates": r.n_open(),
        "gates": r.n_gates(),
        "fold_check": check,
        "loss_first": r.history["loss"][0],
        "loss_last": r.history["loss"][-1],
        "ce_first": r.history["ce"][0],
        "ce_last": r.history["ce"][-1],
        "config": r.config,
        "png": str(png),
        "loss_png": str(png.with_name(png.stem + "_loss.png")),
    }
    try:
        summary["steering_file"] = str(r.save(out))
        print(f"wrote {out}")
    except ValueError as err:
        print(f"not saved: {err}", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0
