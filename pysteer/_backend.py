"""Backend discovery and dispatch.

Dispatch is decided once, when a model is patched (or an op is bound), never per call:
explicit request (``backend=`` / ``PYSTEER_BACKEND``) -> CUDA extension if built and the tensors
are on CUDA -> Triton on CUDA -> torch. An explicitly requested backend that is missing raises
with the reason; an automatic fallback logs once.

Nothing here initialises CUDA or imports Triton at ``import pysteer`` time.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("pysteer")

BACKENDS = ("cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@functools.cache
def _cuda_ext_status() -> tuple[bool, str]:
    try:
        importlib.import_module("pysteer._C")
    except ImportError as err:
        return False, f"pysteer._C is not built ({err}); reinstall with nvcc on PATH or CUDA_HOME set"
    return True, "built"


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err})"
    return True, "installed"


def triton_interpreter() -> bool:
    """True when Triton runs in interpreter mode (CPU tensors allowed, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """Which backends can run ops on ``device`` and why not.

    Returns:
        ``{name: (available, reason)}`` for ``cuda``, ``triton`` and ``torch``.
    """
    dev = torch.device(device) if device is not None else None
    on_cuda = dev is not None and dev.type == "cuda"
    status: dict[str, tuple[bool, str]] = {}

    ok, why = _cuda_ext_status()
    if ok and dev is not None and not on_cuda:
        ok, why = False, f"pysteer._C is built but runs only on CUDA tensors (device is {dev})"
    status["cuda"] = (ok, why)

    ok, why = _triton_status()
    if ok and dev is not None and not on_cuda and not triton_interpreter():
        ok, why = False, f"Triton needs CUDA tensors (device is {dev}) unless TRITON_INTERPRET=1"
    status["triton"] = (ok, why)

    status["torch"] = (True, "always available")
    return status


_fallback_logged: set[tuple[str, str]] = set()


def resolve_backend(requested: str | None = None, device: torch.device | str | None = None) -> str:
    """Pick the backend for ops on ``device``.

    Args:
        requested: ``"cuda" | "triton" | "torch" | "auto" | None``. ``None`` reads ``PYSTEER_BACKEND``.
        device: where the tensors live. CPU resolves to torch unless asked otherwise.

    Raises:
        BackendUnavailable: an explicitly requested backend cannot run here.
        ValueError: unknown backend name.
    """
    if requested is None:
        requested = os.environ.get("PYSTEER_BACKEND", "auto") or "auto"
    requested = requested.strip().lower()
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join((*BACKENDS, 'auto'))}")
    if requested == "torch":
        return "torch"  # always available; nothing to discover (and nothing to break a compiled graph)
    if requested != "auto" and torch.compiler.is_compiling():
        # A named backend inside a compiled graph was checked when its handle or op was bound,
        # outside the graph; discovery imports modules, which would break the graph here.
        return requested
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if requested == "auto" and dev.type != "cuda":
        return "torch"  # decided without importing Triton or the extension
    status = backend_status(device)
    if requested != "auto":
        ok, why = status[requested]
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} requested but unavailable: {why}")
        return requested
    for name in BACKENDS:
        ok, why = status[name]
        if ok:
            return name
        key = (name, why)
        if key not in _fallback_logged:
            _fallback_logged.add(key)
            log.info("pysteer: backend %s unavailable (%s); falling back", name, why)
    return "torch"
