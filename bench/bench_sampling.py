"""N samples per question on the fast path vs Hugging Face ``generate(num_return_sequences=N)``, the
cost of taps and of the abstain gate, in one run with the variants interleaved round by round.

Variants (``do_sample=True``, temperature 1, top-k 50 (HF's default), N samples per question,
exactly ``--new-tokens`` tokens per sample: EOS ignored / ``min_new_tokens``):
  hf-eager        HF ``generate(num_return_sequences=N)``: dynamic cache, eager; N prefills per question
  hf-compiled     same with ``cache_implementation="static"`` and ``torch.compile(model.forward)``
  fast            ``pysteer.generate(num_return_sequences=N)``: one prefill per question, its KV cache
                  copied to the N rows, compiled decode step, log-probs of every token
  fast+taps       the same with ``taps="all"`` (every layer's resid at the last prompt token and at
                  the second-last generated token)

Questions are sent ``--per-call`` at a time (N x per-call rows per batch); HF gets them padded to
one width (one compiled prefill shape). Each variant has its own copy of the model. After the
rounds: the decode step with taps ÷ without (``--step-pairs`` adjacent pairs); the prefill with the
abstain gate ÷ without (``--gate-pairs`` pairs of ``max_new_tokens=1`` calls on all questions, a
generator of its own); and the decode work the gate saves with the threshold at the median score
(about half of the questions abstain), counted in row-steps and timed gated vs ungated (one pair,
eager decode step: a compiled one would compile a graph per batch bucket the abstentions leave).

The probe is a stand-in (a fixed random direction over layers 10-19, logistic): it measures the
gate's cost and the decode work it saves, not the quality of a semantic-entropy probe.

Default: a subset of 6 of the 32 questions (a loaded 2-core CPU runs each round of 5 variants in
minutes); ``--questions 32`` is the full 32 x 10 x 50 run.

    python bench/bench_sampling.py                 # subset, writes bench/results/sampling-cpu.json
    python bench/bench_sampling.py --questions 32  # the full run
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
from bench_fast_generate import interleaved_step_ratio

from pysteer.fast import FastGenerator
from pysteer.models import geometry
from pysteer.models.sites import guard_hooks_in_compiled_graphs

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many continents are there on Earth?",
    "What planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?",
    "In which year did the first person walk on the Moon?",
    "What is the boiling point of water in degrees Celsius at sea level?",
    "What language is mostly spoken in Brazil?",
    "Who developed the theory of general relativity?",
    "What is the smallest prime number?",
    "What is the capital of Australia?",
    "Which gas do plants absorb from the air for photosynthesis?",
    "What is the longest river in Africa?",
    "How many legs does a spider have?",
    "Who was the first President of the United States?",
    "What is the square root of 144?",
    "What is the currency of Japan?",
    "Which organ pumps blood through the human body?",
    "What is the hardest natural substance?",
    "Who discovered penicillin?",
    "What is the capital city of Canada?",
    "How many days are there in a leap year?",
    "What is the tallest mountain in the world?",
    "Which element has the atomic number 1?",
    "Who wrote the novel Nineteen Eighty-Four?",
    "What is the freezing point of water in degrees Fahrenheit?",
    "Which country is home to the kangaroo?",
    "What is the main ingredient of guacamole?",
    "What was the name of the ship that sank in 1912 after hitting an iceberg?",
    "What is the name of the seventh planet from the Sun?",
]
PROBE_LAYERS = range(10, 20)


class RandomProbe:
    """Stand-in abstain probe: ``sigmoid(concat(h) @ w + b)`` over ``PROBE_LAYERS``' resid."""

    def __init__(self, d_model: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.sites = [f"layers.{i}.resid" for i in PROBE_LAYERS]
        self.weight = torch.randn(len(self.sites) * d_model, generator=g) / (len(self.sites) * d_model) ** 0.5
        self.bias = 0.0

    def __call__(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(torch.cat(hidden, -1) @ self.weight + self.bias)


def prompts_of(tok, questions: list[str]) -> list[str]:
    return [f"Answer the question briefly.\nQuestion: {q}\nAnswer:" for q in questions]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--questions", type=int, default=6, help="how many of the 32 questions (32: the full run)")
    p.add_argument("--per-call", type=int, default=3, help="questions per generate call")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--step-pairs", type=int, default=60)
    p.add_argument("--gate-pairs", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="fast path torch.compile backend (aot_eager: smoke runs)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    from pysteer.default_model import load_model

    base, tok = load_model(args.model)
    tok.padding_side = "left"
    geo = geometry(base)
    questions = QUESTIONS[: args.questions]
    chunks = [
        prompts_of(tok, questions[i : i + args.per_call]) for i in range(0, len(questions), args.per_call)
    ]
    N, T = args.samples, args.new_tokens
    sampling = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
    skip = set(filter(None, args.skip.split(",")))
    probe = RandomProbe(geo.d_model)
    width = max(len(tok(q)["input_ids"]) for q in prompts_of(tok, questions))

    def hf_runner(model):
        def run(seed: int) -> dict:
            torch.manual_seed(seed)
            t, rows = time.perf_counter(), 0
            for chunk in chunks:
                enc = tok(chunk, return_tensors="pt", padding="max_length", max_length=width)
                with torch.no_grad():
                    out = model.generate(
                        **enc,
                        max_new_tokens=T,
                        min_new_tokens=T,
                        num_return_sequences=N,
                        pad_token_id=tok.pad_token_id,
                        **sampling,
                    )
                rows += out.shape[0]
            return {"seconds": time.perf_counter() - t, "tokens": rows * T}

        return run

    def fast_runner(gen: FastGenerator, **extra):
        def run(seed: int) -> dict:
            t, tokens, steps, abstained, decode = time.perf_counter(), 0, 0, 0, 0.0
            for chunk in chunks:
                res = gen.generate(
                    chunk,
                    max_new_tokens=T,
                    num_return_sequences=N,
                    ignore_eos=True,
                    seed=seed,
                    **sampling,
                    **extra,
                )
                tokens += sum(len(x) for x in res.tokens)
                steps += sum(T for a in res.abstained if not a)  # row-steps decoded
                abstained += sum(res.abstained)
                decode += res.decode_seconds
            return {
                "seconds": time.perf_counter() - t,
                "tokens": tokens,
                "row_steps": steps,
                "abstained_rows": abstained,
                "decode_seconds": decode,
            }

        return run

    runners = {}
    if "hf-eager" not in skip:
        runners["hf-eager"] = hf_runner(copy.deepcopy(base))
    if "hf-compiled" not in skip:
        m = copy.deepcopy(base)
        m.generation_config.cache_implementation = "static"
        m.forward = torch.compile(m.forward)
        runners["hf-compiled"] = hf_runner(m)
    # The first hook pysteer installs makes Dynamo guard on hooks and drops the graphs compiled
    # before (once per process): turn that on first, or the taps variant would recompile "fast".
    guard_hooks_in_compiled_graphs()
    gens = {
        name: FastGenerator(copy.deepcopy(base), tok, compile_backend=args.compile_backend)
        for name in ("fast", "fast+taps")
    }
    gens["gate"] = FastGenerator(copy.deepcopy(base), tok, compile=False)
    runners["fast"] = fast_runner(gens["fast"])
    runners["fast+taps"] = fast_runner(gens["fast+taps"], taps="all")
    runners = {n: r for n, r in runners.items() if n not in skip}

    print(
        f"{len(questions)} questions x {N} samples x {T} tokens; warming up {len(runners)} variants ...",
        file=sys.stderr,
    )
    first_call = {}
    for name, run in runners.items():
        t = time.perf_counter()
        run(0)
        first_call[name] = time.perf_counter() - t
        print(f"  {name}: first call {first_call[name]:.1f} s", file=sys.stderr)
    samples = {n: [] for n in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
            samples[name].append(runners[name](1 + r))
        print(
            f"  round {r}: "
            + ", ".join(
                f"{n} {samples[n][-1]['tokens'] / samples[n][-1]['seconds']:.1f} tok/s" for n in names
            ),
            file=sys.stderr,
        )

    tps = {n: [s["tokens"] / s["seconds"] for s in v] for n, v in samples.items()}
    res: dict = {
        "what": "sampled generation, N samples per question, exactly new_tokens per sample; tokens/s over all rows",
        "model": args.model,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "questions": len(questions),
        "full_set": len(QUESTIONS),
        "subset": len(questions) < len(QUESTIONS),
        "per_call": args.per_call,
        "samples": N,
        "new_tokens": T,
        "sampling": sampling,
        "rounds": args.rounds,
        "tokens_per_s_median": {n: statistics.median(v) for n, v in tps.items()},
        "tokens_per_s_samples": tps,
        "first_call_seconds": first_call,
    }

    def paired(ref: str) -> dict:
        """Median over rounds of the variant's tokens/s ÷ ref's in the same round."""
        return {n: statistics.median(a / b for a, b in zip(v, tps[ref])) for n, v in tps.items()}

    for ref in ("hf-eager", "hf-compiled"):
        if ref in tps:
            res[f"tokens_per_s_ratio_vs_{ref}"] = paired(ref)
    if "fast+taps" in tps:
        res["taps_end_to_end_time_ratio"] = 1 / paired("fast")["fast+taps"]

    # taps: the decode step with the recorder ÷ without, adjacent pairs on the last call's slot
    batch = 1 << (len(chunks[-1]) * N - 1).bit_length()
    gens["fast+taps"]._recorder.phase = "decode"  # the steps below replay decode steps outside a call
    res["taps_decode_step_ratio"] = interleaved_step_ratio(
        gens["fast"], gens["fast+taps"], batch, args.step_pairs
    )
    gens["fast+taps"]._recorder.phase = "prefill"

    # gate: prefill (+ first token) of all questions with the gate ÷ without, threshold 1 (nobody
    # abstains). The ungated side runs on a generator without taps: the gate's whole cost is counted.
    every = prompts_of(tok, questions)
    plain_gen, gated_gen = gens["fast"], gens["gate"]

    def prefill(gen, **extra):
        def run() -> float:
            return gen.generate(every, max_new_tokens=1, **extra).seconds

        return run

    with torch.no_grad():
        prefill(plain_gen)(), prefill(gated_gen, abstain=probe, threshold=1.0)()
        res["gate_prefill_time_ratio"] = interleaved_ratio(
            prefill(plain_gen), prefill(gated_gen, abstain=probe, threshold=1.0), args.gate_pairs
        )
    # gate: decode work saved at the median score (eager decode step on the gate's generator)
    scores = gated_gen.generate(every, max_new_tokens=1, abstain=probe, threshold=1.0).abstain_scores
    threshold = statistics.median(scores)
    gated_run = fast_runner(gated_gen, abstain=probe, threshold=threshold)
    ungated_run = fast_runner(gated_gen)
    g, f = gated_run(7), ungated_run(7)
    res["gate"] = {
        "probe": "stand-in: fixed random direction over layers 10-19 resid, logistic",
        "probe_sites": probe.sites,
        "threshold_median_score": threshold,
        "scores": scores,
        "abstained_rows": g["abstained_rows"],
        "rows": len(questions) * N,
        "decoded_row_steps": g["row_steps"],
        "ungated_row_steps": f["row_steps"],
        "decode_work_saved": 1 - g["row_steps"] / f["row_steps"],
        "decode_seconds_gated": g["decode_seconds"],
        "decode_seconds_ungated": f["decode_seconds"],
        "decode_seconds_saved_fraction": 1 - g["decode_seconds"] / f["decode_seconds"],
    }
    res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()
    res["python"], res["torch"], res["platform"] = (
        platform.python_version(),
        torch.__version__,
        platform.platform(),
    )
    import transformers

    res["transformers"] = transformers.__version__
    out = Path(args.out or Path(__file__).parent / "results" / "sampling-cpu.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in res if "ratio" in k or k == "tokens_per_s_median"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
