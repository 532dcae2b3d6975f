"""Tracing throughput on the embedded SmolLM2-135M (llama, 30 layers, d_model 576), in one run.

Modes, each over the same token batches, interleaved round by round (medians over rounds):
  plain            model(ids): the full forward, LM head included (the reference, 1.00)
  plain_no_head    model.model(ids): every decoder layer and the final norm, no LM head
  trace_memory     pysteer.trace(model, "layers.29.resid") around the full forward
  trace_disk       pysteer.trace_dataset(..., "layers.29.resid"): to float16 shards; the forward stops
                   after layer 29, so the final norm and LM head never run
  trace_disk_l15   same, site layers.15.resid: early stop after layer 15 of 30
  trace_disk_all   the residual stream of all 30 layers to disk
Peers, when they install in their own virtualenv (``--peers-python``, default /work/peers-venv):
nnsight ``LanguageModel.trace`` and TransformerLens ``TransformerBridge.run_with_cache``, each as a
ratio to the plain forward measured in the same process.

    python bench/bench_trace.py                 # writes bench/results/trace-cpu.json

One torch thread by default: on the shared 2-core machine (load average 6-14) two intra-op threads
made the same 512-token forward take 17-42 s between rounds; one thread kept it within 7.4-8.4 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MID_LAYER = 15
LAST_LAYER = 29

PEER_SCRIPT = textwrap.dedent(
    r"""
    import json, statistics, sys, time, traceback
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, ids_file, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    batches = list(load_file(ids_file).values())
    tokens = sum(b.numel() for b in batches)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads()}
    import transformers
    out["transformers"] = transformers.__version__

    def plain():
        for b in batches:
            model(b, use_cache=False)

    modes = {"plain_sdpa": plain}
    try:
        import nnsight
        from nnsight import LanguageModel
        out["nnsight"] = nnsight.__version__
        lm = LanguageModel(model, tokenizer=tok)

        def nnsight_last():
            for b in batches:
                with lm.trace(b):
                    lm.model.layers[29].output.save()

        def nnsight_l15_stop():
            for b in batches:
                with lm.trace(b) as tracer:
                    lm.model.layers[15].output.save()
                    tracer.stop()

        modes["nnsight_layer29"] = nnsight_last
        modes["nnsight_layer15_stop"] = nnsight_l15_stop
    except Exception as err:
        out["nnsight_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()

    def run(modes):
        times = {k: [] for k in modes}
        cpu = {k: [] for k in modes}
        with torch.inference_mode():
            for name, fn in modes.items():  # warm-up
                fn()
            for r in range(repeats):
                names = list(modes)
                for name in names[r % len(names):] + names[: r % len(names)]:
                    t0, c0 = time.perf_counter(), time.process_time()
                    modes[name]()
                    cpu[name].append(time.process_time() - c0)
                    times[name].append(time.perf_counter() - t0)
        return {k: {"wall_tokens_per_s": tokens / statistics.median(v), "wall_s": v,
                    "cpu_tokens_per_s": tokens / statistics.median(cpu[k]), "cpu_s": cpu[k]}
                for k, v in times.items()}

    out["sdpa_modes"] = run(modes)
    # TransformerLens forces eager attention on the model it wraps: compare it with eager HF.
    try:
        import transformer_lens
        from transformer_lens.model_bridge import TransformerBridge
        out["transformer_lens"] = getattr(transformer_lens, "__version__", None) or __import__(
            "importlib.metadata").metadata.version("transformer-lens")
        bridge = TransformerBridge.boot_transformers(model_dir, hf_model=model, tokenizer=tok, device="cpu")
        out["eager_attention"] = model.config._attn_implementation

        def plain_eager():
            for b in batches:
                model(b, use_cache=False)

        def tl_last():
            for b in batches:
                bridge.run_with_cache(b, names_filter=lambda n: n == "blocks.29.hook_resid_post")

        def tl_l15_stop():
            for b in batches:
                bridge.run_with_cache(b, names_filter=lambda n: n == "blocks.15.hook_resid_post", stop_at_layer=16)

        out["eager_modes"] = run({"plain_eager": plain_eager, "transformer_lens_layer29": tl_last,
                                  "transformer_lens_layer15_stop": tl_l15_stop})
    except Exception as err:
        out["transformer_lens_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
    print("PEER_JSON " + json.dumps(out))
    """
)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=8, help="documents per measurement")
    parser.add_argument("--seq", type=int, default=64, help="tokens per document")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians reported)")
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "trace-cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import pysteer
    from pysteer.default_model import default_cache_dir, load_default_model

    model, _ = load_default_model(dtype=torch.float32, device="cpu", progress=False)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    docs = [torch.randint(0, vocab, (args.seq,), generator=g) for _ in range(args.docs)]
    batches = [torch.stack(docs[i : i + args.batch_size]) for i in range(0, args.docs, args.batch_size)]
    tokens = args.docs * args.seq
    scratch = Path(tempfile.mkdtemp(prefix="pysteer-bench-trace-"))
    counter = [0]

    def fresh_dir() -> Path:
        counter[0] += 1
        return scratch / f"run{counter[0]}"

    def plain() -> None:
        for b in batches:
            model(b, use_cache=False)

    def plain_no_head() -> None:
        for b in batches:
            model.model(b, use_cache=False)

    def trace_memory() -> None:
        with pysteer.trace(model, f"layers.{LAST_LAYER}.resid"):
            plain()

    def to_disk(sites: list[str]):
        def run() -> None:
            out = fresh_dir()
            pysteer.trace_dataset(model, docs, sites, out, dtype=torch.float16, batch_size=args.batch_size)
            shutil.rmtree(out)

        return run

    modes = {
        "plain": plain,
        "plain_no_head": plain_no_head,
        "trace_memory": trace_memory,
        "trace_disk": to_disk([f"layers.{LAST_LAYER}.resid"]),
        "trace_disk_l15": to_disk([f"layers.{MID_LAYER}.resid"]),
        "trace_disk_all": to_disk([f"layers.{i}.resid" for i in range(30)]),
    }
    wall: dict[str, list[float]] = {k: [] for k in modes}
    cpu: dict[str, list[float]] = {k: [] for k in modes}
    with torch.inference_mode():
        for fn in modes.values():  # warm-up round, not timed
            fn()
        for r in range(args.repeats):
            names = list(modes)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                modes[name]()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
            line = ", ".join(f"{k} {wall[k][-1]:.2f}s wall / {cpu[k][-1]:.2f}s cpu" for k in modes)
            print(f"round {r + 1}/{args.repeats}: {line}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    results = {
        k: {
            "wall_median_s": median(wall[k]),
            "wall_tokens_per_s": tokens / median(wall[k]),
            "cpu_median_s": median(cpu[k]),
            "cpu_tokens_per_s": tokens / median(cpu[k]),
            "wall_s": [round(x, 4) for x in wall[k]],
            "cpu_s": [round(x, 4) for x in cpu[k]],
        }
        for k in modes
    }
    tps = {k: v["wall_tokens_per_s"] for k, v in results.items()}
    cps = {k: v["cpu_tokens_per_s"] for k, v in results.items()}
    ratios = {k: round(v / tps["plain"], 3) for k, v in tps.items()}
    cpu_ratios = {k: round(v / cps["plain"], 3) for k, v in cps.items()}
    report = {
        "what": "tracing throughput, tokens/s, medians of interleaved rounds; ratios to the plain forward",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "software": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "model": "SmolLM2-135M-Instruct (llama, 30 layers, d_model 576, 9 heads), float32, "
        + model.config._attn_implementation,
        "workload": {
            "docs": args.docs,
            "tokens_per_doc": args.seq,
            "batch_size": args.batch_size,
            "tokens": tokens,
        },
        "repeats": args.repeats,
        "storage_dtype": "float16",
        "timing_note": "wall ratios are the figure of record on a quiet machine; on a shared, oversubscribed "
        "CPU (see load_average_1m) wall times swing 2-3x between rounds, so ratios of process CPU time "
        "(one torch thread; the writer thread's work included) are reported beside them",
        "modes": results,
        "ratio_to_plain_wall": ratios,
        "ratio_to_plain_cpu": cpu_ratios,
        "ratio_to_plain_no_head_cpu": {k: round(v / cps["plain_no_head"], 3) for k, v in cps.items()},
        "acceptance": {
            "trace_disk_one_site_vs_plain (>= 0.95)": {
                "wall": ratios["trace_disk"],
                "cpu": cpu_ratios["trace_disk"],
            },
            "early_stop_layer15_vs_plain (>= 1.6)": {
                "wall": ratios["trace_disk_l15"],
                "cpu": cpu_ratios["trace_disk_l15"],
            },
        },
    }

    if not args.no_peers:
        report["peers"] = run_peers(args, batches, default_cache_dir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"ratio_to_plain_wall": ratios, "ratio_to_plain_cpu": cpu_ratios}, indent=1))
    if "peers" in report:
        print(json.dumps(report["peers"].get("ratios", report["peers"]), indent=1))
    print(f"wrote {args.out}")
    return 0


def run_peers(args: argparse.Namespace, batches: list[torch.Tensor], model_dir: Path) -> dict:
    """nnsight and TransformerLens in their own virtualenv, same weights and tokens."""
    from safetensors.torch import save_file

    python = Path(args.peers_python)
    if not python.exists():
        return {"skipped": f"{python} does not exist (create a virtualenv with nnsight and transformer-lens)"}
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.safetensors"
        save_file({f"b{i}": b.contiguous() for i, b in enumerate(batches)}, str(ids))
        script = Path(tmp) / "peers.py"
        script.write_text(PEER_SCRIPT)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run(
            [str(python), str(script), str(model_dir), str(ids), str(args.repeats)],
            capture_output=True,
            text=True,
            env=env,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_JSON ")), None)
    if line is None:
        return {"error": f"peer run failed (exit {proc.returncode})", "stderr_tail": proc.stderr[-3000:]}
    peers = json.loads(line.removeprefix("PEER_JSON "))
    ratios: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for group, base in (("sdpa_modes", "plain_sdpa"), ("eager_modes", "plain_eager")):
        modes = peers.get(group, {})
        for k, v in modes.items():
            for clock in ("wall", "cpu"):
                key = f"{clock}_tokens_per_s"
                ratios[clock][k] = round(v[key] / modes[base][key], 3)
    peers["ratios"] = ratios
    return peers


if __name__ == "__main__":
    sys.exit(main())
