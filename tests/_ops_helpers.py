"""What tests/test_ops_affine.py, test_ops_affine_linear.py, test_ops_lowrank.py and test_ops_sae.py share.

The 2x oracle, which fast backends run here, and the host build of the CUDA kernels: csrc/<family>.cu
compiled with the host C++ compiler (each test file supplies how its launches are emulated), with a
C entry point per host function, standing in for ``pysteer._C`` behind the real wrappers in
``pysteer/ops/cuda_<family>.py``. Only those four files import this module (the leading underscore
keeps pytest from collecting it).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda, requires_triton

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------


def assert_within_oracle(
    fast: torch.Tensor,
    same_dtype: torch.Tensor,
    ref64: torch.Tensor,
    what: str,
    terms: int = 1,
    floor_eps: float | None = None,
) -> None:
    """``max|fast - ref64| <= 2 * max|same_dtype - ref64| + floor``.

    ``same_dtype`` is the torch reference run on the same low-precision inputs, ``ref64`` the math
    in float64. The floor is ``floor_eps`` (default: one unit of fast's dtype) at ref64's scale;
    for an entry that sums ``terms`` fp32 values (a table gradient) it is at least ``sqrt(terms)``
    fp32 units, the random-walk size of rounding in any summation order. Without it the rule
    compares luck: a scalar table's gradient has a handful of entries, and for one of ~2000 terms
    torch's order was off by 0.02 fp32 units where another order was off by 8.
    """
    assert fast.shape == ref64.shape and fast.dtype == same_dtype.dtype, what
    if fast.numel() == 0:
        return
    err = (fast.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    eps = torch.finfo(fast.dtype).eps if floor_eps is None else floor_eps
    floor = max(eps, torch.finfo(torch.float32).eps * terms**0.5) * scale
    assert err <= 2 * base + floor, f"{what}: fast error {err:.3g} > 2 x torch error {base:.3g} + {floor:.3g}"


# ---------------------------------------------------------------------------------------------
# which fast backends can run here
# ---------------------------------------------------------------------------------------------


def cuda_ext_missing(function: str) -> str | None:
    """Why ``pysteer._C.<function>`` cannot be called here, or None."""
    try:
        ext = importlib.import_module("pysteer._C")
    except ImportError as err:
        return f"pysteer._C is not built ({err}; install with nvcc present)"
    if not hasattr(ext, function):
        return f"pysteer._C was built without {function}"
    return None


def skip_without_cuda_ext(function: str) -> pytest.MarkDecorator:
    reason = cuda_ext_missing(function)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def fast_backends(cuda_function: str) -> list:
    """``triton`` and ``cuda`` as parameters, each skipped with a reason where it cannot run."""
    return [
        pytest.param("triton", marks=requires_triton),
        pytest.param("cuda", marks=[requires_cuda, skip_without_cuda_ext(cuda_function)]),
    ]


def fast_backends_or_host(cuda_function: str) -> list:
    """``triton``, ``cuda`` and ``cuda-host`` as parameters, each skipped with a reason where it cannot run.

    ``cuda`` runs the compiled kernels (a GPU and ``pysteer._C.<cuda_function>``); ``cuda-host`` runs
    them compiled for the host where there is no GPU: the test's ``backend`` fixture routes the
    wrappers with :func:`host_cuda` and passes ``"cuda"`` on.
    """
    on_gpu = DEVICE.type == "cuda"
    cuda_skip = cuda_ext_missing(cuda_function) if on_gpu else "no CUDA device on this machine"
    host_skip = "a CUDA device is present: the compiled kernels run instead" if on_gpu else host_skip_reason()
    return [
        pytest.param("triton", marks=requires_triton),
        pytest.param("cuda", marks=pytest.mark.skipif(cuda_skip is not None, reason=cuda_skip or "")),
        pytest.param("cuda-host", marks=pytest.mark.skipif(host_skip is not None, reason=host_skip or "")),
    ]


def backend_param(request, host_fixture: str = "cuda_kernels_on_host") -> str:
    """The backend name a ``backend`` fixture passes to the ops for a :func:`fast_backends_or_host` parameter.

    ``"cuda-host"`` requests ``host_fixture`` (which routes the CUDA wrappers to the host build, see
    :func:`host_cuda`) and becomes ``"cuda"``; any other name is passed on.
    """
    if request.param == "cuda-host":
        request.getfixturevalue(host_fixture)
        return "cuda"
    return request.param


# ---------------------------------------------------------------------------------------------
# the CUDA kernels compiled for the host
# ---------------------------------------------------------------------------------------------

# Turns CUDA C++ into host C++; each test file adds its dim3 globals, synchronisation and emulate().
HOST_PRELUDE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#undef __shared__
#define __shared__ static
static int emu_device = 0;
inline cudaError_t emu_get_device(int* d) { *d = emu_device; return cudaSuccess; }
inline cudaError_t emu_set_device(int d) { emu_device = d; return cudaSuccess; }
inline cudaError_t emu_last_error() { return cudaSuccess; }
inline const char* emu_error_string(cudaError_t) { return ""; }
#define cudaGetDevice emu_get_device
#define cudaSetDevice emu_set_device
#define cudaGetLastError emu_last_error
#define cudaGetErrorString emu_error_string
namespace py { using value_error = std::invalid_argument; }
"""

_CTYPES = {
    "uintptr_t": ctypes.c_size_t,
    "int64_t": ctypes.c_int64,
    "int": ctypes.c_int,
    "bool": ctypes.c_bool,
}


def host_skip_reason() -> str | None:
    """Why the CUDA kernels cannot be compiled for the host here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++) to emulate the CUDA kernels"
    if not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        return f"no CUDA headers at {CUDA_INCLUDE} to emulate the CUDA kernels"
    return None


def strip_binding(cu: str, name: str, end: str, drop: tuple[str, ...]) -> str:
    """``cu`` without the lines in ``drop`` (CUDA runtime and pybind11 headers) and from ``end`` on."""
    for line in drop:
        assert line in cu, f"csrc/{name} changed shape ({line!r}); update its host build"
        cu = cu.replace(line, "")
    assert end in cu, f"csrc/{name} changed shape ({end!r}); update its host build"
    return cu[: cu.index(end)]


def emulate_launches(cu: str, name: str, pattern: str, replacement: str, expected: int) -> str:
    """Rewrite ``kernel<<<...>>>(`` launches into ``emulate(...)`` calls, checking how many there are."""
    cu, launches = re.subn(pattern, replacement, cu)
    assert launches == expected, (
        f"csrc/{name} has {launches} launches (expected {expected}); update its host build"
    )
    return cu


def c_entry_points(cu: str, namespace: str, prefix: str) -> tuple[str, dict[str, list]]:
    """An ``extern "C" int emu_<f>(...)`` for each host function ``<prefix>...`` of ``cu``.

    Returns the C source (append it to ``cu``) and each function's ctypes argument types.
    """
    api = [
        "static std::string emu_error;",
        'extern "C" const char* emu_last_message() { return emu_error.c_str(); }',
    ]
    signatures = {}
    for fn, params in re.findall(rf"^void ({prefix}\w*)\(([^)]*)\) \{{", cu, flags=re.M):
        typed = [p.split() for p in " ".join(params.split()).split(", ")]
        signatures[fn] = [_CTYPES[t] for t, _ in typed]
        call = f"{namespace}::{fn}({', '.join(n for _, n in typed)});"
        api.append(
            f'extern "C" int emu_{fn}({params}) {{ try {{ {call} }} '
            "catch (const std::exception& e) { emu_error = e.what(); return 1; } return 0; }"
        )
    return "\n".join(api) + "\n", signatures


# Runs a launch's blocks, and each block's threads, one after another: faithful for kernels without
# shared memory, warp shuffles or block barriers (csrc/affine.cu, csrc/lowrank.cu). Launches are
# ``emulate(grid, threads, kernel, args...)``; atomicAdd is a plain add.
SEQUENTIAL_SHIM = (
    HOST_PRELUDE
    + r"""
static dim3 blockIdx, threadIdx, blockDim, gridDim;
inline float atomicAdd(float* p, float v) { const float old = *p; *p += v; return old; }
template <typename K, typename... Args>
void emulate(dim3 grid, int threads, K kernel, Args... args) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = dim3(bx, by);
      for (int tx = 0; tx < threads; ++tx) { threadIdx = dim3(tx); kernel(args...); }
    }
}
"""
)


def sequential_host_source(
    cu: str,
    name: str,
    drop: tuple[str, ...],
    end: str,
    namespace: str,
    prefix: str,
    launches: int,
    tail: str = "",
) -> tuple[str, dict[str, list]]:
    """A host build of csrc/``name`` run by :data:`SEQUENTIAL_SHIM`.

    ``drop`` and ``end`` are as for :func:`strip_binding` (``tail`` is appended after the cut, e.g.
    to close a namespace); every ``kernel<...><<<grid, threads, 0, stream>>>(`` launch (``launches``
    of them) becomes an ``emulate`` call; the host functions ``<namespace>::<prefix>...`` get C entry
    points (see :func:`c_entry_points`). Returns the source and the entry points' signatures.
    """
    cu = strip_binding(cu, name, end, drop) + tail
    cu = emulate_launches(
        cu, name, r"(\w+<[^<>]*>)<<<(\w+), (\w+), 0, \w+>>>\(", r"emulate(\2, \3, \1, ", launches
    )
    api, signatures = c_entry_points(cu, namespace, prefix)
    return SEQUENTIAL_SHIM + cu + api, signatures


class HostExtension:
    """Stands in for ``pysteer._C``: the same function names, backed by the host build."""

    def __init__(self, lib: ctypes.CDLL, signatures: dict[str, list]) -> None:
        lib.emu_last_message.restype = ctypes.c_char_p
        for name, types in signatures.items():
            fn = getattr(lib, f"emu_{name}")
            fn.argtypes, fn.restype = types, ctypes.c_int
            setattr(self, name, self._checked(lib, fn))

    @staticmethod
    def _checked(lib, fn):
        def call(*args):
            if fn(*args) != 0:
                raise ValueError(lib.emu_last_message().decode())

        return call


def _build_host_extension(
    tmp_path_factory, name: str, source: str, signatures: dict[str, list], std: str
) -> HostExtension:
    """Compile ``source`` (a host build of csrc/``name``.cu) into a :class:`HostExtension`."""
    build = tmp_path_factory.mktemp(f"{name}_host")
    src, lib = build / f"{name}_host.cpp", build / f"lib{name}_host.so"
    src.write_text(source)
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    cmd = [
        cxx,
        f"-std={std}",
        "-O1",
        "-fPIC",
        "-shared",
        "-pthread",
        "-I",
        str(CUDA_INCLUDE),
        "-I",
        str(ROOT / "csrc"),
    ]
    proc = subprocess.run([*cmd, str(src), "-o", str(lib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return HostExtension(ctypes.CDLL(str(lib)), signatures)


_BUILT: dict[str, HostExtension] = {}


def host_cuda(
    family: str,
    host_source: Callable[[str], tuple[str, dict[str, list]]],
    tmp_path_factory,
    monkeypatch,
    std: str = "c++17",
) -> HostExtension:
    """Route ``pysteer/ops/cuda_<family>.py`` to csrc/``family``.cu compiled for the host.

    ``host_source`` turns the .cu text into host C++ and its entry points' signatures; the build
    runs once per session. Host tensors stand in for device ones (one device 0, the legacy stream).
    Skips the calling test where there is no host compiler or no CUDA headers.
    """
    reason = host_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if family not in _BUILT:
        source, signatures = host_source((ROOT / "csrc" / f"{family}.cu").read_text())
        _BUILT[family] = _build_host_extension(tmp_path_factory, family, source, signatures, std)
    ext = _BUILT[family]
    wrappers = importlib.import_module(f"pysteer.ops.cuda_{family}")
    monkeypatch.setattr(wrappers, "extension", lambda: ext)
    monkeypatch.setattr(wrappers, "require_cuda", lambda op, **tensors: torch.device("cpu"))
    monkeypatch.setattr(wrappers, "device_index", lambda device: 0)
    monkeypatch.setattr(wrappers, "stream_handle", lambda device: 0)
    return ext
