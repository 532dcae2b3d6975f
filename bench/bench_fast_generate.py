"""ms/token of the fast path vs Hugging Face generate(), steered and unsteered, in one run.

Variants (greedy, ``max_new_tokens = min_new_tokens = 64``):
  hf-eager                HF ``generate()``, eager, dynamic cache, unhooked
  hf-eager+pysteer        same with pysteer dynamic per-head steering (bias + scale, all layers)
  hf-compiled             HF ``generate()`` with a static cache and ``torch.compile(model.forward)``
  fast                    ``pysteer.generate`` unsteered
  fast+resid              residual add on every layer
  fast+heads              per-head bias + scale on every layer
  fast+heads-16-configs   16 distinct per-head configs in a batch of 16 (batch 16 only)

Each variant gets its own copy of the model (hooks and compiled graphs never interfere), is
compiled and warmed once, then the variants run interleaved, round by round; medians are reported.
Also: the first decode step after a strength change divided by the median steady step.

    python bench/bench_fast_generate.py --batches 1,16 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import interleaved_ratio

import pysteer
from pysteer.fast import FastGenerator
from pysteer.interventions import HeadBias, HeadScale, VectorAdd
from pysteer.models import geometry


def head_steering(geo, seed: int):
    g = torch.Generator().manual_seed(seed)
    ivs = []
    for layer in range(geo.n_layers):
        ivs.append(
            HeadBias(layer, head=None, vector=0.05 * torch.randn(geo.n_heads, geo.head_dim, generator=g))
        )
        ivs.append(HeadScale(layer, head=None, scale=1 + 0.05 * torch.randn(geo.n_heads, generator=g)))
    return ivs


def resid_steering(geo, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        VectorAdd(f"layers.{i}.resid", 0.05 * torch.randn(geo.d_model, generator=g))
        for i in range(geo.n_layers)
    ]


def weight_read_seconds(model, repeats: int = 5) -> float:
    """Median seconds to read every parameter once (GEMV per matrix, sum per vector)."""
    params = [p for p in model.parameters()]
    ones = {
        p.shape[-1]: torch.ones(p.shape[-1], dtype=p.dtype, device=p.device) for p in params if p.dim() == 2
    }
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if params[0].is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for p in params:
                if p.dim() == 2:
                    torch.mv(p, ones[p.shape[-1]])
                else:
                    p.sum()
            if params[0].is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def interleaved_step_ratio(gen_a: FastGenerator, gen_b: FastGenerator, batch: int, pairs: int) -> dict:
    """Decode step of ``gen_b`` ÷ decode step of ``gen_a``, interleaved (``_timing.interleaved_ratio``).

    Each generator must have run a batch of ``batch`` before (its compiled step and static cache).
    """
    from pysteer.steering import runtime

    def stepper(gen: FastGenerator):
        slot = next(s for (b, _), s in gen.slots.items() if b == batch)
        steering_runtime = runtime(gen.model)
        # every step writes the same cache slot (the models read the cache length off the cache)
        n0 = int(slot.cache.get_seq_length())
        cache_position = torch.full((1,), n0, dtype=torch.long, device=gen.device)
        trust = gen._trust_later_steps(slot)

        def step(trusted: bool = True) -> float:
            t = time.perf_counter()
            steering_runtime.supply_positions(*slot.positions)
            try:
                args = (
                    slot.tokens,
                    slot.pos,
                    slot.mask,
                    slot.cache,
                    cache_position if gen._pass_cache_position else None,
                )
                gen._run_step(slot, args, trusted=trusted and trust)
            finally:
                steering_runtime.clear_positions()
            if gen.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            for layer in slot.cache.layers:  # forget the token again: the next step sees n0 tokens
                layer.cumulative_length.fill_(n0)
            return dt

        return step

    a, b = stepper(gen_a), stepper(gen_b)
    with torch.no_grad():
        a(False), b(False)  # full guard check once, then the steady state of a generate call
        return interleaved_ratio(a, b, pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--compile", default="auto", help="fast path compile mode")
    p.add_argument("--skip", default="", help="comma-separated variants to skip")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--step-pairs", type=int, default=100, help="interleaved decode-step pairs per comparison")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pysteer.default_model import load_model

    base, tok = load_model(args.model)
    device = next(base.parameters()).device
    geo = geometry(base)
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    ids = tok(prompt)["input_ids"]
    skip = set(filter(None, args.skip.split(",")))
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [ids] * B
        batch = torch.tensor(prompts, device=device)
        runners = {}

        outputs = {}  # last tokens of each variant: the steered graphs must really steer

        def hf_runner(model, name):
            def run():
                t, c = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    out = model.generate(
                        batch,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )
                outputs[name] = out[:, batch.shape[1] :].tolist()
                return (
                    (time.perf_counter() - t) / args.new_tokens,
                    None,
                    (time.process_time() - c) / args.new_tokens,
                )

            return run

        def fast_runner(gen, steering, name):
            def run():
                c = time.process_time()
                res = gen.generate(
                    prompts, steering=steering, max_new_tokens=args.new_tokens, ignore_eos=True
                )
                outputs[name] = res.tokens
                cpu = (time.process_time() - c) / args.new_tokens
                return res.seconds / args.new_tokens, res.decode_seconds / max(res.steps, 1), cpu

            return run

        if "hf-eager" not in skip:
            runners["hf-eager"] = hf_runner(copy.deepcopy(base), "hf-eager")
        if "hf-eager+pysteer" not in skip:
            m = copy.deepcopy(base)
            pysteer.steer(m, head_steering(geo, 0), mode="dynamic")
            runners["hf-eager+pysteer"] = hf_runner(m, "hf-eager+pysteer")
        if "hf-compiled" not in skip:
            m = copy.deepcopy(base)
            m.generation_config.cache_implementation = "static"
            m.forward = torch.compile(m.forward, mode=None if device.type == "cpu" else "reduce-overhead")
            runners["hf-compiled"] = hf_runner(m, "hf-compiled")
        steered = {}
        fast_gens = {}
        for name, steering in (
            ("fast", None),
            ("fast+resid", resid_steering(geo, 0)),
            ("fast+heads", head_steering(geo, 0)),
        ):
            if name in skip:
                continue
            m = copy.deepcopy(base)
            gen = fast_gens[name] = FastGenerator(m, tok, compile=args.compile)
            if steering is not None:
                handle = pysteer.steer(m, steering, mode="dynamic")
                steered[name] = (gen, handle)
                runners[name] = fast_runner(gen, handle, name)
            else:
                runners[name] = fast_runner(gen, None, name)
        if B == 16 and "fast+heads-16-configs" not in skip:
            m = copy.deepcopy(base)
            gen = fast_gens["fast+heads-16-configs"] = FastGenerator(m, tok, compile=args.compile)
            handle = pysteer.steer(m, {f"c{i}": head_steering(geo, i) for i in range(16)}, mode="dynamic")
            handle.rows([f"c{i}" for i in range(16)])
            runners["fast+heads-16-configs"] = fast_runner(gen, handle, "fast+heads-16-configs")

        print(f"batch {B}: compiling and warming up {len(runners)} variants ...", file=sys.stderr)
        warm = {}
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            warm[name] = time.perf_counter() - t
            print(f"  {name}: first call {warm[name]:.1f} s", file=sys.stderr)
        per_token = {n: [] for n in runners}
        cpu_per_token = {n: [] for n in runners}
        decode = {n: [] for n in runners}
        floor = []
        names = list(runners)
        for r in range(args.rounds):
            floor.append(1000 * weight_read_seconds(base))
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
                total, dec, cpu = runners[name]()
                per_token[name].append(1000 * total)
                cpu_per_token[name].append(1000 * cpu)
                if dec is not None:
                    decode[name].append(1000 * dec)
            print(
                f"  round {r}: floor {floor[-1]:.1f}, "
                + ", ".join(f"{n} {per_token[n][-1]:.1f}" for n in runners),
                file=sys.stderr,
            )
        med = {n: statistics.median(v) for n, v in per_token.items()}
        cpu_med = {n: statistics.median(v) for n, v in cpu_per_token.items()}
        res = {
            # process CPU ms per token: steadier than wall time on a shared machine
            "cpu_ms_per_token_median": cpu_med,
            "ms_per_token_median": med,
            "ms_per_token_best": {n: min(v) for n, v in per_token.items()},
            "decode_ms_per_step_median": {n: statistics.median(v) for n, v in decode.items() if v},
            "first_call_seconds": warm,
            "samples_ms_per_token": per_token,
            "samples_cpu_ms_per_token": cpu_per_token,
            # reading every weight once (one GEMV per matrix, batch 1): the memory-bandwidth floor of a
            # batch-1 decode step on this machine, measured in the same rounds
            "weight_read_floor_ms_median": statistics.median(floor),
        }

        def paired(ref: str) -> dict[str, float]:
            """Median over rounds of ref's time ÷ the variant's time in the same round (tokens/s ratio)."""
            return {
                n: statistics.median(a / b for a, b in zip(per_token[ref], v)) for n, v in per_token.items()
            }

        if "hf-eager" in med:
            res["speedup_vs_hf_eager"] = {n: med["hf-eager"] / v for n, v in med.items()}
            res["cpu_speedup_vs_hf_eager"] = {n: cpu_med["hf-eager"] / v for n, v in cpu_med.items()}
        if "hf-eager" in med:
            res["paired_speedup_vs_hf_eager"] = paired("hf-eager")
        if "fast" in med:
            res["paired_ratio_vs_fast_unsteered"] = {
                n: v for n, v in paired("fast").items() if n.startswith("fast")
            }
            if "decode_ms_per_step_median" in res and "fast" in res["decode_ms_per_step_median"]:
                res["fast_decode_step_over_weight_read_floor"] = (
                    res["decode_ms_per_step_median"]["fast"] / res["weight_read_floor_ms_median"]
                )
            res["ratio_tokens_per_s_vs_fast_unsteered"] = {
                n: med["fast"] / v for n, v in med.items() if n.startswith("fast")
            }
            res["cpu_ratio_tokens_per_s_vs_fast_unsteered"] = {
                n: cpu_med["fast"] / v for n, v in cpu_med.items() if n.startswith("fast")
            }
        if "fast+heads-16-configs" in med and "fast+heads" in med:
            res["ratio_16_configs_vs_1_config"] = med["fast+heads"] / med["fast+heads-16-configs"]
        same = {}
        for a, b in (("fast", "hf-eager"), ("fast+heads", "hf-eager+pysteer"), ("fast+heads", "fast")):
            if a in outputs and b in outputs:
                same[f"{a} == {b}"] = outputs[a] == outputs[b]
        res["same_tokens"] = same  # greedy tokens; fast+heads == fast would mean the steering did not run
        # steady decode steps, interleaved pairwise: tokens/s ratio = 1 / step-time ratio
        pairs = {}
        if args.step_pairs and "fast" in fast_gens:
            for name in ("fast+resid", "fast+heads"):
                if name in fast_gens:
                    pairs[f"{name} vs fast"] = interleaved_step_ratio(
                        fast_gens["fast"], fast_gens[name], B, args.step_pairs
                    )
        if args.step_pairs and "fast+heads" in fast_gens and "fast+heads-16-configs" in fast_gens:
            pairs["fast+heads-16-configs vs fast+heads"] = interleaved_step_ratio(
                fast_gens["fast+heads"], fast_gens["fast+heads-16-configs"], B, args.step_pairs
            )
        if pairs:
            res["interleaved_step_time_ratio"] = pairs
            res["interleaved_tokens_per_s_ratio"] = {k: 1 / v["median"] for k, v in pairs.items()}
        # first step after a strength change vs the steady step, on the per-head variant
        if "fast+heads" in steered:
            gen, handle = steered["fast+heads"]
            ratios = []
            for r in range(args.rounds):
                handle.set_alpha(1.0 + 0.1 * (r + 1))
                times = []
                t = time.perf_counter()
                for _ in gen.stream(prompts, steering=handle, max_new_tokens=16, ignore_eos=True):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    times.append(now - t)
                    t = now
                # times[0] is the prefill; times[1] the first decode step after the change
                ratios.append(times[1] / statistics.median(times[2:]))
            res["first_step_after_change_over_steady"] = statistics.median(ratios)
        results[f"batch{B}"] = res
        print(
            json.dumps({k: v for k, v in res.items() if k not in ("samples_ms_per_token",)}, indent=1),
            file=sys.stderr,
        )

    doc = {
        "bench": "bench_fast_generate",
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "model": args.model,
        "dtype": str(next(base.parameters()).dtype),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "compile": args.compile,
        "results": results,
    }
    out = Path(args.out or f"bench/results/fast-generate-{'cpu' if device.type == 'cpu' else 'gpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
