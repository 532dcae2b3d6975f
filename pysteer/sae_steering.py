"""SAE feature edits as steering interventions (``pysteer.steer(model, [SAEEdit(...)])``).

An ``SAEEdit`` edits chosen latents of an SAE at a d_model site (``attn.out``, ``mlp.out``,
``resid``), or, for an SAE over attention heads' outputs (SAELens ``reshape_activations="hook_z"``),
at ``attn.heads``, whose ``[..., n_heads * d_head]`` tensor is the head-major flattening such an SAE
reads, with the error-preserving op ``x + W_dec[S]^T (f'_S - f_S)``: only the edited latents
are encoded (exactly, for ReLU / JumpReLU), and what the SAE does not reconstruct is kept, so an
all-zero edit leaves the model bit-exactly unchanged. Edits use the handle's positions and
per-request rows like every intervention, and run after the affine row at the same site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .interventions import intervention_kind
from .models.sites import ResolvedSite, Site, parse_site
from .ops.sae import EDIT_KINDS
from .positions import TokenContext
from .sae import SAE, SAEEditTable


@intervention_kind
@dataclass(eq=False)
class SAEEdit:
    """Edit SAE latents at a site.

    Args:
        site_name: a d_model site, e.g. ``"layers.6.resid"``.
        sae: the ``pysteer.SAE`` (its ``d_in`` must equal the model's d_model).
        edits: ``{latent: (kind, strength)}`` with kind one of ``set`` (clamp to strength), ``add``,
            ``scale``, ``ablate`` (strength ignored), ``add_if_active`` (LF-Steering: add only where
            the latent fires).
    """

    site_name: str
    sae: SAE
    edits: Mapping[int, tuple[str, float]] = field(default_factory=dict)

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def applier_key(self) -> int:
        return id(self.sae)

    def to_fields(self, put) -> dict:
        """Saved form: the SAE stored once per file, edits as ``[latent, kind, strength]`` lists."""
        edits = [[int(latent), str(kind), float(strength)] for latent, (kind, strength) in self.edits.items()]
        return {"site_name": self.site_name, "sae": put(self.sae, "sae"), "edits": edits}

    @classmethod
    def from_fields(cls, fields: Mapping, get) -> SAEEdit:
        unknown = sorted(set(fields) - {"site_name", "sae", "edits"})
        if unknown:
            raise ValueError(f"no field {unknown[0]!r}; the file may come from a newer pysteer")
        sae = get(fields.get("sae"), "sae")
        if not isinstance(sae, SAE):
            raise ValueError("field 'sae' does not name a stored SAE")
        edits = fields.get("edits")
        if not isinstance(edits, list) or not all(isinstance(e, list) and len(e) == 3 for e in edits):
            raise ValueError("field 'edits' must be a list of [latent, kind, strength]")
        return cls(str(fields.get("site_name")), sae, {int(f): (str(k), float(v)) for f, k, v in edits})

    def _validate(self, resolved: ResolvedSite) -> None:
        site = self.site
        hook_z = self.sae.reshape_activations == "hook_z"
        if hook_z and site.kind != "attn.heads":
            raise ValueError(
                f"SAEEdit({site}): the SAE reads attention heads' outputs (reshape_activations='hook_z'); "
                "edit it at an attn.heads site"
            )
        if resolved.n_heads > 1 and not (hook_z and site.kind == "attn.heads"):
            raise ValueError(
                f"SAEEdit({site}): SAE edits act on unheaded sites (embed, resid_pre, attn.out, mlp.hidden, "
                "mlp.out, resid), not on head-major ones (attn.heads takes an SAE with reshape_activations='hook_z')"
            )
        if self.sae.d_in != resolved.width:
            raise ValueError(
                f"SAEEdit({site}): SAE d_in={self.sae.d_in} but the site has width {resolved.width}"
            )
        if not self.edits:
            raise ValueError(f"SAEEdit({site}): no edits")
        for latent, edit in self.edits.items():
            if not isinstance(edit, Sequence) or len(edit) != 2:
                raise ValueError(
                    f"SAEEdit({site}): edit of latent {latent} must be (kind, strength), got {edit!r}"
                )
            kind, strength = edit
            if kind not in EDIT_KINDS or kind == "none":
                raise ValueError(f"SAEEdit({site}): unknown edit kind {kind!r} for latent {latent}")
            if not 0 <= int(latent) < self.sae.d_sae:
                raise ValueError(f"SAEEdit({site}): latent {latent} outside [0, {self.sae.d_sae})")
            if not torch.isfinite(torch.tensor(float(strength))):
                raise ValueError(f"SAEEdit({site}): strength of latent {latent} is not finite")

    def make_applier(self, model, resolved: ResolvedSite, num_rows: int, device, group: Sequence[SAEEdit]):
        """One applier per (site, SAE), with the union of the group's latents as table columns."""
        for iv in group:
            iv._validate(resolved)
        features = sorted({int(f) for iv in group for f in iv.edits})
        return _SAEApplier(self.sae, features, num_rows, device)


class _SAEApplier:
    def __init__(self, sae: SAE, features: list[int], num_rows: int, device):
        dev = torch.device(device)
        if (sae.device.type, sae.device.index or 0) != (dev.type, dev.index or 0):
            raise ValueError(
                f"SAEEdit: the SAE is on {sae.device}, the model on {device}; move it with sae.to(...)"
            )
        self.sae = sae
        self.table: SAEEditTable = sae.edit_table(features, num_rows)

    def write_row(self, row: int, iv: SAEEdit) -> None:
        self.table.clear(row)
        for latent, (kind, strength) in iv.edits.items():
            self.table.set(row, int(latent), kind, float(strength))

    def apply(self, y: Tensor, ctx: TokenContext) -> Tensor:
        return self.sae.steer_rows(y, ctx.rows, self.table, backend=ctx.backend)
