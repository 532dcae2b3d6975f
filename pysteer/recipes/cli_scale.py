"""``pysteer scale``: learn activation scalars (and the steering-vector / DynScalar baselines)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "learn activation scalars that flip target/competitor tokens (ActivScalar, SteerVec, DynScalar)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--method", default="scalar", choices=["scalar", "vector", "dynamic", "all"])
    p.add_argument(
        "--heads", action="store_true", help="per-head scalars at attn.heads instead of attn.out/mlp.out"
    )
    p.add_argument("--layers", type=int, nargs="+", help="layers to steer (default: all)")
    p.add_argument("--data", help="JSON lines with city, country, wrong (default: the shipped country task)")
    p.add_argument(
        "--templates", nargs="+", default=["plain", "novel"], help="prompt templates (plain, fact, novel)"
    )
    p.add_argument("--max-prompts", type=int, help="use at most this many prompts (seeded sample)")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--betas", default="both", choices=["both", "+1", "-1"], help="directions to train")
    p.add_argument(
        "--window", type=int, help="prompt positions with their own parameters (default: longest prompt)"
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--lr", type=float, help="Adam step (default per method: scalar/vector 0.05, dynamic 0.01)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--margin", type=float, default=2.0)
    p.add_argument("--lambda-f", type=float, default=1.0, help="faithfulness (KL) weight")
    p.add_argument("--lambda-m", type=float, default=1e-3, help="minimality (L1) weight")
    p.add_argument("--zero-tol", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="scaling", help="directory for steering files, parameters and PNGs")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    import torch

    from pysteer.default_model import load_model
    from pysteer.recipes.scaling import (
        activation_scaling,
        draw_history,
        evaluate_scaling,
        load_country_conflicts,
    )

    try:
        short = load_country_conflicts(args.data, templates=args.templates)
        long = load_country_conflicts(args.data, templates=args.templates, long=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(short), generator=g).tolist()
    if args.max_prompts:
        perm = perm[: args.max_prompts]
    n_test = max(1, round(args.test_fraction * len(perm)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    train = [short[i] for i in train_idx]
    test = [short[i] for i in test_idx]
    test_long = [long[i] for i in test_idx]
    betas = {"both": (1, -1), "+1": (1,), "-1": (-1,)}[args.betas]
    methods = ["scalar", "vector", "dynamic"] if args.method == "all" else [args.method]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "model": args.model,
        "n_train": len(train),
        "n_test": len(test),
        "templates": args.templates,
        "unsteered": {
            "test": evaluate_scaling(model, tok, None, test),
            "test_long": evaluate_scaling(model, tok, None, test_long),
        },
        "methods": {},
    }
    results = {}
    for method in methods:
        print(f"== {method}: training on {len(train)} prompts", file=sys.stderr)
        try:
            r = activation_scaling(
                model,
                tok,
                train,
                method=method,
                heads=args.heads,
                layers=args.layers,
                window=args.window,
                betas=betas,
                margin=args.margin,
                lambda_f=args.lambda_f,
                lambda_m=args.lambda_m,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                zero_tol=args.zero_tol,
                seed=args.seed,
                backend=args.backend,
                png=out_dir / f"{method}.png",
                log_every=max(1, args.steps // 5),
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results[method] = r
        files = r.save(out_dir / method)
        entry = {
            "test": evaluate_scaling(model, tok, r, test, backend=args.backend),
            "test_long": evaluate_scaling(model, tok, r, test_long, backend=args.backend),
            "steering_files": [str(f) for f in files],
            "png": str(out_dir / f"{method}.png"),
            "final_objective": r.history["psi"][-1],
        }
        summary["methods"][method] = entry
        for split in ("test", "test_long"):
            e = entry[split]
            parts = [
                f"{k}: success {e[k]['success']:.2f} flip {e[k]['flip_rate'] if e[k]['flip_rate'] is None else round(e[k]['flip_rate'], 2)} "
                f"KL {e[k]['kl']:.3f}"
                for k in e
                if k.startswith("beta")
            ]
            print(
                f"{method:8s} {split:9s} " + " | ".join(parts) + f" | nonzero {e['nonzero']}/{e['n_params']}"
            )
    if len(results) > 1:
        draw_history(results, out_dir / "objective.png")
        summary["objective_png"] = str(out_dir / "objective.png")
    summary["config"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
    return 0
