"""``pysteer locate``: rank heads by how well they predict answer consistency across paraphrases."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "locate heads whose output predicts consistent answers across paraphrases (probe per head)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data", help="paraphrase facts, JSON lines (default: the shipped capitals/languages/currencies)"
    )
    p.add_argument("--relations", nargs="+", help="only these relations (e.g. capital currency)")
    p.add_argument("--max-facts", type=int, help="at most this many facts per relation (seeded sample)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap questions in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="share of the development facts held out as validation (probe accuracy, choosing K and alpha)",
    )
    p.add_argument(
        "--test-split",
        type=float,
        default=0.3,
        help="share of each relation's facts set aside as the test split, never seen by locate (0: none)",
    )
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=8, help="heads to list (and outline in the heatmap)")
    p.add_argument(
        "--out", default="located.safetensors", help="where to write the result (for `pysteer edit`)"
    )
    p.add_argument("--png", help="heatmap PNG (default: next to --out)")
    p.add_argument("--json-out", help="also write a JSON summary here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def select_facts(facts, relations, max_facts, seed):
    """Facts of the chosen relations, at most ``max_facts`` per relation (seeded, order kept)."""
    import torch

    if relations:
        unknown = sorted(set(relations) - {f.relation for f in facts})
        if unknown:
            raise ValueError(f"no facts with relation(s) {unknown}")
        facts = [f for f in facts if f.relation in relations]
    if max_facts is None:
        return facts
    if max_facts < 2:
        raise ValueError("--max-facts must be >= 2")
    g = torch.Generator().manual_seed(seed)
    keep = set()
    for rel in dict.fromkeys(f.relation for f in facts):
        idx = [i for i, f in enumerate(facts) if f.relation == rel]
        perm = torch.randperm(len(idx), generator=g).tolist()[:max_facts]
        keep.update(idx[i] for i in perm)
    return [f for i, f in enumerate(facts) if i in keep]


def run(args) -> int:
    from pathlib import Path

    from pysteer.default_model import load_model
    from pysteer.recipes.locate import draw_accuracy, load_paraphrases, locate_heads
    from pysteer.recipes.selection import split_test_facts

    try:
        facts = select_facts(load_paraphrases(args.data), args.relations, args.max_facts, args.seed)
        test = []
        if args.test_split:
            facts, test = split_test_facts(facts, args.test_split, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    print(
        f"{len(facts)} facts, {sum(len(f.prompts) for f in facts)} prompts; answering greedily ...",
        file=sys.stderr,
    )
    try:
        result = locate_heads(
            model,
            tok,
            facts,
            chat=not args.no_chat,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            test_fraction=args.test_fraction,
            seed=args.seed,
            probe_steps=args.probe_steps,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.metadata["test_facts"] = [{"relation": f.relation, "subject": f.subject} for f in test]
    result.metadata["test_split"] = {"fraction": args.test_split, "seed": args.seed, "n_facts": len(test)}
    out = result.save(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    draw_accuracy(result, png, k=args.top)
    top = result.top(min(args.top, result.accuracy.numel()))
    summary = {
        "model": args.model,
        "n_facts": len(facts),
        "n_test_facts": len(test),
        "baseline": result.metadata.get("baseline"),
        "train_pairs": result.metadata["train_pairs"],
        "heldout_pairs": result.metadata["heldout_pairs"],
        "top_heads": [
            {"layer": la, "head": h, "heldout_accuracy": round(float(result.accuracy[la, h]), 4)}
            for la, h in top
        ],
        "mean_heldout_accuracy": float(result.accuracy.mean()),
        "out": str(out),
        "png": str(png),
    }
    base = summary["baseline"] or {}
    if base:
        b = base["all"]
        print(
            f"unsteered: consistency {b['consistency']:.3f}, accuracy {b['accuracy']:.3f} over {b['n_pairs']} pairs"
        )
    print("top heads (layer, head, balanced held-out accuracy):")
    for t in summary["top_heads"]:
        print(f"  L{t['layer']:<3d} H{t['head']:<3d} {t['heldout_accuracy']:.3f}")
    print(f"wrote {out} and {png}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0
