"""Backend dispatch: explicit ``backend=`` beats ``PYSTEER_BACKEND`` beats automatic choice;
an explicitly requested backend that cannot run raises with the reason; automatic choice on
CPU is torch and on CUDA prefers the extension, then Triton, logging each fallback once.

Availability is simulated by replacing the two probes in ``pysteer._backend``, so these tests
mean the same on a machine with or without Triton, the extension, or a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pysteer import _backend
from pysteer._backend import BackendUnavailable, backend_status, resolve_backend
from pysteer.ops._registry import get_impl


@pytest.fixture
def available(monkeypatch):
    """Set which of the CUDA extension and Triton are importable: ``available(cuda=..., triton=...)``."""

    def set_available(cuda: bool, triton: bool, interpret: bool = False) -> None:
        monkeypatch.setattr(
            _backend, "_cuda_ext_status", lambda: (True, "built") if cuda else (False, "ext missing")
        )
        monkeypatch.setattr(
            _backend, "_triton_status", lambda: (True, "installed") if triton else (False, "triton missing")
        )
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        monkeypatch.delenv("PYSTEER_BACKEND", raising=False)
        monkeypatch.setattr(_backend, "_fallback_logged", set())

    return set_available


def test_auto_on_cpu_is_torch_even_with_every_backend_installed(available):
    available(cuda=True, triton=True, interpret=True)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend(None, "cpu") == "torch"


@pytest.mark.parametrize(
    "cuda,triton,expected", [(True, True, "cuda"), (False, True, "triton"), (False, False, "torch")]
)
def test_auto_on_cuda_prefers_extension_then_triton_then_torch(available, cuda, triton, expected):
    available(cuda=cuda, triton=triton)
    assert resolve_backend("auto", "cuda") == expected


def test_environment_beats_auto(available, monkeypatch):
    available(cuda=True, triton=True)
    assert resolve_backend(None, "cuda") == "cuda"
    monkeypatch.setenv("PYSTEER_BACKEND", "triton")
    assert resolve_backend(None, "cuda") == "triton"
    monkeypatch.setenv("PYSTEER_BACKEND", "torch")
    assert resolve_backend(None, "cuda") == "torch"


def test_explicit_request_beats_environment(available, monkeypatch):
    available(cuda=True, triton=True)
    monkeypatch.setenv("PYSTEER_BACKEND", "triton")
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("cuda", "cuda") == "cuda"
    assert resolve_backend("auto", "cuda") == "cuda"


@pytest.mark.parametrize(
    "requested,device,reason",
    [
        ("cuda", "cuda", "ext missing"),
        ("cuda", "cpu", "ext missing"),
        ("triton", "cuda", "triton missing"),
    ],
)
def test_explicit_but_missing_backend_raises_with_reason(available, requested, device, reason):
    available(cuda=False, triton=False)
    with pytest.raises(
        BackendUnavailable, match=rf"backend '{requested}' requested but unavailable: {reason}"
    ):
        resolve_backend(requested, device)


def test_extension_built_but_tensors_on_cpu_raises_with_reason(available):
    available(cuda=True, triton=True)
    with pytest.raises(BackendUnavailable, match="runs only on CUDA tensors"):
        resolve_backend("cuda", "cpu")


def test_triton_on_cpu_needs_the_interpreter(available):
    available(cuda=False, triton=True, interpret=False)
    with pytest.raises(BackendUnavailable, match="Triton needs CUDA tensors"):
        resolve_backend("triton", "cpu")
    available(cuda=False, triton=True, interpret=True)
    assert resolve_backend("triton", "cpu") == "triton"


def test_environment_request_that_is_missing_raises(available, monkeypatch):
    available(cuda=False, triton=True)
    monkeypatch.setenv("PYSTEER_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="ext missing"):
        resolve_backend(None, "cuda")


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        resolve_backend("cudnn", "cpu")


def test_automatic_fallback_logs_each_reason_once(available, caplog):
    available(cuda=False, triton=True)
    with caplog.at_level(logging.INFO, logger="pysteer"):
        for _ in range(3):
            assert resolve_backend("auto", "cuda") == "triton"
    fallbacks = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallbacks) == 1 and "ext missing" in fallbacks[0].getMessage()


def test_status_reports_every_backend(available):
    available(cuda=False, triton=True)
    status = backend_status("cuda")
    assert status == {
        "cuda": (False, "ext missing"),
        "triton": (True, "installed"),
        "torch": (True, "always available"),
    }


def test_registry_maps_backends_to_their_implementations():
    from pysteer.ops import affine

    assert get_impl("affine", "affine_steer", "torch") is affine.affine_steer_ref
    assert get_impl("affine", "affine_steer_backward", "torch") is affine.affine_steer_backward_ref
    cuda_impl = get_impl("affine", "affine_steer", "cuda")
    assert cuda_impl.__module__ == "pysteer.ops.cuda_affine"


def test_op_table_lists_every_registered_op_once():
    """``FAMILIES`` names each ``pysteer::`` op exactly once, and its torch / CUDA parts resolve."""
    from pysteer.ops._registry import FAMILIES, resolve

    table = [op for family in FAMILIES.values() for op in family.ops]
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pysteer::"))
    assert sorted(f"pysteer::{op.name}" for op in table) == registered
    for family in FAMILIES.values():
        for op in family.ops:
            declared = resolve(op.declared)
            assert declared._qualname == f"pysteer::{op.name}"
            assert op.declared.startswith(family.module + ":") and op.torch.startswith(family.module + ":")
            for target in (op.fake, op.autograd, op.torch, op.cuda):
                if target is not None:
                    assert callable(resolve(target)), target


def test_registry_triton_implementation_lives_in_kernels():
    pytest.importorskip("triton", reason="triton is not installed")
    assert get_impl("affine", "affine_steer", "triton").__module__ == "pysteer.kernels.affine"
    assert get_impl("affine", "affine_steer_backward", "triton").__module__ == "pysteer.kernels.affine"
    from pysteer.ops._registry import FAMILIES, resolve

    for family in FAMILIES.values():
        for op in family.ops:
            assert callable(resolve(op.triton)), op.triton


def test_registered_op_dispatches_on_its_backend_argument(monkeypatch, request):
    """``torch.ops.pysteer.affine_steer(..., backend)`` runs that backend's implementation."""
    from pysteer.ops import affine

    calls = []

    def spy(x, rows, M, A):
        calls.append(tuple(x.shape))
        return x.clone()

    get_impl.cache_clear()
    request.addfinalizer(get_impl.cache_clear)
    monkeypatch.setattr(affine, "affine_steer_ref", spy)
    x = torch.randn(2, 1, 3)
    rows = torch.zeros(2, dtype=torch.int32)
    torch.ops.pysteer.affine_steer(x, rows, torch.ones(1, 1, 3), torch.zeros(1, 1, 3), "torch")
    assert calls == [(2, 1, 3)]
