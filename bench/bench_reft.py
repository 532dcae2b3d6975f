"""LoReFT on CPU: training steps/s and steered generate tokens/s, pysteer against pyreft.

pysteer's side runs here; pyreft's is ``bench/peers/bench_peer_reft.py``, which needs its own
virtualenv (pyreft pins transformers 4.45.1, pysteer uses transformers 5; set up as the docstring of
``bench/peers/reft_parity.py`` says). With ``--peer-python`` this script first runs the peer script
in that interpreter, as a separate process, then its own side right after, and merges both into
``bench/results/reft-cpu.json``. The two sides therefore run back to back in separate processes and
virtualenvs, with different transformers versions under the same torch (2.13.0+cpu).

Workload (the same on both sides, checked when merging): SmolLM2-135M-Instruct, fp32, sdpa
attention, one torch thread. One LoReFT of rank 4 on layer 15's residual output (pyreft's
``block_output``) at positions ``f1+l1`` (one intervention at the first and the last token), the
model's weights frozen.

- training: a fixed batch of ``--batch`` x ``--seq`` random token ids (seed 0, no padding); one step
  is ``zero_grad``, the steered forward, next-token cross entropy over every position, ``backward``
  and an Adam step (lr 1e-3) over the intervention's parameters. pysteer: ``pysteer.steer(model,
  [LoReFT], trainable=True)`` and ``handle.parameters()``; pyreft: the same loop through ``ReftModel``
  with ``unit_locations`` (no ``ReftTrainer``).
- ``--loss answer`` (written to ``reft-cpu-answer.json``): the same steps with the ABSC recipe's
  classification-style loss instead, cross entropy of one answer token per row at the last
  position, both sides computing only that position's logits (``logits_to_keep=1``; pyreft passes
  ``num_logits_to_keep=1`` through pyvene's ``base``). The output layer's 49k-word projection and its
  gradient then leave both sides' steps, so the ratio shows the work the two libraries differ in.
- training, pysteer's two ways: the plain trainable handle, and the same handle with
  ``handle.frozen_prefix()``, which replays layers 0..15 (the frozen layers under the edit) on a batch
  seen before instead of recomputing them. The per-step figure repeats one batch (so every step after
  the first replays); the whole-run figure (``--epochs`` passes over ``--epoch-batches`` distinct
  batches, a fresh intervention per run) counts the first pass, which computes and stores. The two
  ways alternate block by block in one process; their losses are compared for equality. pyreft runs
  the same two workloads in its own process.
- generate: the 17-token chat prompt, batch 1, ``--new-tokens`` greedy tokens (EOS off), the edit on
  the prompt only. pysteer: ``model.generate`` inside ``pysteer.steer`` and ``pysteer.generate(...,
  steering=[[iv]], compile=False)``, each against its unsteered call; pyreft: ``ReftModel.generate(...,
  intervene_on_prompt=True)`` against ``model.generate``. Variants are interleaved round by round
  (order rotated) and the steered/unsteered ratio is the median of per-round ratios.

    python bench/bench_reft.py --peer-python /work/peers-reft-venv/bin/python
    python bench/bench_reft.py --peer-python /work/peers-reft-venv/bin/python --loss answer
    python bench/bench_reft.py --steps 3 --rounds 2          # pysteer's side only, a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import pysteer
from pysteer.default_model import load_model
from pysteer.reft import LoReFT

ROOT = Path(__file__).resolve().parents[1]
LAYER, RANK, POSITIONS = 15, 4, "f1+l1"
PROMPT = "<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n"


def batch_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def loss_of(model, ids: torch.Tensor, loss: str) -> torch.Tensor:
    """``lm``: next-token cross entropy over every position; ``answer``: cross entropy of one
    answer token per row (the row's first token, a stand-in label) at the last position, the
    classification-style loss of the ABSC recipe, with only that position's logits computed
    (``logits_to_keep=1``)."""
    if loss == "answer":
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        return torch.nn.functional.cross_entropy(logits, ids[:, 0])
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _train_steps(
    model, batches: list[torch.Tensor], steps: int, prefix: bool, warmup: int = 0, loss_kind: str = "lm"
) -> dict:
    """``warmup + steps`` training steps cycling over ``batches``, through ``handle.frozen_prefix()``
    when ``prefix``; the timed steps' wall and CPU seconds and every loss."""
    iv = LoReFT.init(f"layers.{LAYER}.resid", model.config.hidden_size, RANK, POSITIONS, seed=0)
    wall, cpu, losses = [], [], []
    with pysteer.steer(model, [iv], trainable=True) as h:
        params = h.parameters()
        opt = torch.optim.Adam(params, lr=1e-3)
        fp = h.frozen_prefix() if prefix else None
        try:
            for i in range(warmup + steps):
                ids = batches[i % len(batches)]
                c0, t0 = time.process_time(), time.perf_counter()
                opt.zero_grad()
                loss = loss_of(model, ids, loss_kind)
                loss.backward()
                opt.step()
                t1, c1 = time.perf_counter(), time.process_time()
                losses.append(loss.item())
                if i >= warmup:
                    wall.append(t1 - t0)
                    cpu.append(c1 - c0)
        finally:
            stats = dict(fp.stats) if fp else None
            if fp:
                fp.remove()
    return {
        "wall": wall,
        "cpu": cpu,
        "losses": losses,
        "params": sum(p.numel() for p in params),
        "prefix_stats": stats,
    }


def bench_training(
    model, ids: torch.Tensor, steps: int, warmup: int, rounds: int = 2, loss: str = "lm"
) -> dict:
    """Steps on one fixed batch (every step after the first replays the prefix), the plain handle
    and the frozen-prefix handle alternating in blocks of ``steps // rounds`` timed steps."""
    per_round = max(1, steps // rounds)
    runs = {"plain": [], "frozen_prefix": []}
    for r in range(rounds):
        for name in ["plain", "frozen_prefix"] if r % 2 == 0 else ["frozen_prefix", "plain"]:
            runs[name].append(
                _train_steps(model, [ids], per_round, name == "frozen_prefix", warmup=warmup, loss_kind=loss)
            )
    out = {}
    for name, rs in runs.items():
        wall = [w for r in rs for w in r["wall"]]
        cpu = [c for r in rs for c in r["cpu"]]
        out[name] = {
            "step_s": {
                "wall_median": statistics.median(wall),
                "cpu_median": statistics.median(cpu),
                "wall": wall,
            },
            "steps_per_s": 1 / statistics.median(wall),
            "losses": [round(v, 5) for v in rs[0]["losses"]],
            "params": rs[0]["params"],
            "prefix_stats": [r["prefix_stats"] for r in rs],
        }
    out["losses_equal"] = runs["plain"][0]["losses"] == runs["frozen_prefix"][0]["losses"]
    out["frozen_prefix_speedup"] = {
        "wall": out["plain"]["step_s"]["wall_median"] / out["frozen_prefix"]["step_s"]["wall_median"],
        "cpu": out["plain"]["step_s"]["cpu_median"] / out["frozen_prefix"]["step_s"]["cpu_median"],
    }
    return out


def epoch_batches(n: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    return [
        torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(100 + i))
        for i in range(n)
    ]


def bench_epochs(model, batches: list[torch.Tensor], epochs: int, rounds: int, loss: str = "lm") -> dict:
    """Whole training runs, ``epochs`` passes over ``batches`` (the first pass stores the prefix
    outputs, later ones replay them), the two variants alternating run by run."""
    runs = {"plain": [], "frozen_prefix": []}
    for r in range(rounds):
        for name in ["plain", "frozen_prefix"] if r % 2 == 0 else ["frozen_prefix", "plain"]:
            runs[name].append(
                _train_steps(model, batches, epochs * len(batches), name == "frozen_prefix", loss_kind=loss)
            )
    out = {
        name: {
            "run_s": {"wall": [sum(r["wall"]) for r in rs], "cpu": [sum(r["cpu"]) for r in rs]},
            "wall_median_s": statistics.median(sum(r["wall"]) for r in rs),
            "cpu_median_s": statistics.median(sum(r["cpu"]) for r in rs),
            "final_loss": rs[0]["losses"][-1],
            "prefix_stats": rs[0]["prefix_stats"],
        }
        for name, rs in runs.items()
    }
    out["losses_equal"] = runs["plain"][0]["losses"] == runs["frozen_prefix"][0]["losses"]
    out["frozen_prefix_speedup"] = {
        "wall": out["plain"]["wall_median_s"] / out["frozen_prefix"]["wall_median_s"],
        "cpu": out["plain"]["cpu_median_s"] / out["frozen_prefix"]["cpu_median_s"],
    }
    return out


def bench_generate(model, ids: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    n = ids.shape[1]
    iv = LoReFT.init(f"layers.{LAYER}.resid", model.config.hidden_size, RANK, POSITIONS, seed=0)
    iv.bias = torch.randn(RANK, generator=torch.Generator().manual_seed(1)) * 4  # a visible edit
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 2}
    mask = torch.ones_like(ids)

    def hf_plain():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, **kw)[0, n:].tolist()

    def hf_steered():
        with torch.no_grad(), pysteer.steer(model, [iv]):
            return model.generate(input_ids=ids, attention_mask=mask, **kw)[0, n:].tolist()

    def fast(steering):
        def run():
            out = pysteer.generate(
                model,
                ids,
                steering=steering,
                max_new_tokens=new_tokens,
                compile=False,
                progress=False,
                ignore_eos=True,
            )
            return out.tokens[0]

        return run

    variants = {
        "hf_unsteered": hf_plain,
        "hf_steered": hf_steered,
        "fast_unsteered": fast(None),
        "fast_steered": fast([[iv]]),
    }
    names = list(variants)
    times = {k: {"wall": [], "cpu": []} for k in names}
    tokens = {k: f() for k, f in variants.items()}  # warm-up, and the tokens
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    res = {
        name: {
            "wall_median_s": statistics.median(t["wall"]),
            "cpu_median_s": statistics.median(t["cpu"]),
            "tokens_per_s": new_tokens / statistics.median(t["wall"]),
            "wall_s": t["wall"],
            "tokens": tokens[name],
        }
        for name, t in times.items()
    }
    for path in ("hf", "fast"):
        s, u = times[f"{path}_steered"], times[f"{path}_unsteered"]
        res[f"{path}_steered_over_unsteered"] = {
            "wall_median": statistics.median(a / b for a, b in zip(s["wall"], u["wall"])),
            "cpu_median": statistics.median(a / b for a, b in zip(s["cpu"], u["cpu"])),
        }
    res["steered_tokens_equal_hf_fast"] = tokens["hf_steered"] == tokens["fast_steered"]
    return res


def matmul_work(config, batch: int, seq: int, epoch_batches: int, epochs: int, loss: str) -> dict:
    """The multiply-adds each side must do, from the model's shapes: the bound on any speed ratio.

    Per token, a decoder layer's linears cost ``F`` multiply-adds (q, k, v, o and the three MLP
    projections), the output layer ``H``; with the weights frozen, a linear's backward computes only the
    input's gradient, ``F`` again. pyreft's step runs every layer forward, and the layers above the edit
    and the output layer backward; ``frozen_prefix`` replays the layers up to the edit, so its step
    skips them. ``loss="answer"`` keeps one position's logits per row. The attention scores
    (``seq`` x ``seq`` per head, a few percent at these lengths) and the elementwise work are left out.
    The whole run adds, for pysteer, one pass over the frozen layers per distinct batch.
    """
    h, m = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    layers, above = config.num_hidden_layers, config.num_hidden_layers - LAYER - 1
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * m
    head = h * config.vocab_size
    tokens = batch * seq
    logit_rows = batch * (seq if loss == "lm" else 1)
    output_layer = 2 * head * logit_rows  # forward and the hidden state's gradient
    pyreft_step = layers * per_layer * tokens + above * per_layer * tokens + output_layer
    replay_step = 2 * above * per_layer * tokens + output_layer
    prefix = (LAYER + 1) * per_layer * tokens
    steps = epochs * epoch_batches
    return {
        "what": "matmul multiply-adds per step and per whole run (model shapes; attention scores and "
        "elementwise work left out): the ratios any implementation of the same math can reach",
        "pyreft_step": pyreft_step,
        "frozen_prefix_step": replay_step,
        "step_ratio_bound": pyreft_step / replay_step,
        "whole_run_ratio_bound": steps * pyreft_step / (epoch_batches * prefix + steps * replay_step),
    }


def run_peer(python: str, args) -> dict:
    cmd = [
        python,
        str(ROOT / "bench" / "peers" / "bench_peer_reft.py"),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--new-tokens",
        str(args.new_tokens),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
        "--epoch-batches",
        str(args.epoch_batches),
        "--epochs",
        str(args.epochs),
        "--epoch-rounds",
        str(args.epoch_rounds),
        "--loss",
        args.loss,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peer bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epoch-batches", type=int, default=4, help="distinct batches of the whole-run workload")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--epoch-rounds", type=int, default=2)
    ap.add_argument(
        "--loss",
        choices=["lm", "answer"],
        default="lm",
        help="lm: next-token loss over every position; answer: one answer token at the last position",
    )
    ap.add_argument(
        "--peer-python", default=None, help="the pyreft virtualenv's python (runs its side first)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/reft-cpu.json (reft-cpu-answer.json for --loss answer)",
    )
    args = ap.parse_args()
    if args.out is None:
        args.out = (
            ROOT / "bench" / "results" / ("reft-cpu.json" if args.loss == "lm" else "reft-cpu-answer.json")
        )
    torch.set_num_threads(args.threads)

    peer = None
    if args.peer_python:
        t0 = time.time()
        peer = run_peer(args.peer_python, args)
        print(f"pyreft side done in {time.time() - t0:.0f} s", file=sys.stderr)

    model, tok = load_model("default", progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = batch_ids(args.batch, args.seq, model.config.vocab_size)
    prompt = torch.tensor([tok(PROMPT)["input_ids"]])
    ours = {
        "side": "pysteer",
        "versions": {
            "pysteer": pysteer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "workload": {
            "batch": args.batch,
            "seq": args.seq,
            "ids_sum": int(ids.sum()),
            "layer": LAYER,
            "rank": RANK,
            "positions": POSITIONS,
            "steps": args.steps,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "prompt_ids": prompt[0].tolist(),
            "attn": model.config._attn_implementation,
            "epoch_batches": args.epoch_batches,
            "epochs": args.epochs,
            "loss": args.loss,
        },
        "load_before": os.getloadavg(),
        "training": bench_training(model, ids, args.steps, args.warmup, loss=args.loss),
        "epochs": bench_epochs(
            model,
            epoch_batches(args.epoch_batches, args.batch, args.seq, model.config.vocab_size),
            args.epochs,
            args.epoch_rounds,
            loss=args.loss,
        ),
        "generate": bench_generate(model, prompt, args.new_tokens, args.rounds),
        "matmul_work": matmul_work(
            model.config, args.batch, args.seq, args.epoch_batches, args.epochs, args.loss
        ),
    }
    result = {
        "what": "LoReFT (rank 4, layer 15 resid / block_output, f1+l1) on SmolLM2-135M-Instruct, fp32 CPU, "
        f"{args.loss} loss",
        "script": "bench/bench_reft.py (pysteer) + bench/peers/bench_peer_reft.py (pyreft)",
        "machine": platform.machine(),
        "threads": args.threads,
        "pysteer": ours,
    }
    ours["load_after"] = os.getloadavg()
    tr, ep, gen = ours["training"]["frozen_prefix"], ours["epochs"], ours["generate"]
    print(
        f"pysteer: training {tr['steps_per_s']:.3f} steps/s (frozen prefix; x{ours['training']['frozen_prefix_speedup']['wall']:.2f} "
        f"over plain), whole run x{ep['frozen_prefix_speedup']['wall']:.2f}; generate steered/unsteered "
        f"hf {gen['hf_steered_over_unsteered']['wall_median']:.3f}, fast {gen['fast_steered_over_unsteered']['wall_median']:.3f}"
    )
    if peer is not None:
        for key in (
            "batch",
            "seq",
            "ids_sum",
            "layer",
            "rank",
            "positions",
            "new_tokens",
            "prompt_ids",
            "attn",
            "epoch_batches",
            "epochs",
            "loss",
        ):
            if peer["workload"][key] != ours["workload"][key]:
                raise RuntimeError(
                    f"the two sides ran different workloads: {key} {peer['workload'][key]!r} vs {ours['workload'][key]!r}"
                )
        pg = peer["generate"]
        result["pyreft"] = peer
        result["note"] = (
            "The two sides ran back to back in separate processes and virtualenvs: pyreft with transformers "
            f"{peer['versions']['transformers']}, pysteer with transformers {transformers.__version__}, both torch "
            f"{torch.__version__}, {args.threads} thread(s). Steered/unsteered ratios compare each side with its own "
            "unsteered generate; cross-side ratios also carry the two transformers versions' own speed."
        )
        plain = ours["training"]["plain"]
        result["ratios"] = {
            "training_steps_per_s_pysteer_over_pyreft": {
                "frozen_prefix": tr["steps_per_s"] / peer["training"]["steps_per_s"],
                "plain": plain["steps_per_s"] / peer["training"]["steps_per_s"],
            },
            "training_cpu_step_pyreft_over_pysteer": {
                "frozen_prefix": peer["training"]["step_s"]["cpu_median"] / tr["step_s"]["cpu_median"],
                "plain": peer["training"]["step_s"]["cpu_median"] / plain["step_s"]["cpu_median"],
            },
            "whole_run_pyreft_over_pysteer": {
                f"{name}_{clock}": peer["epochs"][f"{clock}_median_s"] / ep[name][f"{clock}_median_s"]
                for name in ("frozen_prefix", "plain")
                for clock in ("wall", "cpu")
            },
            "generate_steered_over_unsteered": {
                "pysteer_hf_generate": gen["hf_steered_over_unsteered"]["wall_median"],
                "pysteer_fast_generate": gen["fast_steered_over_unsteered"]["wall_median"],
                "pyreft": pg["steered_over_unsteered"]["wall_median"],
            },
            "steered_tokens_per_s_over_pyreft": {
                "pysteer_hf_generate": gen["hf_steered"]["tokens_per_s"] / pg["pyreft"]["tokens_per_s"],
                "pysteer_fast_generate": gen["fast_steered"]["tokens_per_s"] / pg["pyreft"]["tokens_per_s"],
            },
            "unsteered_tokens_per_s_pysteer_hf_over_pyreft_hf": gen["hf_unsteered"]["tokens_per_s"]
            / pg["unsteered"]["tokens_per_s"],
        }
        work = ours["matmul_work"]
        result["ratios"]["measured_over_matmul_bound"] = {
            "step, cpu": result["ratios"]["training_cpu_step_pyreft_over_pysteer"]["frozen_prefix"]
            / work["step_ratio_bound"],
            "whole run, cpu": result["ratios"]["whole_run_pyreft_over_pysteer"]["frozen_prefix_cpu"]
            / work["whole_run_ratio_bound"],
        }
        result["targets"] = {
            "training_at_least_1.5x_pyreft": {
                "step, wall": result["ratios"]["training_steps_per_s_pysteer_over_pyreft"]["frozen_prefix"]
                >= 1.5,
                "step, cpu": result["ratios"]["training_cpu_step_pyreft_over_pysteer"]["frozen_prefix"]
                >= 1.5,
                "whole run, wall": result["ratios"]["whole_run_pyreft_over_pysteer"]["frozen_prefix_wall"]
                >= 1.5,
            },
            "steered_generate_at_most_3pct_over_unsteered": {
                k: v <= 1.03
                for k, v in result["ratios"]["generate_steered_over_unsteered"].items()
                if k != "pyreft"
            },
        }
        print(json.dumps(result["ratios"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
