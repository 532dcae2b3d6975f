"""Time steered greedy ``generate()`` with the peer libraries repeng and steering-vectors on CPU.

Standalone: it imports neither pysteer nor anything from this repository, and runs in a virtualenv
of its own, because the peers pin ``transformers<5`` while pysteer uses transformers 5. pysteer's
side of the comparison is ``bench/bench_generate.py``.

Model: the default SmolLM2-135M-Instruct checkpoint that pysteer caches (LlamaForCausalLM, 30
layers, d_model 576), fp32 on the CPU. The checkpoint is written by transformers 5, so the config
is rebuilt from the json fields (``rope_parameters`` -> ``rope_theta``, which transformers 4 would
otherwise silently default to 10000), the weights are loaded with ``load_state_dict`` (tied
``lm_head``) and the tokenizer is read from ``tokenizer.json``.

Variants, all steering the same fixed random vector (norm 4) into the residual stream output of
decoder layers 8, 10, 12 and 14 (0-based ``model.model.layers[i]``, every position):

- ``unhooked``: plain ``model.generate()``.
- ``plain_hook``: a PyTorch forward hook on each of those layers returning ``output + v``.
- ``steering_vectors``: ``SteeringVector(layer_activations, layer_type="decoder_block")`` applied
  with its ``apply(model, multiplier=1.0)`` context manager (forward hooks on the same modules).
- ``repeng``: ``ControlModel(model, layer_ids)`` wrapping the same modules, with
  ``set_control(ControlVector("llama", directions), coeff=1.0)``.

Each batch size gets one untimed pass that checks the three steered variants give the same greedy
tokens and the same logits, one warm-up of every variant, then ``--rounds`` rounds that each time
every variant once (order rotated round to round). Only ``generate()`` is timed, by the wall clock
and by the process's CPU time; registering hooks, wrapping layers and removing them is outside the
timer. Results go to ``bench/results/generate-peers-cpu.json``: medians, bests, tokens/s and ratios
against ``unhooked`` from the same run, per clock. On a shared machine the CPU-time ratios are the
steadier ones (one torch thread by default, see ``--threads``).

Installed for the committed results: torch 2.13.0+cpu, transformers 4.57.6, repeng 0.4.0,
steering-vectors 0.12.2.

Setup (``torch`` first and pinned, so pip never swaps in another torch build)::

    python3 -m venv /work/peers-steer-venv
    echo "torch==2.13.0" > /tmp/torch-pin.txt
    export PIP_CONSTRAINT=/tmp/torch-pin.txt
    /work/peers-steer-venv/bin/pip install torch==2.13.0
    /work/peers-steer-venv/bin/pip install repeng steering-vectors

Run from the repository root::

    /work/peers-steer-venv/bin/python bench/peers/bench_peer_steering.py
    /work/peers-steer-venv/bin/python bench/peers/bench_peer_steering.py --rounds 3 --batches 1
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from repeng import ControlModel, ControlVector
from safetensors.torch import load_file
from steering_vectors import SteeringVector
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "pysteer" / "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parents[1] / "results"
LAYERS = [8, 10, 12, 14]
# 17 tokens with SmolLM2's tokenizer (checked at run time and recorded in the results).
PROMPT = "<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n"
VARIANTS = ["unhooked", "plain_hook", "steering_vectors", "repeng"]
STEERED = VARIANTS[1:]


def load_config(model_dir: Path, attn: str) -> LlamaConfig:
    """LlamaConfig from a transformers-5 ``config.json``, readable by transformers 4."""
    fields = json.loads((model_dir / "config.json").read_text())
    if fields.get("model_type") != "llama":
        raise ValueError(f"expected a llama checkpoint, got {fields.get('model_type')!r}")
    rope = fields.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version", "_model_name_or_path"):
        fields.pop(key, None)
    return LlamaConfig(**fields, attn_implementation=attn)


def load_model(model_dir: Path, attn: str) -> LlamaForCausalLM:
    config = load_config(model_dir, attn)
    model = LlamaForCausalLM(config)
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.to(torch.float32).eval()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    special = json.loads((model_dir / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        **{k: special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in special},
        padding_side="left",
    )


def steering_vector(dim: int, norm: float, seed: int) -> torch.Tensor:
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return v * (norm / v.norm())


def layer_modules(model: LlamaForCausalLM) -> torch.nn.ModuleList:
    return model.model.layers


@contextmanager
def plain_hooks(model: LlamaForCausalLM, vec: torch.Tensor, layers: list[int]) -> Iterator[None]:
    def add_vec(_module: torch.nn.Module, _inputs: object, output: object) -> object:
        if isinstance(output, tuple):
            return (output[0] + vec,) + output[1:]
        return output + vec

    handles = [layer_modules(model)[i].register_forward_hook(add_vec) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def steering_vectors_applied(model: LlamaForCausalLM, vec: torch.Tensor, layers: list[int]) -> Iterator[None]:
    sv = SteeringVector(layer_activations={i: vec for i in layers}, layer_type="decoder_block")
    with sv.apply(model, multiplier=1.0):
        yield


@contextmanager
def repeng_applied(model: LlamaForCausalLM, vec: torch.Tensor, layers: list[int]) -> Iterator[None]:
    # ControlModel replaces model.model.layers[i] with a wrapper; unwrap() puts the originals back.
    control_model = ControlModel(model, layers)
    directions = {i: vec.numpy().copy() for i in layers}
    control_model.set_control(ControlVector(model_type="llama", directions=directions), coeff=1.0)
    try:
        yield
    finally:
        control_model.reset()
        control_model.unwrap()


def variant_context(name: str, model: LlamaForCausalLM, vec: torch.Tensor, layers: list[int]):
    if name == "unhooked":
        return _nothing()
    if name == "plain_hook":
        return plain_hooks(model, vec, layers)
    if name == "steering_vectors":
        return steering_vectors_applied(model, vec, layers)
    if name == "repeng":
        return repeng_applied(model, vec, layers)
    raise ValueError(name)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def assert_unpatched(model: LlamaForCausalLM) -> None:
    """Every variant must leave the model as it found it (no hooks, no wrapped layers)."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise RuntimeError(f"hook left on {name}")
    for i, layer in enumerate(layer_modules(model)):
        if type(layer).__name__ != "LlamaDecoderLayer":
            raise RuntimeError(f"layer {i} is still wrapped: {type(layer).__name__}")


def run_generate(
    model: LlamaForCausalLM,
    inputs: dict[str, torch.Tensor],
    gen_config: GenerationConfig,
    *,
    scores: bool = False,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """One ``generate()``.

    Returns ({"wall": s, "cpu": s}, new tokens [B, N], stacked raw logits [N, B, V] or None).
    """
    c0, t0 = time.process_time(), time.perf_counter()
    out = model.generate(
        **inputs, generation_config=gen_config, return_dict_in_generate=True, output_logits=scores
    )
    elapsed = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    if new_tokens.shape[1] != gen_config.max_new_tokens:
        raise RuntimeError(f"made {new_tokens.shape[1]} tokens, expected {gen_config.max_new_tokens}")
    # Raw logits, not processed scores: min_new_tokens sets EOS to -inf in the scores.
    logits = torch.stack(out.logits) if scores else None
    return elapsed, new_tokens, logits


def timed_variant(
    name: str,
    model: LlamaForCausalLM,
    vec: torch.Tensor,
    layers: list[int],
    inputs: dict[str, torch.Tensor],
    gen_config: GenerationConfig,
    *,
    scores: bool = False,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    with variant_context(name, model, vec, layers):
        result = run_generate(model, inputs, gen_config, scores=scores)
    assert_unpatched(model)
    return result


def check_agreement(
    model: LlamaForCausalLM,
    vec: torch.Tensor,
    layers: list[int],
    inputs: dict[str, torch.Tensor],
    gen_config: GenerationConfig,
) -> dict:
    """Untimed pass: do the steered variants make the same tokens and logits?"""
    tokens, logits = {}, {}
    for name in VARIANTS:
        _, tokens[name], logits[name] = timed_variant(
            name, model, vec, layers, inputs, gen_config, scores=True
        )
    ref = "plain_hook"
    report: dict = {"reference": ref, "variants": {}}
    for name in VARIANTS:
        report["variants"][name] = {
            "tokens_equal_to_plain_hook": bool(torch.equal(tokens[name], tokens[ref])),
            "logits_bit_equal_to_plain_hook": bool(torch.equal(logits[name], logits[ref])),
            "max_abs_logit_diff_vs_plain_hook": float((logits[name] - logits[ref]).abs().max()),
            "first_generated_tokens_row0": tokens[name][0, :16].tolist(),
        }
    report["steered_agree"] = all(report["variants"][n]["tokens_equal_to_plain_hook"] for n in STEERED)
    report["steering_changes_output"] = not torch.equal(tokens["unhooked"], tokens[ref])
    report["rows_identical_within_batch"] = {n: bool((tokens[n] == tokens[n][:1]).all()) for n in VARIANTS}
    report["_tokens"] = tokens  # dropped before writing; used to check timed runs
    return report


def summarize(times: dict[str, list[float]], generated: int) -> dict[str, dict]:
    """Per clock (wall, cpu): median and best seconds and tokens/s over the timed rounds."""
    summary = {}
    for clock, samples in times.items():
        med, best = statistics.median(samples), min(samples)
        summary[clock] = {
            "median_s": med,
            "best_s": best,
            "tokens_per_s_median": generated / med,
            "tokens_per_s_best": generated / best,
            "times_s": samples,
        }
    return summary


def bench_batch(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    vec: torch.Tensor,
    layers: list[int],
    batch: int,
    new_tokens: int,
    rounds: int,
) -> dict:
    enc = tokenizer([PROMPT] * batch, return_tensors="pt", padding=True, return_token_type_ids=False)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    agreement = check_agreement(model, vec, layers, inputs, gen_config)
    ref_tokens = agreement.pop("_tokens")

    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in VARIANTS}
    deterministic = True
    for r in range(rounds + 1):  # round 0 is the warm-up
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            elapsed, toks, _ = timed_variant(name, model, vec, layers, inputs, gen_config)
            deterministic &= bool(torch.equal(toks, ref_tokens[name]))
            if r > 0:
                for clock, seconds in elapsed.items():
                    times[name][clock].append(seconds)
        print(
            f"  batch {batch} round {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(
                f"{n} {times[n]['wall'][-1]:.2f}s wall {times[n]['cpu'][-1]:.2f}s cpu" if r > 0 else n
                for n in order
            ),
            flush=True,
        )

    generated = batch * new_tokens
    per_variant = {n: summarize(times[n], generated) for n in VARIANTS}
    for n in VARIANTS:
        for clock, stats in per_variant[n].items():
            base = per_variant["unhooked"][clock]
            stats["ratio_vs_unhooked_median"] = stats["tokens_per_s_median"] / base["tokens_per_s_median"]
            stats["ratio_vs_unhooked_best"] = stats["tokens_per_s_best"] / base["tokens_per_s_best"]
    return {
        "batch": batch,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "generated_tokens_per_run": generated,
        "timed_runs_same_tokens_as_check": deterministic,
        "agreement": agreement,
        "variants": per_variant,
    }


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    parser.add_argument("--norm", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared 2-core box (load ~8) two OpenMP threads spin against the
    # other jobs and an 8-token smoke run went from under 2 minutes to over 10.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate-peers-cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model_dir, args.attn)
    tokenizer = load_tokenizer(args.model_dir)
    vec = steering_vector(model.config.hidden_size, args.norm, args.seed)
    load_before = os.getloadavg()[0]

    results = []
    with torch.inference_mode():
        for batch in args.batches:
            print(f"batch {batch}", flush=True)
            results.append(
                bench_batch(model, tokenizer, vec, args.layers, batch, args.new_tokens, args.rounds)
            )

    report = {
        "benchmark": "steered greedy generate(), peer libraries",
        "device": "cpu",
        "versions": {
            "python": platform.python_version(),
            **{
                p: version(p)
                for p in ("torch", "transformers", "tokenizers", "repeng", "steering-vectors", "numpy")
            },
        },
        "settings": {
            "model": args.model_dir.name,
            "model_class": type(model).__name__,
            "num_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "dtype": "float32",
            "attn_implementation": model.config._attn_implementation,
            "prompt": PROMPT,
            "padding": "left (batch of identical prompts, so no pad tokens)",
            "new_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,
            "decoding": "greedy, KV cache",
            "steer_layers": args.layers,
            "steer_point": "output of model.model.layers[i] (residual stream after block i), all positions",
            "vector": f"torch.randn(hidden_size, seed={args.seed}) scaled to norm {args.norm}, same at every layer",
            "rounds": args.rounds,
            "warmup_rounds": 1,
            "order": "variants interleaved, order rotated each round; only generate() is timed",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "ratio_definition": "tokens/s of the variant / tokens/s of unhooked, same batch, same run",
        "clocks": {
            "wall": "time.perf_counter() around generate()",
            "cpu": "time.process_time() around generate(): with one torch thread, less sensitive to "
            "other jobs on a shared machine than wall time (cache and memory contention still count)",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header = f"{'variant':18s} {'batch':>5s} {'clock':>5s} {'median s':>9s} {'tok/s':>8s}"
    print(f"\n{header} {'ratio':>6s} {'best ratio':>10s}")
    for res in results:
        for name, clocks in res["variants"].items():
            for clock, v in clocks.items():
                print(
                    f"{name:18s} {res['batch']:5d} {clock:>5s} {v['median_s']:9.3f} "
                    f"{v['tokens_per_s_median']:8.1f} {v['ratio_vs_unhooked_median']:6.3f} "
                    f"{v['ratio_vs_unhooked_best']:10.3f}"
                )
        print(
            f"  batch {res['batch']}: steered variants agree: {res['agreement']['steered_agree']}, "
            f"steering changes output: {res['agreement']['steering_changes_output']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
