"""Tokens/s of steered ``generate()`` vs the unhooked model, measured in one run.

Steering: a head bias plus a head scale at ``attn.heads`` of 4 layers, and separately a vector add
at ``resid`` of the same 4 layers. Variants: unhooked; pysteer fold; pysteer dynamic (1 config);
pysteer with 8 distinct configs in a batch of 8; a plain PyTorch forward-hook implementation of
the same steering. Greedy, ``min_new_tokens = max_new_tokens = 64``. Variants are interleaved
round by round in a rotating order (one warm-up round first); medians are reported, and the
median over rounds of each variant's ratio to the unhooked run of the same round. Separately, the
time spent inside pysteer's hooks is measured directly (per token, and as a share of the unhooked
step), which isolates steering's own cost from the machine's run-to-run noise. The peers (repeng, steering-vectors) need their own virtualenv:
``bench/peers/bench_peer_steering.py``.

    python bench/bench_generate.py                     # SmolLM2 on CPU
    python bench/bench_generate.py --rounds 7 --out bench/results/generate-cpu.json
"""

from __future__ import annotations

import argparse
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
from pysteer.interventions import HeadBias, HeadScale, VectorAdd
from pysteer.models import geometry

LAYERS = (8, 10, 12, 14)


def head_interventions(geo, seed: int):
    g = torch.Generator().manual_seed(seed)
    ivs = []
    for layer in LAYERS:
        ivs.append(HeadBias(layer, head=[0, 3, 5], vector=0.5 * torch.randn(3, geo.head_dim, generator=g)))
        ivs.append(HeadScale(layer, head=[1, 2], scale=1.5))
    return ivs


def resid_interventions(geo, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        VectorAdd(f"layers.{layer}.resid", 2.0 * torch.randn(geo.d_model, generator=g)) for layer in LAYERS
    ]


class PlainHooks:
    """The same steering written as ordinary forward hooks (what users write without pysteer)."""

    def __init__(self, model, ivs, geo):
        self.handles = []
        for iv in ivs:
            site = iv.site
            terms = iv.affine_terms(geo)
            layer = model.model.layers[site.layer]
            if site.kind == "attn.heads":
                m = (terms.m if terms.m is not None else torch.ones(geo.n_heads, geo.head_dim)).reshape(-1)
                a = (terms.a if terms.a is not None else torch.zeros(geo.n_heads, geo.head_dim)).reshape(-1)

                def pre(mod, args, m=m, a=a):
                    return (args[0] * m.to(args[0]) + a.to(args[0]),)

                self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
            else:
                a = terms.a.reshape(-1)

                def post(mod, args, out, a=a):
                    if isinstance(out, tuple):
                        return (out[0] + a.to(out[0]), *out[1:])
                    return out + a.to(out)

                self.handles.append(layer.register_forward_hook(post))

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_time_per_token(model, variant, gen, tokens: int) -> dict[str, float]:
    """ms per generated token spent inside pysteer's hooks, for each pysteer dynamic variant."""
    from pysteer.steering import SteeringHandle, _ModelState

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        return wrapper

    originals = (_ModelState._root_pre_hook, SteeringHandle._apply)
    out = {}
    try:
        _ModelState._root_pre_hook = timed(originals[0])
        SteeringHandle._apply = timed(originals[1])
        for name in ("head/dynamic", "resid/dynamic"):
            spent[0] = 0.0
            h = variant(name)
            try:
                gen()
            finally:
                h.remove()
            out[name] = spent[0] / tokens * 1e3
    finally:
        _ModelState._root_pre_hook, SteeringHandle._apply = originals
    return out


def interleaved_forward_ratio(unhooked, steered, ids, pairs: int) -> dict:
    """Tokens/s of ``steered`` ÷ ``unhooked`` (two copies of the model) from interleaved one-token
    decode forwards on the prompt's KV cache (``_timing.interleaved_ratio``).
    """
    from transformers import DynamicCache

    from pysteer.models.forward_args import cache_keyword

    def stepper(model):
        cache = DynamicCache()
        kw = {cache_keyword(model): cache}  # the keyword this transformers release takes
        with torch.no_grad():
            model(**ids, **kw, use_cache=True)
        mask = torch.cat([ids["attention_mask"], torch.ones_like(ids["attention_mask"][:, :1])], 1)
        token = ids["input_ids"][:, -1:]

        def step() -> float:
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=token, attention_mask=mask, **kw, use_cache=True)
            dt = time.perf_counter() - t
            cache.crop(-1)  # back to the prompt: every step sees the same cache length
            return dt

        return step

    a, b = stepper(unhooked), stepper(steered)
    a(), b()
    return interleaved_ratio(b, a, pairs)  # unhooked time ÷ steered time: the tokens/s ratio


def run_interleaved(model, tok, geo, batches: list[int], pairs: int, prompt: str) -> dict:
    """Tokens/s ratio vs the unhooked model per variant, from interleaved single decode forwards."""
    import copy

    device = next(model.parameters()).device
    out = {}
    for batch_size in batches:
        ids = tok([prompt] * batch_size, return_tensors="pt", padding=True).to(device)
        variants = {
            "head/fold": lambda m: pysteer.steer(m, head_interventions(geo, 0), mode="fold"),
            "head/dynamic": lambda m: pysteer.steer(m, head_interventions(geo, 0), mode="dynamic"),
            "head/plain-hooks": lambda m: PlainHooks(m, head_interventions(geo, 0), geo),
            "resid/dynamic": lambda m: pysteer.steer(m, resid_interventions(geo, 0), mode="auto"),
            "resid/plain-hooks": lambda m: PlainHooks(m, resid_interventions(geo, 0), geo),
        }
        res = {}
        steered = copy.deepcopy(model)
        for name, attach in variants.items():
            h = attach(steered)
            try:
                res[name] = interleaved_forward_ratio(model, steered, ids, pairs)
            finally:
                h.remove()
        if batch_size > 1:
            one = pysteer.steer(steered, head_interventions(geo, 0), mode="dynamic")
            many = copy.deepcopy(model)
            h = pysteer.steer(many, {f"c{i}": head_interventions(geo, i) for i in range(8)}, mode="dynamic")
            h.rows([f"c{i % 8}" for i in range(batch_size)])
            r = interleaved_forward_ratio(steered, many, ids, pairs)
            res["head/dynamic-8-configs vs head/dynamic"] = r
            one.remove()
            h.remove()
        out[f"batch{batch_size}"] = {k: v["median"] for k, v in res.items()}
        out[f"batch{batch_size}_detail"] = res
        print(f"batch {batch_size}: " + json.dumps(out[f"batch{batch_size}"]), file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        help="only interleaved single decode forwards: pairs per variant",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pysteer.default_model import load_model

    model, tok = load_model(args.model)
    geo = geometry(model)
    device = next(model.parameters()).device
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    if args.interleaved:
        doc = {
            "bench": "bench_generate --interleaved",
            "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": args.model,
            "dtype": str(next(model.parameters()).dtype),
            "layers": list(LAYERS),
            "tokens_per_s_ratio_vs_unhooked": run_interleaved(
                model, tok, geo, [int(b) for b in args.batches.split(",")], args.interleaved, prompt
            ),
            "load_average_at_end": os.getloadavg(),
        }
        out = Path(args.out or "bench/results/generate-interleaved-cpu.json")
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}", file=sys.stderr)
        return 0
    results = {}
    for batch_size in [int(b) for b in args.batches.split(",")]:
        ids = tok([prompt] * batch_size, return_tensors="pt", padding=True).to(device)

        def gen():
            with torch.no_grad():
                t, c = time.perf_counter(), time.process_time()
                out = model.generate(
                    **ids,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                dt, dc = time.perf_counter() - t, time.process_time() - c
            n = batch_size * args.new_tokens
            return out, n / dt, n / dc

        heads = head_interventions(geo, 0)
        resid = resid_interventions(geo, 0)
        distinct = {f"c{i}": head_interventions(geo, i) for i in range(8)}

        def variant(name):
            if name == "unhooked":
                return None
            if name == "head/fold":
                return pysteer.steer(model, heads, mode="fold")
            if name == "head/dynamic":
                return pysteer.steer(model, heads, mode="dynamic")
            if name == "head/dynamic-8-configs":
                h = pysteer.steer(model, distinct, mode="dynamic")
                h.rows([f"c{i % 8}" for i in range(batch_size)])
                return h
            if name == "head/plain-hooks":
                return PlainHooks(model, heads, geo)
            if name == "resid/dynamic":
                return pysteer.steer(model, resid, mode="auto")
            if name == "resid/plain-hooks":
                return PlainHooks(model, resid, geo)
            raise KeyError(name)

        names = [
            "unhooked",
            "head/fold",
            "head/dynamic",
            "head/plain-hooks",
            "resid/dynamic",
            "resid/plain-hooks",
        ]
        if batch_size > 1:
            names.insert(3, "head/dynamic-8-configs")
        samples = {n: [] for n in names}
        cpu_samples = {n: [] for n in names}
        paired = {n: [] for n in names}  # per round: variant ÷ unhooked of the same round (process CPU time)
        outputs = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = (
                names[r % len(names) :] + names[: r % len(names)]
            )  # rotate: no variant always follows another
            this = {}
            for n in order:
                h = variant(n)
                try:
                    out, tps, cpu_tps = gen()
                finally:
                    if h is not None:
                        h.remove()
                if r:
                    samples[n].append(tps)
                    cpu_samples[n].append(cpu_tps)
                    this[n] = cpu_tps
                outputs[n] = out
            for n in this:
                paired[n].append(this[n] / this["unhooked"])
            print(
                f"batch {batch_size} round {r}: "
                + ", ".join(f"{n} {samples[n][-1]:.1f}" for n in names if r),
                file=sys.stderr,
            )
        hook_ms = hook_time_per_token(model, variant, gen, batch_size * args.new_tokens)
        med = {n: statistics.median(v) for n, v in samples.items()}
        cpu_med = {n: statistics.median(v) for n, v in cpu_samples.items()}
        res = {
            # tokens per second of process CPU time: steadier than wall time on a shared machine
            "cpu_tokens_per_s_median": cpu_med,
            "cpu_ratio_vs_unhooked": {n: cpu_med[n] / cpu_med["unhooked"] for n in names},
            "tokens_per_s_median": med,
            "tokens_per_s_best": {n: max(v) for n, v in samples.items()},
            "samples": samples,
            "cpu_samples": cpu_samples,
            # median over rounds of (variant ÷ unhooked in the same round), process CPU time
            "paired_cpu_ratio_median": {n: statistics.median(v) for n, v in paired.items()},
            "paired_cpu_ratio_range": {n: [min(v), max(v)] for n, v in paired.items()},
            # time spent inside pysteer's hooks (root position hook + site dispatchers), per token,
            # and as a share of the unhooked model's CPU time per token: what steering costs,
            # measured without the memory-bandwidth noise that moves whole runs by several percent
            "pysteer_hook_ms_per_token": hook_ms,
            "pysteer_hook_share_of_unhooked": {n: v * cpu_med["unhooked"] / 1e3 for n, v in hook_ms.items()},
            "ratio_vs_unhooked": {n: med[n] / med["unhooked"] for n in names},
            "same_tokens": {
                "head: fold == dynamic == plain hooks": bool(
                    torch.equal(outputs["head/dynamic"], outputs["head/plain-hooks"])
                    and torch.equal(outputs["head/fold"], outputs["head/dynamic"])
                ),
                "resid: dynamic == plain hooks": bool(
                    torch.equal(outputs["resid/dynamic"], outputs["resid/plain-hooks"])
                ),
            },
        }
        if batch_size > 1:
            res["ratio_8_configs_vs_1_config"] = med["head/dynamic-8-configs"] / med["head/dynamic"]
            res["cpu_ratio_8_configs_vs_1_config"] = (
                cpu_med["head/dynamic-8-configs"] / cpu_med["head/dynamic"]
            )
        results[f"batch{batch_size}"] = res
    doc = {
        "bench": "bench_generate",
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "layers": list(LAYERS),
        "results": results,
    }
    out = Path(args.out or f"bench/results/generate-{'cpu' if device.type == 'cpu' else 'gpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    summary = {
        k: {
            "wall": v["ratio_vs_unhooked"],
            "cpu": v["cpu_ratio_vs_unhooked"],
            "paired_cpu": v["paired_cpu_ratio_median"],
            "hook_share": v["pysteer_hook_share_of_unhooked"],
        }
        for k, v in results.items()
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
