"""Folding static steering into projection weights, and unfolding it bit-exactly.

A site that is a projection's input or output (``FOLD_TARGETS``) takes an affine edit ``x * m + a``
into that projection: on the input side ``W diag(m)`` and ``b + W a``, on the output side
``diag(m) W`` and ``b * m + a``. Each projection keeps its original weight and bias in a
``FoldedProjection`` with the list of edits folded into it (one per handle, in order), and is
recomputed from the originals whenever that list changes, so removing any handle restores the
exact original bits once the list is empty.

A low-rank weight delta (``pysteer.WeightDelta``, ``y = x W + x U V``) folds into its linear as
``W + U V`` (``W + (U V)^T`` in the ``[out, in]`` layout); a projection's deltas are added to the
original weight first, then its affine edits apply as above.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .models.sites import Site
from .models.specs import ArchSpec, get_submodule, proj_weight_in_out

# Site kinds that fold, as data: the projection whose input ("in") or output ("out") the site is.
FOLD_TARGETS: dict[str, tuple[str, str]] = {
    "attn.q": ("q_proj", "out"),
    "attn.k": ("k_proj", "out"),
    "attn.v": ("v_proj", "out"),
    "attn.heads": ("attn_out_proj", "in"),
    "attn.out": ("attn_out_proj", "out"),
    "mlp.hidden": ("mlp_out_proj", "in"),
    "mlp.out": ("mlp_out_proj", "out"),
    "mlp.gate_proj.in": ("mlp_gate_proj", "in"),
    "mlp.gate_proj.out": ("mlp_gate_proj", "out"),
    "mlp.up_proj.in": ("mlp_up_proj", "in"),
    "mlp.up_proj.out": ("mlp_up_proj", "out"),
    "mlp.down_proj.in": ("mlp_out_proj", "in"),
    "mlp.down_proj.out": ("mlp_out_proj", "out"),
    "attn.o_proj.in": ("attn_out_proj", "in"),
    "attn.o_proj.out": ("attn_out_proj", "out"),
}
FOLDABLE_KINDS = tuple(FOLD_TARGETS)

SiteTerms = Mapping[Site, tuple[Tensor, Tensor]]  # one config's composed ``(m, a)`` per site
Deltas = Sequence[tuple[Site, Tensor, Tensor]]  # ``(a linear's out site, U [in, r], V [r, out])``: W + U V


def fold_target(model: nn.Module, spec: ArchSpec, site: Site) -> tuple[nn.Module, str, str]:
    """``(projection, "in"|"out", its path)`` that steering at ``site`` folds into."""
    attr, side = FOLD_TARGETS[site.kind]
    path = getattr(spec, attr)
    layer = get_submodule(model, spec.layers)[site.layer]
    return get_submodule(layer, path), side, f"layers.{site.layer}.{path}"


def fold_blocker(terms_per_config: Mapping[str, SiteTerms], has_non_affine: bool, positions) -> str | None:
    """Why this steering cannot fold (it needs the dynamic op), or None."""
    if len(terms_per_config) != 1:
        return "several configs (per-request steering needs the dynamic op)"
    if positions != "all":
        return f"positions={positions!r} (folding applies to every token, prompt included)"
    if has_non_affine:
        return "non-affine interventions (e.g. SAE edits) do not fold"
    for terms in terms_per_config.values():
        for site in terms:
            if site.kind not in FOLDABLE_KINDS:
                return f"site {site} is not a projection's input or output (the kinds {FOLDABLE_KINDS} fold)"
    return None


def unfoldable_projection(
    model: nn.Module,
    spec: ArchSpec,
    terms_per_config: Mapping[str, SiteTerms],
    delta_sites: Sequence[Site] = (),
) -> str | None:
    """Why a projection the steering would fold into cannot take it, or None.

    Fold rewrites ``weight`` and ``bias`` of a plain ``nn.Linear`` (or GPT-2's ``Conv1D``). A PEFT
    LoRA wrapper computes more than its weight (folding ignored the LoRA branch, and adding a bias
    to it failed after the weight was already scaled), and a quantised linear stores no float weight.
    """
    from transformers.pytorch_utils import Conv1D

    for terms in [*terms_per_config.values(), delta_sites]:
        for site in terms:
            if site.kind not in FOLD_TARGETS:
                continue
            proj, _, where = fold_target(model, spec, site)
            if type(proj) not in (nn.Linear, Conv1D):
                return f"{where} is a {type(proj).__module__}.{type(proj).__name__}, not a plain Linear (a wrapper such as PEFT LoRA, or a quantised layer)"
            weight = proj.weight
            if weight.is_meta or not weight.dtype.is_floating_point:
                return f"{where}.weight is {'on the meta device' if weight.is_meta else weight.dtype}"
    return None


class FoldedProjection:
    """Original weights of one projection plus the folded edits applied to it, in order."""

    def __init__(self, module: nn.Module, layout: str):
        self.module = module
        self.layout = layout
        self.orig_weight = module.weight.detach().clone()
        bias = getattr(module, "bias", None)
        self.orig_bias = bias.detach().clone() if bias is not None else None
        self.entries: list[
            tuple[int, str, Tensor, Tensor]
        ] = []  # (handle id, "in"|"out", m, a) or (.., "delta", U, V)

    def recompute(self) -> None:
        mod = self.module
        if not self.entries:
            with torch.no_grad():
                mod.weight.copy_(self.orig_weight)
                if self.orig_bias is None:
                    if getattr(mod, "bias", None) is not None:
                        mod.register_parameter("bias", None)
                else:
                    mod.bias.copy_(self.orig_bias)
            return
        in_f, out_f = proj_weight_in_out(mod, self.layout)
        dev = self.orig_weight.device
        m_in, a_in = torch.ones(in_f, device=dev), torch.zeros(in_f, device=dev)
        m_out, a_out = torch.ones(out_f, device=dev), torch.zeros(out_f, device=dev)
        W = self.orig_weight.float()
        for _, side, m, a in self.entries:
            if side == "in":
                m_in, a_in = m_in * m, a_in * m + a
            elif side == "out":
                m_out, a_out = m_out * m, a_out * m + a
            else:  # a weight delta U V, [in, out]
                delta = m.float() @ a.float()
                W = W + (delta.transpose(0, 1) if self.layout == "linear" else delta)
        b = self.orig_bias.float() if self.orig_bias is not None else torch.zeros(out_f, device=dev)
        if self.layout == "linear":  # y = W x + b, W [out, in]
            b = b + W @ a_in
            W = W * m_in[None, :] * m_out[:, None]
        else:  # Conv1D: y = x W + b, W [in, out]
            b = b + a_in @ W
            W = W * m_in[:, None] * m_out[None, :]
        b = b * m_out + a_out
        with torch.no_grad():
            mod.weight.copy_(W.to(mod.weight.dtype))
            if getattr(mod, "bias", None) is None:
                mod.bias = nn.Parameter(b.to(mod.weight.dtype), requires_grad=False)
            else:
                mod.bias.copy_(b.to(mod.bias.dtype))


FOLDED: weakref.WeakKeyDictionary[nn.Module, FoldedProjection] = weakref.WeakKeyDictionary()


def fold(
    owner: int, model: nn.Module, spec: ArchSpec, terms: SiteTerms, deltas: Deltas = ()
) -> list[nn.Module]:
    """Fold one config's terms and weight deltas into their projections as ``owner``'s edits; return
    the projections.

    All or nothing: if any projection fails, every projection touched goes back to its original."""
    planned = []
    for site, (m, a) in terms.items():
        proj, side, _ = fold_target(model, spec, site)
        planned.append((proj, side, m.reshape(-1), a.reshape(-1)))
    for site, U, V in deltas:
        proj, _, where = fold_target(model, spec, site)
        in_f, out_f = proj_weight_in_out(proj, spec.proj_layout)
        if (U.shape[0], V.shape[1]) != (in_f, out_f):
            raise ValueError(
                f"weight delta on {where}: U must be [{in_f}, r] and V [r, {out_f}], got U {tuple(U.shape)}, "
                f"V {tuple(V.shape)}"
            )
        planned.append((proj, "delta", U.detach(), V.detach()))
    touched: list[nn.Module] = []
    try:
        for proj, side, m, a in planned:
            slot = FOLDED.get(proj)
            if slot is None:
                slot = FOLDED[proj] = FoldedProjection(proj, spec.proj_layout)
            dev = slot.orig_weight.device
            touched.append(proj)
            slot.entries.append((owner, side, m.to(dev), a.to(dev)))
            slot.recompute()
    except BaseException:
        unfold(owner, touched)
        raise
    return touched


def unfold(owner: int, projections: list[nn.Module]) -> None:
    """Remove ``owner``'s edits from ``projections``; a projection with no edits left is its original."""
    for proj in dict.fromkeys(projections):
        slot = FOLDED.get(proj)
        if slot is None:
            continue
        slot.entries = [e for e in slot.entries if e[0] != owner]
        slot.recompute()
        if not slot.entries:
            del FOLDED[proj]
