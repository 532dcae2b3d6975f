"""The per-row low-rank edit op (ARCHITECTURE.md, "Decisions every part shares").

    y[t] = base[t] + (x[t] @ U[r[t]] + c[r[t]]) @ V[r[t]]

``x`` is ``[T, K]`` (what the edit reads), ``base`` is ``[T, N]`` (what it adds to), ``rows`` an
int32 table row per token, and the tables are ``U [C, K, R]``, ``c [C, R]``, ``V [C, R, N]`` with
rank ``R``. Two interventions lower to it:

- LoReFT, ``h <- h + R^T (W h + b - R h)``: ``x = base = h``, ``U = W^T - R^T``, ``c = b``,
  ``V = R`` (``K = N = d``).
- a weight delta on a projection, ``out = x W + s (x A) B``: ``base`` is the projection's output,
  ``U = A``, ``c = 0``, ``V = s B``.

Row 0 means "no edit" and is bit-exact: the output of such a token is ``base`` itself, whatever
row 0 of the tables holds (it is never read). Compute is fp32 for fp32/fp16/bf16 inputs (float64
stays float64, for gradcheck): the hidden ``h = x U + c`` is kept in fp32, ``base + h V`` is
formed in fp32 and rounded once to the output dtype, which is ``x``'s (``base`` has it too).

Backward, with ``g`` the output gradient and ``h`` recomputed: ``dbase = g``;
``dh = g V[r]^T`` (``[T, R]``), ``dx = dh U[r]^T``; per table row ``c``, over its tokens,
``dU[c] = sum x^T dh``, ``dc[c] = sum dh``, ``dV[c] = sum h^T g``. Tokens on row 0 get
``dx = 0`` and contribute nothing to the tables' gradients.

Tables are float32 (float64 on the torch backend, the oracle's precision); ``x`` and ``base`` are
fp32, fp16 or bf16 (and float64 on the torch backend) of one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import KERNEL_DTYPES
from ._registry import get_impl

__all__ = [
    "check_lowrank_args",
    "check_lowrank_backward_args",
    "kernel_grad_buffers",
    "lowrank_edit",
    "lowrank_edit_backward_ref",
    "lowrank_edit_ref",
]

_OP = "lowrank_edit"

# ---------------------------------------------------------------------------------------------
# validation: once per call, in the op bodies (or the inline torch path), for every backend
# ---------------------------------------------------------------------------------------------


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_lowrank_args(
    x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor, backend: str = "torch"
) -> None:
    """Raise ``ValueError`` naming the first problem with the op's arguments.

    Args:
        x: ``[T, K]``; fp32/fp16/bf16, or float64 with ``backend="torch"``.
        base: ``[T, N]`` of ``x``'s dtype.
        rows: ``[T]`` int32 table row per token, in ``[0, C)``. The range is checked only for CPU
            tensors outside ``torch.compile`` (elsewhere it would cost a device sync); the kernels
            treat an out-of-range row like row 0.
        U: ``[C, K, R]``, c: ``[C, R]``, V: ``[C, R, N]`` tables of one dtype: float32, or float64
            with ``backend="torch"``; ``C >= 1`` (row 0 is the identity) and ``R >= 1``.
        backend: the backend that will run; it decides the allowed dtypes.
    """
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be [T, K], got shape {tuple(x.shape)}")
    T, K = x.shape
    if base.dim() != 2 or base.shape[0] != T:
        raise ValueError(f"{_OP}: base must be [T, N] with T={T}, got shape {tuple(base.shape)}")
    N = base.shape[1]
    if rows.dim() != 1 or rows.shape[0] != T:
        raise ValueError(f"{_OP}: rows must be [T]=[{T}], got shape {tuple(rows.shape)}")
    if rows.dtype != torch.int32:
        raise ValueError(f"{_OP}: rows must be int32, got {rows.dtype}")
    if U.dim() != 3 or U.shape[1] != K:
        raise ValueError(f"{_OP}: U must be [C, K, R] with K={K}, got shape {tuple(U.shape)}")
    C, _, R = U.shape
    if C < 1:
        raise ValueError(f"{_OP}: the tables have no rows (row 0 is the identity and must exist)")
    if R < 1:
        raise ValueError(f"{_OP}: the rank R (U's last dim) must be at least 1")
    if tuple(c.shape) != (C, R):
        raise ValueError(f"{_OP}: c must be [C, R]=[{C}, {R}], got shape {tuple(c.shape)}")
    if tuple(V.shape) != (C, R, N):
        raise ValueError(f"{_OP}: V must be [C, R, N]=[{C}, {R}, {N}], got shape {tuple(V.shape)}")

    act_dtypes = KERNEL_DTYPES if backend != "torch" else (*KERNEL_DTYPES, torch.float64)
    tab_dtypes = (torch.float32,) if backend != "torch" else (torch.float32, torch.float64)
    if x.dtype not in act_dtypes:
        raise ValueError(f"{_OP} ({backend}): x must be one of {_names(act_dtypes)}, got {x.dtype}")
    if base.dtype != x.dtype:
        raise ValueError(f"{_OP}: base is {base.dtype}, x is {x.dtype} (they must match)")
    for name, tab in (("U", U), ("c", c), ("V", V)):
        if tab.dtype not in tab_dtypes:
            raise ValueError(
                f"{_OP} ({backend}): {name} must be one of {_names(tab_dtypes)}, got {tab.dtype}"
            )
        if tab.dtype != U.dtype:
            raise ValueError(f"{_OP}: {name} is {tab.dtype}, U is {U.dtype} (the tables share one dtype)")
    for name, t in (("base", base), ("rows", rows), ("U", U), ("c", c), ("V", V)):
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, x on {x.device}")

    if T > 0 and rows.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"{_OP}: rows must be in [0, C={C}), got values in [{lo}, {hi}]")


def check_lowrank_backward_args(
    grad: Tensor, x: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor, backend: str = "torch"
) -> None:
    """:func:`check_lowrank_args` with ``grad`` (``[T, N]``, ``x``'s dtype) in the place of ``base``."""
    if grad.dim() != 2 or grad.shape[0] != x.shape[0] or (V.dim() == 3 and grad.shape[1] != V.shape[2]):
        raise ValueError(
            f"{_OP}_backward: grad must be [T, N] (x has T={x.shape[0]}, V has N={V.shape[-1]}), "
            f"got shape {tuple(grad.shape)}"
        )
    if grad.dtype != x.dtype:
        raise ValueError(f"{_OP}_backward: grad is {grad.dtype}, x is {x.dtype}")
    check_lowrank_args(x, grad, rows, U, c, V, backend)


# ---------------------------------------------------------------------------------------------
# torch reference: product code (CPU path, compile-visible math) and the test oracle
# ---------------------------------------------------------------------------------------------
#
# The per-row GEMMs run as dense GEMMs over the concatenated edit rows 1..C-1: x @ [U_1 .. U_{C-1}]
# gives every row's hidden, the token's own is gathered, and a hidden placed in its row's block of
# a zero [T, (C-1)*R] matrix times the stacked V rows gives the edit. No data-dependent shapes or
# host syncs (torch.compile traces it whole), and no [T, K, R] gather of per-token tables; the cost
# is C-1 times the per-row FLOPs, negligible for the few edit rows of a batch. Row 0 is never read.


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; float64 stays float64 (so gradcheck sees float64 math)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _edit_rows(rows: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """``(live [T] bool, index [T] long)``: a token's edit row among rows 1..C-1 (index 0 for row 0)."""
    r = rows.long()
    live = r > 0
    return live, (r - 1).clamp(min=0)


def _hidden(x: Tensor, U: Tensor, c: Tensor, live: Tensor, idx: Tensor, ct: torch.dtype) -> Tensor:
    """``x[t] @ U[r[t]] + c[r[t]]`` in ``ct`` (``[T, R]``), 0 for tokens on row 0."""
    T, K = x.shape
    C1, R = U.shape[0] - 1, U.shape[2]
    Ucat = U[1:].to(ct).permute(1, 0, 2).reshape(K, C1 * R)
    h_all = (x.to(ct) @ Ucat).view(T, C1, R)
    h = h_all.gather(1, idx[:, None, None].expand(T, 1, R)).squeeze(1) + c[1:].to(ct)[idx]
    return torch.where(live[:, None], h, 0.0)


def _blocks(h: Tensor, live: Tensor, idx: Tensor, C1: int) -> Tensor:
    """``h [T, R]`` placed in its token's row block of a zero ``[T, C1*R]`` (row-0 tokens: all zero)."""
    T, R = h.shape
    own = (idx[:, None] == torch.arange(C1, device=h.device)[None, :]) & live[:, None]
    return torch.where(own[:, :, None], h[:, None, :], 0.0).reshape(T, C1 * R)


def lowrank_edit_ref(x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor) -> Tensor:
    """Reference forward (see the module docstring). Any strides; returns a contiguous tensor of ``x``'s dtype."""
    C, _, R = U.shape
    N = V.shape[2]
    if C == 1:
        return base.clone(memory_format=torch.contiguous_format)
    ct = _compute_dtype(x)
    live, idx = _edit_rows(rows, C)
    h = _hidden(x, U, c, live, idx, ct)
    delta = _blocks(h, live, idx, C - 1) @ V[1:].to(ct).reshape((C - 1) * R, N)
    y = (base.to(ct) + delta).to(x.dtype)
    return torch.where(live[:, None], y, base).contiguous()


def lowrank_edit_backward_ref(
    grad: Tensor, x: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference backward: ``(dx, dbase, dU, dc, dV)`` with the shapes and dtypes of ``x``, ``grad``
    (``base``'s), ``U``, ``c`` and ``V``. Row 0 of the table gradients is zero; ``dx`` is 0 on row-0 tokens.
    """
    T, K = x.shape
    C, _, R = U.shape
    N = V.shape[2]
    ct = _compute_dtype(x)
    dbase = grad.clone(memory_format=torch.contiguous_format)
    dU = torch.zeros(U.shape, dtype=ct, device=U.device)
    dc = torch.zeros(c.shape, dtype=ct, device=c.device)
    dV = torch.zeros(V.shape, dtype=ct, device=V.device)
    if C == 1:
        return (
            torch.zeros_like(x, memory_format=torch.contiguous_format),
            dbase,
            dU.to(U.dtype),
            dc.to(c.dtype),
            dV.to(V.dtype),
        )
    C1 = C - 1
    live, idx = _edit_rows(rows, C)
    g = torch.where(live[:, None], grad.to(ct), 0.0)
    xc = torch.where(live[:, None], x.to(ct), 0.0)
    h = _hidden(xc, U, c, live, idx, ct)
    Vcat = V[1:].to(ct).reshape(C1 * R, N)
    dh_all = (g @ Vcat.t()).view(T, C1, R)
    dh = torch.where(live[:, None], dh_all.gather(1, idx[:, None, None].expand(T, 1, R)).squeeze(1), 0.0)
    dh_blocks = _blocks(dh, live, idx, C1)
    Ucat = U[1:].to(ct).permute(1, 0, 2).reshape(K, C1 * R)
    dx = (dh_blocks @ Ucat.t()).to(x.dtype)
    dU[1:] = (xc.t() @ dh_blocks).view(K, C1, R).permute(1, 0, 2)
    dc.index_add_(0, rows.long(), dh)
    dV[1:] = (_blocks(h, live, idx, C1).t() @ g).view(C1, R, N)
    return dx, dbase, dU.to(U.dtype), dc.to(c.dtype), dV.to(V.dtype)


def kernel_grad_buffers(grad: Tensor, x: Tensor, U: Tensor, c: Tensor, V: Tensor) -> tuple[Tensor, ...]:
    """What a kernel backward fills and returns: ``(dx, dbase, dU, dc, dV)``.

    ``dx`` is uninitialised (the kernels write every entry), ``dbase`` is ``grad`` itself copied
    (``y = base + ...``), and the fp32 table gradients are zeroed for the kernels' atomics (the
    kernels take fp32 tables only, so no cast follows).
    """
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        grad.clone(memory_format=torch.contiguous_format),
        torch.zeros(U.shape, dtype=torch.float32, device=U.device),
        torch.zeros(c.shape, dtype=torch.float32, device=c.device),
        torch.zeros(V.shape, dtype=torch.float32, device=V.device),
    )


# ---------------------------------------------------------------------------------------------
# op declarations: one schema, implementations chosen by the ``backend`` argument
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("pysteer::lowrank_edit", mutates_args=())
def _lowrank_edit_op(
    x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor, backend: str
) -> Tensor:
    check_lowrank_args(x, base, rows, U, c, V, backend)
    return get_impl("lowrank", "lowrank_edit", backend)(x, base, rows, U, c, V)


@_lowrank_edit_op.register_fake
def _lowrank_edit_fake(x, base, rows, U, c, V, backend):
    return torch.empty(base.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("pysteer::lowrank_edit_backward", mutates_args=())
def _lowrank_edit_backward_op(
    grad: Tensor, x: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_lowrank_backward_args(grad, x, rows, U, c, V, backend)
    return get_impl("lowrank", "lowrank_edit_backward", backend)(grad, x, rows, U, c, V)


@_lowrank_edit_backward_op.register_fake
def _lowrank_edit_backward_fake(grad, x, rows, U, c, V, backend):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(grad.shape, dtype=grad.dtype, device=grad.device),
        torch.empty(U.shape, dtype=U.dtype, device=U.device),
        torch.empty(c.shape, dtype=c.dtype, device=c.device),
        torch.empty(V.shape, dtype=V.dtype, device=V.device),
    )


def _setup_context(ctx, inputs, output):
    x, _base, rows, U, c, V, backend = inputs
    ctx.save_for_backward(x, rows, U, c, V)  # base is not needed: dbase = grad
    ctx.backend = backend


def _backward(ctx, grad):
    x, rows, U, c, V = ctx.saved_tensors
    dx, dbase, dU, dc, dV = torch.ops.pysteer.lowrank_edit_backward(
        grad.contiguous(), x, rows, U, c, V, ctx.backend
    )
    return dx, dbase, None, dU, dc, dV, None


_lowrank_edit_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_edit(
    x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor, backend: str = "torch"
) -> Tensor:
    """Apply the per-row low-rank edit ``y = base + (x U[r] + c[r]) V[r]``.

    Args:
        x: ``[T, K]`` what the edit reads (fp32/fp16/bf16; any strides).
        base: ``[T, N]`` what it adds to, ``x``'s dtype (``x`` itself for LoReFT, the projection's
            output for a weight delta).
        rows: ``[T]`` int32 table row per token; 0 returns ``base`` bit-exactly.
        U: ``[C, K, R]`` float32 down-projections.
        c: ``[C, R]`` float32 hidden biases.
        V: ``[C, R, N]`` float32 up-projections.
        backend: ``"torch"`` runs the reference math inline, visible to ``torch.compile``;
            ``"triton"`` / ``"cuda"`` call the registered op ``pysteer::lowrank_edit``.

    Returns:
        ``[T, N]`` tensor of ``x``'s dtype (fp32 compute, one rounding).

    Raises:
        ValueError: bad shapes, dtypes, devices or (CPU) rows out of range.
    """
    if backend == "torch":
        check_lowrank_args(x, base, rows, U, c, V)
        return lowrank_edit_ref(x, base, rows, U, c, V)
    return torch.ops.pysteer.lowrank_edit(x, base, rows, U, c, V, backend)
