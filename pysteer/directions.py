"""Steering directions from contrast data (the ITI / CAA mean-difference estimator)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .interventions import HeadBias, VectorAdd
from .models.sites import Site, install_site_hook, parse_site, resolve_site, site_shape
from .models.specs import geometry, get_spec


@dataclass
class Direction:
    """A mean-difference direction at one site.

    Attributes:
        site: where it was measured.
        diff: ``[H, D]`` (``attn.heads``) or ``[1, d_model]``: mean(positive) - mean(negative).
        std: ``[H]``: standard deviation of all activations projected on each head's unit direction
            (ITI's sigma).
        n_pos, n_neg: sample counts.
    """

    site: Site
    diff: Tensor
    std: Tensor
    n_pos: int
    n_neg: int

    @property
    def unit(self) -> Tensor:
        return self.diff / self.diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def head_bias(self, alpha: float, heads: Sequence[int] | None = None) -> HeadBias:
        """ITI intervention ``alpha * sigma * unit`` on the given heads (all when None)."""
        if self.site.kind != "attn.heads":
            raise ValueError(f"head_bias needs an attn.heads direction, this one is at {self.site}")
        heads = list(range(self.diff.shape[0])) if heads is None else list(heads)
        return HeadBias(
            self.site.layer, head=heads, direction=self.unit[heads], alpha=alpha, sigma=self.std[heads]
        )

    def vector_add(self, alpha: float = 1.0, normalise: bool = False) -> VectorAdd:
        """CAA intervention: add ``alpha * diff`` (or the unit direction times ``alpha * std``)."""
        v = (self.unit * self.std[:, None]) if normalise else self.diff
        return VectorAdd(self.site.name, v.reshape(-1), alpha=alpha)


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    sites: Sequence[str | Site],
    position: str = "last",
    batch_size: int = 8,
) -> dict[Site, Tensor]:
    """Activations ``[N, H, D]`` (or ``[N, 1, d_model]``) at each site, per text.

    ``position="last"`` takes each text's last token, ``"mean"`` the mean over its tokens.
    """
    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
    spec = get_spec(model)
    geo = geometry(model, spec)
    parsed = [parse_site(s) for s in sites]
    resolved = [resolve_site(model, s, spec) for s in parsed]
    grabbed: dict[Site, list[Tensor]] = {s: [] for s in parsed}
    current: dict[Site, Tensor] = {}
    hooks = []
    for s, r in zip(parsed, resolved):
        hooks.append(install_site_hook(r, lambda x, s=s: current.__setitem__(s, x.detach())))
    device = next(model.parameters()).device
    old_side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            model(**batch)
            mask = batch["attention_mask"]
            last = mask.sum(-1) - 1
            for s in parsed:
                x = current[s].reshape(mask.shape[0], mask.shape[1], -1).float()
                if position == "last":
                    v = x[torch.arange(x.shape[0]), last]
                else:
                    v = (x * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
                H = site_shape(s, geo)[0]
                grabbed[s].append(v.reshape(v.shape[0], H, -1).cpu())
    finally:
        tokenizer.padding_side = old_side
        for h in hooks:
            h.remove()
    return {s: torch.cat(v) for s, v in grabbed.items()}


def from_activations(site: Site, pos: Tensor, neg: Tensor) -> Direction:
    """Mean difference of ``pos [Np, H, D]`` and ``neg [Nn, H, D]``, with ITI's per-head sigma."""
    if pos.dim() != 3 or neg.dim() != 3 or pos.shape[1:] != neg.shape[1:]:
        raise ValueError(
            f"from_activations: expected [N, H, D] tensors of equal H, D, got {tuple(pos.shape)}, {tuple(neg.shape)}"
        )
    if pos.shape[0] < 1 or neg.shape[0] < 1:
        raise ValueError("from_activations: need at least one positive and one negative sample")
    diff = pos.float().mean(0) - neg.float().mean(0)
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = (torch.cat([pos, neg]).float() * unit).sum(-1)  # [N, H]
    std = proj.std(0, unbiased=True) if proj.shape[0] > 1 else torch.ones(proj.shape[1])
    return Direction(site, diff, std, pos.shape[0], neg.shape[0])


def mean_difference(
    model: nn.Module,
    tokenizer,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    site: str | Site | Sequence[str | Site],
    position: str = "last",
    batch_size: int = 8,
) -> Direction | dict[Site, Direction]:
    """Per-head (at ``attn.heads``) or per-site directions ``mean(pos) - mean(neg)`` and their std.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        pos_texts, neg_texts: the two sides of the contrast.
        site: one site name (returns a ``Direction``) or several (returns ``{Site: Direction}``).
        position: ``"last"`` token of each text or ``"mean"`` over its tokens.
    """
    single = isinstance(site, (str, Site))
    sites = [site] if single else list(site)
    p = collect(model, tokenizer, pos_texts, sites, position, batch_size)
    n = collect(model, tokenizer, neg_texts, sites, position, batch_size)
    out = {s: from_activations(s, p[s], n[s]) for s in p}
    return next(iter(out.values())) if single else out
