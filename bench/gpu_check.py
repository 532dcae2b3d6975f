"""The GPU check: every kernel proven on real hardware and the headline figures measured, in one run.

Run through ``scripts/gpu_check.sh`` (see DEVICE.md). Steps run in order of value, each a
subprocess with its own time cap, never past the run's ``--budget``; each writes one JSON (or text
log) into ``--out`` and the running ``summary.json`` there is rewritten after every step, so a run
that is cut short keeps everything finished before.

1. ``build``      ``pysteer._C`` for the detected GPU architecture only.
2. ``kernels``    one small launch of every CUDA and Triton kernel against the torch reference.
3. ``e2e``        random Llama-3-8B-shape bf16 model: fast path unsteered vs per-head steered on
                  every layer, 16 configs, first step after a strength change, Hugging Face eager
                  and compiled (``bench/bench_e2e.py``).
4. ``sanitizer``  ``compute-sanitizer`` memcheck on the same small launches.
5. ``tests``      the op test files on the GPU (CUDA-graph replay included; Triton compiled, not
                  interpreted).
6. ``ops``, ``affine-linear``, ``sae-ops``  the op benches against the copy-bandwidth / FLOP floors.
7. ``causal-trace`` one causal-tracing heatmap (SmolLM2 shape, 30 layers x 20 tokens, 10 noise draws)
                  ROME's way and batched through rows (``bench/bench_causal_trace.py``).

``--dry-run`` runs the same steps on the CPU with tiny shapes (Triton interpreter, torch reference,
a 2-layer model) in about a minute, so the script cannot rot between the rare GPU runs; CI runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "arch": f"{major}{minor}", "torch": torch.__version__}


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


def plan(py: str, out: Path, dry_run: bool, gpu: dict | None) -> list[dict]:
    """The steps, in order: name, command, time cap (s), extra environment, result file."""
    b = str(BENCH)
    if dry_run:
        interp = {"TRITON_INTERPRET": "1"}
        return [
            dict(
                name="build",
                cmd=[py, "-c", "import pysteer._C as c; print(c.__file__)"],
                cap=60,
                env={},
                result=None,
            ),
            dict(
                name="kernels",
                cmd=[
                    py,
                    f"{b}/gpu_kernel_launches.py",
                    "--device",
                    "cpu",
                    "--backend",
                    "triton",
                    "--out",
                    str(out / "kernels.json"),
                ],
                cap=120,
                env=interp,
                result="kernels.json",
            ),
            dict(
                name="e2e",
                cmd=[
                    py,
                    f"{b}/bench_e2e.py",
                    "--shape",
                    "tiny",
                    "--device",
                    "cpu",
                    "--compile",
                    "default",
                    "--compile-backend",
                    "aot_eager",
                    "--new-tokens",
                    "8",
                    "--rounds",
                    "2",
                    "--out",
                    str(out / "e2e.json"),
                ],
                cap=180,
                env={},
                result="e2e.json",
            ),
            dict(
                name="sanitizer",
                cmd=None,
                cap=0,
                env={},
                result=None,
                skip="dry run: compute-sanitizer needs a GPU",
            ),
            # the CUDA kernels compiled for the host (csrc launches as loops) and the dispatch tests
            dict(
                name="tests",
                cmd=[
                    py,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "tests/test_ops_affine.py",
                    "tests/test_ops_affine_linear.py",
                    "tests/test_ops_sae.py",
                    "-k",
                    "host or test_backend_dispatch",
                    "tests/test_backend_dispatch.py",
                ],
                cap=180,
                env={},
                result="tests.txt",
            ),
            dict(
                name="ops",
                cmd=[
                    py,
                    f"{b}/bench_ops.py",
                    "--device",
                    "cpu",
                    "--reps",
                    "2",
                    "--out",
                    str(out / "ops.json"),
                ],
                cap=120,
                env={},
                result="ops.json",
            ),
            dict(
                name="affine-linear",
                cmd=[
                    py,
                    f"{b}/bench_affine_linear.py",
                    "--device",
                    "cpu",
                    "--reps",
                    "1",
                    "--tokens",
                    "1",
                    "4",
                    "--out",
                    str(out / "affine-linear.json"),
                ],
                cap=120,
                env={},
                result="affine-linear.json",
            ),
            dict(
                name="sae-ops",
                cmd=[
                    py,
                    f"{b}/bench_sae.py",
                    "--device",
                    "cpu",
                    "--grid",
                    "tiny",
                    "--out",
                    str(out / "sae-ops.json"),
                ],
                cap=120,
                env={},
                result="sae-ops.json",
            ),
            dict(
                name="causal-trace",
                cmd=[
                    py,
                    f"{b}/bench_causal_trace.py",
                    "--model",
                    "tiny",
                    "--samples",
                    "2",
                    "--out",
                    str(out / "causal-trace.json"),
                ],
                cap=120,
                env={},
                result="causal-trace.json",
            ),
        ]
    arch = gpu["arch"] if gpu else "90"
    sanitizer = _sanitizer()
    compiled = {"PYSTEER_TEST_TRITON_INTERPRET": "0", "TRITON_INTERPRET": "0"}
    return [
        dict(
            name="build",
            cmd=[py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
            cap=240,
            env={"PYSTEER_BUILD_CUDA": "1", "PYSTEER_CUDA_ARCHS": arch},
            result=None,
        ),
        dict(
            name="kernels",
            cmd=[py, f"{b}/gpu_kernel_launches.py", "--backend", "cuda", "--out", str(out / "kernels.json")],
            cap=90,
            env=compiled,
            result="kernels.json",
            also=[
                py,
                f"{b}/gpu_kernel_launches.py",
                "--backend",
                "triton",
                "--out",
                str(out / "kernels.json"),
            ],
        ),
        dict(
            name="e2e",
            cmd=[py, f"{b}/bench_e2e.py", "--rounds", "3", "--out", str(out / "e2e.json")],
            cap=330,
            env=compiled,
            result="e2e.json",
        ),
        dict(
            name="sanitizer",
            cmd=None
            if sanitizer is None
            else [
                sanitizer,
                "--tool",
                "memcheck",
                "--error-exitcode",
                "1",
                py,
                f"{b}/gpu_kernel_launches.py",
                "--backend",
                "cuda",
            ],
            cap=150,
            env=compiled,
            result="sanitizer.txt",
            skip=None if sanitizer else "compute-sanitizer not found (CUDA_HOME/bin or PATH)",
        ),
        dict(
            name="tests",
            cmd=[
                py,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "tests/test_ops_affine.py",
                "tests/test_ops_affine_linear.py",
                "tests/test_ops_sae.py",
                "tests/test_backend_dispatch.py",
            ],
            cap=300,
            env=compiled,
            result="tests.txt",
        ),
        dict(
            name="ops",
            cmd=[py, f"{b}/bench_ops.py", "--out", str(out / "ops.json")],
            cap=120,
            env=compiled,
            result="ops.json",
        ),
        dict(
            name="affine-linear",
            cmd=[py, f"{b}/bench_affine_linear.py", "--out", str(out / "affine-linear.json")],
            cap=120,
            env=compiled,
            result="affine-linear.json",
        ),
        dict(
            name="sae-ops",
            cmd=[
                py,
                f"{b}/bench_sae.py",
                "--device",
                "cuda",
                "--grid",
                "quick",
                "--out",
                str(out / "sae-ops.json"),
            ],
            cap=180,
            env=compiled,
            result="sae-ops.json",
        ),
        dict(
            name="causal-trace",
            cmd=[
                py,
                f"{b}/bench_causal_trace.py",
                "--model",
                "smollm2-shape",
                "--device",
                "cuda",
                "--samples",
                "10",
                "--batch-size",
                "256",
                "--out",
                str(out / "causal-trace.json"),
            ],
            cap=150,
            env=compiled,
            result="causal-trace.json",
        ),
    ]


def run_step(step: dict, out: Path, remaining: float) -> dict:
    record = {"name": step["name"], "cmd": step["cmd"], "cap_s": step["cap"]}
    if step.get("skip"):
        return {**record, "status": "skipped", "reason": step["skip"], "seconds": 0.0}
    timeout = min(step["cap"], remaining)
    if timeout < 5:
        return {**record, "status": "skipped", "reason": "the run's time budget is spent", "seconds": 0.0}
    env = {**os.environ, **step["env"]}
    t = time.perf_counter()
    outputs, status, rc = [], "ok", 0
    for cmd in [step["cmd"]] + ([step["also"]] if step.get("also") else []):
        left = timeout - (time.perf_counter() - t)
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(left, 1)
            )
        except subprocess.TimeoutExpired as err:
            outputs.append(
                (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            )
            status, rc = "timeout", None
            break
        outputs.append(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            status, rc = "failed", proc.returncode
            break
    text = "\n".join(outputs)
    result = step.get("result")
    if result and result.endswith(".txt"):  # a log; the JSON-writing steps write their own file
        (out / result).write_text(text)
    return {
        **record,
        "status": status,
        "rc": rc,
        "seconds": round(time.perf_counter() - t, 1),
        "result": result,
        "tail": text[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the script runs (CI)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu", help="folder for the JSONs (default .gpu/)")
    p.add_argument("--only", default="", help="comma-separated step names to run (default all)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    gpu = _gpu()
    if not args.dry_run and gpu is None:
        print("gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    summary = {
        "dry_run": args.dry_run,
        "device": gpu or {"name": "cpu (dry run)"},
        "python": platform.python_version(),
        "budget_s": args.budget,
        "steps": [],
    }
    failed = False
    for step in plan(sys.executable, args.out, args.dry_run, gpu):
        if only and step["name"] not in only:
            continue
        remaining = args.budget - (time.perf_counter() - start)
        print(
            f"gpu_check: [{time.perf_counter() - start:6.1f} s] {step['name']} ...",
            file=sys.stderr,
            flush=True,
        )
        record = run_step(step, args.out, remaining)
        summary["steps"].append(record)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(
            f"gpu_check: [{time.perf_counter() - start:6.1f} s] {step['name']}: {record['status']}"
            + (f" ({record.get('reason')})" if record.get("reason") else f" in {record['seconds']} s"),
            file=sys.stderr,
            flush=True,
        )
        failed |= record["status"] in ("failed", "timeout")
        if record["status"] == "failed" and step["name"] == "build":
            break  # nothing else can run on an extension that did not build
    if not args.dry_run:
        slug = "".join(c if c.isalnum() else "-" for c in summary["device"]["name"].lower()).strip("-")
        for record in summary["steps"]:
            result = record.get("result")
            # a step cut short by its cap keeps what its bench wrote so far (bench_e2e saves per figure)
            if (
                record["status"] in ("ok", "timeout")
                and result
                and result.endswith(".json")
                and (args.out / result).is_file()
            ):
                shutil.copy(args.out / result, RESULTS / f"{result[:-5]}-gpu-{slug}.json")
        shutil.copy(args.out / "summary.json", RESULTS / f"gpu-check-{slug}.json")
    print(
        f"gpu_check: done in {time.perf_counter() - start:.0f} s; {args.out / 'summary.json'}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
