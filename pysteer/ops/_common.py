"""Helpers shared by the op families and their backends (imports neither Triton nor the extension)."""

from __future__ import annotations

import torch
from torch import Tensor

# What the Triton and CUDA kernels are instantiated for; the torch reference also takes float64.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_kernel_dtypes(op: str, backend: str, **tensors: Tensor) -> None:
    """For a kernel backend (not ``torch``), raise ``ValueError`` naming a tensor of another dtype."""
    if backend == "torch":
        return
    for name, t in tensors.items():
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op} ({backend}): {name} must be float32, float16 or bfloat16, got {t.dtype}")


def unit_stride_last(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is addressable with stride 1, else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
