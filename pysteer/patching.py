"""Activation patching as intervention kinds: replace a site's tensor at chosen positions by given
values (``Patch``), or add seeded Gaussian noise there (``Noise``, the corruption of causal tracing).

Both are per-request: each config row of a handle carries its own values and positions, so one
batched forward serves many patched runs (a causal-tracing sweep restores a different (layer,
position) in every batch row). Positions count from each sequence's first real token, negative
ones back from the end of the prompt, as everywhere in pysteer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .interventions import _as_tensor, finite_number, intervention_kind
from .models.sites import ResolvedSite, Site, parse_site
from .positions import _NO_POSITION, TokenContext


def _positions(positions, what: str) -> list[int]:
    out = [positions] if isinstance(positions, int) else list(positions)
    if not out or not all(isinstance(p, int) and not isinstance(p, bool) for p in out):
        raise ValueError(f"{what}: positions must be a non-empty list of ints, got {positions!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: repeated position in {out}")
    return out


class _PatchApplier:
    """Rows of ``values [C, P, W]`` and ``positions [C, P]``; ``add`` adds instead of replacing."""

    def __init__(self, width: int, slots: int, num_rows: int, add: bool, device, dtype):
        self.add = add
        self.values = torch.zeros(num_rows, slots, width, dtype=dtype, device=device)
        self.positions = torch.full((num_rows, slots), _NO_POSITION, dtype=torch.long, device=device)

    def write_row(self, row: int, iv) -> None:
        pos = _positions(iv.positions, repr(iv)[:60])
        self.positions[row].fill_(_NO_POSITION)
        self.positions[row, : len(pos)] = torch.tensor(pos, device=self.positions.device)
        self.values[row].zero_()
        self.values[row, : len(pos)] = iv.values_for(len(pos), self.values.shape[-1]).to(self.values)

    def apply(self, y: Tensor, ctx: TokenContext) -> Tensor:
        T = y.shape[0]
        r = ctx.rows.long()
        hit = ctx.at_positions(self.positions[r]) & (r > 0)[:, None]  # [T, P]
        found = hit.any(-1)
        v = self.values[r, hit.to(torch.int8).argmax(-1)].to(y.dtype).reshape(y.shape)  # [T, H, D]
        new = y + v if self.add else v
        return torch.where(found.reshape(T, 1, 1), new, y)


def _check_values(v: Tensor, n: int, width: int, what: str) -> Tensor:
    if v.dim() == 1:
        v = v.expand(n, -1)
    if v.dim() != 2 or v.shape != (n, width):
        raise ValueError(
            f"{what}: values must be [{width}] or [{n}, {width}] for {n} position(s), got {tuple(v.shape)}"
        )
    return v


@intervention_kind
@dataclass(eq=False)
class Patch:
    """Replace the site's activation at ``positions`` by ``value``.

    Args:
        site_name: any site, e.g. ``"layers.4.resid"``, ``"embed"``, ``"layers.2.attn.heads"``.
        value: ``[W]`` (every listed position) or ``[len(positions), W]`` with ``W`` the site's
            width (all heads at head-major sites). A row of a ``pysteer.trace`` capture fits as is.
        positions: positions from the sequence's first real token (negative: from the prompt's end).
    """

    site_name: str
    value: Tensor
    positions: Sequence[int] = (-1,)
    trainable: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.positions = _positions(self.positions, f"Patch({self.site_name!r})")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def applier_key(self) -> str:
        return "Patch"

    def values_for(self, n: int, width: int) -> Tensor:
        return _check_values(
            _as_tensor(self.value, f"Patch({self.site_name!r}).value"), n, width, f"Patch({self.site_name!r})"
        )

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[Patch]):
        for iv in group:
            iv.values_for(len(iv.positions), resolved.width)  # shapes checked before anything is attached
        slots = max(len(iv.positions) for iv in group)
        return _PatchApplier(resolved.width, slots, num_rows, False, device, torch.float32)


@intervention_kind
@dataclass(eq=False)
class Noise:
    """Add Gaussian noise ``std * N(0, 1)`` at ``positions`` (seeded: the same noise every forward).

    Args:
        site_name: usually ``"embed"`` (causal tracing corrupts the subject's token embeddings).
        std: the noise scale (ROME: 3 times the standard deviation of the embeddings).
        positions: as for ``Patch``.
        seed: the noise's seed; equal seeds give equal noise, so a corrupted run is reproducible.
    """

    site_name: str
    std: float
    positions: Sequence[int] = field(default_factory=lambda: [0])
    seed: int = 0
    trainable: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.positions = _positions(self.positions, f"Noise({self.site_name!r})")
        self.std = finite_number(self.std, f"Noise({self.site_name!r}).std")
        if self.std < 0:
            raise ValueError(f"Noise({self.site_name!r}): std must be >= 0, got {self.std}")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def applier_key(self) -> str:
        return "Noise"

    def values_for(self, n: int, width: int) -> Tensor:
        g = torch.Generator().manual_seed(int(self.seed))
        return self.std * torch.randn(n, width, generator=g)

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[Noise]):
        slots = max(len(iv.positions) for iv in group)
        return _PatchApplier(resolved.width, slots, num_rows, True, device, torch.float32)
