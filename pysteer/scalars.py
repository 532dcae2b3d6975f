"""Activation-scaling interventions (Stoehr et al.): position-specific scalars and vectors, and the
activation-dependent DynScalar, as intervention kinds that ``pysteer.steer`` / ``pysteer.generate``
run, ``pysteer.save`` writes and ``steer(..., trainable=True)`` trains.

- ``ActivScalar(site, alpha [P] | [P, H], beta)``: the token at prompt offset ``k - P`` (``-1`` is the
  last prompt token) is multiplied by ``1 + beta * alpha[k]`` (per head with ``[P, H]``);
- ``SteerVec(site, vector [P, W], beta)``: the same tokens get ``beta * vector[k]`` added;
- ``DynScalar(site, weight [W], bias, beta)``: every token is multiplied by
  ``1 + beta * (weight . x / |x| + bias)``, a function of the activation itself, so it applies at
  every position and transfers to prompts of other lengths.

All three lower to ``pysteer::affine_steer`` with a table row per (config, window position), or per
token for DynScalar, so training runs through the op's backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .interventions import _as_tensor, finite_number, intervention_kind
from .models.sites import ResolvedSite, Site, parse_site
from .ops.affine import affine_steer
from .positions import TokenContext


def _beta(beta, what: str) -> int:
    if isinstance(beta, bool) or beta not in (1, -1):
        raise ValueError(f"{what}: beta must be +1 or -1, got {beta!r}")
    return int(beta)


def _table_dtype(values) -> torch.dtype:
    """float64 tables when a parameter is float64 (gradient checks), float32 otherwise."""
    return (
        torch.float64
        if any(isinstance(v, Tensor) and v.dtype == torch.float64 for v in values)
        else torch.float32
    )


def _site_heads(resolved: ResolvedSite) -> tuple[int, int]:
    return resolved.n_heads, resolved.width // resolved.n_heads


# ------------------------------------------------------------------------------------------------
# position-specific: ActivScalar and SteerVec
# ------------------------------------------------------------------------------------------------


class _WindowApplier:
    """Rows ``1 + (r - 1) * P + k`` of ``M, A`` hold config row ``r`` at window position ``k``."""

    def __init__(
        self, P: int, num_rows: int, m_shape: tuple[int, int], a_shape: tuple[int, int], device, dtype
    ):
        self.P = P
        R = 1 + (num_rows - 1) * P
        self.M = torch.ones(R, *m_shape, dtype=dtype, device=device)
        self.A = torch.zeros(R, *a_shape, dtype=dtype, device=device)

    def _rows(self, row: int) -> slice:
        return slice(1 + (row - 1) * self.P, 1 + row * self.P)

    def apply(self, y: Tensor, ctx: TokenContext) -> Tensor:
        k = ctx.offsets_from_prompt_end() + self.P
        rows = ctx.rows.to(k.dtype)
        inside = (rows > 0) & (k >= 0) & (k < self.P)
        idx = torch.where(inside, (rows - 1) * self.P + k + 1, 0).to(torch.int32)
        return affine_steer(y, idx, self.M, self.A, ctx.backend)


class _ScalarApplier(_WindowApplier):
    def write_row(self, row: int, iv: ActivScalar) -> None:
        a = _as_tensor(iv.alpha, f"{iv!r:.60}.alpha")
        a = a.reshape(self.P, -1, 1).to(self.M.device)  # [P, H|1, 1]
        self.M[self._rows(row)] = (1 + iv.beta * a).expand(self.P, self.M.shape[1], 1)


class _VectorApplier(_WindowApplier):
    def write_row(self, row: int, iv: SteerVec) -> None:
        v = _as_tensor(iv.vector, f"SteerVec({iv.site_name!r}).vector").to(self.A.device)
        self.A[self._rows(row)] = (iv.beta * v).reshape(self.P, *self.A.shape[1:])


@intervention_kind
@dataclass(eq=False)
class ActivScalar:
    """Scale the last ``P`` prompt tokens at a site by ``1 + beta * alpha[k]`` (ActivScalar).

    Args:
        site_name: e.g. ``"layers.3.attn.out"``; at ``attn.heads`` ``alpha`` may be per head.
        alpha: ``[P]`` or ``[P, H]``; window position ``k`` is prompt offset ``k - P``.
        beta: ``+1`` or ``-1``, the direction (``1 - alpha`` for ``-1``).
    """

    site_name: str
    alpha: Tensor
    beta: int = 1
    trainable: ClassVar[tuple[str, ...]] = ("alpha",)

    def __post_init__(self) -> None:
        self.beta = _beta(self.beta, f"ActivScalar({self.site_name!r})")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    @property
    def window(self) -> int:
        return int(self.alpha.shape[0]) if isinstance(self.alpha, Tensor) and self.alpha.dim() else 0

    def applier_key(self) -> tuple:
        a = self.alpha
        return ("ActivScalar", self.window, tuple(a.shape[1:]) if isinstance(a, Tensor) else ())

    def make_applier(
        self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[ActivScalar]
    ):
        H, _ = _site_heads(resolved)
        for iv in group:
            a = _as_tensor(iv.alpha, f"ActivScalar({iv.site_name!r}).alpha")
            if a.dim() not in (1, 2) or a.shape[0] < 1 or (a.dim() == 2 and a.shape[1] != H):
                raise ValueError(
                    f"ActivScalar({iv.site_name!r}): alpha must be [P] or [P, {H}] (heads of the site), got {tuple(a.shape)}"
                )
        dtype = _table_dtype(iv.alpha for iv in group)
        return _ScalarApplier(self.window, num_rows, (H, 1), (H, 1), device, dtype)


@intervention_kind
@dataclass(eq=False)
class SteerVec:
    """Add ``beta * vector[k]`` to the last ``P`` prompt tokens at a site (the SteerVec baseline).

    Args:
        site_name: e.g. ``"layers.3.mlp.out"``.
        vector: ``[P, W]`` with ``W`` the site's width (at ``attn.heads`` also ``[P, head_dim]``: one
            vector for every head).
        beta: ``+1`` or ``-1``.
    """

    site_name: str
    vector: Tensor
    beta: int = 1
    trainable: ClassVar[tuple[str, ...]] = ("vector",)

    def __post_init__(self) -> None:
        self.beta = _beta(self.beta, f"SteerVec({self.site_name!r})")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def applier_key(self) -> tuple:
        v = self.vector
        return ("SteerVec", tuple(v.shape) if isinstance(v, Tensor) else ())

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[SteerVec]):
        H, D = _site_heads(resolved)
        v = _as_tensor(self.vector, f"SteerVec({self.site_name!r}).vector")
        if v.dim() != 2 or v.shape[1] not in (H * D, D):
            raise ValueError(
                f"SteerVec({self.site_name!r}): vector must be [P, {H * D}]"
                + (f" or [P, {D}]" if H > 1 else "")
                + f", got {tuple(v.shape)}"
            )
        per_head = v.shape[1] == H * D
        dtype = _table_dtype(iv.vector for iv in group)
        return _VectorApplier(v.shape[0], num_rows, (1, 1), (H, D) if per_head else (1, D), device, dtype)


# ------------------------------------------------------------------------------------------------
# activation-dependent: DynScalar
# ------------------------------------------------------------------------------------------------


class _DynApplier:
    def __init__(self, width: int, num_rows: int, device, dtype):
        self.weight = torch.zeros(num_rows, width, dtype=dtype, device=device)
        self.bias = torch.zeros(num_rows, dtype=dtype, device=device)
        self.sign = torch.zeros(num_rows, dtype=dtype, device=device)

    def write_row(self, row: int, iv: DynScalar) -> None:
        what = f"DynScalar({iv.site_name!r})"
        self.weight[row] = _as_tensor(iv.weight, what + ".weight").to(self.weight.device)
        self.bias[row] = _as_tensor(iv.bias, what + ".bias").reshape(()).to(self.bias.device)
        self.sign[row] = float(iv.beta)

    def apply(self, y: Tensor, ctx: TokenContext) -> Tensor:
        T, H = y.shape[0], y.shape[1]
        flat = y.reshape(T, -1)
        flat = flat.to(torch.promote_types(flat.dtype, self.weight.dtype))
        unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        r = ctx.rows.long()
        alpha = (unit @ self.weight.t()).gather(1, r[:, None])[:, 0] + self.bias[r]  # [T]
        scale = 1 + self.sign[r] * alpha
        M = (
            torch.cat([torch.ones(1, dtype=scale.dtype, device=y.device), scale])
            .reshape(-1, 1, 1)
            .expand(-1, H, 1)
        )
        A = torch.zeros(1, 1, 1, device=y.device).expand(M.shape[0], H, 1)
        idx = torch.where(r > 0, torch.arange(1, T + 1, device=y.device), 0).to(torch.int32)
        return affine_steer(y, idx, M, A, ctx.backend)


@intervention_kind
@dataclass(eq=False)
class DynScalar:
    """Multiply every token at a site by ``1 + beta * (weight . x / |x| + bias)`` (DynScalar).

    Args:
        site_name: e.g. ``"layers.3.attn.out"`` (at ``attn.heads`` ``x`` is all heads, ``[H * D]``).
        weight: ``[W]``, the site's width.
        bias: a number or a one-element tensor.
        beta: ``+1`` or ``-1``.
    """

    site_name: str
    weight: Tensor
    bias: float | Tensor = 0.0
    beta: int = 1
    trainable: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __post_init__(self) -> None:
        self.beta = _beta(self.beta, f"DynScalar({self.site_name!r})")
        if not isinstance(self.bias, Tensor):
            finite_number(self.bias, f"DynScalar({self.site_name!r}).bias")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def applier_key(self) -> str:
        return "DynScalar"

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[DynScalar]):
        for iv in group:
            w = _as_tensor(iv.weight, f"DynScalar({iv.site_name!r}).weight")
            if w.dim() != 1 or w.shape[0] != resolved.width:
                raise ValueError(
                    f"DynScalar({iv.site_name!r}): weight must be [{resolved.width}], got {tuple(w.shape)}"
                )
            if _as_tensor(iv.bias, f"DynScalar({iv.site_name!r}).bias").numel() != 1:
                raise ValueError(f"DynScalar({iv.site_name!r}): bias must be one number")
        return _DynApplier(resolved.width, num_rows, device, _table_dtype(iv.weight for iv in group))
