"""Greedy ``model.generate`` throughput on SmolLM2 (CPU, 1 thread) with 3 rank-132 weight deltas on the
down projections of layers 27-29 (the size 100 DAFNet edits reach in ``bench_dafnet.py``): unedited,
folded, unfolded (the low-rank op at every token) and unfolded after compression to rank 32. The
variants are interleaved round by round; ratios are medians over rounds of each round's ratio to the
unedited run, with the load average recorded. Speed does not depend on the deltas' values, so they
are random (seeded).

    python bench/bench_dafnet_generate.py [--rounds 12] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

LAYERS = (27, 28, 29)


def rate(model, ids, n: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=132)
    p.add_argument("--out", default="bench/results/dafnet-generate-cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    import pysteer
    from pysteer.default_model import load_model

    model, tok = load_model("default")
    g = torch.Generator().manual_seed(0)
    deltas = [
        pysteer.WeightDelta(
            f"layers.{i}.mlp.down_proj",
            torch.randn(1536, args.rank, generator=g) * 1e-3,
            torch.randn(args.rank, 576, generator=g) * 1e-3,
        )
        for i in LAYERS
    ]
    small = [d.compress(32) for d in deltas]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rate(model, ids, 4)  # warm-up
    variants = {
        "folded": lambda: pysteer.steer(model, deltas, mode="fold"),
        "unfolded": lambda: pysteer.steer(model, deltas, mode="dynamic"),
        "unfolded_rank32": lambda: pysteer.steer(model, small, mode="dynamic"),
    }
    rates: dict[str, list[float]] = {"unedited": [], **{k: [] for k in variants}}
    loads = [os.getloadavg()]
    for _ in range(args.rounds):
        rates["unedited"].append(rate(model, ids, args.new_tokens))
        for name, make in variants.items():
            with make():
                rates[name].append(rate(model, ids, args.new_tokens))
        loads.append(os.getloadavg())
    ratio = {
        k: statistics.median(a / b for a, b in zip(v, rates["unedited"], strict=True))
        for k, v in rates.items()
        if k != "unedited"
    }
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU, 1 thread)",
        "settings": vars(args),
        "tokens_per_s": rates,
        "ratio_to_unedited_median": ratio,
        "loadavg": loads,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(ratio))


if __name__ == "__main__":
    main()
