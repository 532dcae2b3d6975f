"""Causal tracing: one heatmap computed ROME's way (one forward per cell) and batched through rows.

Variants, the same prompt, layers, noise draws and answer, in one run:
  per-cell        ROME's ``trace_with_patch``: per (layer, token), one forward over the clean prompt
                  and its noise draws, plain hooks, logits at every position
  rows            every (cell, noise draw) a batch row with its own config (``Patch`` + ``Noise``)
  rows+prefix     the same, cells grouped by token, each group starting from the corrupted run's
                  KV cache of the tokens before it
  rows+prefix+skip  the same, and tokens before the subject (never corrupted) scored without a
                  forward (the default of ``causal_trace``)

Reported: seconds per heatmap and ratios to per-cell, and the largest score difference (the three
compute the same numbers).

    python bench/bench_causal_trace.py --model default --samples 3        # SmolLM2, 20-token prompt, all 30 layers
    python bench/bench_causal_trace.py --model smollm2-shape --device cuda # random weights, same shapes (GPU check)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from pysteer.recipes.causal_trace import causal_trace

PROMPT = "Known for its wrought-iron lattice, the Eiffel Tower is a landmark located in the city of"
SUBJECT = "Eiffel Tower"


class _IntTokenizer:
    """Texts are space-separated token ids (random-weight models have no tokenizer)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


def _model(name: str, device: str, dtype: torch.dtype):
    """``(model, tokenizer, prompt, subject)``."""
    if name == "default":
        from pysteer.default_model import load_model

        model, tok = load_model("default", dtype=str(dtype).removeprefix("torch."), device=device)
        return model, tok, PROMPT, SUBJECT
    from transformers import LlamaConfig, LlamaForCausalLM

    from pysteer.models.tiny import tiny_model

    if name == "tiny":
        model = tiny_model("llama")
    elif name == "smollm2-shape":
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    else:
        raise SystemExit(f"unknown --model {name!r}")
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(
        3, min(model.config.vocab_size, 1000), (20,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    return model, _IntTokenizer(), " ".join(map(str, ids)), " ".join(map(str, ids[4:7]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", choices=["default", "smollm2-shape", "tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--samples", type=int, default=3, help="noise draws per cell (ROME uses 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--kind", default="resid", choices=["resid", "mlp", "attn"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tok, prompt, subject = _model(args.model, args.device, dtype)
    kw = dict(kind=args.kind, samples=args.samples, batch_size=args.batch_size)

    def timed(**extra):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = causal_trace(model, tok, prompt, subject, **kw, **extra)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return r, time.perf_counter() - t

    causal_trace(model, tok, prompt, subject, kind=args.kind, samples=1, layers=[0])  # warm-up
    results, load = {}, {}
    variants = (
        ("rows+prefix+skip", {}),
        ("rows+prefix", {"skip_unaffected": False}),
        ("rows", {"prefix_cache": False, "skip_unaffected": False}),
        ("per-cell", {"per_cell": True}),
    )
    for name, extra in variants:
        before = os.getloadavg()[0]
        r, sec = timed(**extra)
        results[name] = (r, sec)
        load[name] = [round(before, 2), round(os.getloadavg()[0], 2)]  # 1-min load average around it
        print(f"{name:16s} {sec:8.2f} s", file=sys.stderr, flush=True)
    ref, ref_s = results["per-cell"]
    n_layers, n_tokens = ref.scores.shape
    out = {
        "bench": "bench_causal_trace",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(0),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "dtype": args.dtype,
        "kind": args.kind,
        "layers": n_layers,
        "prompt_tokens": n_tokens,
        "cells": n_layers * n_tokens,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "seconds_per_heatmap": {k: round(s, 3) for k, (_, s) in results.items()},
        "speedup_vs_per_cell": {k: round(ref_s / s, 3) for k, (_, s) in results.items() if k != "per-cell"},
        "max_abs_score_diff_vs_per_cell": {
            k: float((r.scores - ref.scores).abs().max()) for k, (r, _) in results.items() if k != "per-cell"
        },
        "load_average_before_after": load,
        "cpus": os.cpu_count(),
        "clean_prob": ref.clean_prob,
        "corrupted_prob": ref.corrupted_prob,
        "best_cell": list(results["rows+prefix+skip"][0].best()),
        "subject_tokens": list(ref.subject),
        "answer": ref.answer,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
