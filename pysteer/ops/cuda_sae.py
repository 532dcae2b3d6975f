"""CUDA-extension implementations of the SAE ops (kernels in csrc/sae.cu).

Named in the op table (``pysteer/ops/_registry.py``), with the reference's signatures. The op bodies in
``pysteer/ops/sae.py`` have validated shapes, dtypes and devices already; these wrappers check that
the tensors are on one CUDA device, allocate outputs and workspaces with torch (so the caching
allocator and streams behave as for any torch op) and pass raw pointers, sizes, strides, the dtype
code and torch's current stream to ``pysteer._C``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cuda_common import device_index, dtype_code, extension, require_cuda, stream_handle
from .sae import SteerArgs

__all__ = ["sae_decode_sparse", "sae_encode", "sae_encode_topk", "sae_steer"]

_ACT_CODE = {"none": 0, "relu": 1, "jumprelu": 2}
# fp32 pre-activations for the top-k selection are staged per chunk of tokens: at most 512 MiB.
_TOPK_WORKSPACE_ELEMS = 1 << 27


def _opt(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _vector(t: Tensor | None) -> Tensor | None:
    """1-D tensors are passed without strides: make them contiguous (they are small)."""
    return None if t is None else t.contiguous()


def _launch_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    act: str,
    out: Tensor,
    op: str,
) -> None:
    device = require_cuda(op, x=x, W_enc=W_enc, b_enc=b_enc)
    b_enc, b_dec, threshold = _vector(b_enc), _vector(b_dec), _vector(threshold)
    T, d = x.shape
    extension().sae_encode(
        x.data_ptr(), x.stride(0), x.stride(1), _opt(b_dec),
        W_enc.data_ptr(), W_enc.stride(0), W_enc.stride(1),
        b_enc.data_ptr(), _opt(threshold),
        out.data_ptr(), out.dtype == torch.float32,
        T, d, W_enc.shape[1], _ACT_CODE[act], dtype_code(x, op, "x"),
        device_index(device), stream_handle(device),
    )  # fmt: skip


def sae_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, act: str
) -> Tensor:
    """Dense encode ``[T, d] -> [T, m]`` (ReLU / JumpReLU) in ``x``'s dtype; any strides of x and W_enc."""
    out = torch.empty((x.shape[0], W_enc.shape[1]), dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_encode(x, W_enc, b_enc, b_dec, threshold, act, out, "sae_encode")
    return out


def _encode_topk_chunk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, values: Tensor, indices: Tensor
) -> None:
    T, M = x.shape[0], W_enc.shape[1]
    pre = torch.empty((T, M), dtype=torch.float32, device=x.device)
    _launch_encode(x, W_enc, b_enc, b_dec, None, "none", pre, "sae_encode_topk")
    device = x.device
    extension().sae_topk_select(
        pre.data_ptr(), T, M, k, values.data_ptr(), indices.data_ptr(),
        dtype_code(x, "sae_encode_topk", "x"), device_index(device), stream_handle(device),
    )  # fmt: skip


def sae_encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """TopK encode: ``(values [T, k] in x's dtype, descending, indices [T, k] int64)``."""
    T, M = x.shape[0], W_enc.shape[1]
    values = torch.empty((T, k), dtype=x.dtype, device=x.device)
    indices = torch.empty((T, k), dtype=torch.int64, device=x.device)
    chunk = max(1, _TOPK_WORKSPACE_ELEMS // max(M, 1))
    for i in range(0, T, chunk):
        _encode_topk_chunk(
            x[i : i + chunk], W_enc, b_enc, b_dec, k, values[i : i + chunk], indices[i : i + chunk]
        )
    return values, indices


def sae_decode_sparse(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``[T, d] = sum_i values[:, i] * W_dec[indices[:, i]] (+ b_dec)`` in ``W_dec``'s dtype."""
    op = "sae_decode_sparse"
    device = require_cuda(op, indices=indices, values=values, W_dec=W_dec)
    T, K = indices.shape
    D = W_dec.shape[1]
    out = torch.empty((T, D), dtype=W_dec.dtype, device=W_dec.device)
    if out.numel() == 0:
        return out
    indices, values, b_dec = indices.contiguous(), values.contiguous(), _vector(b_dec)
    extension().sae_decode_sparse(
        indices.data_ptr(), indices.dtype == torch.int64, values.data_ptr(), K,
        W_dec.data_ptr(), W_dec.stride(0), W_dec.stride(1), _opt(b_dec),
        out.data_ptr(), T, D, dtype_code(W_dec, op, "W_dec"),
        device_index(device), stream_handle(device),
    )  # fmt: skip
    return out


def sae_steer(a: SteerArgs) -> Tensor:
    """``y = x + W_dec[S]^T (f'_S - f_S)`` per token; ``[T, d]`` contiguous in ``x``'s dtype."""
    op = "sae_steer"
    x, W_enc, W_dec, b_enc, b_dec, act, k = a.x, a.W_enc, a.W_dec, a.b_enc, a.b_dec, a.act, a.k
    device = require_cuda(op, x=x, rows=a.rows, W_enc=W_enc, W_dec=W_dec, features=a.features, kinds=a.kinds)
    T, D = x.shape
    F = a.features.shape[0]
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    code = dtype_code(x, op, "x")
    ext = extension()
    dev, stream = device_index(device), stream_handle(device)
    rows, features = a.rows.contiguous(), a.features.contiguous()
    kinds, strengths = a.kinds.contiguous(), a.strengths.contiguous()
    df = torch.empty((T, F), dtype=torch.float32, device=x.device)
    if act == "topk":
        values, indices = sae_encode_topk(x, W_enc, b_enc, b_dec, k)
        ext.sae_steer_coeff_topk(
            indices.data_ptr(), values.data_ptr(), k, rows.data_ptr(), features.data_ptr(),
            kinds.data_ptr(), strengths.data_ptr(), df.data_ptr(), T, F, code, dev, stream,
        )  # fmt: skip
    else:
        b_enc_c, b_dec_c, thr_c = _vector(b_enc), _vector(b_dec), _vector(a.threshold)
        ext.sae_steer_coeff(
            x.data_ptr(), x.stride(0), x.stride(1), _opt(b_dec_c),
            W_enc.data_ptr(), W_enc.stride(0), W_enc.stride(1), b_enc_c.data_ptr(), _opt(thr_c),
            rows.data_ptr(), features.data_ptr(), kinds.data_ptr(), strengths.data_ptr(), df.data_ptr(),
            T, D, F, _ACT_CODE[act], code, dev, stream,
        )  # fmt: skip
    ext.sae_steer_apply(
        x.data_ptr(), x.stride(0), x.stride(1), rows.data_ptr(), df.data_ptr(),
        W_dec.data_ptr(), W_dec.stride(0), W_dec.stride(1), features.data_ptr(), out.data_ptr(),
        T, D, F, code, dev, stream,
    )  # fmt: skip
    return out
