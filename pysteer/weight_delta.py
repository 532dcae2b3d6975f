"""Low-rank weight deltas on named linears: ``y = x W + s (x U) V`` as an intervention kind.

A ``WeightDelta`` edits one linear of one decoder layer (``LINEARS``: the MLP's gate, up and down
projections and the attention output projection, named in the Llama nomenclature and found per
architecture in its ``ArchSpec``). It acts at the linear's output site (``layers.{i}.{linear}.out``),
which hands the linear's input to the interventions there, and lowers to the low-rank op
``pysteer::lowrank_edit`` with ``x`` the linear's input, ``base`` its output, ``U``, ``c = 0`` and
``V = s V``: one table row per config, so different requests of a batch carry different edit sets.

Static deltas fold: ``steer(model, deltas)`` with one config and every position adds ``s U V`` to the
weight (``pysteer/folding.py``), and ``remove()`` restores the original bits. Deltas on one linear
accumulate as sequential editors do (``accumulate``: ``dW <- decay dW + lr dW_new``, kept as
concatenated factors, exact) and compress to a chosen rank (``WeightDelta.compress``: the truncated
SVD of ``s U V`` from the QR factors of ``U`` and ``V^T``, never forming the dense matrix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .interventions import _as_tensor, finite_number, intervention_kind
from .models.sites import LINEARS, ResolvedSite, Site

_MODULE_SITE = re.compile(r"^(?:layers\.)?(\d+)\.(" + "|".join(re.escape(k) for k in LINEARS) + r")$")


def parse_module_site(module_site: str) -> tuple[int, str]:
    """``(layer, linear)`` of ``"layers.{i}.{linear}"``, ``linear`` one of ``LINEARS``; raises ``ValueError``."""
    m = _MODULE_SITE.match(str(module_site).strip())
    if m is None:
        raise ValueError(
            f"WeightDelta: unknown module site {module_site!r}; expected 'layers.<i>.<linear>' with linear one of "
            f"{', '.join(LINEARS)}"
        )
    return int(m.group(1)), m.group(2)


@intervention_kind
@dataclass(eq=False)
class WeightDelta:
    """``y = x W + scale * (x U) V`` on one named linear (see the module docstring).

    Args:
        module_site: ``"layers.{i}.{linear}"``, e.g. ``"layers.27.mlp.down_proj"``.
        U: ``[in_features, r]``.
        V: ``[r, out_features]``.
        scale: ``s``, a finite number.
    """

    module_site: str
    U: Tensor
    V: Tensor
    scale: float = 1.0
    trainable: ClassVar[tuple[str, ...]] = ("U", "V")

    def __post_init__(self) -> None:
        parse_module_site(self.module_site)
        finite_number(self.scale, f"{self._what()}.scale")
        U = _as_tensor(self.U, f"{self._what()}.U")
        V = _as_tensor(self.V, f"{self._what()}.V")
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0] or U.shape[1] < 1:
            raise ValueError(
                f"{self._what()}: U must be [in, r] and V [r, out] with one rank r >= 1, got U {tuple(U.shape)}, "
                f"V {tuple(V.shape)}"
            )

    def _what(self) -> str:
        return f"WeightDelta({self.module_site!r})"

    @property
    def site(self) -> Site:
        layer, linear = parse_module_site(self.module_site)
        return Site(layer, f"{linear}.out")

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of the linear it edits."""
        return int(self.U.shape[0]), int(self.V.shape[1])

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(U, s V)`` as the op and the fold use them."""
        U = _as_tensor(self.U, f"{self._what()}.U")
        V = _as_tensor(self.V, f"{self._what()}.V")
        return U, V * finite_number(self.scale, f"{self._what()}.scale")

    def dense(self) -> Tensor:
        """``s U V``, ``[in, out]``: what the delta adds to ``x W`` per unit of ``x``."""
        U, V = self.factors()
        return U @ V

    @classmethod
    def from_dense(cls, module_site: str, delta: Tensor, rank: int | None = None) -> WeightDelta:
        """The delta ``[in, out]`` as factors, truncated to ``rank`` singular values (all when None)."""
        d = _as_tensor(delta, f"WeightDelta({module_site!r}).from_dense")
        if d.dim() != 2:
            raise ValueError(f"WeightDelta.from_dense: delta must be [in, out], got {tuple(d.shape)}")
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = _check_rank(rank, s.shape[0], "WeightDelta.from_dense")
        return cls(module_site, u[:, :k] * s[:k], vh[:k], 1.0)

    def compress(self, rank: int) -> WeightDelta:
        """The best rank-``rank`` approximation of ``s U V`` (truncated SVD, via the QR factors of ``U``
        and ``V^T``: the cost grows with the rank, not with the weight's size)."""
        U, V = self.factors()
        k = _check_rank(rank, min(U.shape[1], *self.shape), f"{self._what()}.compress")
        qu, ru = torch.linalg.qr(U)
        qv, rv = torch.linalg.qr(V.transpose(0, 1))
        u, s, vh = torch.linalg.svd(ru @ rv.transpose(0, 1))
        return WeightDelta(self.module_site, (qu @ u[:, :k]) * s[:k], vh[:k] @ qv.transpose(0, 1), 1.0)

    def applier_key(self) -> tuple:
        return ("WeightDelta",)

    def make_applier(
        self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[WeightDelta]
    ):
        from .models.sites import SITE_TABLE
        from .models.specs import geometry

        H, D = SITE_TABLE[f"{parse_module_site(self.module_site)[1]}.in"].shape(geometry(model))
        shape = (H * D, resolved.width)
        for iv in group:
            if iv.shape != shape:
                raise ValueError(
                    f"{iv._what()}: U must be [{shape[0]}, r] and V [r, {shape[1]}] for this linear "
                    f"(in {shape[0]}, out {shape[1]}), got U {tuple(iv.U.shape)}, V {tuple(iv.V.shape)}"
                )
        dtype = (
            torch.float64
            if any(_as_tensor(iv.U, "U").dtype == torch.float64 for iv in group)
            else torch.float32
        )
        return _WeightDeltaApplier(shape, sum(iv.rank for iv in group), num_rows, device, dtype)

    def fold_delta(self) -> tuple[Site, Tensor, Tensor]:
        """``(site, U, s V)``: what ``pysteer/folding.py`` adds to the linear's weight."""
        return (self.site, *self.factors())


def _check_rank(rank: int | None, limit: int, what: str) -> int:
    if rank is None:
        return limit
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"{what}: rank must be an int in [1, {limit}], got {rank!r}")
    return rank


class _WeightDeltaApplier:
    """One table row per config; a config's deltas on this linear sit side by side along the rank
    (zero columns elsewhere), and configs without one map their tokens to row 0 (bit-exact)."""

    def __init__(self, shape: tuple[int, int], rank: int, num_rows: int, device, dtype):
        K, N = shape
        self.U = torch.zeros(num_rows, K, rank, dtype=dtype, device=device)
        self.c = torch.zeros(num_rows, rank, dtype=dtype, device=device)
        self.V = torch.zeros(num_rows, rank, N, dtype=dtype, device=device)
        self.live = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.filled = [0] * num_rows  # rank columns already written per row

    def write_row(self, row: int, iv: WeightDelta) -> None:
        U, V = iv.factors()
        lo, hi = self.filled[row], self.filled[row] + iv.rank
        self.U[row, :, lo:hi] = U.to(self.U)
        self.V[row, lo:hi] = V.to(self.V)
        self.filled[row] = hi
        self.live[row] = True

    def apply(self, y: Tensor, ctx) -> Tensor:
        from .ops.lowrank import lowrank_edit

        if ctx.site_input is None:
            raise RuntimeError(
                "WeightDelta: the site did not hand over the linear's input (not a linear's out site)"
            )
        T = y.shape[0]
        base = y.reshape(T, -1)
        rows = torch.where(self.live[ctx.rows.long()], ctx.rows, 0).to(torch.int32)
        return lowrank_edit(ctx.site_input, base, rows, self.U, self.c, self.V, backend=ctx.backend).reshape(
            y.shape
        )


def accumulate(old: WeightDelta | None, new: WeightDelta, decay: float = 1.0, lr: float = 1.0) -> WeightDelta:
    """``decay * old + lr * new`` on one linear, exactly, as concatenated factors (rank adds up;
    ``compress`` brings it back down). ``old=None`` is the first edit."""
    decay = finite_number(decay, "accumulate: decay")
    lr = finite_number(lr, "accumulate: lr")
    if old is None:
        U, V = new.factors()
        return WeightDelta(new.module_site, U, V * lr, 1.0)
    if parse_module_site(old.module_site) != parse_module_site(new.module_site) or old.shape != new.shape:
        raise ValueError(
            f"accumulate: deltas on different linears ({old.module_site} {old.shape}, {new.module_site} {new.shape})"
        )
    (u1, v1), (u2, v2) = old.factors(), new.factors()
    return WeightDelta(
        old.module_site, torch.cat([u1, u2], dim=1), torch.cat([v1 * decay, v2 * lr], dim=0), 1.0
    )
