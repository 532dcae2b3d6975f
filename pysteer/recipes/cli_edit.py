"""``pysteer edit``: inject ITI biases on the located heads; optionally measure consistency before/after."""

from __future__ import annotations

import argparse
import json
import sys

HELP = (
    "write the consistency edit (ITI biases on the top-K located heads); sweep K and alpha on validation "
    "facts, choose there and report on the test split"
)


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
    p.add_argument(
        "--choose",
        action="store_true",
        help="choose K and alpha from the sweep on the validation facts, write the file with them, and "
        "report them once on the test split (`pysteer locate --test-split`) with a bootstrap interval",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (of test facts)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--png", help="sweep heatmap PNG (consistency per K and alpha)")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from pysteer.recipes.locate import LocateResult, consistency_edit

    try:
        located = LocateResult.load(args.located)
        if args.choose and not (args.sweep_k or args.sweep_alpha):
            raise ValueError("--choose picks from a sweep: give --sweep-k and/or --sweep-alpha")
        if args.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary: dict = {"k": args.k, "alpha": args.alpha, "positions": args.positions}
    if args.evaluate or args.sweep_k or args.sweep_alpha:
        try:
            _evaluate(args, located, summary)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    k, alpha = summary["k"], summary["alpha"]
    try:
        path = consistency_edit(located, args.out, k=k, alpha=alpha, positions=args.positions)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary["steering_file"] = str(path)
    print(
        f"wrote {path}: HeadBias on {k} heads {located.top(k)}, alpha {alpha:g}, positions {args.positions}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def _evaluate(args, located, summary: dict) -> None:
    """Sweep (or evaluate one configuration) on the validation facts; with ``--choose``, pick K and alpha
    there and measure them on the test split. Fills ``summary`` in place."""
    from pysteer.default_model import load_model
    from pysteer.recipes.locate import (
        answer_facts,
        consistency_metrics,
        edit_spec,
        heldout_facts,
        load_paraphrases,
        recorded_facts,
        reserved_test_facts,
    )
    from pysteer.recipes.selection import validate_then_test

    dataset = load_paraphrases(args.data)
    held = heldout_facts(located, recorded_facts(located, dataset))
    # looked up before the model loads, so a result without a test split fails at once
    test = reserved_test_facts(located, dataset) if args.choose else []
    chat = bool(located.metadata.get("chat", True))
    mnt = args.max_new_tokens or int(located.metadata.get("max_new_tokens", 12))
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)

    def answers(facts, spec):
        return answer_facts(
            model, tok, facts, spec, chat=chat, max_new_tokens=mnt, batch_size=args.batch_size
        )

    print(
        f"evaluating on {len(held)} validation facts ({sum(len(f.prompts) for f in held)} prompts) ...",
        file=sys.stderr,
    )
    recorded = (located.metadata.get("baseline") or {}).get("heldout")
    if recorded is not None and args.max_new_tokens in (None, located.metadata.get("max_new_tokens")):
        before = recorded  # locate answered the same prompts with the same settings: reuse, no rerun
    else:
        before = consistency_metrics(held, answers(held, None))
    summary["validation_facts"] = len(held)
    summary["before"] = before
    print(f"unsteered: consistency {before['consistency']:.3f}  accuracy {before['accuracy']:.3f}")
    ks = args.sweep_k or [args.k]
    alphas = args.sweep_alpha or [args.alpha]
    configs = [{"k": k, "alpha": alpha} for k in ks for alpha in alphas]
    make_spec = lambda c: edit_spec(located, c["k"], c["alpha"], args.positions)
    if args.choose:
        out = validate_then_test(
            answers, make_spec, configs, held, test, before, n_resamples=args.bootstrap, seed=args.seed
        )
        rows = out["sweep"]
        summary.update(
            k=out["chosen"]["k"], alpha=out["chosen"]["alpha"], chosen=out["chosen"], test=out["test"]
        )
    else:
        rows = []
        for c in configs:
            m = consistency_metrics(held, answers(held, make_spec(c)))
            rows.append({**c, **m})
            print(
                f"K={c['k']} alpha={c['alpha']:g}: consistency {m['consistency']:.3f}  accuracy {m['accuracy']:.3f}"
            )
    summary["after"] = rows
    if args.png and len(rows) > 1:
        summary["png"] = _sweep_png(rows, ks, alphas, before, args.png)


def _sweep_png(rows, ks, alphas, before, png) -> str:
    import torch

    from pysteer.recipes._common import heatmap_png

    grid = torch.tensor(
        [
            [next(r["consistency"] for r in rows if r["k"] == k and r["alpha"] == a) for a in alphas]
            for k in ks
        ]
    )
    heatmap_png(
        grid - before["consistency"],
        png,
        title="validation consistency change vs unsteered",
        xlabel="alpha",
        ylabel="K (heads)",
        xticklabels=[f"{a:g}" for a in alphas],
        yticklabels=[str(k) for k in ks],
        center=True,
    )
    return str(png)
