"""LoReFT (Wu et al., "ReFT: Representation Finetuning for Language Models"; pyreft) as an
intervention kind: ``h <- h + R^T (W h + b - R h)`` at chosen tokens of a site, with ``R`` a rank-r
projection with orthonormal rows.

It lowers to the low-rank op ``pysteer::lowrank_edit`` (``y = base + (x U + c) V`` with
``x = base = h``, ``U = W^T - R^T``, ``c = b``, ``V = R``), one table row per config, so different
requests of a batch carry different edits and a trainable handle (``steer(..., trainable=True)``)
trains ``rotation``, ``weight`` and ``bias`` through the op's backward. ``R`` is the orthonormal
basis of ``rotation``'s row space (QR, signs fixed), so it stays orthonormal whatever an optimizer
does to ``rotation``, and equals ``rotation`` when that already has orthonormal rows.

Positions follow pyreft: ``"f{k}"`` the first k prompt tokens, ``"l{k}"`` the last k, ``"f{k}+l{m}"``
both, or explicit positions (from the first real token; negative ones back from the prompt's
end). Only prompt tokens are edited unless ``every_step=True`` (then every generated token too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .interventions import _as_tensor, intervention_kind
from .models.sites import ResolvedSite, Site, parse_site
from .positions import _NO_POSITION, TokenContext

_PYREFT = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


def parse_reft_positions(positions: str | Sequence[int]) -> tuple[int, int, list[int]]:
    """``(first k, last k, explicit positions)`` of a pyreft position string or a list of ints."""
    if isinstance(positions, str):
        m = _PYREFT.match(positions)
        if not positions or m is None or (m.group(1) is None and m.group(2) is None):
            raise ValueError(
                f"LoReFT: positions {positions!r}: use 'f<k>', 'l<k>', 'f<k>+l<m>' or a list of ints"
            )
        return int(m.group(1) or 0), int(m.group(2) or 0), []
    out = list(positions)
    if not out or not all(isinstance(p, int) and not isinstance(p, bool) for p in out):
        raise ValueError(
            f"LoReFT: positions must be a pyreft string or a non-empty list of ints, got {positions!r}"
        )
    return 0, 0, out


def orthonormal_rows(m: Tensor) -> Tensor:
    """The orthonormal basis of ``m``'s row space, ``[r, d]`` (QR with the signs fixed, so an
    ``m`` with orthonormal rows maps to itself up to rounding). Differentiable."""
    q, r = torch.linalg.qr(m.transpose(0, 1))
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).transpose(0, 1)


class _LoReFTApplier:
    def __init__(self, d: int, rank: int, slots: int, num_rows: int, device, dtype):
        self.U = torch.zeros(num_rows, d, rank, dtype=dtype, device=device)
        self.c = torch.zeros(num_rows, rank, dtype=dtype, device=device)
        self.V = torch.zeros(num_rows, rank, d, dtype=dtype, device=device)
        self.first = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.last = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.explicit = torch.full((num_rows, max(slots, 1)), _NO_POSITION, dtype=torch.long, device=device)
        self.every_step = torch.zeros(num_rows, dtype=torch.bool, device=device)

    def write_row(self, row: int, iv: LoReFT) -> None:
        R, W, b = iv.tables()
        self.U[row] = (W - R).transpose(0, 1).to(self.U)
        self.c[row] = b.to(self.c)
        self.V[row] = R.to(self.V)
        first, last, explicit = parse_reft_positions(iv.positions)
        self.first[row], self.last[row] = first, last
        self.explicit[row].fill_(_NO_POSITION)
        if explicit:
            self.explicit[row, : len(explicit)] = torch.tensor(explicit, device=self.explicit.device)
        self.every_step[row] = bool(iv.every_step)

    def selected(self, ctx: TokenContext) -> Tensor:
        """``[T]`` bool: tokens whose row's positions include them."""
        r = ctx.rows.long()
        pos = ctx.pos.reshape(-1)
        pl = ctx.token_prompt_len()
        in_prompt = pos < pl
        ends = (pos < self.first[r]) | (pos >= pl - self.last[r])
        explicit = ctx.at_positions(self.explicit[r]).any(-1)
        return (r > 0) & ((in_prompt & (ends | explicit)) | (~in_prompt & self.every_step[r]))

    def apply(self, y: Tensor, ctx: TokenContext) -> Tensor:
        from .ops.lowrank import lowrank_edit

        T = y.shape[0]
        x = y.reshape(T, -1)
        rows = torch.where(self.selected(ctx), ctx.rows, 0).to(torch.int32)
        return lowrank_edit(x, x, rows, self.U, self.c, self.V, backend=ctx.backend).reshape(y.shape)


@intervention_kind
@dataclass(eq=False)
class LoReFT:
    """A LoReFT edit at a site (see the module docstring).

    Args:
        site_name: e.g. ``"layers.6.resid"`` (pyreft's ``block_output``); any site, all heads at
            head-major ones.
        rotation: ``[r, d]``; its rows' orthonormal basis is ``R``.
        weight: ``[r, d]``, the learned source projection ``W``.
        bias: ``[r]``.
        positions: ``"l1"`` (default: the last prompt token), ``"f1+l1"``, ... or explicit positions.
        every_step: also edit every generated token.
    """

    site_name: str
    rotation: Tensor
    weight: Tensor
    bias: Tensor
    positions: str | Sequence[int] = "l1"
    every_step: bool = False
    trainable: ClassVar[tuple[str, ...]] = ("rotation", "weight", "bias")

    def __post_init__(self) -> None:
        parse_reft_positions(self.positions)
        if not isinstance(self.positions, str):
            self.positions = list(self.positions)

    @classmethod
    def init(
        cls,
        site_name: str,
        d: int,
        rank: int,
        positions: str | Sequence[int] = "l1",
        *,
        every_step: bool = False,
        seed: int = 0,
        device=None,
    ) -> LoReFT:
        """A fresh edit: random orthonormal ``R``, ``W`` as ``nn.Linear(d, r)`` initialises it, ``b = 0``."""
        g = torch.Generator().manual_seed(seed)
        rotation = orthonormal_rows(torch.randn(rank, d, generator=g))
        bound = 1 / d**0.5
        weight = (torch.rand(rank, d, generator=g) * 2 - 1) * bound
        return cls(
            site_name,
            rotation.to(device),
            weight.to(device),
            torch.zeros(rank, device=device),
            positions,
            every_step,
        )

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    @property
    def rank(self) -> int:
        return int(self.rotation.shape[0])

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(R, W, b)`` as the op uses them (``R`` orthonormalised)."""
        what = f"LoReFT({self.site_name!r})"
        rot = _as_tensor(self.rotation, what + ".rotation")
        W = _as_tensor(self.weight, what + ".weight")
        b = _as_tensor(self.bias, what + ".bias")
        return orthonormal_rows(rot), W, b

    def applier_key(self) -> tuple:
        return ("LoReFT", self.rank)

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[LoReFT]):
        d = resolved.width
        for iv in group:
            what = f"LoReFT({iv.site_name!r})"
            shapes = {"rotation": (iv.rank, d), "weight": (iv.rank, d), "bias": (iv.rank,)}
            for name, shape in shapes.items():
                got = tuple(_as_tensor(getattr(iv, name), f"{what}.{name}").shape)
                if got != shape:
                    raise ValueError(
                        f"{what}: {name} must be {list(shape)} (rank {iv.rank}, site width {d}), got {got}"
                    )
            if not 1 <= iv.rank <= d:
                raise ValueError(f"{what}: rank must be in [1, {d}], got {iv.rank}")
        slots = max(len(parse_reft_positions(iv.positions)[2]) for iv in group)
        dtype = (
            torch.float64
            if any(_as_tensor(iv.weight, "w").dtype == torch.float64 for iv in group)
            else torch.float32
        )
        return _LoReFTApplier(d, self.rank, slots, num_rows, device, dtype)
