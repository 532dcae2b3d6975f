"""Test configuration.

Triton's interpreter must be switched on before any ``@triton.jit`` function is decorated, so it is
set here, before pysteer (or its kernels) can be imported. On a CUDA machine set
``PYSTEER_TEST_TRITON_INTERPRET=0`` to test the compiled kernels instead.
"""

import os

import torch

_default = "0" if torch.cuda.is_available() else "1"
if os.environ.get("PYSTEER_TEST_TRITON_INTERPRET", _default) == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
