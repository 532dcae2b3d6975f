"""Triton kernels for the SAE ops declared in ``pysteer/ops/sae.py``.

- ``_sae_encode_kernel``: tiled ``(x - b_dec) @ W_enc`` with fp32 accumulation, bias and
  activation fused in the epilogue. Programs that share a tile of ``W_enc`` are launched next to
  each other (tokens vary fastest in the grid), so ``W_enc`` comes from DRAM once per launch.
- ``_topk_stage_kernel``: per-token top-k over the fp32 pre-activations. Each value is packed
  with its latent id into one int64 key (order-preserving float bits in the high word, the
  complemented id in the low word), so keys are distinct, select values and ids together and
  break ties towards the lower id. Groups of ``GROUP`` keys reduce to their best ``k`` (found by
  bisection, compacted with a cumsum) until one group is left, which is sorted by rank.
- ``_sae_decode_sparse_kernel``: gathers the k decoder rows of a token and sums them.
- ``_sae_steer_coeff_kernel`` / ``_sae_steer_coeff_topk_kernel``: ``df = f'_S - f_S`` per token
  (selective encode over the F columns of ``W_enc`` for ReLU/JumpReLU; a lookup in the token's
  top-k for TopK), fp32 ``[T, F]``.
- ``_sae_steer_apply_kernel``: ``y = x + df @ W_dec[S]``, keeping ``x``'s bits on row 0.

Dot products on fp16/bf16 run on tensor cores (fp32 accumulation); on fp32 inputs they use
``input_precision="ieee"`` so fp32 results match torch's (no TF32). The interpreter computes bf16
``tl.dot`` wrongly, so under ``TRITON_INTERPRET=1`` operands are upcast to fp32 first,
and its fp32 -> bf16 conversion truncates, so ``_cast`` rounds to nearest even by hand there.

The tile sizes below were chosen by reasoning about the shapes (decode: one token, weight-read
bound; prefill: thousands of tokens, tensor-core bound), not tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pysteer._backend import triton_interpreter
from pysteer.ops import sae as _ops

_ACT_CODE = {"none": 0, "relu": 1, "jumprelu": 2}
# globals read inside @triton.jit functions must be constexpr
_KEY_FLOOR = tl.constexpr(-9223372036854775807)  # below every packed key (int64 min + 1)
_SET = tl.constexpr(_ops.EDIT_SET)
_ADD = tl.constexpr(_ops.EDIT_ADD)
_SCALE = tl.constexpr(_ops.EDIT_SCALE)
_ABLATE = tl.constexpr(_ops.EDIT_ABLATE)
_ADD_IF_ACTIVE = tl.constexpr(_ops.EDIT_ADD_IF_ACTIVE)
_GRID_Y_MAX = 65535


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``v`` to ``dtype``, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (measured: max error 2x torch's rounding on randn), so
    there the rounding is done on the bits first; compiled kernels convert with RTNE natively.
    """
    if INTERPRET and dtype == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _load_encoder_input(
    x_ptr,
    b_dec_ptr,
    offs_t,
    offs_d,
    t_mask,
    d_mask,
    stride_xt,
    stride_xd,
    HAS_B_DEC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    xt = tl.load(
        x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
        mask=t_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if HAS_B_DEC:
        bd = tl.load(b_dec_ptr + offs_d, mask=d_mask, other=0.0)
        # rounded to x's dtype like torch's ``x - b_dec``, so the GEMM sees the same operand
        xt = _cast(xt.to(tl.float32) - bd.to(tl.float32)[None, :], xt.dtype, INTERPRET)
    return xt


@triton.jit
def _activate(pre, thr, ACT: tl.constexpr):
    if ACT == 1:
        pre = tl.maximum(pre, 0.0)
    elif ACT == 2:
        pre = tl.where((pre > thr) & (pre > 0.0), pre, 0.0)
    return pre


@triton.jit
def _edit_delta(f, r, kinds_ptr, str_ptr, offs_f, F, mask):
    """``f' - f`` for the table rows ``r`` ([BT]) and features ``offs_f`` ([BF]); 0 on row 0."""
    live = mask & (r[:, None] != 0)
    tab = r.to(tl.int64)[:, None] * F + offs_f[None, :]
    kind = tl.load(kinds_ptr + tab, mask=live, other=0)
    s = tl.load(str_ptr + tab, mask=live, other=0.0)
    fp = tl.where(kind == _SET, s, f)
    fp = tl.where(kind == _ADD, f + s, fp)
    fp = tl.where(kind == _SCALE, f * s, fp)
    fp = tl.where(kind == _ABLATE, 0.0, fp)
    fp = tl.where((kind == _ADD_IF_ACTIVE) & (f > 0.0), f + s, fp)
    return tl.where(live, fp - f, 0.0)


# ---------------------------------------------------------------------------------------------
# dense encode
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sae_encode_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
    thr_ptr,
    out_ptr,
    T,
    D,
    M,
    stride_xt,
    stride_xd,
    stride_wd,
    stride_wm,
    stride_ot,
    HAS_B_DEC: tl.constexpr,
    ACT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_mask = offs_t < T
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        xt = _load_encoder_input(
            x_ptr, b_dec_ptr, offs_t, offs_d, t_mask, d_mask, stride_xt, stride_xd, HAS_B_DEC, INTERPRET
        )
        wt = tl.load(
            w_ptr + offs_d[:, None] * stride_wd + offs_m[None, :].to(tl.int64) * stride_wm,
            mask=d_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        acc = _dot_acc(xt, wt, acc, INTERPRET)
    pre = acc + tl.load(b_enc_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)[None, :]
    thr = pre
    if ACT == 2:
        thr = tl.load(thr_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)[None, :]
    out = _activate(pre, thr, ACT)
    tl.store(
        out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + offs_m[None, :],
        _cast(out, out_ptr.dtype.element_ty, INTERPRET),
        mask=t_mask[:, None] & m_mask[None, :],
    )


def _encode_config(T: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_T, BLOCK_M, BLOCK_D, num_warps, num_stages)``."""
    if triton_interpreter():
        # The interpreter pays per program and per op, not per element: few, large programs.
        return max(16, min(_pow2(T), 64)), 128, max(16, min(_pow2(D), 256)), 4, 1
    wide = 32 if dtype == torch.float32 else 64
    if T <= 16:  # decode: bound by reading W_enc; many programs to keep every SM streaming
        return 16, 64, 2 * wide, 4, 4
    if T <= 64:
        return 64, 64, wide, 4, 4
    return 128, 128, wide, 8, 3


def _encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    act: str,
    out_dtype: torch.dtype,
) -> Tensor:
    T, D = x.shape
    M = W_enc.shape[1]
    out = torch.empty((T, M), dtype=out_dtype, device=x.device)
    if T == 0 or M == 0:
        return out
    BT, BM, BD, warps, stages = _encode_config(T, D, x.dtype)
    grid = (triton.cdiv(T, BT), triton.cdiv(M, BM))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"sae_encode: m={M} exceeds the launch grid ({_GRID_Y_MAX} tiles of {BM})")
    _sae_encode_kernel[grid](
        x,
        W_enc,
        b_enc,
        b_dec if b_dec is not None else b_enc,
        threshold if threshold is not None else b_enc,
        out,
        T,
        D,
        M,
        x.stride(0),
        x.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        out.stride(0),
        HAS_B_DEC=b_dec is not None,
        ACT=_ACT_CODE[act],
        INTERPRET=triton_interpreter(),
        BLOCK_T=BT,
        BLOCK_M=BM,
        BLOCK_D=BD,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def sae_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, act: str
) -> Tensor:
    """Dense encode ``[T, d] -> [T, m]`` (ReLU / JumpReLU) in ``x``'s dtype."""
    return _encode(x, W_enc, b_enc, b_dec, threshold, act, x.dtype)


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pack_keys(v, ids, valid):
    """int64 keys ordered like ``v`` (fp32), ties towards the lower id; invalid slots sort last."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0: one key, so the tie goes to the lower id
    b = v.to(tl.int32, bitcast=True)
    s = b ^ ((b >> 31) & 0x7FFFFFFF)  # an int32 with the floats' order
    s = tl.where(valid, s, -2147483648)
    return (s.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _unpack_keys(key):
    s = (key >> 32).to(tl.int32)
    v = (s ^ ((s >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return v, 4294967295 - (key & 4294967295)


@triton.jit
def _select_largest(key, K):
    """Mask of the ``K`` largest of the distinct int64 ``key [BT, G]`` in each row.

    Bisection on the high words (the values), then, only if values tie at the boundary, on the
    low words (the ids): 32 halvings of a 2**32 range each. ``tl.topk`` would avoid the
    reductions, but its bitonic network reduces with an xor combine that the interpreter runs
    element by element in Python (measured: 1.8 s per token at m=257, k=64, against 25 ms here).
    """
    hi = key >> 32
    lo = key & 4294967295
    a = tl.full((key.shape[0],), -2147483648, tl.int64)
    b = tl.full((key.shape[0],), 2147483647, tl.int64)
    for _ in range(32):
        mid = (a + b + 1) >> 1
        ok = tl.sum((hi >= mid[:, None]).to(tl.int32), axis=1) >= K
        a = tl.where(ok, mid, a)
        b = tl.where(ok, b, mid - 1)
    above = hi > a[:, None]
    tie = hi == a[:, None]
    need = K - tl.sum(above.to(tl.int32), axis=1)
    n_tie = tl.sum(tie.to(tl.int32), axis=1)
    c = tl.zeros((key.shape[0],), tl.int64)
    if tl.sum((n_tie != need).to(tl.int32)) != 0:  # a row takes only some of its tied values
        e = tl.full((key.shape[0],), 4294967295, tl.int64)
        for _ in range(32):
            mid = (c + e + 1) >> 1
            ok = tl.sum((tie & (lo >= mid[:, None])).to(tl.int32), axis=1) >= need
            c = tl.where(ok, mid, c)
            e = tl.where(ok, e, mid - 1)
    return above | (tie & (lo >= c[:, None]))


@triton.jit
def _topk_stage_kernel(
    src_ptr,
    keys_ptr,
    val_ptr,
    idx_ptr,
    T,
    N,
    K,
    stride_src,
    stride_keys,
    FROM_VALUES: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_J: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Reduce each group of ``GROUP`` candidates of a token to its ``K`` best.

    Non-final stages write the winners' keys, unordered, to ``keys [T, n_groups * K]``. The
    final stage writes them to ``keys [T, K]`` as scratch, then places each winner at its rank
    (the number of winners with a larger key): values descending, ties by lower id.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    t_mask = offs_t < T
    rows = offs_t.to(tl.int64)[:, None]
    offs = g * GROUP + tl.arange(0, GROUP)
    valid = t_mask[:, None] & (offs < N)[None, :]
    if FROM_VALUES:
        v = tl.load(src_ptr + rows * stride_src + offs[None, :], mask=valid, other=0.0).to(tl.float32)
        key = _pack_keys(v, offs[None, :], valid)
    else:
        key = tl.load(src_ptr + rows * stride_src + offs[None, :], mask=valid, other=0)
        key = tl.where(valid, key, _pack_keys(tl.zeros((BLOCK_T, GROUP), tl.float32), offs[None, :], valid))
    win = _select_largest(key, K)
    pos = tl.cumsum(win.to(tl.int32), axis=1) - 1
    # distinct invalid slots can tie with each other only below every valid candidate; cap at K
    keep = win & (pos < K) & t_mask[:, None]
    tl.store(keys_ptr + rows * stride_keys + g * K + pos, key, mask=keep)
    if FINAL:
        tl.debug_barrier()
        o = tl.arange(0, KP)
        mine_mask = t_mask[:, None] & (o < K)[None, :]
        mine = tl.load(keys_ptr + rows * stride_keys + o[None, :], mask=mine_mask, other=0)
        rank = tl.zeros((BLOCK_T, KP), tl.int32)
        for j0 in range(0, K, BLOCK_J):
            oj = j0 + tl.arange(0, BLOCK_J)
            other = tl.load(
                keys_ptr + rows * stride_keys + oj[None, :],
                mask=t_mask[:, None] & (oj < K)[None, :],
                other=_KEY_FLOOR,
            )
            rank += tl.sum((other[:, None, :] > mine[:, :, None]).to(tl.int32), axis=2)
        v, ids = _unpack_keys(mine)
        out = rows * K + rank
        tl.store(
            val_ptr + out, _cast(tl.maximum(v, 0.0), val_ptr.dtype.element_ty, INTERPRET), mask=mine_mask
        )
        tl.store(idx_ptr + out, ids, mask=mine_mask)


def _topk_group(N: int, KP: int) -> int:
    # at least 4x the winners per group, so each stage shrinks the candidates 4x or more
    cap = 1024 if triton_interpreter() else 4096
    return max(KP, min(_pow2(N), max(cap, 4 * KP)))


def _select_topk(pre: Tensor, k: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Top-k of each row of fp32 ``pre [T, M]``: ``(relu(values) [T, k], indices [T, k] int64)``."""
    T, M = pre.shape
    KP = _pow2(k)
    values = torch.empty((T, k), dtype=out_dtype, device=pre.device)
    indices = torch.empty((T, k), dtype=torch.int64, device=pre.device)
    # the interpreter pays per program: batch tokens; compiled, one token per program
    BT = min(_pow2(T), 16) if triton_interpreter() else 1
    src, N, from_values = pre, M, True
    while True:
        group = _topk_group(N, KP)
        n_groups = triton.cdiv(N, group)
        final = n_groups == 1
        keys = torch.empty((T, n_groups * k), dtype=torch.int64, device=pre.device)
        _topk_stage_kernel[(triton.cdiv(T, BT), n_groups)](
            src,
            keys,
            values,
            indices,
            T,
            N,
            k,
            src.stride(0),
            keys.stride(0),
            FROM_VALUES=from_values,
            FINAL=final,
            BLOCK_T=BT,
            GROUP=group,
            KP=KP,
            BLOCK_J=min(KP, 16),
            INTERPRET=triton_interpreter(),
            num_warps=8 if group >= 2048 else 4,
        )
        if final:
            return values, indices
        src, N, from_values = keys, n_groups * k, False


# fp32 pre-activations are staged per chunk of tokens; this bounds the workspace to 512 MiB.
_TOPK_WORKSPACE_ELEMS = 1 << 27


def sae_encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """TopK encode: ``(values [T, k] in x's dtype, sorted descending, indices [T, k] int64)``."""
    T = x.shape[0]
    M = W_enc.shape[1]
    chunk = max(1, _TOPK_WORKSPACE_ELEMS // max(M, 1))
    if T <= chunk:
        return _select_topk(_encode(x, W_enc, b_enc, b_dec, None, "none", torch.float32), k, x.dtype)
    parts = [
        _select_topk(_encode(x[i : i + chunk], W_enc, b_enc, b_dec, None, "none", torch.float32), k, x.dtype)
        for i in range(0, T, chunk)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# sparse decode
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sae_decode_sparse_kernel(
    idx_ptr,
    val_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    K,
    D,
    stride_wm,
    stride_wd,
    HAS_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ids = tl.load(idx_ptr + t * K + offs_k, mask=k_mask, other=0).to(tl.int64)
        v = tl.load(val_ptr + t * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + ids[:, None] * stride_wm + offs_d[None, :] * stride_wd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    if HAS_B:
        acc += tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + offs_d, _cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=d_mask)


def sae_decode_sparse(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``[T, d] = sum_i values[:, i] * W_dec[indices[:, i]] (+ b_dec)`` in ``W_dec``'s dtype."""
    T, K = indices.shape
    D = W_dec.shape[1]
    out = torch.empty((T, D), dtype=W_dec.dtype, device=W_dec.device)
    if T == 0 or D == 0:
        return out
    if K == 0:
        return out.copy_(b_dec.expand(T, D)) if b_dec is not None else out.zero_()
    indices = indices.contiguous()
    values = values.contiguous()
    if triton_interpreter():
        BK, BD = min(_pow2(K), 64), min(_pow2(D), 1024)
    else:
        BK, BD = min(_pow2(K), 16), min(_pow2(D), 512)
    _sae_decode_sparse_kernel[(T, triton.cdiv(D, BD))](
        indices,
        values,
        W_dec,
        b_dec if b_dec is not None else W_dec,
        out,
        K,
        D,
        W_dec.stride(0),
        W_dec.stride(1),
        HAS_B=b_dec is not None,
        BLOCK_K=BK,
        BLOCK_D=BD,
        INTERPRET=triton_interpreter(),
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# feature steering
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sae_steer_coeff_kernel(
    x_ptr,
    rows_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
    thr_ptr,
    feat_ptr,
    kinds_ptr,
    str_ptr,
    df_ptr,
    T,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_wd,
    stride_wm,
    HAS_B_DEC: tl.constexpr,
    ACT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    t_mask = offs_t < T
    f_mask = offs_f < F
    feats = tl.load(feat_ptr + offs_f, mask=f_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        xt = _load_encoder_input(
            x_ptr, b_dec_ptr, offs_t, offs_d, t_mask, d_mask, stride_xt, stride_xd, HAS_B_DEC, INTERPRET
        )
        # only the F columns of W_enc that the edit needs
        wt = tl.load(
            w_ptr + offs_d[:, None] * stride_wd + feats[None, :] * stride_wm,
            mask=d_mask[:, None] & f_mask[None, :],
            other=0.0,
        )
        acc = _dot_acc(xt, wt, acc, INTERPRET)
    pre = acc + tl.load(b_enc_ptr + feats, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    thr = pre
    if ACT == 2:
        thr = tl.load(thr_ptr + feats, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    f = _activate(pre, thr, ACT)
    r = tl.load(rows_ptr + offs_t, mask=t_mask, other=0)
    mask = t_mask[:, None] & f_mask[None, :]
    df = _edit_delta(f, r, kinds_ptr, str_ptr, offs_f, F, mask)
    tl.store(df_ptr + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], df, mask=mask)


@triton.jit
def _sae_steer_coeff_topk_kernel(
    idx_ptr,
    val_ptr,
    rows_ptr,
    feat_ptr,
    kinds_ptr,
    str_ptr,
    df_ptr,
    T,
    K,
    F,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    t_mask = offs_t < T
    f_mask = offs_f < F
    feats = tl.load(feat_ptr + offs_f, mask=f_mask, other=-2).to(tl.int64)
    f = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tk_mask = t_mask[:, None] & (offs_k < K)[None, :]
        tk = offs_t[:, None].to(tl.int64) * K + offs_k[None, :]
        ids = tl.load(idx_ptr + tk, mask=tk_mask, other=-1)
        v = tl.load(val_ptr + tk, mask=tk_mask, other=0.0).to(tl.float32)
        match = ids[:, :, None] == feats[None, None, :]  # [BT, BK, BF]
        f += tl.sum(tl.where(match, v[:, :, None], 0.0), axis=1)
    r = tl.load(rows_ptr + offs_t, mask=t_mask, other=0)
    mask = t_mask[:, None] & f_mask[None, :]
    df = _edit_delta(f, r, kinds_ptr, str_ptr, offs_f, F, mask)
    tl.store(df_ptr + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], df, mask=mask)


@triton.jit
def _sae_steer_apply_kernel(
    x_ptr,
    rows_ptr,
    df_ptr,
    w_ptr,
    feat_ptr,
    out_ptr,
    T,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_wm,
    stride_wd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    d_mask = offs_d < D
    delta = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_mask = offs_f < F
        feats = tl.load(feat_ptr + offs_f, mask=f_mask, other=0).to(tl.int64)
        df = tl.load(
            df_ptr + offs_t[:, None].to(tl.int64) * F + offs_f[None, :],
            mask=t_mask[:, None] & f_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + feats[:, None] * stride_wm + offs_d[None, :] * stride_wd,
            mask=f_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # fp32 x fp32 (no TF32): the edit is added to x at fp32 precision, like the reference
        delta = tl.dot(df, w.to(tl.float32), delta, input_precision="ieee")
    mask = t_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    r = tl.load(rows_ptr + offs_t, mask=t_mask, other=0)
    xf = x.to(tl.float32)
    y = _cast(xf + delta, x.dtype, INTERPRET)
    # row 0 and "nothing added to a zero" keep x's bits (x + 0.0 would turn -0.0 into +0.0)
    keep = (r[:, None] == 0) | ((delta == 0.0) & (xf == 0.0))
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :], tl.where(keep, x, y), mask=mask)


def sae_steer(a: _ops.SteerArgs) -> Tensor:
    """``y = x + W_dec[S]^T (f'_S - f_S)`` per token; ``[T, d]`` contiguous in ``x``'s dtype."""
    x, W_enc, b_enc, b_dec, act, k = a.x, a.W_enc, a.b_enc, a.b_dec, a.act, a.k
    T, D = x.shape
    n_feat = a.features.shape[0]
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0 or D == 0:
        return out
    features = a.features.contiguous()
    kinds = a.kinds.contiguous()
    strengths = a.strengths.contiguous()
    rows = a.rows.contiguous()
    interp = triton_interpreter()
    df = torch.empty((T, n_feat), dtype=torch.float32, device=x.device)
    BT = max(16, min(_pow2(T), 64 if interp else (16 if T <= 16 else 64)))
    BF = max(16, min(_pow2(n_feat), 64 if interp else 32))
    if act == "topk":
        values, indices = sae_encode_topk(x, W_enc, b_enc, b_dec, k)
        BK = max(16, min(_pow2(k), 64 if interp else 16))
        _sae_steer_coeff_topk_kernel[(triton.cdiv(T, BT), triton.cdiv(n_feat, BF))](
            indices, values, rows, features, kinds, strengths, df, T, k, n_feat,
            BLOCK_T=BT, BLOCK_F=BF, BLOCK_K=BK, num_warps=4,
        )  # fmt: skip
    else:
        BD = max(16, min(_pow2(D), 256 if interp else (64 if x.dtype == torch.float32 else 128)))
        _sae_steer_coeff_kernel[(triton.cdiv(T, BT), triton.cdiv(n_feat, BF))](
            x, rows, W_enc, b_enc,
            b_dec if b_dec is not None else b_enc,
            a.threshold if a.threshold is not None else b_enc,
            features, kinds, strengths, df, T, D, n_feat,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
            HAS_B_DEC=b_dec is not None, ACT=_ACT_CODE[act], INTERPRET=interp,
            BLOCK_T=BT, BLOCK_F=BF, BLOCK_D=BD, num_warps=4,
        )  # fmt: skip
    BD = max(16, min(_pow2(D), 512 if interp else 128))
    _sae_steer_apply_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
        x, rows, df, a.W_dec, features, out, T, D, n_feat,
        x.stride(0), x.stride(1), a.W_dec.stride(0), a.W_dec.stride(1),
        BLOCK_T=BT, BLOCK_D=BD, BLOCK_F=BF, INTERPRET=interp, num_warps=4,
    )  # fmt: skip
    return out
