"""Sequential editing on SmolLM2-135M-Instruct (CPU): DAFNet vs FT-L vs DAFNet without inter-editing
attention, after 1, 10 and 100 edits of the shipped ``eval`` split, plus the speed figures.

Edited weights: the down projections of the last three MLPs (layers 27, 28, 29). Both editors are
meta-trained here on the ``train`` split (disjoint subjects) with the same settings and seed; the
training wall time is recorded. After k edits (the first k records of the eval split, in file
order), reliability / generality / locality are scored on those k records
(``pysteer.recipes.editing.EditEvaluator``).

Speed: per-edit latency (gradient signal + editor forward, then the fold of the accumulated deltas),
and greedy ``model.generate`` tokens/s with the 100 DAFNet edits folded and unfolded (dynamic, the
low-rank op) against the unedited model, the three variants interleaved round by round; ratios are
medians over rounds, with the load average recorded.

    python bench/bench_dafnet.py [--steps 40] [--out bench/results/dafnet-smollm2.json]
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
COUNTS = (1, 10, 100)


def score_after(model, tok, evaluator, records, edit_fn, counts=COUNTS) -> list[dict]:
    """Scores after the first k edits, for each k (the model restored between k's)."""
    out = []
    for k in counts:
        t = time.perf_counter()
        undo = edit_fn(records[:k])
        edit_s = time.perf_counter() - t
        scores = evaluator.score(model, k).as_dict()
        undo()
        out.append({**scores, "edit_seconds": edit_s})
        print(f"  k={k}: {scores}", flush=True)
    return out


def dafnet_edit_fn(model, tok, editor):
    from pysteer.recipes.dafnet import sequential_edit

    def edit(records):
        handle = sequential_edit(model, editor, records, tok, progress=False)
        return handle.remove

    return edit


def ftl_edit_fn(model, tok, sites, lr, steps):
    from pysteer.recipes.editing import FTL

    def edit(records):
        ftl = FTL(model, tok, sites, lr=lr, max_steps=steps)
        for r in records:
            ftl.edit(r)
        return ftl.restore

    return edit


def generate_rate(model, ids, new_tokens: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / dt


def speed(model, tok, editor, records, rounds: int, new_tokens: int) -> dict:
    """Per-edit latency and interleaved generate throughput (unedited / folded / unfolded)."""
    from pysteer.recipes.dafnet import sequential_edit

    stamps = []
    t0 = time.perf_counter()
    handle = sequential_edit(
        model,
        editor,
        records,
        tok,
        progress=False,
        mode="dynamic",
        on_edit=lambda k: stamps.append(time.perf_counter()),
    )
    per_edit = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    deltas = [d for ivs in handle.configs.values() for d in ivs]
    handle.remove()
    import pysteer

    t = time.perf_counter()
    folded = pysteer.steer(model, deltas, mode="fold")
    fold_s = time.perf_counter() - t
    folded.remove()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rates: dict[str, list[float]] = {"unedited": [], "folded": [], "unfolded": []}
    loads = [os.getloadavg()]
    for _ in range(rounds):
        rates["unedited"].append(generate_rate(model, ids, new_tokens))
        with pysteer.steer(model, deltas, mode="fold"):
            rates["folded"].append(generate_rate(model, ids, new_tokens))
        with pysteer.steer(model, deltas, mode="dynamic"):
            rates["unfolded"].append(generate_rate(model, ids, new_tokens))
        loads.append(os.getloadavg())
    ratio = {
        k: statistics.median(a / b for a, b in zip(v, rates["unedited"], strict=True))
        for k, v in rates.items()
        if k != "unedited"
    }
    return {
        "per_edit_seconds_median": statistics.median(per_edit),
        "per_edit_seconds_mean": statistics.mean(per_edit),
        "fold_seconds": fold_s,
        "delta_ranks": [d.rank for d in deltas],
        "generate_new_tokens": new_tokens,
        "rounds": rounds,
        "tokens_per_s": rates,
        "ratio_to_unedited_median": ratio,
        "loadavg": loads,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--curriculum-steps", type=int, default=30)
    p.add_argument("--max-sequence", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-edit-lr", type=float, default=2e-3)
    p.add_argument("--ftl-lr", type=float, default=1e-3)
    p.add_argument("--ftl-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default="bench/results/dafnet-smollm2.json")
    p.add_argument("--ckpt-dir", default="bench/results/dafnet")
    args = p.parse_args()
    torch.set_num_threads(1)

    from pysteer.default_model import load_model
    from pysteer.recipes._common import curves_png  # noqa: F401  (matplotlib present)
    from pysteer.recipes.dafnet import DAFNetConfig, TrainConfig, dafnet_train
    from pysteer.recipes.editing import EditEvaluator, load_edits

    model, tok = load_model("default")
    sites = [f"layers.{i}.mlp.down_proj" for i in LAYERS]
    train_recs, eval_recs = load_edits("train"), load_edits("eval")
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU, 1 thread)",
        "edited": sites,
        "data": {"train": len(train_recs), "eval": len(eval_recs)},
        "settings": vars(args),
        "loadavg_start": os.getloadavg(),
        "methods": {},
    }
    evaluator = EditEvaluator(model, tok, eval_recs)
    Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    editors = {}
    for name, inter in (("dafnet", True), ("dafnet_no_inter", False)):
        cfg = DAFNetConfig(sites, inter_attention=inter, init_edit_lr=args.init_edit_lr)
        train = TrainConfig(
            steps=args.steps,
            max_sequence=args.max_sequence,
            curriculum_steps=args.curriculum_steps,
            lr=args.lr,
        )
        t = time.perf_counter()
        editor, log = dafnet_train(
            model, tok, train_recs, cfg, train, checkpoint=f"{args.ckpt_dir}/{name}.safetensors"
        )
        train_s = time.perf_counter() - t
        editors[name] = editor
        print(f"{name}: trained {args.steps} steps in {train_s:.0f} s", flush=True)
        result["methods"][name] = {
            "train_seconds": train_s,
            "train_log": log,
            "loadavg_after_train": os.getloadavg(),
        }
    for name, editor in editors.items():
        print(name, flush=True)
        result["methods"][name]["scores"] = score_after(
            model, tok, evaluator, eval_recs, dafnet_edit_fn(model, tok, editor)
        )
    print("ft_l", flush=True)
    result["methods"]["ft_l"] = {
        "scores": score_after(
            model, tok, evaluator, eval_recs, ftl_edit_fn(model, tok, sites, args.ftl_lr, args.ftl_steps)
        )
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    result["speed"] = speed(model, tok, editors["dafnet"], eval_recs, args.rounds, args.new_tokens)
    result["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps(result["speed"], indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("reliability", "generality", "locality")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, metric in zip(axes, metrics, strict=True):
        for name, m in result["methods"].items():
            xs = [s["n_edits"] for s in m["scores"]]
            ax.plot(xs, [s[metric] for s in m["scores"]], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("sequential edits")
        ax.set_title(metric)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, down_proj of layers 27-29 (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
