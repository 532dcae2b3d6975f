"""What the Triton kernels and launchers of more than one op family share.

The op bodies in ``pysteer/ops/<family>.py`` have validated shapes, dtypes and devices before a
launcher runs; the host helpers here check only what Triton alone needs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from pysteer._backend import BackendUnavailable, triton_interpreter


def require_launchable(op: str, t: Tensor) -> None:
    """Raise ``BackendUnavailable`` unless ``t`` is a CUDA tensor or Triton runs in its interpreter."""
    if t.device.type != "cuda" and not triton_interpreter():
        raise BackendUnavailable(
            f"{op} (triton): tensors are on {t.device}; Triton needs CUDA tensors unless TRITON_INTERPRET=1"
        )


def device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def to_f32(v):
    """Widen ``v`` to fp32 exactly; bf16 by a shift, since the interpreter flushes bf16 subnormals."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def round_to(y, dtype: tl.constexpr):
    """Round fp32 ``y`` to ``dtype`` to nearest, ties to even (what torch's ``.to()`` does).

    bf16 is rounded with integer ops instead of ``.to()``: Triton's interpreter truncates fp32 to
    bf16 (in 425 of 1245 random products of a test tensor the result was 1 ulp off torch's), and one
    code path for GPU and interpreter keeps the CPU tests meaningful. The affine kernels are
    memory-bound and the GEMM's z tile is small next to its dot, so a few integer ops per element
    cost nothing measurable.
    """
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
