"""``pysteer uncertainty``: semantic entropy, its baselines and semantic-entropy probes on the shipped
question set (or a JSON-lines file of the same shape); writes a JSON summary and PNGs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "semantic entropy, baselines (naive entropy, log-likelihood, p(true)) and SE probes on a question set"


def add_question_arguments(p: argparse.ArgumentParser, samples_help: str) -> None:
    """The model, the question set and its sampling: shared by ``uncertainty`` and ``abstain``."""
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--questions", help="JSON-lines question file (default: the shipped set)")
    p.add_argument(
        "--per-split",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="use only the first N questions of each split (a subset that fits the time you have)",
    )
    p.add_argument("--samples", type=int, default=10, help=samples_help)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--entailment",
        default="exact",
        help="exact (normalised exact match), judge (the model itself), judge:PATH or nli:PATH "
        "(e.g. nli:microsoft/deberta-v2-xlarge-mnli, the paper's model)",
    )
    p.add_argument("--strict", action="store_true", help="strict bidirectional entailment")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Threads, seed, dtype and device: the tail of both commands' arguments."""
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_question_arguments(p, "sampled answers per question")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-layers", type=int, default=5, help="narrowest concatenated probe layer range")
    p.add_argument(
        "--no-chat", action="store_true", help="plain prompt even when the tokenizer has a chat template"
    )
    p.add_argument("--out-dir", required=True, help="where the JSON, PNGs and probe files go")
    add_run_arguments(p)


def _subset(questions, per_split):
    if per_split is None:
        return questions
    keep = dict(zip(("train", "validation", "test"), per_split))
    seen = dict.fromkeys(keep, 0)
    out = []
    for q in questions:
        if seen[q.split] < keep[q.split]:
            seen[q.split] += 1
            out.append(q)
    return out


def run(args) -> int:
    import os

    import torch

    from pysteer.default_model import load_model
    from pysteer.uncertainty.entailment import make_entailment
    from pysteer.uncertainty.experiment import ExperimentConfig, run_experiment
    from pysteer.uncertainty.questions import load_questions

    if args.per_split is not None and min(args.per_split) < 1:
        raise ValueError(f"--per-split {args.per_split}: every split needs at least one question")
    questions = _subset(load_questions(args.questions), args.per_split)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    entailment = make_entailment(args.entailment, model, tok)
    config = ExperimentConfig(
        n_samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        strict=args.strict,
        batch_size=args.batch_size,
        min_layers=args.min_layers,
        chat=not args.no_chat,
    )
    load_start = list(os.getloadavg())
    result = run_experiment(
        model, tok, questions, entailment, config, out_dir, log=lambda s: print(s, flush=True)
    )
    result = {
        "model": args.model,
        "entailment_spec": args.entailment,
        "per_split": args.per_split,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "loadavg_start_end": [load_start, list(os.getloadavg())],
        **result,
    }
    _print_summary(result)
    path = out_dir / "uncertainty.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _print_summary(result: dict) -> None:
    ev = result["evaluation_test"]
    print(f"accuracy (answerable): {result['accuracy_answerable']}")
    print(f"{'score':28s} {'AUROC':>6s} {'AURAC':>6s}   (test split, {ev['n']} questions)")
    for name in (
        "semantic_entropy",
        "discrete_semantic_entropy",
        "naive_entropy",
        "neg_log_likelihood",
        "p_false",
    ):
        print(f"{name:28s} {_fmt(ev[name]['auroc']):>6s} {ev[name]['aurac']:6.3f}")
    for key, r in result["probes"].items():
        if isinstance(r, dict):
            print(
                f"{key:28s} layers {r['layer_range']}: AUROC own target {_fmt(r['range_auroc_test_own_target'])}, "
                f"wrong answers {_fmt(r['range_auroc_test_wrong_answer'])}"
            )
