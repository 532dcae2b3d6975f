"""CUDA-extension implementation of ``pysteer::affine_linear`` (kernel in csrc/affine_linear.cu).

Named in the op table (``pysteer/ops/_registry.py``). The op body in ``pysteer/ops/affine_linear.py``
has validated shapes, dtypes and devices; the wrapper checks that the tensors are on one CUDA
device, allocates the output with torch (so the caching allocator and streams behave
as for any torch op) and passes raw pointers, sizes, strides and torch's current stream to
``pysteer._C``.

The kernel covers the decode regime, ``T <= MAX_TOKENS`` (64) tokens: a GEMV that reads ``W``
once and keeps one fp32 accumulator per (token, output row) in registers. Larger batches are
prefill-shaped and tensor-core bound, which this CUDA-core kernel is not written for; they run the
torch reference math (steer, then ``F.linear``: cuBLAS on a GPU) instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import BackendUnavailable
from ._common import unit_stride_last
from ._cuda_common import device_index, dtype_code, extension, require_cuda, stream_handle
from .affine_linear import affine_linear_ref

__all__ = ["MAX_TOKENS", "affine_linear"]

_OP = "affine_linear"
# kMaxTokens in csrc/affine_linear.cu
MAX_TOKENS = 64


def affine_linear(z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """CUDA forward of ``pysteer::affine_linear`` (arguments validated by the op).

    Args:
        z: ``[T, H*D]`` fp32/fp16/bf16 CUDA tensor, any token stride (copied if the channel stride
            is not 1). 16-byte loads are used when D, the token stride and the pointers allow it.
        rows: ``[T]`` int32 table row per token; row 0 projects the unmodified ``z``.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table, any strides.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table, any strides. Tables of another dtype than
            ``z`` are widened to fp32 first (exact; the kernel is instantiated for tables of z's
            dtype or fp32), which costs two small copies per call.
        W: ``[out, H*D]`` weight of ``z``'s dtype (copied if its channel stride is not 1).
        bias: ``[out]`` of ``z``'s dtype, or None.

    Returns:
        Contiguous ``[T, out]`` tensor of ``z``'s dtype, accumulated in fp32. For
        ``T > MAX_TOKENS`` the result comes from the torch reference math (see the module docstring).

    Raises:
        ValueError: a tensor is not on the one CUDA device.
        BackendUnavailable: ``pysteer._C`` is not built, or was built without csrc/affine_linear.cu.
    """
    code = dtype_code(z, _OP, "z")
    tensors = {"z": z, "rows": rows, "M": M, "A": A, "W": W}
    if bias is not None:
        tensors["bias"] = bias
    device = require_cuda(_OP, **tensors)
    ext = extension()
    if not hasattr(ext, "affine_linear_fwd"):
        raise BackendUnavailable(
            "pysteer._C was built without csrc/affine_linear.cu; reinstall to rebuild it"
        )
    T, K = z.shape
    if T > MAX_TOKENS:
        return affine_linear_ref(z, rows, M, A, W, bias)
    N = W.shape[0]
    C, H = M.shape[0], M.shape[1]
    out = torch.empty((T, N), dtype=z.dtype, device=z.device)
    if T == 0 or N == 0:
        return out
    if not (M.dtype == A.dtype and M.dtype in (z.dtype, torch.float32)):
        M, A = M.float(), A.float()
    z, W = unit_stride_last(z), unit_stride_last(W)  # the tables are read through their strides
    rows = rows.contiguous()
    bias = bias.contiguous() if bias is not None else None
    ext.affine_linear_fwd(
        z.data_ptr(), z.stride(0),
        rows.data_ptr(),
        M.data_ptr(), M.stride(0), M.stride(1), M.stride(2), M.shape[2],
        A.data_ptr(), A.stride(0), A.stride(1), A.stride(2), A.shape[2],
        W.data_ptr(), W.stride(0),
        bias.data_ptr() if bias is not None else 0,
        out.data_ptr(),
        T, H, K // H, N, C,
        code, dtype_code(M, _OP, "M"), device_index(device), stream_handle(device),
    )  # fmt: skip
    return out
