"""Timing helpers shared by the op benchmarks (``python bench/bench_*.py`` puts this folder on the path)."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU's name in lower case with runs of other characters as ``-``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def time_per_call(
    fn: Callable[[], object], device: torch.device, reps: int, inner: int, warmup: int | None = None
) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls, in seconds.

    On a GPU each rep is bracketed by CUDA events, so launch-bound ops are timed as the device
    sees them when calls are queued back to back.
    """
    for _ in range(warmup if warmup is not None else (5 if device.type == "cuda" else 2)):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3 / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int, reps: int) -> float:
    """Bytes per second of ``y.copy_(x)`` (bytes read + bytes written) for an ``nbytes`` buffer."""
    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(n, device=device).to(dtype)
    y = torch.empty_like(x)
    seconds = time_per_call(lambda: y.copy_(x), device, reps, inner=1)
    return 2 * x.numel() * x.element_size() / seconds


def interleaved_ratio(first: Callable[[], float], second: Callable[[], float], pairs: int) -> dict:
    """``second()``'s time ÷ ``first()``'s, the two called back to back ``pairs`` times.

    Each callable runs one step and returns its seconds. Runs on a shared machine move by several
    percent from one to the next; two adjacent steps see the same machine, so the median of their
    ratios resolves a 1 % difference. The order alternates so drift within a pair cancels.
    """
    ratios = []
    for i in range(pairs):
        if i % 2:
            t2, t1 = second(), first()
        else:
            t1, t2 = first(), second()
        ratios.append(t2 / t1)
    ratios.sort()
    return {
        "median": statistics.median(ratios),
        "quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        "pairs": pairs,
    }


def hf_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Exactly ``new`` greedy tokens per row from Hugging Face ``generate`` (EOS ignored, no
    padding), the eager path the compat benches time."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]
