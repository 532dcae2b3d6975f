"""``pysteer causal-trace``: which (layer, token) states carry a prompt's answer (ROME's causal tracing)."""

from __future__ import annotations

import argparse
import json

HELP = "causal tracing: corrupt the subject, restore one (layer, token) state at a time, heatmap of p(answer)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--prompt", required=True, help="text whose next token is the answer")
    p.add_argument(
        "--subject", required=True, help="the subject's text inside the prompt (its tokens are corrupted)"
    )
    p.add_argument("--answer", help="answer text (first token scored; default: the model's top token)")
    p.add_argument("--kind", default="resid", choices=["resid", "mlp", "attn"])
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp / attn")
    p.add_argument("--samples", type=int, default=10, help="noise draws per cell")
    p.add_argument("--noise", type=float, help="noise std (default: 3x the std of the subject's embeddings)")
    p.add_argument("--batch-size", type=int, default=64, help="rows (cell x noise draw) per forward")
    p.add_argument("--layers", type=int, nargs="+", help="layers to trace (default: all)")
    p.add_argument("--png", default="causal_trace.png")
    p.add_argument("--json-out", help="write the scores here")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from pysteer.default_model import load_model
    from pysteer.recipes.causal_trace import causal_trace

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    r = causal_trace(
        model, tok, args.prompt, args.subject, args.answer, kind=args.kind, window=args.window,
        noise=args.noise, samples=args.samples, batch_size=args.batch_size, layers=args.layers,
    )  # fmt: skip
    r.draw(args.png)
    layer, token = r.best()
    print(
        f"answer {r.answer!r}: clean p {r.clean_prob:.4f}, corrupted p {r.corrupted_prob:.4f}; "
        f"best restore: layer {r.extra['layers'][layer]}, token {token} {r.tokens[token]!r} (p {float(r.scores[layer, token]):.4f}); "
        f"heatmap {args.png}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r.to_json(), indent=2))
    return 0
