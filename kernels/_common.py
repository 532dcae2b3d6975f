"""Host helpers shared by the Triton launchers of every op family.

The op bodies in ``pysteer/ops/<family>.py`` have validated shapes, dtypes and devices before a
launcher runs; what is left here is what only Triton needs.
"""

from __future__ import annotations

import contextlib

import torch
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
