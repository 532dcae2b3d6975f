"""pyvene and pyreft: ``IntervenableModel.generate`` on pyvene's own path vs the same call under
``pysteer.compat.accelerate``. The twin of ``bench/bench_compat.py`` for pyvene's virtualenv (pyvene
0.1.8 and pyreft 0.1.0 run on transformers 4.57.6; repeng and steering-vectors are not installed there):

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/peers-pyvene-venv/bin/python bench/peers/bench_compat_pyvene.py

On the embedded SmolLM2 (fp32, CPU, one thread), one ``IntervenableModel`` per library, its own
path run inside ``Acceleration.paused()``:

- ``pyvene``: two ``AdditionIntervention``s with a fixed source at ``block_output`` of layers 6 and
  12, pyvene's default ``generate`` (every generated token edited, position 0 of each decode step);
- ``pyreft``: a rank-4 ``LoreftIntervention`` at ``block_output`` of layer 15 on the last prompt
  token, ``intervene_on_prompt=True`` (pyreft's own generation recipe).

``eager-b{1,8}``: Hugging Face ``generate`` through the library's call (greedy, ``NEW`` tokens),
ms per token. Own and accelerated alternate within each round (which goes first alternates too);
each figure is a median over the rounds; ``ratio_own_over_accelerated`` > 1 means the accelerated
path is faster. The two paths' greedy tokens are compared every round. The results are added to
``bench/results/compat-cpu.json`` under ``results.pyvene`` / ``results.pyreft``; its other entries
are kept.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import time
from pathlib import Path

import pyreft
import pyvene as pv
import torch

from pysteer.compat import accelerate
from pysteer.default_model import load_default_model

OUT = Path(__file__).parents[1] / "results" / "compat-cpu.json"
NEW = 16
PROMPT_LEN = 24
BATCHES = (1, 8)


def _direction(d: int, seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def pyvene_additions(model):
    """Fixed-source additions at layers 6 and 12, every generated token (pyvene's default generate)."""
    d = model.config.hidden_size
    intervenable = pv.IntervenableModel(
        [
            {
                "layer": layer,
                "component": "block_output",
                "intervention": pv.AdditionIntervention(
                    source_representation=_direction(d, layer, 8.0), embed_dim=d
                ),
            }
            for layer in (6, 12)
        ],
        model,
    )
    return intervenable, lambda ids: {}


def pyreft_loreft(model):
    """A rank-4 LoReFT at layer 15 on the last prompt token, edited in the prompt's forward."""
    d = model.config.hidden_size
    torch.manual_seed(0)
    config = pyreft.ReftConfig(
        representations=[
            {
                "layer": 15,
                "component": "block_output",
                "low_rank_dimension": 4,
                "intervention": pyreft.LoreftIntervention(
                    embed_dim=d, low_rank_dimension=4, dtype=torch.float32
                ),
            }
        ]
    )
    reft = pyreft.get_reft_model(model, config, set_device=False)
    with torch.no_grad():
        for iv in reft.interventions.values():
            iv.learned_source.bias.normal_()
    return reft, lambda ids: {"unit_locations": {"base": ids.shape[1] - 1}, "intervene_on_prompt": True}


LIBRARIES = {"pyvene": pyvene_additions, "pyreft": pyreft_loreft}


def _generate(intervenable, ids: torch.Tensor, how: dict) -> torch.Tensor:
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = intervenable.generate(
        base, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **how
    )[1]
    return out[:, ids.shape[1] :]


def bench_library(intervenable, how, acc, prompts: dict, rounds: int) -> dict:
    """Own and accelerated generate, alternating, ``rounds`` times per batch size."""
    samples: dict[str, list[float]] = {}
    agree = []
    for r in range(rounds):
        for b, ids in prompts.items():
            tokens = {}
            order = ("own", "accelerated") if r % 2 == 0 else ("accelerated", "own")
            for path in order:
                t0 = time.perf_counter()
                if path == "own":
                    with acc.paused():
                        tokens[path] = _generate(intervenable, ids, how(ids))
                else:
                    tokens[path] = _generate(intervenable, ids, how(ids))
                samples.setdefault(f"{path}/eager-b{b}", []).append((time.perf_counter() - t0) / NEW)
            agree.append(bool(torch.equal(tokens["own"], tokens["accelerated"])))
    median = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    variants = sorted({k.split("/", 1)[1] for k in median})
    return {
        "ms_per_token_median": median,
        "ratio_own_over_accelerated": {v: median[f"own/{v}"] / median[f"accelerated/{v}"] for v in variants},
        "samples_seconds_per_token": samples,
        "greedy_tokens_equal_every_round": all(agree),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_default_model(progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(100, 40000, (b, PROMPT_LEN), generator=gen) for b in BATCHES}
    results = {}
    with accelerate("pyreft") as acc:
        for name, build in LIBRARIES.items():
            intervenable, how = build(model)
            _generate(intervenable, prompts[1], how(prompts[1]))  # warm-up, outside the rounds
            results[name] = bench_library(intervenable, how, acc, prompts, args.rounds)
            print(json.dumps({name: results[name]["ratio_own_over_accelerated"]}, indent=1), flush=True)
    run = {
        "bench": "bench/peers/bench_compat_pyvene.py",
        "threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),
        "versions": {n: importlib.metadata.version(n) for n in ("torch", "transformers", "pyvene", "pyreft")},
        "model": "default (SmolLM2-135M-Instruct), fp32",
        "new_tokens": NEW,
        "prompt_tokens": PROMPT_LEN,
        "rounds": args.rounds,
    }
    report = json.loads(args.out.read_text()) if args.out.exists() else {"results": {}}
    for name, result in results.items():
        report.setdefault("results", {})[name] = {**result, "run": run}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
