"""Time the affine steering op ``pysteer::affine_steer`` on every backend available here.

Shapes are Llama-3-8B's per-head site (H=32, D=128) with a table of C=8 rows: decode
(T = 1 ... 64) and prefill (T = 4096); bf16 on a GPU, fp32 on the CPU. Every token is steered
(rows 1..C-1), the case that reads the tables.

For each backend and shape the script reports the median time per call, the bytes the op must
move (read x, write y, read the table rows in use and the row index) and the achieved bandwidth as
a fraction of a device copy (``y.copy_(x)`` of a large buffer) measured in the same run. Results go
to ``bench/results/ops-<device>.json``.

    python bench/bench_ops.py                 # GPU if present, else CPU (torch backends)
    TRITON_INTERPRET=1 python bench/bench_ops.py --device cpu   # adds Triton's interpreter (slow)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import copy_bandwidth, device_slug, time_per_call

from pysteer._backend import backend_status
from pysteer.ops._registry import get_impl
from pysteer.ops.affine import affine_steer

DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64]
PREFILL_TOKENS = [4096]
HEADS, HEAD_DIM, TABLE_ROWS = 32, 128, 8
RESULTS = Path(__file__).resolve().parent / "results"


def bytes_moved(x: torch.Tensor, rows: torch.Tensor, M: torch.Tensor, A: torch.Tensor) -> int:
    """Bytes the op cannot avoid: read x, write y, read the table rows in use and the row index."""
    used = int(torch.unique(rows[rows != 0]).numel())
    table = used * (M[0].numel() * M.element_size() + A[0].numel() * A.element_size())
    return 2 * x.numel() * x.element_size() + table + rows.numel() * rows.element_size()


def backends(device: torch.device) -> dict[str, Callable]:
    """The callables to time, by name; backends that cannot run here are left out (with a note)."""
    fns: dict[str, Callable] = {
        "torch-inline": lambda x, r, M, A: affine_steer(x, r, M, A, backend="torch"),
        "torch-op": lambda x, r, M, A: torch.ops.pysteer.affine_steer(x, r, M, A, "torch"),
    }
    status = backend_status(device)
    for name in ("triton", "cuda"):
        ok, why = status[name]
        if not ok:
            print(f"# {name}: skipped ({why})", file=sys.stderr)
            continue
        fns[f"{name}-op"] = lambda x, r, M, A, name=name: torch.ops.pysteer.affine_steer(x, r, M, A, name)
        # the launcher alone: what the op's Python dispatch costs on top
        fns[f"{name}-launcher"] = get_impl("affine", "affine_steer", name)
    return fns


def run(device: torch.device, reps: int, tokens: list[int]) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    M = (1 + 0.1 * torch.randn(TABLE_ROWS, HEADS, HEAD_DIM, generator=gen)).to(device, dtype)
    A = torch.randn(TABLE_ROWS, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    copy_bps = copy_bandwidth(device, dtype, copy_bytes, reps)
    print(
        f"# {device_slug(device)}: copy of {copy_bytes >> 20} MiB at {copy_bps / 1e9:.1f} GB/s",
        file=sys.stderr,
    )

    results = []
    for name, fn in backends(device).items():
        slow = name.startswith("triton") and device.type != "cuda"  # the interpreter
        for T in tokens:
            if slow and T > 64:
                continue
            x = torch.randn(T, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
            rows = torch.randint(1, TABLE_ROWS, (T,), generator=gen, dtype=torch.int32).to(device)
            y = fn(x, rows, M, A)
            torch.testing.assert_close(
                y, affine_steer(x, rows, M, A, backend="torch")
            )  # never time a wrong op
            big = T * HEADS * HEAD_DIM >= 1 << 20
            inner = 1 if (big and device.type != "cuda") or slow else 20
            n_reps = 3 if slow else (max(5, reps // 4) if big and device.type != "cuda" else reps)
            seconds = time_per_call(lambda fn=fn, x=x, rows=rows: fn(x, rows, M, A), device, n_reps, inner)
            nbytes = bytes_moved(x, rows, M, A)
            results.append(
                {
                    "backend": name,
                    "T": T,
                    "time_us": round(seconds * 1e6, 3),
                    "bytes": nbytes,
                    "GBps": round(nbytes / seconds / 1e9, 3),
                    "fraction_of_copy": round(nbytes / seconds / copy_bps, 4),
                    "reps": n_reps,
                    "calls_per_rep": inner,
                }
            )
            r = results[-1]
            print(
                f"{name:>16} T={T:>5}  {r['time_us']:>10.1f} us  {r['GBps']:>8.2f} GB/s  "
                f"{r['fraction_of_copy']:.3f} of copy",
                file=sys.stderr,
            )
    return {
        "op": "pysteer::affine_steer",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_slug": device_slug(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"H": HEADS, "D": HEAD_DIM, "C": TABLE_ROWS, "tables": "[C, H, D]", "rows": "all steered"},
        "torch": torch.__version__,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU figures
        "copy_bytes": copy_bytes,
        "copy_GBps": round(copy_bps / 1e9, 3),
        "timing": "median over reps of mean per call; CUDA events on GPU, perf_counter on CPU",
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 200 GPU, 15 CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: steadier on a shared machine)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output JSON (default bench/results/ops-<device>.json)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (200 if device.type == "cuda" else 15)
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
    report = run(device, reps, DECODE_TOKENS + PREFILL_TOKENS)
    out = args.out or RESULTS / f"ops-{report['device_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(f"# wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
