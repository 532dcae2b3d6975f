"""CUDA-extension implementation of ``pysteer::lowrank_edit`` (kernels in csrc/lowrank.cu).

Named in the op table (``pysteer/ops/_registry.py``). The op bodies in ``pysteer/ops/lowrank.py``
have validated shapes, dtypes and devices; these wrappers check that the tensors are on one CUDA
device, allocate outputs and fp32 workspaces with torch (so the caching allocator and streams
behave as for any torch op) and pass raw pointers, sizes, strides and torch's current stream to
``pysteer._C``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import unit_stride_last
from ._cuda_common import device_index, dtype_code, extension, require_cuda, stream_handle
from .lowrank import kernel_grad_buffers

__all__ = ["lowrank_edit", "lowrank_edit_backward"]

_OP = "lowrank_edit"


def lowrank_edit(x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor) -> Tensor:
    """CUDA forward of ``pysteer::lowrank_edit`` (arguments validated by the op).

    Args:
        x: ``[T, K]`` fp32/fp16/bf16 CUDA tensor, any stride in T (copied if the K stride is not 1).
        base: ``[T, N]`` of ``x``'s dtype, any stride in T (copied if the N stride is not 1).
        rows: ``[T]`` int32 table row per token; 0 returns ``base`` bit-exactly.
        U: ``[C, K, R]``, c: ``[C, R]``, V: ``[C, R, N]`` fp32 tables (made contiguous).

    Returns:
        Contiguous ``[T, N]`` tensor of ``x``'s dtype, computed in fp32 (the hidden ``x U + c``
        goes through an fp32 ``[T, R]`` workspace).

    Raises:
        ValueError: a tensor is not on the one CUDA device.
        BackendUnavailable: ``pysteer._C`` is not built.
    """
    x_code = dtype_code(x, _OP, "x")
    device = require_cuda(_OP, x=x, base=base, rows=rows, U=U, c=c, V=V)
    ext = extension()
    T, K = x.shape
    C, _, R = U.shape
    N = base.shape[1]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, base = unit_stride_last(x), unit_stride_last(base)
    rows, U, c, V = rows.contiguous(), U.contiguous(), c.contiguous(), V.contiguous()
    h = torch.empty((T, R), dtype=torch.float32, device=x.device)
    ext.lowrank_edit_fwd(
        x.data_ptr(), x.stride(0), base.data_ptr(), base.stride(0), rows.data_ptr(),
        U.data_ptr(), c.data_ptr(), V.data_ptr(), h.data_ptr(), y.data_ptr(),
        T, K, N, R, C,
        x_code, device_index(device), stream_handle(device),
    )  # fmt: skip
    return y


def lowrank_edit_backward(
    grad: Tensor, x: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CUDA backward of ``pysteer::lowrank_edit`` (arguments validated by ``pysteer::lowrank_edit_backward``).

    Args:
        grad: ``[T, N]`` gradient of the output, ``x``'s dtype.
        x, rows, U, c, V: the forward's inputs (see :func:`lowrank_edit`).

    Returns:
        ``(dx, dbase, dU, dc, dV)`` as :func:`pysteer.ops.lowrank.lowrank_edit_backward_ref` gives
        them; each table entry's per-thread fp32 sums over a chunk of tokens are flushed with
        atomics, so the table gradients are not bit-reproducible run to run.

    Raises:
        ValueError: a tensor is not on the one CUDA device.
        BackendUnavailable: ``pysteer._C`` is not built.
    """
    x_code = dtype_code(x, _OP, "x")
    device = require_cuda(_OP, grad=grad, x=x, rows=rows, U=U, c=c, V=V)
    ext = extension()
    T, K = x.shape
    C, _, R = U.shape
    N = V.shape[2]
    dx, dbase, dU, dc, dV = kernel_grad_buffers(grad, x, U, c, V)
    if T > 0:
        grad, x = grad.contiguous(), unit_stride_last(x)
        rows, U, c, V = rows.contiguous(), U.contiguous(), c.contiguous(), V.contiguous()
        h = torch.empty((T, R), dtype=torch.float32, device=x.device)
        dh = torch.empty((T, R), dtype=torch.float32, device=x.device)
        ext.lowrank_edit_bwd(
            grad.data_ptr(), x.data_ptr(), x.stride(0), rows.data_ptr(),
            U.data_ptr(), c.data_ptr(), V.data_ptr(), h.data_ptr(), dh.data_ptr(),
            dx.data_ptr(), dU.data_ptr(), dc.data_ptr(), dV.data_ptr(),
            T, K, N, R, C,
            x_code, device_index(device), stream_handle(device),
        )  # fmt: skip
    return dx, dbase, dU, dc, dV
