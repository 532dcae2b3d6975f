"""Op-level SAE benchmark: encode, dense vs sparse decode, top-k encode, selective vs naive steering.

Grid: d in {576, 4096}, m in {8d, 16d, 32d}, k in {32, 64, 192}, tokens in {1, 64, 4096}.
Every time is set against floors measured in the same run:

- bytes floor: the bytes an op must move at the measured copy bandwidth (a 256 MiB tensor copy,
  read + write). An encode must read ``W_enc`` once; a dense decode reads ``W_dec``; a sparse
  decode reads only the distinct rows its ids name (tokens past the 64th repeat the first 64
  tokens' ids, so at most ``64 * k`` rows); selective steering reads ``F`` columns of ``W_enc`` and
  ``F`` rows of ``W_dec``; every op also reads its input and writes its output.
- FLOP floor (GEMM-shaped ops): ``2 * T * d * m`` at the throughput of one large measured matmul.

Both ceilings are measured at the start and at the end of the run and the best is used, so a
machine that other work slows down mid-run does not make a floor look beatable.

Usage::

    python bench/bench_sae.py                      # CPU, torch backend, float32
    python bench/bench_sae.py --device cuda        # torch, triton and cuda backends, bfloat16

On CPU the d=4096, tokens=4096 cells are skipped (tens of seconds per GEMM on a few cores); the
JSON lists every skipped cell with the reason. Results go to ``bench/results/sae-ops-<device>.json``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pysteer.ops import sae as sae_ops
from pysteer.ops.sae import EDIT_ADD, EDIT_SCALE, EDIT_SET

D_VALUES = [576, 4096]
EXPANSIONS = [8, 16, 32]
K_VALUES = [32, 64, 192]
TOKENS = [1, 64, 4096]
# --grid: "full" is the grid above; "quick" its headline cells (the GPU check's budget); "tiny" a
# few small cells that only prove the script runs (the GPU check's CPU dry run).
GRIDS = {
    "full": (D_VALUES, EXPANSIONS, K_VALUES, TOKENS),
    "quick": ([4096], [32], [64], [1, 4096]),
    "tiny": ([64], [8], [8], [1, 16]),
}
N_FEATURES = 8  # features edited by the steering benchmark
RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0, max_reps: int = 50
) -> float:
    """Median seconds per call after one warm-up call; repeats until ``budget_s`` or ``max_reps``.

    Calls slower than half a second are timed once after the warm-up (the CPU grid's prefill cells
    take seconds each); faster ones at least three times.
    """
    t0 = time.perf_counter()
    fn()
    _sync(device)
    min_reps = 1 if time.perf_counter() - t0 > 0.5 else 3
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    n = (256 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = timeit(lambda: dst.copy_(src), device, budget_s=1.0, max_reps=20)
    return 2 * src.numel() * 4 / sec


def gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timeit(lambda: a @ b, device, budget_s=1.0, max_reps=10)
    return 2 * n**3 / sec


def device_label(device: torch.device) -> tuple[str, str]:
    """(file tag, human-readable device name)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "cpu", f"{cpu}, {torch.get_num_threads()} torch threads"


def naive_steer(x, W_enc, b_enc, W_dec, b_dec, features, kinds, strengths, rows):
    """What a torch user writes: encode everything, edit, decode twice, keep the error term."""
    f = torch.relu((x - b_dec) @ W_enc + b_enc)
    edited = f.clone()
    S = features.long()
    r = rows.long()
    fs = f[:, S].float()
    kind, s = kinds[r], strengths[r]
    new = torch.where(
        kind == EDIT_SET,
        s,
        torch.where(kind == EDIT_ADD, fs + s, torch.where(kind == EDIT_SCALE, fs * s, fs)),
    )
    edited[:, S] = new.to(f.dtype)
    return x - (f @ W_dec + b_dec) + (edited @ W_dec + b_dec)


class Recorder:
    """Collects timings; ratios to the floors are computed at the end from the best measured ceilings."""

    def __init__(self) -> None:
        self.raw: list[tuple[dict, float, float, float | None]] = []

    def __call__(
        self, op, backend, sec, *, d, m, tokens, bytes_moved, k=None, gemm_flop=None, **extra
    ) -> None:
        row = {
            "op": op,
            "backend": backend,
            "d": d,
            "m": m,
            "tokens": tokens,
            "k": k,
            "ms": round(sec * 1e3, 4),
        }
        row.update(extra)
        self.raw.append((row, sec, bytes_moved, gemm_flop))
        print(json.dumps(row), flush=True)

    def rows(self, bandwidth: float, flops: float) -> list[dict]:
        out = []
        for row, sec, bytes_moved, gemm_flop in self.raw:
            floor = bytes_moved / bandwidth
            row = {
                **row,
                "bytes_floor_ms": round(floor * 1e3, 4),
                "time_over_bytes_floor": round(sec / floor, 2),
            }
            if gemm_flop is not None:
                row["flop_floor_ms"] = round(gemm_flop / flops * 1e3, 4)
                row["time_over_flop_floor"] = round(sec / (gemm_flop / flops), 2)
            out.append(row)
        return out


def bench_tokens(
    rec: Recorder,
    sae: dict,
    T: int,
    backends: list[str],
    device: torch.device,
    k_values: list[int] = K_VALUES,
) -> None:
    """Every op for one (d, m, T) cell; ``sae`` holds the weights and the edit tables."""
    W_enc, b_enc, W_dec, b_dec = sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"]
    d, m = W_dec.shape[1], W_dec.shape[0]
    dtype = W_dec.dtype
    elem = W_dec.element_size()
    w_bytes = m * d * elem
    x = torch.randn(T, d, device=device, dtype=dtype)
    io = 2 * T * d * elem
    flop = 2 * T * d * m
    rows = torch.ones(T, dtype=torch.int32, device=device)
    tables = (sae["features"], sae["kinds"], sae["strengths"])
    cell = {"d": d, "m": m, "tokens": T}
    for be in backends:
        enc = functools.partial(sae_ops.sae_encode, x, W_enc, b_enc, b_dec, act="relu", backend=be)
        rec(
            "encode_relu",
            be,
            timeit(enc, device),
            **cell,
            bytes_moved=w_bytes + io + T * m * elem,
            gemm_flop=flop,
        )
        steer = functools.partial(
            sae_ops.sae_steer, x, rows, W_enc, b_enc, W_dec, b_dec, None, *tables, act="relu", backend=be
        )
        sel_bytes = 2 * N_FEATURES * d * elem + io
        rec(
            "steer_selective_relu",
            be,
            timeit(steer, device),
            **cell,
            bytes_moved=sel_bytes,
            features=N_FEATURES,
        )
    f = torch.relu(torch.randn(T, m, device=device, dtype=dtype))
    dense_decode = timeit(functools.partial(torch.addmm, b_dec, f, W_dec), device)
    dense_bytes = w_bytes + T * m * elem + T * d * elem
    rec("decode_dense", "torch", dense_decode, **cell, bytes_moved=dense_bytes, gemm_flop=flop)
    del f
    naive = functools.partial(naive_steer, x, W_enc, b_enc, W_dec, b_dec, *tables, rows)
    rec(
        "steer_naive_torch",
        "torch",
        timeit(naive, device),
        **cell,
        bytes_moved=2 * w_bytes + io,
        gemm_flop=3 * flop,
    )
    for k in k_values:
        distinct = min(T, 64)
        idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(distinct)])
        idx = idx.repeat((T + distinct - 1) // distinct, 1)[:T].contiguous()
        vals = torch.rand(T, k, device=device, dtype=dtype)
        sparse_bytes = min(distinct * k, m) * d * elem + T * k * (8 + elem) + T * d * elem
        for be in backends:
            dec = functools.partial(sae_ops.sae_decode_sparse, idx, vals, W_dec, b_dec, backend=be)
            sec = timeit(dec, device)
            speedup = round(dense_decode / sec, 1)
            rec(
                "decode_sparse",
                be,
                sec,
                **cell,
                k=k,
                bytes_moved=sparse_bytes,
                speedup_over_dense_decode=speedup,
            )
            topk = functools.partial(sae_ops.sae_encode_topk, x, W_enc, b_enc, b_dec, k=k, backend=be)
            rec(
                "encode_topk", be, timeit(topk, device), **cell, k=k, bytes_moved=w_bytes + io, gemm_flop=flop
            )


def make_sae(d: int, m: int, device: torch.device, dtype: torch.dtype) -> dict:
    kinds = [[0] * N_FEATURES, [EDIT_ADD, EDIT_SET, EDIT_SCALE] * 2 + [EDIT_ADD] * 2]
    return {
        "W_enc": (torch.randn(m, d, device=device, dtype=dtype) / d**0.5).t(),  # pysteer.SAE's layout
        "b_enc": torch.zeros(m, device=device, dtype=dtype),
        "W_dec": torch.randn(m, d, device=device, dtype=dtype) / m**0.5,
        "b_dec": torch.zeros(d, device=device, dtype=dtype),
        "features": torch.randperm(m, device=device)[:N_FEATURES].int(),
        "kinds": torch.tensor(kinds, dtype=torch.int32, device=device),
        "strengths": torch.tensor([[0.0] * N_FEATURES, [2.0] * N_FEATURES], device=device),
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tag, name = device_label(device)
    load = os.getloadavg()[0]
    bandwidths = [copy_bandwidth(device)]
    flops_seen = [gemm_flops(device, dtype)]
    backends = args.backends.split(",")
    torch.manual_seed(0)
    rec = Recorder()
    skipped: list[dict] = []
    d_values, expansions, k_values, tokens = GRIDS[args.grid]
    for d in d_values:
        for e in expansions:
            sae = make_sae(d, e * d, device, dtype)
            for T in tokens:
                if device.type == "cpu" and d == 4096 and T == 4096:
                    why = "CPU: d=4096 with 4096 tokens takes tens of seconds per GEMM on this machine"
                    skipped.append({"d": d, "m": e * d, "tokens": T, "reason": why})
                    continue
                bench_tokens(rec, sae, T, backends, device, k_values)
            del sae
            gc.collect()
    bandwidths.append(copy_bandwidth(device))
    flops_seen.append(gemm_flops(device, dtype))
    bandwidth, flops = max(bandwidths), max(flops_seen)
    rows = rec.rows(bandwidth, flops)
    headline = {
        f"d={r['d']},k={r['k']},backend={r['backend']}": r["speedup_over_dense_decode"]
        for r in rows
        if r["op"] == "decode_sparse" and r["tokens"] == 1 and r["m"] == 32 * r["d"]
    }
    return {
        "device": tag,
        "device_name": name,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "backends": backends,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "copy_bandwidth_GBps_start_end": [round(b / 1e9, 2) for b in bandwidths],
        "gemm_TFLOPs": round(flops / 1e12, 4),
        "gemm_TFLOPs_start_end": [round(f / 1e12, 4) for f in flops_seen],
        "steer_features": N_FEATURES,
        "notes": [
            "time_over_bytes_floor = measured time / (bytes the op must move at the measured copy bandwidth)",
            "decode_dense is torch.addmm with a dense [T, m] code; decode_sparse reads only the k rows per token",
            "steer_naive_torch encodes all m latents, edits, decodes twice and keeps the error term",
            "CPU timings share the machine with other processes: compare ratios within this file only",
            "floors use the best copy bandwidth and matmul throughput measured at the start and the end",
            "CPU ratios below 1 are real: weights of a few MB stay in cache, and a copy's writes also read each "
            "line first (write-allocate), so read-only streams beat the copy-based floor",
            f"load average at the start: {load:.1f} on {os.cpu_count()} CPUs, at the end: {os.getloadavg()[0]:.1f}",
        ],
        "skipped": skipped,
        "sparse_over_dense_decode_T1_m32d": headline,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument(
        "--backends", default=None, help="comma list; torch on CPU, cuda,triton,torch on CUDA"
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/sae-ops-<device>.json)")
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS), help="cells to time (default full)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on a shared, oversubscribed machine OpenMP regions stall "
        "on descheduled peers, which put fixed ~48 ms steps into small ops in a 2-thread run)",
    )
    args = parser.parse_args()
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.backends = args.backends or ("cuda,triton,torch" if on_cuda else "torch")
    if not on_cuda and "triton" in args.backends and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit(
            "timing the Triton interpreter measures Python, not the kernels; use --backends torch"
        )
    report = run(args)
    out = Path(args.out) if args.out else RESULTS / f"sae-ops-{report['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
