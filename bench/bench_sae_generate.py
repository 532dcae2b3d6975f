"""End to end: SmolLM2 ``generate()`` with a selective SAE steer at one layer vs unhooked, one run.

A random ReLU SAE with m = 16 * 576 latents at ``layers.15.resid``; the edit touches |S| = 8
latents (``add_if_active``), so only those 8 columns of W_enc are read per token. Greedy,
``min_new_tokens = max_new_tokens``, batch 1, variants interleaved round by round, medians.

    python bench/bench_sae_generate.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import pysteer
from pysteer.sae import SAE
from pysteer.sae_steering import SAEEdit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/sae-generate-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pysteer.default_model import load_model

    model, tok = load_model("default")
    d = model.config.hidden_size
    m = 16 * d
    g = torch.Generator().manual_seed(0)
    sae = SAE(
        torch.randn(d, m, generator=g) / d**0.5,
        torch.zeros(m),
        torch.randn(m, d, generator=g) / d**0.5,
        torch.zeros(d),
    )
    features = torch.randperm(m, generator=g)[:8].tolist()
    edit = SAEEdit("layers.15.resid", sae, {f: ("add_if_active", 2.0) for f in features})
    ids = tok("Write a short story about a lighthouse keeper.", return_tensors="pt")

    def gen():
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return out, args.new_tokens / (time.perf_counter() - t), args.new_tokens / (time.process_time() - c)

    samples = {"unhooked": [], "sae-steer": []}
    cpu_samples = {"unhooked": [], "sae-steer": []}
    outs = {}
    for r in range(args.rounds + 1):
        for name in samples:
            h = pysteer.steer(model, [edit], positions="generated") if name == "sae-steer" else None
            try:
                out, tps, cpu_tps = gen()
            finally:
                if h is not None:
                    h.remove()
            outs[name] = out
            if r:
                samples[name].append(tps)
                cpu_samples[name].append(cpu_tps)
        print(
            f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items() if v and r),
            file=sys.stderr,
        )
    med = {k: statistics.median(v) for k, v in samples.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_samples.items()}
    doc = {
        "bench": "bench_sae_generate",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "sae": {
            "d": d,
            "m": m,
            "activation": "relu",
            "edited_latents": len(features),
            "site": "layers.15.resid",
        },
        "new_tokens": args.new_tokens,
        "tokens_per_s_median": med,
        "samples": samples,
        "ratio_steered_vs_unhooked": med["sae-steer"] / med["unhooked"],
        "cost_fraction": 1 - med["sae-steer"] / med["unhooked"],
        # tokens per second of process CPU time: steadier than wall time on a shared machine
        "cpu_tokens_per_s_median": cpu_med,
        "cpu_ratio_steered_vs_unhooked": cpu_med["sae-steer"] / cpu_med["unhooked"],
        "steering_changed_tokens": not torch.equal(outs["unhooked"], outs["sae-steer"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(
        json.dumps(
            {
                k: doc[k]
                for k in (
                    "tokens_per_s_median",
                    "ratio_steered_vs_unhooked",
                    "cpu_ratio_steered_vs_unhooked",
                    "steering_changed_tokens",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
