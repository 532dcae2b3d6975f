"""Time per-head steering fused into the output projection, ``pysteer::affine_linear``.

Shape: Llama-3-8B's o_proj (H=32, D=128 so H*D=4096, out=4096, no bias) with a table of C=8 rows,
every token steered (rows 1..C-1, the case that reads the tables); T = 1, 4, 16, 64 (decode) and
4096 (prefill). bf16 on a GPU, fp32 on the CPU.

Variants, all timed in one run:

- ``linear``: plain ``F.linear(z, W)``, the floor: steering should cost nothing over it.
- ``unfused-torch``: the reference, ``affine_steer`` math then ``F.linear`` (``backend="torch"``).
- ``unfused-<b>-op``: the registered ``pysteer::affine_steer`` op of backend ``b``, then ``F.linear``
  (GPU only): the best unfused path.
- ``fused-<b>``: ``pysteer::affine_linear`` with backend ``b`` (triton, cuda). The CUDA backend runs
  its kernel for T <= 64 and the reference math above (marked ``"fallback": true``).

For each variant and T the script reports the median time per call, the ratio to ``linear`` at
that T, and the bytes the fused op must move (read W, z, the table rows in use and the row index;
write the output) as a fraction of a device copy (``y.copy_(x)`` of a large buffer) measured in the
same run. Results go to ``bench/results/affine-linear-<device>.json``.

    python bench/bench_affine_linear.py                # GPU if present, else CPU (torch variants)
    python bench/bench_affine_linear.py --device cpu --reps 5
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
import torch.nn.functional as F
from _timing import copy_bandwidth, device_slug, time_per_call

from pysteer._backend import backend_status
from pysteer.ops.affine_linear import affine_linear

TOKENS = [1, 4, 16, 64, 4096]
HEADS, HEAD_DIM, OUT, TABLE_ROWS = 32, 128, 4096, 8
CUDA_KERNEL_MAX_TOKENS = 64  # pysteer.ops.cuda_affine_linear.MAX_TOKENS (not imported: lean on CPU)
RESULTS = Path(__file__).resolve().parent / "results"


def bytes_moved(
    z: torch.Tensor, rows: torch.Tensor, M: torch.Tensor, A: torch.Tensor, W: torch.Tensor
) -> int:
    """Bytes the fused op cannot avoid: read W, z, the table rows in use and the row index; write out."""
    used = int(torch.unique(rows[rows != 0]).numel())
    tables = used * (M[0].numel() * M.element_size() + A[0].numel() * A.element_size())
    out = z.shape[0] * W.shape[0] * z.element_size()
    return W.numel() * W.element_size() + z.numel() * z.element_size() + tables + out + rows.numel() * 4


def variants(device: torch.device) -> dict[str, Callable]:
    """The callables to time, ``fn(z, rows, M, A, W)``; backends that cannot run here are left out."""
    fns: dict[str, Callable] = {
        "linear": lambda z, r, M, A, W: F.linear(z, W),
        "unfused-torch": lambda z, r, M, A, W: affine_linear(z, r, M, A, W, backend="torch"),
    }
    status = backend_status(device)
    for name in ("triton", "cuda"):
        ok, why = status[name]
        if not ok:
            print(f"# {name}: skipped ({why})", file=sys.stderr)
            continue
        fns[f"unfused-{name}-op"] = lambda z, r, M, A, W, name=name: F.linear(
            torch.ops.pysteer.affine_steer(z.view(z.shape[0], HEADS, HEAD_DIM), r, M, A, name).view(z.shape),
            W,
        )
        fns[f"fused-{name}"] = lambda z, r, M, A, W, name=name: torch.ops.pysteer.affine_linear(
            z, r, M, A, W, None, name
        )
    return fns


def run(device: torch.device, reps: int, tokens: list[int]) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    K = HEADS * HEAD_DIM
    M = (1 + 0.1 * torch.randn(TABLE_ROWS, HEADS, HEAD_DIM, generator=gen)).to(device, dtype)
    A = torch.randn(TABLE_ROWS, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    W = (torch.randn(OUT, K, generator=gen) / K**0.5).to(device, dtype)
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    copy_bps = copy_bandwidth(device, dtype, copy_bytes, reps)
    print(
        f"# {device_slug(device)}: copy of {copy_bytes >> 20} MiB at {copy_bps / 1e9:.1f} GB/s",
        file=sys.stderr,
    )

    fns = variants(device)
    results = []
    for T in tokens:
        z = torch.randn(T, K, generator=gen).to(device, dtype)
        rows = torch.randint(1, TABLE_ROWS, (T,), generator=gen, dtype=torch.int32).to(device)
        want = affine_linear(z, rows, M, A, W, backend="torch")
        nbytes = bytes_moved(z, rows, M, A, W)
        big = T > 64 and device.type != "cuda"  # seconds per call on one CPU thread
        inner = 1 if big else (20 if device.type == "cuda" else 5)
        n_reps = max(3, reps // 5) if big else reps
        floor_s = None
        for name, fn in fns.items():
            out = fn(z, rows, M, A, W)
            if name != "linear":  # never time a wrong op
                torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
            seconds = time_per_call(lambda fn=fn, z=z, rows=rows: fn(z, rows, M, A, W), device, n_reps, inner)
            if name == "linear":
                floor_s = seconds
            row = {
                "variant": name,
                "T": T,
                "time_us": round(seconds * 1e6, 3),
                "ratio_vs_linear": round(seconds / floor_s, 4),
                "bytes": nbytes,
                "GBps": round(nbytes / seconds / 1e9, 3),
                "fraction_of_copy": round(nbytes / seconds / copy_bps, 4),
                "reps": n_reps,
                "calls_per_rep": inner,
            }
            if name == "fused-cuda" and T > CUDA_KERNEL_MAX_TOKENS:
                row["fallback"] = True
            results.append(row)
            print(
                f"{name:>18} T={T:>5}  {row['time_us']:>12.1f} us  x{row['ratio_vs_linear']:.3f} of linear  "
                f"{row['fraction_of_copy']:.3f} of copy",
                file=sys.stderr,
            )
    return {
        "op": "pysteer::affine_linear",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_slug": device_slug(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {
            "H": HEADS,
            "D": HEAD_DIM,
            "out": OUT,
            "C": TABLE_ROWS,
            "bias": None,
            "tables": "[C, H, D]",
            "rows": "all steered",
        },
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU figures
        "copy_bytes": copy_bytes,
        "copy_GBps": round(copy_bps / 1e9, 3),
        "timing": "median over reps of mean per call; CUDA events on GPU, perf_counter on CPU",
        "bytes_note": "W + z + table rows in use + rows + output, the fused op's minimum traffic",
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 100 GPU, 7 CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="token counts T")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: steadier on a shared machine)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output JSON (default bench/results/affine-linear-<device>.json)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (100 if device.type == "cuda" else 7)
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
    report = run(device, reps, args.tokens)
    out = args.out or RESULTS / f"affine-linear-{report['device_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(f"# wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
