"""Interventions: what an intervention kind is, and the affine kinds.

An intervention kind is one class (a dataclass, registered with ``@intervention_kind`` so
``pysteer.save`` / ``pysteer.load`` know it). It has:

- ``site``: the ``Site`` it acts on;
- a lowering, one of
    - ``affine_terms(geo) -> AffineTerms``: an affine edit ``x * m + a`` per site. Affine
      interventions of one config compose into one row of the site's table and run through
      ``pysteer::affine_steer`` (``HeadBias``, ``HeadScale``, ``VectorAdd``, ``VectorScale``);
    - ``applier_key()`` and ``make_applier(model, resolved_site, num_rows, device, group) -> Applier``:
      any other edit. Interventions with equal ``(site, applier_key())`` across a handle's configs
      share one applier, which holds one row per config (``write_row(row, iv)``, row 0 the
      identity) and edits a site's ``[T, H, D]`` tensor given the forward's ``TokenContext``
      (``apply(y, ctx)``: token rows, positions, prompt lengths, backend). Appliers run after the
      site's affine row, in config order (``SAEEdit``, ``ActivScalar``, ``DynScalar``, ...). The
      tensors an applier holds as attributes must be its own (allocated in ``make_applier``, rows
      copied in by ``write_row``), never an intervention's: ``handle.update`` writes new rows into
      them in place (``steering._adopt``) so compiled graphs keep running; a module it holds
      (an SAE) is only ever shared, never written;
- ``trainable``: the names of the tensor fields ``handle.parameters()`` trains
  (``steer(..., trainable=True)``);
- saving: dataclass fields that are JSON values or tensors save as they are; a kind with other
  fields defines ``to_fields(put) -> dict`` and ``from_fields(fields, get) -> instance`` (``put``
  stores a tensor or an object and returns its reference, ``get`` reads one back).

Affine interventions apply in list order: ``[VectorAdd(a1), VectorScale(m2)]`` is
``(x + a1) * m2 = x * m2 + a1 * m2``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from .models.sites import LAYER_FREE_KINDS, Site, parse_site, site_shape
from .models.specs import ModelGeometry

HeadSpec = int | Sequence[int] | None

KINDS: dict[str, type] = {}  # registered intervention kinds, by class name (what steering files name)


def intervention_kind(cls: type) -> type:
    """Register an intervention kind (a class decorator): ``pysteer.save`` / ``load`` know it by name."""
    name = cls.__name__
    if name in KINDS and KINDS[name] is not cls:
        raise ValueError(f"intervention_kind: another kind is already registered as {name!r}")
    KINDS[name] = cls
    return cls


class Applier(Protocol):
    """The lowering of a non-affine intervention kind at one site (see the module docstring)."""

    def write_row(self, row: int, iv) -> None: ...

    def apply(self, y: Tensor, ctx) -> Tensor: ...


def is_affine(iv) -> bool:
    return hasattr(iv, "affine_terms")


def is_intervention(iv) -> bool:
    """Whether ``iv`` has one of the two lowerings (an affine or a non-affine intervention)."""
    return is_affine(iv) or hasattr(iv, "make_applier")


def check_intervention(iv, where: str) -> None:
    """Raise unless ``iv`` is an intervention: it has a site and one of the two lowerings."""
    if not (is_affine(iv) or hasattr(iv, "make_applier")) or not hasattr(iv, "site"):
        raise TypeError(
            f"{where}: {type(iv).__name__} is not an intervention (an intervention kind has a site and "
            "either affine_terms or make_applier)"
        )


def trainable_tensors(iv, device: torch.device) -> list[Tensor]:
    """``iv``'s trainable fields as float32 leaves that require grad (numbers become tensors on
    ``device``; tensors keep their device, a non-leaf is detached into a new leaf)."""
    out = []
    for name in getattr(type(iv), "trainable", ()):
        value = getattr(iv, name)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value), device=device)
        if not value.is_leaf or value.dtype != torch.float32:
            value = value.detach().float()
        if not value.requires_grad:
            value.requires_grad_(True)
        setattr(iv, name, value)
        out.append(value)
    return out


def _heads(head: HeadSpec, n_heads: int, what: str) -> list[int]:
    if head is None:
        return list(range(n_heads))
    heads = [head] if isinstance(head, int) else [int(h) for h in head]
    if not heads:
        raise ValueError(f"{what}: empty head list")
    for h in heads:
        if not 0 <= h < n_heads:
            raise ValueError(f"{what}: head {h} out of range, the model has {n_heads} heads")
    if len(set(heads)) != len(heads):
        raise ValueError(f"{what}: repeated head in {heads}")
    return heads


def finite_number(value, what: str) -> float:
    """``value`` as a float: a real number (Python, NumPy or a one-element tensor) that is finite.

    Strings and booleans are refused, not converted: ``alpha="2.0"`` is a mistake to report.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{what}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: expected a number, got {type(value).__name__} {value!r:.40}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{what}: must be finite, got {out}")
    return out


def _as_tensor(value, what: str) -> Tensor:
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{what}: expected a number or a tensor, got {type(value).__name__} {value!r:.40}")
    if isinstance(value, Tensor) and value.requires_grad:  # a trained field: keep its graph and device
        if not torch.isfinite(value.detach()).all():
            raise ValueError(f"{what}: contains NaN or inf")
        return value if value.dtype == torch.float64 else value.float()
    try:
        t = (
            torch.as_tensor(value, dtype=torch.float32)
            if not isinstance(value, Tensor)
            else value.detach().float().cpu()
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{what}: expected a number or a tensor, got {type(value).__name__} ({err})"
        ) from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return t


def _per_head(value, heads: list[int], head_dim: int, what: str, scalar_ok: bool) -> Tensor:
    """Broadcast ``value`` to ``[len(heads), head_dim]``: scalar, ``[D]``, ``[n, 1]`` or ``[n, D]``."""
    t = _as_tensor(value, what)
    n = len(heads)
    if t.dim() == 0:
        if not scalar_ok:
            raise ValueError(f"{what}: expected a vector of size head_dim={head_dim}, got a scalar")
        return t.expand(n, head_dim).clone()
    if t.dim() == 1 and t.shape[0] == head_dim:
        return t.expand(n, head_dim).clone()
    if t.dim() == 1 and scalar_ok and t.shape[0] == n:
        return t[:, None].expand(n, head_dim).clone()
    if t.dim() == 2 and t.shape[0] == n and t.shape[1] in (1, head_dim):
        return t.expand(n, head_dim).clone()
    raise ValueError(
        f"{what}: shape {tuple(t.shape)} does not fit {n} head(s) of head_dim={head_dim} "
        f"(expected [{head_dim}], [{n}, {head_dim}]" + (f", [{n}] or a scalar)" if scalar_ok else ")")
    )


@dataclass(frozen=True)
class AffineTerms:
    """What one intervention contributes to one site's row: ``m`` and ``a`` are ``[H, D]`` or None."""

    site: Site
    m: Tensor | None
    a: Tensor | None


@intervention_kind
@dataclass
class HeadBias:
    """Add a bias to the output of attention heads (at ``attn.heads``, before the output projection).

    Either ``vector`` (added as ``alpha * vector``) or ``direction`` (normalised, added as
    ``alpha * sigma * direction / |direction|``, the ITI form) is given.

    Args:
        layer: decoder layer index.
        head: head index, a list of heads, or None for all heads.
        vector: ``[D]`` (same for each head) or ``[n_heads_listed, D]``.
        direction: ``[D]`` or ``[n, D]``; each head's direction is normalised to unit length.
        alpha: strength.
        sigma: per-head standard deviation along the direction (scalar or ``[n]``), ITI's sigma.
    """

    layer: int
    head: HeadSpec = None
    vector: Tensor | None = None
    direction: Tensor | None = None
    alpha: float = 1.0
    sigma: float | Tensor = 1.0
    trainable: ClassVar[tuple[str, ...]] = ("vector", "direction")

    def __post_init__(self) -> None:
        self._alpha()

    def _alpha(self) -> float:
        return finite_number(self.alpha, f"HeadBias(layer={self.layer}).alpha")

    @property
    def site(self) -> Site:
        return Site(int(self.layer), "attn.heads")

    def affine_terms(self, geo: ModelGeometry) -> AffineTerms:
        what = f"HeadBias(layer={self.layer})"
        _check_layer(self.layer, geo, what)
        heads = _heads(self.head, geo.n_heads, what)
        if (self.vector is None) == (self.direction is None):
            raise ValueError(f"{what}: give exactly one of vector= or direction=")
        if self.vector is not None:
            v = _per_head(self.vector, heads, geo.head_dim, what + ".vector", scalar_ok=False) * self._alpha()
        else:
            d = _per_head(self.direction, heads, geo.head_dim, what + ".direction", scalar_ok=False)
            norm = d.norm(dim=-1, keepdim=True)
            if (norm == 0).any():
                raise ValueError(f"{what}: direction has zero norm")
            sigma = _as_tensor(self.sigma, what + ".sigma")
            sigma = sigma.reshape(-1, 1) if sigma.dim() else sigma
            if sigma.dim() and sigma.shape[0] != len(heads):
                raise ValueError(f"{what}: sigma has {sigma.shape[0]} entries for {len(heads)} heads")
            v = d / norm * sigma * self._alpha()
        a = torch.zeros(geo.n_heads, geo.head_dim, device=v.device)
        a[heads] = v
        return AffineTerms(self.site, None, a)


@intervention_kind
@dataclass
class HeadScale:
    """Scale the output of attention heads (at ``attn.heads``).

    Args:
        layer: decoder layer index.
        head: head index, a list of heads, or None for all heads.
        scale: scalar, ``[n]`` (one per listed head), ``[D]`` or ``[n, D]``.
    """

    layer: int
    head: HeadSpec = None
    scale: float | Tensor = 1.0
    trainable: ClassVar[tuple[str, ...]] = ("scale",)

    @property
    def site(self) -> Site:
        return Site(int(self.layer), "attn.heads")

    def affine_terms(self, geo: ModelGeometry) -> AffineTerms:
        what = f"HeadScale(layer={self.layer})"
        _check_layer(self.layer, geo, what)
        heads = _heads(self.head, geo.n_heads, what)
        s = _per_head(self.scale, heads, geo.head_dim, what + ".scale", scalar_ok=True)
        m = torch.ones(geo.n_heads, geo.head_dim, device=s.device)
        m[heads] = s
        return AffineTerms(self.site, m, None)


def _site_width(site: Site, geo: ModelGeometry) -> tuple[int, int]:
    return site_shape(site, geo)


@intervention_kind
@dataclass
class VectorAdd:
    """Add ``alpha * vector`` at a site (CAA / repeng style steering vector).

    Args:
        site: e.g. ``"layers.6.resid"``; at ``attn.heads`` the vector is ``[H*D]``.
        vector: ``[width]`` of the site.
        alpha: strength.
    """

    site_name: str
    vector: Tensor = field(default=None)  # type: ignore[assignment]
    alpha: float = 1.0
    trainable: ClassVar[tuple[str, ...]] = ("vector",)

    def __post_init__(self) -> None:
        finite_number(self.alpha, f"VectorAdd({self.site_name!r}).alpha")

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def affine_terms(self, geo: ModelGeometry) -> AffineTerms:
        site = self.site
        _check_site_layer(site, geo, f"VectorAdd({site})")
        H, D = _site_width(site, geo)
        if self.vector is None:
            raise ValueError(f"VectorAdd({site}): vector is required")
        v = _as_tensor(self.vector, f"VectorAdd({site}).vector")
        if v.dim() != 1 or v.shape[0] != H * D:
            raise ValueError(f"VectorAdd({site}): vector must be [{H * D}], got {tuple(v.shape)}")
        return AffineTerms(
            site, None, v.reshape(H, D) * finite_number(self.alpha, f"VectorAdd({site}).alpha")
        )


@intervention_kind
@dataclass
class VectorScale:
    """Multiply the activation at a site by ``scale`` (scalar or ``[width]``)."""

    site_name: str
    scale: float | Tensor = 1.0
    trainable: ClassVar[tuple[str, ...]] = ("scale",)

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def affine_terms(self, geo: ModelGeometry) -> AffineTerms:
        site = self.site
        _check_site_layer(site, geo, f"VectorScale({site})")
        H, D = _site_width(site, geo)
        s = _as_tensor(self.scale, f"VectorScale({site}).scale")
        if s.dim() == 0:
            s = s.expand(H * D)
        if s.dim() != 1 or s.shape[0] != H * D:
            raise ValueError(
                f"VectorScale({site}): scale must be a scalar or [{H * D}], got {tuple(s.shape)}"
            )
        return AffineTerms(site, s.reshape(H, D).clone(), None)


def _check_site_layer(site: Site, geo: ModelGeometry, what: str) -> None:
    if site.kind not in LAYER_FREE_KINDS:
        _check_layer(site.layer, geo, what)


def _check_layer(layer: int, geo: ModelGeometry, what: str) -> None:
    if not isinstance(layer, int) or not 0 <= layer < geo.n_layers:
        raise ValueError(f"{what}: layer {layer!r} out of range, the model has {geo.n_layers} layers")


def compose_affine(interventions: Sequence, geo: ModelGeometry) -> dict[Site, tuple[Tensor, Tensor]]:
    """Compose the affine interventions of one config into ``{site: (m [H,D], a [H,D])}`` (fp32; on
    the CPU, or on a trained field's device). Non-affine interventions are skipped."""
    terms_at: dict[Site, tuple[Tensor, Tensor]] = {}
    for iv in interventions:
        if not is_affine(iv):
            continue
        terms = iv.affine_terms(geo)
        H, D = _site_width(terms.site, geo)
        dev = next(t.device for t in (terms.m, terms.a, torch.empty(0)) if t is not None)
        m, a = terms_at.get(terms.site, (torch.ones(H, D, device=dev), torch.zeros(H, D, device=dev)))
        if terms.m is not None:
            m = m * terms.m.to(m.device)
            a = a * terms.m.to(m.device)  # a later scale also scales earlier additive terms of the row
        if terms.a is not None:
            a = a + terms.a.to(a.device)
        terms_at[terms.site] = (m, a)
    return terms_at
