"""``pysteer edit``: inject ITI biases on the located heads; optionally measure consistency before/after."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "write the consistency edit (ITI biases on the top-K located heads) and evaluate it on held-out facts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--located", required=True, help="result of `pysteer locate --out`")
    p.add_argument("--k", type=int, default=8, help="heads to edit")
    p.add_argument("--alpha", type=float, default=5.0, help="strength in units of each head's sigma")
    p.add_argument("--positions", default="all", choices=["all", "generated"])
    p.add_argument("--out", default="consistency-edit.safetensors", help="steering file to write")
    p.add_argument(
        "--evaluate", action="store_true", help="measure consistency and accuracy on the held-out facts"
    )
    p.add_argument("--sweep-k", type=int, nargs="+", help="evaluate these K values (with --sweep-alpha)")
    p.add_argument("--sweep-alpha", type=float, nargs="+", help="evaluate these alpha values")
    p.add_argument(
        "--model", default="default", help="model for --evaluate / sweeps (default SmolLM2-135M-Instruct)"
    )
    p.add_argument("--data", help="the paraphrase file given to `pysteer locate` (default: the shipped one)")
    p.add_argument("--max-new-tokens", type=int, help="default: what locate used")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--png", help="sweep heatmap PNG (consistency per K and alpha)")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from pysteer.recipes.locate import LocateResult, consistency_edit, edit_spec

    try:
        located = LocateResult.load(args.located)
        path = consistency_edit(located, args.out, k=args.k, alpha=args.alpha, positions=args.positions)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: HeadBias on {args.k} heads {located.top(args.k)}, alpha {args.alpha:g}, positions {args.positions}"
    )
    summary: dict = {
        "steering_file": str(path),
        "k": args.k,
        "alpha": args.alpha,
        "positions": args.positions,
    }
    sweep = bool(args.sweep_k or args.sweep_alpha)
    if not (args.evaluate or sweep):
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(summary, indent=2))
        return 0

    import torch

    from pysteer.default_model import load_model
    from pysteer.recipes._common import heatmap_png
    from pysteer.recipes.locate import evaluate_consistency, heldout_facts, load_paraphrases, recorded_facts

    try:
        facts = recorded_facts(located, load_paraphrases(args.data))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held = heldout_facts(located, facts)
    chat = bool(located.metadata.get("chat", True))
    mnt = args.max_new_tokens or int(located.metadata.get("max_new_tokens", 12))
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    ev = lambda spec: evaluate_consistency(
        model, tok, held, spec, chat=chat, max_new_tokens=mnt, batch_size=args.batch_size
    )
    print(
        f"evaluating on {len(held)} held-out facts ({sum(len(f.prompts) for f in held)} prompts) ...",
        file=sys.stderr,
    )
    recorded = (located.metadata.get("baseline") or {}).get("heldout")
    if recorded is not None and args.max_new_tokens in (None, located.metadata.get("max_new_tokens")):
        before = recorded  # locate answered the same prompts with the same settings: reuse, no rerun
    else:
        before = ev(None)
    summary["heldout_facts"] = len(held)
    summary["before"] = before
    print(f"unsteered: consistency {before['consistency']:.3f}  accuracy {before['accuracy']:.3f}")
    ks = args.sweep_k or [args.k]
    alphas = args.sweep_alpha or [args.alpha]
    rows = []
    for k in ks:
        for alpha in alphas:
            m = ev(edit_spec(located, k, alpha, args.positions))
            rows.append({"k": k, "alpha": alpha, **m})
            print(
                f"K={k:<3d} alpha={alpha:<6g} consistency {m['consistency']:.3f}  accuracy {m['accuracy']:.3f}  "
                f"answered {m['answered']:.3f}",
                flush=True,
            )
    summary["after"] = rows
    if sweep and args.png:
        grid = torch.tensor(
            [
                [next(r["consistency"] for r in rows if r["k"] == k and r["alpha"] == a) for a in alphas]
                for k in ks
            ]
        )
        heatmap_png(
            grid - before["consistency"],
            args.png,
            title="held-out consistency change vs unsteered",
            xlabel="alpha",
            ylabel="K (heads)",
            xticklabels=[f"{a:g}" for a in alphas],
            yticklabels=[str(k) for k in ks],
            center=True,
        )
        summary["png"] = args.png
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0
