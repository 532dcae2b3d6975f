"""Helpers shared by the wrappers around ``pysteer._C`` (``pysteer/ops/cuda_<family>.py``).

``pysteer._C`` takes raw device pointers (Python ints), sizes, strides, dtype codes and the CUDA
stream handle, so it needs no torch headers. These helpers turn tensors into those arguments.
Importing this module does not import the extension or initialise CUDA; :func:`extension` loads
the extension on first use.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
from torch import Tensor

from .._backend import BackendUnavailable

# Must match ``enum DType`` in csrc/pysteer.h.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def extension() -> ModuleType:
    """The compiled ``pysteer._C`` module.

    Raises:
        BackendUnavailable: the extension was not built (install with nvcc present).
    """
    try:
        return importlib.import_module("pysteer._C")
    except ImportError as err:
        raise BackendUnavailable(
            f"pysteer._C is not built ({err}); reinstall with nvcc on PATH or CUDA_HOME set"
        ) from None


def dtype_code(t: Tensor, op: str, name: str) -> int:
    """The ``DType`` code of ``t`` (0 float32, 1 float16, 2 bfloat16).

    Raises:
        ValueError: any other dtype, naming ``op`` and the argument ``name``.
    """
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(f"{op} (cuda): {name} must be float32, float16 or bfloat16, got {t.dtype}") from None


def pointer(t: Tensor, op: str, name: str) -> tuple[int, int]:
    """``(data pointer, dtype code)`` of a floating-point tensor (see :func:`dtype_code`)."""
    return t.data_ptr(), dtype_code(t, op, name)


def require_cuda(op: str, **tensors: Tensor) -> torch.device:
    """Check that every tensor is on one CUDA device and return it.

    Raises:
        ValueError: a tensor is not a CUDA tensor, or the tensors span devices.
    """
    device: torch.device | None = None
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{op} (cuda): {name} must be a CUDA tensor, got device {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op} (cuda): {name} is on {t.device}, expected {device}")
    if device is None:
        raise ValueError(f"{op} (cuda): no tensors given")
    return device


def stream_handle(device: torch.device) -> int:
    """The ``cudaStream_t`` of torch's current stream on ``device``, as an int (0: legacy default)."""
    return torch.cuda.current_stream(device).cuda_stream


def device_index(device: torch.device) -> int:
    """CUDA device ordinal of ``device`` (``cuda`` without an index means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()
