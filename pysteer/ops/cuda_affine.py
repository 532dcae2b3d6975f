"""CUDA-extension implementation of ``pysteer::affine_steer`` (kernels in csrc/affine.cu).

Named in the op table (``pysteer/ops/_registry.py``). The op bodies in ``pysteer/ops/affine.py``
have validated shapes, dtypes and devices; these wrappers check that the tensors are on one CUDA
device, allocate outputs with torch (so the caching allocator and streams behave as for any torch op) and
pass raw pointers, sizes, strides and torch's current stream to ``pysteer._C``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import unit_stride_last
from ._cuda_common import device_index, dtype_code, extension, pointer, require_cuda, stream_handle

__all__ = ["affine_steer", "affine_steer_backward"]

_OP = "affine_steer"


def affine_steer(x: Tensor, rows: Tensor, M: Tensor, A: Tensor) -> Tensor:
    """CUDA forward of ``pysteer::affine_steer`` (arguments validated by the op).

    Args:
        x: ``[T, H, D]`` fp32/fp16/bf16 CUDA tensor, any strides in T and H (copied if the D stride
            is not 1). 16-byte loads are used when D and the T/H strides allow it.
        rows: ``[T]`` int32 table row per token; 0 leaves the token bit-exactly unchanged.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table. When M and A differ in dtype both are
            widened to fp32 first (exact; the kernel is instantiated for one table dtype).

    Returns:
        Contiguous ``[T, H, D]`` tensor of ``x``'s dtype, computed in fp32 (``x * M + A`` as one FMA).

    Raises:
        ValueError: a tensor is not on the one CUDA device.
        BackendUnavailable: ``pysteer._C`` is not built.
    """
    x_code = dtype_code(x, _OP, "x")
    device = require_cuda(_OP, x=x, rows=rows, M=M, A=A)
    ext = extension()
    if M.dtype != A.dtype:
        M, A = M.float(), A.float()
    T, H, D = x.shape
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, M, A = unit_stride_last(x), unit_stride_last(M), unit_stride_last(A)
    rows = rows.contiguous()
    m_ptr, tab_code = pointer(M, _OP, "M")
    ext.affine_steer_fwd(
        x.data_ptr(), x.stride(0), x.stride(1),
        rows.data_ptr(),
        m_ptr, M.stride(0), M.stride(1), M.stride(2), M.shape[2],
        A.data_ptr(), A.stride(0), A.stride(1), A.stride(2), A.shape[2],
        y.data_ptr(),
        T, H, D, M.shape[0],
        x_code, tab_code, device_index(device), stream_handle(device),
    )  # fmt: skip
    return y


def affine_steer_backward(
    grad: Tensor, x: Tensor, rows: Tensor, M: Tensor, A: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA backward of ``pysteer::affine_steer`` (arguments validated by ``pysteer::affine_steer_backward``).

    Args:
        grad: ``[T, H, D]`` gradient of the output, ``x``'s dtype.
        x, rows, M, A: the forward's inputs (see :func:`affine_steer`).

    Returns:
        ``(dx, dM, dA)`` with the shapes and dtypes of ``x``, ``M`` and ``A``; table gradients are
        accumulated in fp32 (per-thread sums flushed with atomics, so not bit-reproducible run to
        run) and cast to the table dtype. Row 0 of ``dM`` and ``dA`` is zero.

    Raises:
        ValueError: a tensor is not on the one CUDA device.
        BackendUnavailable: ``pysteer._C`` is not built.
    """
    x_code = dtype_code(x, _OP, "x")
    device = require_cuda(_OP, grad=grad, x=x, rows=rows, M=M, A=A)
    ext = extension()
    T, H, D = x.shape
    dx = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    dM = torch.zeros(M.shape, dtype=torch.float32, device=M.device)
    dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
    if dx.numel() > 0:
        grad, x, M = grad.contiguous(), unit_stride_last(x), unit_stride_last(M)
        rows = rows.contiguous()
        m_ptr, tab_code = pointer(M, _OP, "M")
        ext.affine_steer_bwd(
            grad.data_ptr(), x.data_ptr(), x.stride(0), x.stride(1),
            rows.data_ptr(),
            m_ptr, M.stride(0), M.stride(1), M.stride(2), M.shape[2], A.shape[2],
            dx.data_ptr(), dM.data_ptr(), dA.data_ptr(),
            T, H, D, M.shape[0],
            x_code, tab_code, device_index(device), stream_handle(device),
        )  # fmt: skip
    return dx, dM.to(M.dtype), dA.to(A.dtype)
