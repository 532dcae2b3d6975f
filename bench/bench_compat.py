"""repeng and steering-vectors: the library's own path vs the same code under ``pysteer.compat.accelerate``.

Runs in the peer virtualenv (the libraries pin ``transformers<5``):

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/peers-steer-venv/bin/python bench/bench_compat.py

On the embedded SmolLM2 (fp32, CPU, one thread), two copies of the model: one steered by the library's
own code (its calls made inside ``Acceleration.paused()``), one by the same calls accelerated. Per
library, interleaved round by round:

- ``eager-b{1,8}``: Hugging Face ``generate`` (greedy, ``NEW`` tokens), ms per token;
- ``compiled-b{1,8}``: ``pysteer.generate`` (static cache, inductor-compiled decode step), ms per token;
- ``strength-change-compiled-b1``: seconds of the first ``pysteer.generate`` call (``CHANGE_NEW``
  tokens) after a strength change (repeng ``set_control`` with a new coefficient; steering-vectors
  a new ``patch_activations`` multiplier, what ``with sv.apply(model, multiplier=m)`` does): the
  library re-registers its steering, so the compiled step recompiles; accelerated, the table row is
  rewritten in place. ``steady-compiled-b1`` is the same call with nothing changed.

A round's strength change also invalidates the library path's compiled batch-8 step, so from the
second round on its ``compiled-b8`` samples include that recompile (round 1's samples do not).

Each figure is a median over the rounds; ``ratio_own_over_accelerated`` > 1 means the accelerated path
is faster. The two paths' greedy tokens are compared at every strength. -> ``bench/results/compat-cpu.json``

pyvene and pyreft live in a virtualenv of their own: ``bench/peers/bench_compat_pyvene.py`` adds their
figures to the same file; each script keeps the other's entries.
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

import torch
from _timing import hf_greedy
from repeng import ControlModel, ControlVector
from steering_vectors import SteeringVector

import pysteer
from pysteer.compat import accelerate
from pysteer.default_model import load_default_model

OUT = Path(__file__).parent / "results" / "compat-cpu.json"
NEW = 16
CHANGE_NEW = 4
PROMPT_LEN = 24
LAYERS = (6, 12)
STRENGTHS = (1.5, -2.0, 3.0, -1.0, 2.5, 0.5)


def _direction(d: int, seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


class RepengPaths:
    """repeng's ``ControlModel`` on each model; strength changes are ``set_control`` calls."""

    name = "repeng"

    def __init__(self, own, accel, acc, d: int):
        self.acc = acc
        self.vector = ControlVector("llama", {k: _direction(d, k, 6.0).numpy() for k in LAYERS})
        with acc.paused():
            self.own = ControlModel(own, list(LAYERS))
        self.accel = ControlModel(accel, list(LAYERS))
        self.set_strength(STRENGTHS[0])

    def set_strength(self, coeff: float) -> None:
        with self.acc.paused():
            self.own.set_control(self.vector, coeff)
        self.accel.set_control(self.vector, coeff)

    def close(self) -> None:
        with self.acc.paused():
            self.own.reset()
            self.own.unwrap()
        self.accel.reset()
        self.accel.unwrap()


class SteeringVectorsPaths:
    """A steering-vectors ``SteeringVector`` patched into each model; a strength change removes the
    patch and patches again with the new multiplier (what ``with sv.apply(model, multiplier=m)`` does)."""

    name = "steering-vectors"

    def __init__(self, own, accel, acc, d: int):
        self.acc = acc
        self.models = {"own": own, "accelerated": accel}
        self.vector = SteeringVector(
            {k: _direction(d, 10 + k, 8.0) for k in LAYERS}, layer_type="decoder_block"
        )
        self.handles: dict = {}
        self.set_strength(STRENGTHS[0])

    def _patch(self, path: str, multiplier: float) -> None:
        if path in self.handles:
            self.handles[path].remove()
        self.handles[path] = self.vector.patch_activations(self.models[path], multiplier=multiplier)

    def set_strength(self, multiplier: float) -> None:
        with self.acc.paused():
            self._patch("own", multiplier)
        self._patch("accelerated", multiplier)

    def close(self) -> None:
        with self.acc.paused():
            self.handles.pop("own").remove()
        self.handles.pop("accelerated").remove()


def _compiled(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    out = pysteer.generate(model, ids, max_new_tokens=new, progress=False, ignore_eos=True)
    return torch.as_tensor(out.tokens)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_library(paths, models: dict, prompts: dict, rounds: int) -> dict:
    """Every variant of one library, own and accelerated back to back in each round."""
    samples: dict[str, list[float]] = {}
    first_call: dict[str, float] = {}
    agree: list[bool] = []

    def record(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds)

    for path, model in models.items():  # compile each model's decode steps once, outside the rounds
        for b, ids in prompts.items():
            first_call[f"{path}/compiled-b{b}"] = _timed(lambda m=model, i=ids: _compiled(m, i, NEW))[0]
        _compiled(model, prompts[1], CHANGE_NEW)
    for r in range(rounds):
        for b, ids in prompts.items():
            for kind, run, new in (("eager", hf_greedy, NEW), ("compiled", _compiled, NEW)):
                for path, model in models.items():
                    record(f"{path}/{kind}-b{b}", _timed(lambda m=model: run(m, ids, new))[0] / new)
        for path, model in models.items():
            record(
                f"{path}/steady-compiled-b1", _timed(lambda m=model: _compiled(m, prompts[1], CHANGE_NEW))[0]
            )
        paths.set_strength(STRENGTHS[1 + r % (len(STRENGTHS) - 1)])
        tokens = {}
        for path, model in models.items():
            seconds, tokens[path] = _timed(lambda m=model: _compiled(m, prompts[1], CHANGE_NEW))
            record(f"{path}/strength-change-compiled-b1", seconds)
        agree.append(bool(torch.equal(tokens["own"], tokens["accelerated"])))
        agree.append(
            bool(
                torch.equal(
                    hf_greedy(models["own"], prompts[8], 4), hf_greedy(models["accelerated"], prompts[8], 4)
                )
            )
        )
    return _summary(samples, first_call, agree)


def _summary(samples: dict, first_call: dict, agree: list[bool]) -> dict:
    median = {k: statistics.median(v) for k, v in samples.items()}
    variants = sorted({k.split("/", 1)[1] for k in median})
    return {
        "ms_per_token_median": {
            k: 1e3 * v for k, v in median.items() if "strength" not in k and "steady" not in k
        },
        "seconds_median": {k: v for k, v in median.items() if "strength" in k or "steady" in k},
        "ratio_own_over_accelerated": {v: median[f"own/{v}"] / median[f"accelerated/{v}"] for v in variants},
        "first_call_seconds": first_call,
        "samples_seconds": samples,
        "greedy_tokens_equal_every_round": all(agree),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    own, tok = load_default_model(progress=False)
    accel, _ = load_default_model(progress=False)
    d = own.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(100, 40000, (b, PROMPT_LEN), generator=gen) for b in (1, 8)}
    results = {}
    with accelerate("repeng") as acc_repeng, accelerate("steering_vectors") as acc_sv:
        for cls, acc in ((RepengPaths, acc_repeng), (SteeringVectorsPaths, acc_sv)):
            paths = cls(own, accel, acc, d)
            try:
                results[paths.name] = bench_library(
                    paths, {"own": own, "accelerated": accel}, prompts, args.rounds
                )
            finally:
                paths.close()
            print(
                json.dumps({paths.name: results[paths.name]["ratio_own_over_accelerated"]}, indent=1),
                flush=True,
            )
    report = {
        "bench": "bench_compat",
        "device": "cpu",
        "host": platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),
        "versions": {
            n: importlib.metadata.version(n) for n in ("torch", "transformers", "repeng", "steering-vectors")
        },
        "model": "default (SmolLM2-135M-Instruct), fp32",
        "new_tokens": NEW,
        "strength_change_new_tokens": CHANGE_NEW,
        "prompt_tokens": PROMPT_LEN,
        "rounds": args.rounds,
        "layers": list(LAYERS),
        "results": results,
    }
    if args.out.exists():  # keep the libraries this script does not run (bench_compat_pyvene.py's)
        previous = json.loads(args.out.read_text()).get("results", {})
        report["results"] = {**{k: v for k, v in previous.items() if k not in results}, **results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
