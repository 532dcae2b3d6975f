"""Sparse-autoencoder ops (ARCHITECTURE.md, "Decisions every part shares").

An SAE over a site of width ``d`` with ``m`` latents holds ``W_enc [d, m]``, ``b_enc [m]``,
``W_dec [m, d]``, ``b_dec [d]`` and, for JumpReLU, a per-latent ``threshold [m]``. With
``x`` the site activations flattened to ``[T, d]``:

    pre = (x - b_dec) @ W_enc + b_enc          (b_dec omitted when the SAE does not subtract it)
    relu:      f = relu(pre)
    jumprelu:  f = relu(pre) * (pre > threshold)
    topk:      the k largest entries of pre per token, then relu; all others are 0

Four ops, each declared once here with ``torch.library`` (schema, fake impl, autograd) and
implemented per backend (``torch`` reference below, Triton in ``pysteer.kernels.sae``, CUDA in
``pysteer.ops.cuda_sae``), as the op table in ``pysteer/ops/_registry.py`` names them:

- ``sae_encode``: dense ``f [T, m]`` for ReLU / JumpReLU (GEMM + bias + activation fused).
- ``sae_encode_topk``: ``(values [T, k], indices [T, k] int64)`` for TopK, values sorted
  descending. A dense TopK output would be ``m / k`` times larger than what it carries.
- ``sae_decode_sparse``: ``sum_i values[t, i] * W_dec[indices[t, i]] (+ b_dec)``: reads k rows.
- ``sae_steer``: the error-preserving feature edit ``y = x + W_dec[S]^T (f'_S - f_S)``.

Feature-edit tables (``sae_steer``), laid out like the affine op's steering tables:

- ``features [F]`` int32: the feature set S, distinct latent ids in ``[0, m)``.
- ``kinds [C, F]`` int32 and ``strengths [C, F]`` float32: for table row ``c`` and feature
  ``features[j]``, the edit applied to that feature's activation ``f``:

  ========================  ====  ==================================
  kind                      code  edited value ``f'``
  ========================  ====  ==================================
  ``none``                  0     ``f``
  ``set`` (clamp to value)  1     ``s``
  ``add``                   2     ``f + s``
  ``scale``                 3     ``f * s``
  ``ablate``                4     ``0``
  ``add_if_active``         5     ``f + s`` where ``f > 0``, else ``f``
  ========================  ====  ==================================

- ``rows [T]`` int32: table row per token. Row 0 is never read: such a token's output is ``x``
  itself, bit-exactly. A row whose edits leave every ``f'`` equal to ``f`` (``add 0``,
  ``scale 1``, ``none``) also returns ``x`` bit-exactly: the SAE's reconstruction error is kept,
  only the change of the edited features is added.

For ReLU and JumpReLU the encoding is selective: only the ``F`` columns of ``W_enc`` for S are
read (exact, since each latent depends only on its own column). TopK needs the full encode to
know whether a feature is among the k largest.

Only shapes, dtypes and devices are validated (before any kernel runs); values inside index
tensors (``rows < C``, ``0 <= features < m``, distinct features, valid kinds) are not, because
checking device values costs a host sync on every call and breaks CUDA-graph capture. Build the
tables with :class:`pysteer.sae.SAEEditTable`, which validates on the host.

Gradients flow to ``x`` (all ops), ``values`` (``sae_decode_sparse``) and ``strengths``
(``sae_steer``); the SAE's weights are constants for these ops (request their gradients with the
``torch`` backend, which runs the reference math under autograd). Backward passes are torch
math for every backend: they are GEMMs over ``F`` or ``k`` columns, which cuBLAS already runs at
its best.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import KERNEL_DTYPES
from ._registry import get_impl

ACTIVATIONS = ("relu", "jumprelu", "topk")

EDIT_NONE = 0
EDIT_SET = 1
EDIT_ADD = 2
EDIT_SCALE = 3
EDIT_ABLATE = 4
EDIT_ADD_IF_ACTIVE = 5
EDIT_KINDS = {
    "none": EDIT_NONE,
    "set": EDIT_SET,
    "add": EDIT_ADD,
    "scale": EDIT_SCALE,
    "ablate": EDIT_ABLATE,
    "add_if_active": EDIT_ADD_IF_ACTIVE,
}

# The Triton and CUDA top-k selections sort the k winners of a token in one block (in registers
# / shared memory), so k is bounded there; the torch reference has no bound.
MAX_TOPK_K = 1024

# float64 is accepted by the torch reference only: it is the test oracle's precision.
_REF_DTYPES = (*KERNEL_DTYPES, torch.float64)


class SteerArgs(NamedTuple):
    """``sae_steer``'s arguments in the op schema's order (``backend`` aside).

    The one signature the torch reference, the Triton launcher and the CUDA wrapper share: each
    takes a ``SteerArgs``. The fields are documented at :func:`sae_steer`.
    """

    x: Tensor
    rows: Tensor
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor | None
    threshold: Tensor | None
    features: Tensor
    kinds: Tensor
    strengths: Tensor
    act: str
    k: int


# ---------------------------------------------------------------------------------------------
# validation: once per call, in the op bodies (or the inline torch paths), for every backend
# ---------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_floats(op: str, backend: str, x: Tensor, named: dict[str, Tensor | None]) -> None:
    allowed = _REF_DTYPES if backend == "torch" else KERNEL_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{op}: x must be one of {names} for backend {backend!r}, got {x.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(
                f"{op}: {name} is {t.dtype} but x is {x.dtype}; convert the SAE once with sae.to({x.dtype})"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def _check_encoder(
    op: str,
    backend: str,
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    act: str,
    k: int,
) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, d], got shape {_shape(x)}")
    d = x.shape[1]
    if W_enc.dim() != 2 or W_enc.shape[0] != d:
        raise ValueError(f"{op}: W_enc must be [d, m] with d={d} (x's width), got shape {_shape(W_enc)}")
    m = W_enc.shape[1]
    if b_enc.shape != (m,):
        raise ValueError(f"{op}: b_enc must be [m]=[{m}], got shape {_shape(b_enc)}")
    if b_dec is not None and b_dec.shape != (d,):
        raise ValueError(f"{op}: b_dec must be [d]=[{d}], got shape {_shape(b_dec)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    if act == "jumprelu":
        if threshold is None:
            raise ValueError(f"{op}: act='jumprelu' needs threshold [m]=[{m}], got None")
        if threshold.shape != (m,):
            raise ValueError(f"{op}: threshold must be [m]=[{m}], got shape {_shape(threshold)}")
    elif threshold is not None:
        raise ValueError(f"{op}: threshold is only used by act='jumprelu', got act={act!r}")
    if act == "topk":
        if not 1 <= k <= m:
            raise ValueError(f"{op}: k must be in [1, m={m}] for act='topk', got {k}")
        if backend != "torch" and k > MAX_TOPK_K:
            raise ValueError(f"{op}: backend {backend!r} supports k <= {MAX_TOPK_K}, got {k}")
    elif k != 0:
        raise ValueError(f"{op}: k is only used by act='topk'; pass k=0 for act={act!r}, got {k}")
    _check_floats(op, backend, x, {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold})


def check_sae_encode_args(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    act: str,
    backend: str = "torch",
) -> None:
    """Raise ``ValueError`` naming the first problem with ``sae_encode``'s arguments."""
    if act == "topk":
        raise ValueError("sae_encode: act='topk' returns sparse output; call sae_encode_topk")
    _check_encoder("sae_encode", backend, x, W_enc, b_enc, b_dec, threshold, act, 0)


def check_sae_encode_topk_args(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, backend: str = "torch"
) -> None:
    """Raise ``ValueError`` naming the first problem with ``sae_encode_topk``'s arguments."""
    _check_encoder("sae_encode_topk", backend, x, W_enc, b_enc, b_dec, None, "topk", k)


def check_sae_decode_sparse_args(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None, backend: str = "torch"
) -> None:
    """Raise ``ValueError`` naming the first problem with ``sae_decode_sparse``'s arguments."""
    op = "sae_decode_sparse"
    if indices.dim() != 2:
        raise ValueError(f"{op}: indices must be [T, k], got shape {_shape(indices)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    if values.shape != indices.shape:
        raise ValueError(f"{op}: values must have indices' shape {_shape(indices)}, got {_shape(values)}")
    if W_dec.dim() != 2:
        raise ValueError(f"{op}: W_dec must be [m, d], got shape {_shape(W_dec)}")
    d = W_dec.shape[1]
    if b_dec is not None and b_dec.shape != (d,):
        raise ValueError(f"{op}: b_dec must be [d]=[{d}], got shape {_shape(b_dec)}")
    if indices.device != values.device:
        raise ValueError(f"{op}: indices is on {indices.device}, values on {values.device}")
    _check_floats(op, backend, values, {"W_dec": W_dec, "b_dec": b_dec})


def check_sae_steer_args(a: SteerArgs, backend: str = "torch") -> None:
    """Raise ``ValueError`` naming the first problem with ``sae_steer``'s arguments."""
    op = "sae_steer"
    x, rows, W_dec, features, kinds, strengths = a.x, a.rows, a.W_dec, a.features, a.kinds, a.strengths
    _check_encoder(op, backend, x, a.W_enc, a.b_enc, a.b_dec, a.threshold, a.act, a.k)
    T, d = x.shape
    m = a.W_enc.shape[1]
    if W_dec.shape != (m, d):
        raise ValueError(f"{op}: W_dec must be [m, d]=[{m}, {d}], got shape {_shape(W_dec)}")
    _check_floats(op, backend, x, {"W_dec": W_dec})
    if rows.shape != (T,):
        raise ValueError(f"{op}: rows must be [T]=[{T}], got shape {_shape(rows)}")
    if rows.dtype != torch.int32:
        raise ValueError(f"{op}: rows must be int32, got {rows.dtype}")
    if features.dim() != 1 or features.shape[0] < 1:
        raise ValueError(f"{op}: features must be [F] with F >= 1, got shape {_shape(features)}")
    if features.dtype != torch.int32:
        raise ValueError(f"{op}: features must be int32, got {features.dtype}")
    n_feat = features.shape[0]
    if kinds.dim() != 2 or kinds.shape[1] != n_feat or kinds.shape[0] < 1:
        raise ValueError(f"{op}: kinds must be [C, F] with F={n_feat}, got shape {_shape(kinds)}")
    if kinds.dtype != torch.int32:
        raise ValueError(f"{op}: kinds must be int32, got {kinds.dtype}")
    if strengths.shape != kinds.shape:
        raise ValueError(
            f"{op}: strengths must be [C, F]={_shape(kinds)} like kinds, got {_shape(strengths)}"
        )
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if strengths.dtype != want:
        raise ValueError(f"{op}: strengths must be {want}, got {strengths.dtype}")
    for name, t in (("rows", rows), ("features", features), ("kinds", kinds), ("strengths", strengths)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def _no_weight_grad(op: str, named: dict[str, Tensor | None]) -> None:
    for name, t in named.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but kernel backends differentiate only the activations "
                "and edit strengths; detach the SAE weights or use backend='torch'"
            )


# ---------------------------------------------------------------------------------------------
# torch reference: product code (CPU path, compile-visible math) and the test oracle
# ---------------------------------------------------------------------------------------------


def _encoder_input(x: Tensor, b_dec: Tensor | None) -> Tensor:
    return x if b_dec is None else x - b_dec


def _activate(pre: Tensor, threshold: Tensor | None, act: str) -> Tensor:
    if act == "jumprelu":
        return torch.relu(pre) * (pre > threshold)
    return torch.relu(pre)


def sae_encode_ref(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, act: str
) -> Tensor:
    """Reference dense encode in ``x``'s dtype: ``[T, d] -> [T, m]``."""
    pre = torch.addmm(b_enc, _encoder_input(x, b_dec), W_enc)
    return _activate(pre, threshold, act)


def sae_encode_topk_ref(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """Reference TopK encode: ``(values [T, k], indices [T, k] int64)``, values descending."""
    pre = torch.addmm(b_enc, _encoder_input(x, b_dec), W_enc)
    top = torch.topk(pre, k, dim=-1, largest=True, sorted=True)
    return torch.relu(top.values), top.indices


def sae_decode_sparse_ref(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """Reference sparse decode: ``[T, d] = sum_i values[:, i] * W_dec[indices[:, i]] (+ b_dec)``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sae_feature_acts_ref(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    features: Tensor,
    act: str,
    k: int,
) -> Tensor:
    """Activations of the latents ``features`` only: ``[T, F]`` in ``x``'s dtype.

    ReLU / JumpReLU read only those columns of ``W_enc``; TopK runs the full encode and keeps a
    feature's value where it is among the token's k winners (0 elsewhere).
    """
    fidx = features.long()
    if act == "topk":
        values, indices = sae_encode_topk_ref(x, W_enc, b_enc, b_dec, k)
        match = indices[:, :, None] == fidx[None, None, :]  # [T, k, F]
        return torch.where(match, values[:, :, None], 0).sum(1)
    pre = torch.addmm(b_enc[fidx], _encoder_input(x, b_dec), W_enc[:, fidx])
    return _activate(pre, None if threshold is None else threshold[fidx], act)


def _edited(f: Tensor, kind: Tensor, s: Tensor) -> Tensor:
    """``f'`` for each edit kind (elementwise over ``[T, F]``)."""
    out = torch.where(kind == EDIT_SET, s, f)
    out = torch.where(kind == EDIT_ADD, f + s, out)
    out = torch.where(kind == EDIT_SCALE, f * s, out)
    out = torch.where(kind == EDIT_ABLATE, torch.zeros_like(f), out)
    return torch.where((kind == EDIT_ADD_IF_ACTIVE) & (f > 0), f + s, out)


def _steered_feature_acts(a: SteerArgs) -> Tensor:
    """:func:`sae_feature_acts_ref` of the edited features."""
    return sae_feature_acts_ref(a.x, a.W_enc, a.b_enc, a.b_dec, a.threshold, a.features, a.act, a.k)


def sae_steer_ref(a: SteerArgs) -> Tensor:
    """Reference error-preserving feature edit: ``[T, d] -> [T, d]`` in ``x``'s dtype.

    The encode runs in ``x``'s dtype (as torch would); the edit, ``W_dec[S]^T (f' - f)`` and the
    add run in fp32 (fp64 for fp64 input), rounded once to ``x``'s dtype.
    """
    x = a.x
    acc = _compute_dtype(x)
    r = a.rows.long()
    live = r != 0
    f = _steered_feature_acts(a).to(acc)
    df = _edited(f, a.kinds[r], a.strengths[r].to(acc)) - f
    df = torch.where(live[:, None], df, torch.zeros_like(df))
    delta = df @ a.W_dec[a.features.long()].to(acc)
    xf = x.to(acc)
    y = xf + delta
    # x + 0.0 turns -0.0 into +0.0; keep x's bits where nothing was added.
    y = torch.where((delta == 0) & (xf == 0), xf, y).to(x.dtype)
    return torch.where(live[:, None], y, x).contiguous()


def sae_steer_backward_ref(grad: Tensor, a: SteerArgs) -> tuple[Tensor, Tensor]:
    """Backward of ``sae_steer``: ``(dx [T, d], dstrengths [C, F])``.

    With ``g_j = grad . W_dec[S_j]``, a token on row ``c`` contributes ``g_j * df'_j/ds`` to
    ``dstrengths[c, j]`` (1 for set/add, ``f_j`` for scale, ``[f_j > 0]`` for add_if_active, 0
    otherwise) and ``dx = grad + sum_j g_j (df'_j/df_j - 1) [f_j > 0] W_enc[:, S_j]``. A latent's
    membership in the top k (TopK) and JumpReLU's threshold are treated as locally constant.
    """
    x, strengths = a.x, a.strengths
    acc = _compute_dtype(x)
    r = a.rows.long()
    live = (r != 0)[:, None]
    fidx = a.features.long()
    f = _steered_feature_acts(a).to(acc)
    active = f > 0
    kind = a.kinds[r]
    s = strengths[r].to(acc)
    g = grad.to(acc)
    gdot = g @ a.W_dec[fidx].to(acc).T  # [T, F]
    one = torch.ones_like(f)
    zero = torch.zeros_like(f)
    dfp_ds = torch.where((kind == EDIT_SET) | (kind == EDIT_ADD), one, zero)
    dfp_ds = torch.where(kind == EDIT_SCALE, f, dfp_ds)
    dfp_ds = torch.where(kind == EDIT_ADD_IF_ACTIVE, active.to(acc), dfp_ds)
    ds = torch.where(live, gdot * dfp_ds, zero)
    dstrengths = torch.zeros(strengths.shape, dtype=acc, device=strengths.device).index_add_(0, r, ds)
    dfp_df = torch.where((kind == EDIT_SET) | (kind == EDIT_ABLATE), zero, one)
    dfp_df = torch.where(kind == EDIT_SCALE, s, dfp_df)
    coef = torch.where(live & active, gdot * (dfp_df - 1), zero)
    dx = g + coef @ a.W_enc[:, fidx].to(acc).T
    return dx.to(x.dtype), dstrengths.to(strengths.dtype)


# ---------------------------------------------------------------------------------------------
# op declarations: one schema each, implementations chosen by the ``backend`` argument
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("pysteer::sae_encode", mutates_args=())
def _sae_encode_op(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    act: str,
    backend: str,
) -> Tensor:
    check_sae_encode_args(x, W_enc, b_enc, b_dec, threshold, act, backend)
    return get_impl("sae", "sae_encode", backend)(x, W_enc, b_enc, b_dec, threshold, act)


@_sae_encode_op.register_fake
def _sae_encode_fake(x, W_enc, b_enc, b_dec, threshold, act, backend):
    return x.new_empty((x.shape[0], W_enc.shape[1]))


def _sae_encode_setup(ctx, inputs, output):
    x, W_enc, *_ = inputs
    ctx.save_for_backward(W_enc, output)


def _sae_encode_backward(ctx, grad):
    W_enc, out = ctx.saved_tensors
    # relu(pre) * (pre > thr) has slope 1 exactly where the output is nonzero.
    dx = (grad * (out != 0)) @ W_enc.T
    return dx, None, None, None, None, None, None


_sae_encode_op.register_autograd(_sae_encode_backward, setup_context=_sae_encode_setup)


@torch.library.custom_op("pysteer::sae_encode_topk", mutates_args=())
def _sae_encode_topk_op(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, backend: str
) -> tuple[Tensor, Tensor]:
    check_sae_encode_topk_args(x, W_enc, b_enc, b_dec, k, backend)
    return get_impl("sae", "sae_encode_topk", backend)(x, W_enc, b_enc, b_dec, k)


@_sae_encode_topk_op.register_fake
def _sae_encode_topk_fake(x, W_enc, b_enc, b_dec, k, backend):
    T = x.shape[0]
    return x.new_empty((T, k)), x.new_empty((T, k), dtype=torch.int64)


def _sae_encode_topk_setup(ctx, inputs, output):
    x, W_enc, *_ = inputs
    values, indices = output
    ctx.save_for_backward(W_enc, values, indices)
    ctx.mark_non_differentiable(indices)


def _sae_encode_topk_backward(ctx, grad_values, grad_indices):
    W_enc, values, indices = ctx.saved_tensors
    g = grad_values * (values > 0)
    dense = torch.zeros((values.shape[0], W_enc.shape[1]), dtype=g.dtype, device=g.device)
    dx = dense.scatter_(1, indices, g) @ W_enc.T
    return dx, None, None, None, None, None


_sae_encode_topk_op.register_autograd(_sae_encode_topk_backward, setup_context=_sae_encode_topk_setup)


@torch.library.custom_op("pysteer::sae_decode_sparse", mutates_args=())
def _sae_decode_sparse_op(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None, backend: str
) -> Tensor:
    check_sae_decode_sparse_args(indices, values, W_dec, b_dec, backend)
    return get_impl("sae", "sae_decode_sparse", backend)(indices, values, W_dec, b_dec)


@_sae_decode_sparse_op.register_fake
def _sae_decode_sparse_fake(indices, values, W_dec, b_dec, backend):
    return values.new_empty((indices.shape[0], W_dec.shape[1]))


def _sae_decode_sparse_setup(ctx, inputs, output):
    indices, values, W_dec, *_ = inputs
    ctx.save_for_backward(indices, W_dec)


def _sae_decode_sparse_backward(ctx, grad):
    indices, W_dec = ctx.saved_tensors
    # dvalues[t, i] = grad[t] . W_dec[indices[t, i]]: a batched [k, d] x [d] product per token.
    rows = F.embedding(indices.long(), W_dec)  # [T, k, d]
    dvalues = torch.bmm(rows, grad.to(rows.dtype).unsqueeze(-1)).squeeze(-1)
    return None, dvalues, None, None, None


_sae_decode_sparse_op.register_autograd(_sae_decode_sparse_backward, setup_context=_sae_decode_sparse_setup)


@torch.library.custom_op("pysteer::sae_steer", mutates_args=())
def _sae_steer_op(
    x: Tensor,
    rows: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    features: Tensor,
    kinds: Tensor,
    strengths: Tensor,
    act: str,
    k: int,
    backend: str,
) -> Tensor:
    a = SteerArgs(x, rows, W_enc, b_enc, W_dec, b_dec, threshold, features, kinds, strengths, act, k)
    check_sae_steer_args(a, backend)
    return get_impl("sae", "sae_steer", backend)(a)


@_sae_steer_op.register_fake
def _sae_steer_fake(x, *args):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_STEER_TENSORS = len(SteerArgs._fields) - 2  # every field before act and k


def _sae_steer_setup(ctx, inputs, output):
    a = SteerArgs(*inputs[: len(SteerArgs._fields)])
    ctx.save_for_backward(*a[:_STEER_TENSORS])
    ctx.act = a.act
    ctx.k = a.k


def _sae_steer_backward(ctx, grad):
    dx, dstrengths = sae_steer_backward_ref(grad, SteerArgs(*ctx.saved_tensors, ctx.act, ctx.k))
    grads = [None] * (len(SteerArgs._fields) + 1)  # + backend
    grads[SteerArgs._fields.index("x")] = dx
    grads[SteerArgs._fields.index("strengths")] = dstrengths
    return tuple(grads)


_sae_steer_op.register_autograd(_sae_steer_backward, setup_context=_sae_steer_setup)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def sae_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None = None,
    threshold: Tensor | None = None,
    *,
    act: str = "relu",
    backend: str = "torch",
) -> Tensor:
    """Dense SAE encode for ReLU / JumpReLU SAEs.

    Args:
        x: ``[T, d]`` activations (fp32/fp16/bf16; any strides).
        W_enc: ``[d, m]`` encoder (any strides; ``SAE`` keeps it as a view of ``[m, d]`` storage).
        b_enc: ``[m]`` encoder bias.
        b_dec: ``[d]`` subtracted from ``x`` before encoding, or ``None`` for SAEs that do not.
        threshold: ``[m]`` JumpReLU thresholds (``act="jumprelu"`` only).
        act: ``"relu"`` or ``"jumprelu"`` (TopK: :func:`sae_encode_topk`).
        backend: ``"torch"`` runs the reference inline (visible to ``torch.compile``);
            ``"triton"`` / ``"cuda"`` call the registered op ``pysteer::sae_encode``.

    Returns:
        ``[T, m]`` feature activations in ``x``'s dtype. All tensors share ``x``'s dtype and device.
    """
    if backend == "torch":
        check_sae_encode_args(x, W_enc, b_enc, b_dec, threshold, act, backend)
        return sae_encode_ref(x, W_enc, b_enc, b_dec, threshold, act)
    _no_weight_grad("sae_encode", {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold})
    return torch.ops.pysteer.sae_encode(x, W_enc, b_enc, b_dec, threshold, act, backend)


def sae_encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None = None,
    *,
    k: int,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """TopK SAE encode: the k largest pre-activations per token, after ReLU.

    Args:
        x: ``[T, d]`` activations.
        W_enc: ``[d, m]``; b_enc: ``[m]``; b_dec: ``[d]`` or ``None`` (as in :func:`sae_encode`).
        k: latents kept per token, ``1 <= k <= m`` (``<= MAX_TOPK_K`` for triton / cuda).
        backend: ``"torch"`` | ``"triton"`` | ``"cuda"``.

    Returns:
        ``(values [T, k], indices [T, k] int64)``: values in ``x``'s dtype sorted descending.
        Between equal pre-activations the Triton and CUDA kernels pick the lower latent id first;
        ``torch.topk`` (the torch backend) leaves the choice unspecified.
    """
    if backend == "torch":
        check_sae_encode_topk_args(x, W_enc, b_enc, b_dec, k, backend)
        return sae_encode_topk_ref(x, W_enc, b_enc, b_dec, k)
    _no_weight_grad("sae_encode_topk", {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec})
    return torch.ops.pysteer.sae_encode_topk(x, W_enc, b_enc, b_dec, k, backend)


def sae_decode_sparse(
    indices: Tensor,
    values: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None = None,
    *,
    backend: str = "torch",
) -> Tensor:
    """Decode sparse codes by summing ``k`` decoder rows per token.

    Args:
        indices: ``[T, k]`` int32/int64 latent ids in ``[0, m)``.
        values: ``[T, k]`` activations (W_dec's dtype).
        W_dec: ``[m, d]`` decoder (any strides).
        b_dec: ``[d]`` added to the result, or ``None``.
        backend: ``"torch"`` | ``"triton"`` | ``"cuda"``.

    Returns:
        ``[T, d]`` in ``W_dec``'s dtype; reads ``T * k`` rows of ``W_dec``, never all of it.
    """
    if backend == "torch":
        check_sae_decode_sparse_args(indices, values, W_dec, b_dec, backend)
        return sae_decode_sparse_ref(indices, values, W_dec, b_dec)
    _no_weight_grad("sae_decode_sparse", {"W_dec": W_dec, "b_dec": b_dec})
    return torch.ops.pysteer.sae_decode_sparse(indices, values, W_dec, b_dec, backend)


def sae_steer(
    x: Tensor,
    rows: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    features: Tensor,
    kinds: Tensor,
    strengths: Tensor,
    *,
    act: str,
    k: int = 0,
    backend: str = "torch",
) -> Tensor:
    """Error-preserving SAE feature edit: ``y = x + W_dec[S]^T (f'_S - f_S)`` per token.

    Args:
        x: ``[T, d]`` site activations (fp32/fp16/bf16; any strides).
        rows: ``[T]`` int32 table row per token; 0 leaves the token bit-exactly unchanged.
        W_enc: ``[d, m]``; b_enc: ``[m]``; W_dec: ``[m, d]`` (any strides).
        b_dec: ``[d]`` subtracted from ``x`` before encoding, or ``None`` for SAEs that do not
            (it never enters the output: the reconstruction error is kept).
        threshold: ``[m]`` for ``act="jumprelu"``, else ``None``.
        features: ``[F]`` int32 distinct latent ids S.
        kinds: ``[C, F]`` int32 edit kinds (``EDIT_KINDS``).
        strengths: ``[C, F]`` float32 edit strengths.
        act: ``"relu"`` | ``"jumprelu"`` | ``"topk"``.
        k: latents per token for ``act="topk"``, else 0.
        backend: ``"torch"`` runs the reference inline (visible to ``torch.compile``);
            ``"triton"`` / ``"cuda"`` call the registered op ``pysteer::sae_steer``.

    Returns:
        ``[T, d]`` contiguous tensor of ``x``'s dtype. Differentiable in ``x`` and ``strengths``.
    """
    a = SteerArgs(x, rows, W_enc, b_enc, W_dec, b_dec, threshold, features, kinds, strengths, act, k)
    if backend == "torch":
        check_sae_steer_args(a)
        return sae_steer_ref(a)
    _no_weight_grad(
        "sae_steer", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    )
    return torch.ops.pysteer.sae_steer(*a, backend)
