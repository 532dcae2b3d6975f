"""ITI: honest_llama's own hook vs the same directions through ``pysteer.compat.iti``.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_iti.py

On the embedded SmolLM2 (fp32, CPU, one thread), three copies of the model: ``plain`` (no steering),
``honest`` (honest_llama's ``lt_modulated_vector_add`` on every steered layer's ``o_proj`` input, as
its baukit ``TraceDict`` applies it: one Python hook per layer that loops over the layer's heads) and
``pysteer`` (``iti.steer``: one table op per steered layer). ``HEADS`` heads (honest_llama's default
K = 48) at ``ALPHA = 15``, the ``"lt"`` rule. Interleaved round by round:

- ``eager-b{1,8}``: Hugging Face ``generate`` (greedy, ``NEW`` tokens, KV cache), ms per token;
- ``compiled-b{1,8}``: ``pysteer.generate`` (static cache, inductor-compiled decode step), ms per
  token, for ``plain`` and ``pysteer`` only: honest_llama's hook builds a tensor from a numpy array
  on every call, which the compiler cannot trace.

Each figure is a median over the rounds. Ratios: ``honest / pysteer`` (> 1: pysteer is faster) and
``steered / plain`` (the cost of steering). The greedy tokens of ``honest`` and ``pysteer`` are
compared every round. -> ``bench/results/iti-cpu.json``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _timing import hf_greedy

import pysteer
from pysteer.compat import iti
from pysteer.default_model import load_default_model
from pysteer.models import geometry, get_spec
from pysteer.models.specs import get_submodule

OUT = Path(__file__).parent / "results" / "iti-cpu.json"
NEW = 16
PROMPT_LEN = 24
HEADS = 48
ALPHA = 15.0


def interventions_dict(model, seed: int = 0) -> dict:
    """honest_llama's interventions dict for ``HEADS`` random heads: unit directions and the std of
    (random) tuning activations projected on them, keyed and sorted as ``get_interventions_dict`` does."""
    geo = geometry(model)
    rng = np.random.default_rng(seed)
    flat = rng.choice(geo.n_layers * geo.n_heads, size=HEADS, replace=False)
    out: dict[str, list] = {}
    for idx in flat:
        layer, head = divmod(int(idx), geo.n_heads)
        direction = rng.normal(size=geo.head_dim)
        direction = direction / np.linalg.norm(direction)
        proj_val_std = np.std(0.1 * rng.normal(size=(64, geo.head_dim)) @ direction)
        out.setdefault(f"model.layers.{layer}.self_attn.head_out", []).append((head, direction, proj_val_std))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def honest_hooks(model, interventions: dict, alpha: float) -> list:
    """honest_llama's ``legacy/llama_validate_2fold.py: lt_modulated_vector_add`` with
    ``start_edit_location='lt'``, on each listed layer's ``o_proj`` input (its ``head_out``)."""
    num_heads = geometry(model).n_heads
    spec = get_spec(model)
    layers = get_submodule(model, spec.layers)

    def lt_modulated_vector_add(head_output, layer_name):
        b, s, _ = head_output.shape
        head_output = head_output.reshape(b, s, num_heads, -1)
        for head, direction, proj_val_std in interventions[layer_name]:
            direction_to_add = torch.tensor(direction)
            head_output[:, -1, head, :] += alpha * proj_val_std * direction_to_add
        return head_output.reshape(b, s, -1)

    handles = []
    for name in interventions:
        proj = get_submodule(layers[int(name.split(".")[2])], spec.attn_out_proj)
        handles.append(
            proj.register_forward_pre_hook(lambda m, a, n=name: (lt_modulated_vector_add(a[0], n), *a[1:]))
        )
    return handles


def _compiled(model, ids: torch.Tensor, steering) -> torch.Tensor:
    out = pysteer.generate(model, ids, steering=steering, max_new_tokens=NEW, progress=False, ignore_eos=True)
    return torch.as_tensor(out.tokens)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def run(rounds: int) -> dict:
    models = {name: load_default_model(progress=False)[0] for name in ("plain", "honest", "pysteer")}
    interventions = interventions_dict(models["plain"])
    hooks = honest_hooks(models["honest"], interventions, ALPHA)
    handle = iti.steer(models["pysteer"], interventions, alpha=ALPHA, mode="dynamic")
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(100, 40000, (b, PROMPT_LEN), generator=gen) for b in (1, 8)}
    compiled_paths = {"plain": None, "pysteer": handle}
    first_call = {}
    for name, steering in compiled_paths.items():  # compile each decode step once, outside the rounds
        for b, ids in prompts.items():
            first_call[f"{name}/compiled-b{b}"] = _timed(lambda m=models[name], s=steering, i=ids: _compiled(m, i, s))[0]  # fmt: skip
    samples: dict[str, list[float]] = {}
    agree = []
    for _ in range(rounds):
        for b, ids in prompts.items():
            tokens = {}
            for name, model in models.items():
                seconds, tokens[name] = _timed(lambda m=model: hf_greedy(m, ids, NEW))
                samples.setdefault(f"{name}/eager-b{b}", []).append(seconds / NEW)
            agree.append(bool(torch.equal(tokens["honest"], tokens["pysteer"])))
            for name, steering in compiled_paths.items():
                seconds = _timed(lambda m=models[name], s=steering: _compiled(m, ids, s))[0]
                samples.setdefault(f"{name}/compiled-b{b}", []).append(seconds / NEW)
    for h in hooks:
        h.remove()
    handle.remove()
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "ms_per_token_median": {k: 1e3 * v for k, v in median.items()},
        "ratio_honest_over_pysteer": {
            f"eager-b{b}": median[f"honest/eager-b{b}"] / median[f"pysteer/eager-b{b}"] for b in prompts
        },
        "ratio_steered_over_plain": {
            **{
                f"honest/eager-b{b}": median[f"honest/eager-b{b}"] / median[f"plain/eager-b{b}"]
                for b in prompts
            },
            **{
                f"pysteer/eager-b{b}": median[f"pysteer/eager-b{b}"] / median[f"plain/eager-b{b}"]
                for b in prompts
            },
            **{
                f"pysteer/compiled-b{b}": median[f"pysteer/compiled-b{b}"] / median[f"plain/compiled-b{b}"]
                for b in prompts
            },
        },  # fmt: skip
        "first_call_seconds": first_call,
        "samples_seconds_per_token": samples,
        "greedy_tokens_equal_every_round": all(agree),
        "steered_layers": len(interventions),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_at_start = list(os.getloadavg())
    results = run(args.rounds)
    report = {
        "bench": "bench_iti",
        "device": "cpu",
        "host": platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "versions": {n: importlib.metadata.version(n) for n in ("torch", "transformers")},
        "model": "default (SmolLM2-135M-Instruct), fp32",
        "heads": HEADS,
        "alpha": ALPHA,
        "rule": "lt (last_prompt+generated)",
        "new_tokens": NEW,
        "prompt_tokens": PROMPT_LEN,
        "rounds": args.rounds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {k: results[k] for k in ("ratio_honest_over_pysteer", "ratio_steered_over_plain")}, indent=1
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
