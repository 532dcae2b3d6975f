"""End-to-end steered decode on a random model of a real shape, in one run (the GPU check's figures).

A random Llama-3-8B-shaped model (bf16 on a GPU; ``--shape tiny``: a 2-layer fp32 model for the
CPU dry run), greedy, fixed token-id prompts, every token generated (``ignore_eos``). Variants, in
order of value, each timed as ms per decode step (median over ``--rounds`` calls):

- ``fast``: ``pysteer.generate`` unsteered (static cache, compiled decode step).
- ``fast+heads``: per-head bias + scale on every layer (one handle, dynamic).
- ``first step after a change``: the first decode step of the call right after ``set_alpha``,
  divided by the median steady step (in-place tables: no recompilation).
- batch 16: ``fast``, ``fast+heads`` with one config for every row, and 16 distinct configs
  (``handle.rows``) in the same compiled graph.
- ``hf-eager`` / ``hf-eager+pysteer``: Hugging Face ``generate()`` without a static cache, unhooked
  and with the same steering.
- ``hf-compiled``: Hugging Face ``generate()`` with a static cache and ``torch.compile(forward)``.
- ``fast+heads-fused``: the same steering with ``projection="fused"`` (``attn.heads`` applied while
  the output projection reads its input, ``pysteer::affine_linear``), against ``fast+heads``.

Targets (from the fast-generation issue): 8B steered decode <= 6.5 ms/token at batch 1,
per-head steering <= 1.01x, first step after a change <= 1.05x, 16 configs >= 0.98x of one.

    python bench/bench_e2e.py --out /tmp/e2e.json                 # GPU: Llama-3-8B shape, bf16
    python bench/bench_e2e.py --shape tiny --device cpu --compile-backend aot_eager   # dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import device_slug  # noqa: E402
from bench_fast_generate import head_steering  # noqa: E402  (the same steering as the CPU bench)

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
    ),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    return model.eval()


def step_times(gen, prompts, new_tokens: int, steering=None) -> list[float]:
    """Seconds of each decode step of one call (the first yield is the prefill's token)."""
    stamps = []
    for _ in gen.stream(prompts, steering=steering, max_new_tokens=new_tokens, ignore_eos=True):
        if gen.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def median_step(gen, prompts, new_tokens, rounds, steering=None) -> float:
    steps = []
    for _ in range(rounds):
        steps += step_times(gen, prompts, new_tokens, steering)
    return statistics.median(steps)


def hf_ms_per_token(model, batch, new_tokens, rounds) -> float:
    times = []
    for _ in range(rounds + 1):  # the first call warms up (and compiles, for hf-compiled)
        if batch.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        if batch.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / new_tokens)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on CPU by default")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--compile", default="auto", help="fast path compile mode (auto: reduce-overhead on a GPU)"
    )
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--skip", default="", help="comma-separated: hf-eager, hf-compiled, batch16")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import pysteer
    from pysteer.fast import FastGenerator
    from pysteer.models import geometry

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    model = random_model(args.shape, device, dtype)
    geo = geometry(model)
    report: dict = {
        "shape": args.shape,
        "device": device_slug(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "new_tokens": args.new_tokens,
        "model_seconds": round(time.perf_counter() - t0, 1),
        "ms_per_step": {},
        "ratios": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(
        3, min(SHAPES[args.shape]["vocab_size"], 30000), (args.prompt_tokens,), generator=g
    ).tolist()
    gen = FastGenerator(model, compile=args.compile, compile_backend=args.compile_backend, progress=True)
    ms = report["ms_per_step"]

    def stamp(name: str, seconds: float) -> None:
        ms[name] = round(seconds * 1e3, 4)
        print(
            f"bench_e2e: {name}: {ms[name]} ms/step  [{time.perf_counter() - t0:.0f} s]",
            file=sys.stderr,
            flush=True,
        )
        save()

    for batch in (1, 16):
        if batch == 16 and "batch16" in skip:
            continue
        prompts = [prompt] * batch
        step_times(gen, prompts, 4)  # compile the unsteered bucket
        stamp(f"b{batch}/fast", median_step(gen, prompts, args.new_tokens, args.rounds))
        configs = {f"c{i}": head_steering(geo, i) for i in range(16)}
        handle = pysteer.steer(model, configs, mode="dynamic")
        handle.rows(["c0"] * batch)
        step_times(gen, prompts, 4, handle)  # the steered graph
        steady = median_step(gen, prompts, args.new_tokens, args.rounds, handle)
        stamp(f"b{batch}/fast+heads", steady)
        report["ratios"][f"b{batch}/fast+heads vs fast"] = ms[f"b{batch}/fast+heads"] / ms[f"b{batch}/fast"]
        if batch == 1:
            handle.set_alpha(1.5, "c0")
            first = step_times(gen, prompts, 4, handle)[0]
            report["ratios"]["first step after a change vs steady"] = first / steady
            handle.remove()
            # the same steering with attn.heads run as pysteer::affine_linear (fused projection)
            handle = pysteer.steer(model, configs, mode="dynamic", projection="fused")
            handle.rows(["c0"] * batch)
            step_times(gen, prompts, 4, handle)
            stamp("b1/fast+heads-fused", median_step(gen, prompts, args.new_tokens, args.rounds, handle))
            report["ratios"]["b1/fused vs separate projection"] = (
                ms["b1/fast+heads-fused"] / ms["b1/fast+heads"]
            )
        else:
            handle.rows([f"c{i}" for i in range(16)])
            stamp(
                "b16/fast+heads-16-configs", median_step(gen, prompts, args.new_tokens, args.rounds, handle)
            )
            report["ratios"]["b16/16 configs vs 1 config"] = (
                ms["b16/fast+heads"] / ms["b16/fast+heads-16-configs"]
            )
        handle.remove()
        save()

    batch1 = torch.tensor([prompt], device=device)
    if "hf-eager" not in skip:
        stamp("b1/hf-eager", hf_ms_per_token(model, batch1, args.new_tokens, args.rounds))
        with pysteer.steer(model, head_steering(geo, 0), mode="dynamic"):
            stamp("b1/hf-eager+pysteer", hf_ms_per_token(model, batch1, args.new_tokens, args.rounds))
        report["ratios"]["b1/fast vs hf-eager (tokens/s)"] = ms["b1/hf-eager"] / ms["b1/fast"]
    if "hf-compiled" not in skip:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(
            model.forward,
            backend=args.compile_backend,
            mode="reduce-overhead" if device.type == "cuda" else None,
        )
        stamp("b1/hf-compiled", hf_ms_per_token(model, batch1, args.new_tokens, args.rounds))
        report["ratios"]["b1/fast vs hf-compiled (tokens/s)"] = ms["b1/hf-compiled"] / ms["b1/fast"]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(report["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
