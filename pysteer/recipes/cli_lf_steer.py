"""``pysteer lf-steer``: LF-Steering on the paraphrase-consistency facts, with the honest split."""

from __future__ import annotations

import argparse
import json
import sys

HELP = (
    "LF-Steering: probe the layers for consistency, locate SAE latents there, add to them where active; "
    "alpha chosen on validation, reported on the test split"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--sae", help="SAE directory (SAELens layout) at layers.L.resid of the probed layer L")
    p.add_argument(
        "--probe-only",
        action="store_true",
        help="only probe the layers and report which one to train an SAE at",
    )
    p.add_argument("--layer", type=int, help="use this layer instead of the probes' choice")
    p.add_argument("--data", help="paraphrase facts, JSON lines (default: the shipped set)")
    p.add_argument("--relations", nargs="+", help="only these relations")
    p.add_argument("--max-facts", type=int, help="at most this many facts per relation (seeded sample)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap questions in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--test-split", type=float, default=0.3, help="share of each relation's facts kept for test"
    )
    p.add_argument("--validation-fraction", type=float, default=0.3, help="share of the rest used to choose")
    p.add_argument("--n-features", type=int, default=8, help="latents to steer")
    p.add_argument(
        "--min-frequency", type=float, default=0.05, help="least firing rate on consistent samples"
    )
    p.add_argument(
        "--sweep-alpha", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="alphas to choose from"
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (of test facts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lf-steering.safetensors", help="steering file (the SAE travels in it)")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from pysteer.recipes.cli_locate import select_facts
    from pysteer.recipes.locate import load_paraphrases
    from pysteer.recipes.selection import split_test_facts
    from pysteer.sae import SAE

    try:
        if args.sae is None and not args.probe_only:
            raise ValueError(
                "give --sae DIR: an SAE at the residual stream of the layer that `pysteer lf-steer --probe-only` "
                "reports (pysteer.train_sae writes one; any SAELens-layout directory loads)"
            )
        if args.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
        sae = SAE.load(args.sae, device=args.device) if args.sae else None
        facts = select_facts(load_paraphrases(args.data), args.relations, args.max_facts, args.seed)
        dev, test = split_test_facts(facts, args.test_split, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pysteer.default_model import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    common = dict(
        chat=not args.no_chat,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
    )
    try:
        summary = (
            _probe_only(model, tok, dev, common)
            if args.probe_only
            else _steer(model, tok, dev, test, sae, args, common)
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def _probe_only(model, tok, dev, common) -> dict:
    from pysteer.recipes.lf_features import probe_consistency_layers

    out = probe_consistency_layers(model, tok, dev, **common)
    print(f"layer probes (balanced validation accuracy): {[round(a, 3) for a in out['probe_accuracy']]}")
    print(f"relation only (one-hot, same probe): {out['relation_only_accuracy']:.3f}")
    print(f"chosen: {out['site']} -- train the SAE there and pass it with --sae")
    return out


def _steer(model, tok, dev, test, sae, args, common) -> dict:
    from pysteer.io import save
    from pysteer.recipes.lf_features import lf_steering
    from pysteer.recipes.locate import answer_facts
    from pysteer.recipes.selection import validate_then_test

    result = lf_steering(
        model,
        tok,
        dev,
        sae=sae,
        layer=args.layer,
        n_features=args.n_features,
        min_frequency=args.min_frequency,
        **common,
    )
    print(
        f"layer {result.layer} (probe accuracy {float(result.probe_accuracy[result.layer]):.3f}); latents {result.features}"
    )
    validation = [dev[i] for i in result.heldout_groups]

    def answers(facts, spec):
        return answer_facts(
            model,
            tok,
            facts,
            spec,
            chat=common["chat"],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )

    before = result.metadata["baseline"]["validation"]
    out = validate_then_test(
        answers,
        lambda c: result.spec(sae, c["alpha"]),
        [{"alpha": a} for a in args.sweep_alpha],
        validation,
        test,
        before,
        n_resamples=args.bootstrap,
        seed=args.seed,
    )
    path = save(result.spec(sae, out["chosen"]["alpha"]), args.out)
    print(f"wrote {path}")
    return {
        **result.summary(),
        "validation_facts": len(validation),
        "before": before,
        **out,
        "steering_file": str(path),
        "test_facts": [{"relation": f.relation, "subject": f.subject} for f in test],
    }
