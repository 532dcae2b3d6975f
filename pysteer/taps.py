"""Taps: sites recorded at chosen positions while ``pysteer.generate`` runs, and the abstain gate.

A tap records a site's tensor (after any steering at that site) at two positions per row, with no
second pass and no ``output_hidden_states``:

- ``"last_prompt"``: the last prompt token, the token before generation (recorded in the prefill);
- ``"second_last_generated"``: the second-last token of the row's generated tokens, the stop token
  counted as generated. Its state is the one that produced the row's last token; for an answer that
  ended with EOS that is the last answer token (the SLT of semantic-entropy probes, Kossen et al.
  2024). A row that generated a single token has no second-last one: the state that produced it,
  the last prompt token's, stands in (as the reference code of Farquhar et al. falls back to the
  prompt's hidden state).

Each decode step writes every still-running row's state into a fixed-address buffer (a
``torch.where`` on a fixed-address "live" mask), so the compiled decode step records without graph
breaks or recompiles, and a finished row keeps the state of the step that produced its last token.

The gate: an ``abstain`` probe is any object with ``sites: list[str]`` and
``__call__(hidden: list[Tensor[B, d]]) -> Tensor[B]`` (a score in [0, 1], high = uncertain). It reads
the last-prompt taps of its sites straight after the prefill; rows scoring above the threshold are
not decoded at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .interventions import finite_number
from .models.sites import Site, install_site_hook, parse_site, resolve_site
from .models.specs import geometry

TAP_POSITIONS = ("last_prompt", "second_last_generated")


def tap_sites(model: nn.Module, taps) -> list[Site]:
    """Normalise ``taps`` (None, ``"all"`` for every layer's ``resid``, a site name or a list of
    them) to sites, checking each against the model; raises ``ValueError`` naming a bad one."""
    if taps is None:
        return []
    if isinstance(taps, str) and taps == "all":
        return [Site(i, "resid") for i in range(geometry(model).n_layers)]
    items = [taps] if isinstance(taps, (str, Site)) else list(taps)
    if not items:
        raise ValueError(
            "taps: an empty list; pass None for no taps, 'all' or site names like 'layers.3.resid'"
        )
    sites: list[Site] = []
    for item in items:
        if not isinstance(item, (str, Site)):
            raise TypeError(f"taps: site names are strings like 'layers.3.resid', got {type(item).__name__}")
        resolve_site(model, item)
        site = parse_site(item)
        if site not in sites:
            sites.append(site)
    return sites


def check_abstain(model: nn.Module, probe, threshold) -> list[Site]:
    """Check an abstain probe and its threshold before anything runs; returns the probe's sites."""
    sites = getattr(probe, "sites", None)
    if not callable(probe) or not isinstance(sites, (list, tuple)) or not sites:
        raise TypeError(
            "abstain: expected a probe with `sites: list[str]` (non-empty) and "
            "`__call__(hidden: list[Tensor[B, d]]) -> Tensor[B]`"
        )
    threshold = finite_number(threshold, "threshold")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] (probe scores are), got {threshold}")
    return tap_sites(model, list(sites))


def probe_scores(probe, hidden: list[Tensor], n: int) -> Tensor:
    """Run the probe on the last-prompt states of ``n`` prompts; returns scores ``[n]`` (float32, host)."""
    scores = probe(hidden)
    if not isinstance(scores, Tensor) or scores.shape != (n,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"abstain: the probe must return a tensor of shape ({n},), one score per prompt, got {got}"
        )
    scores = scores.detach().float().cpu()
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        raise ValueError(
            f"abstain: probe scores must lie in [0, 1], got min {scores.min():.4g}, max {scores.max():.4g}"
        )
    return scores


class TapRecorder:
    """Hooks that record the last position of each tapped site: the whole prefill batch once
    (``prompt_states``), then, per decode step, every live row into fixed-address buffers.

    The generator keeps a recorder attached across calls (like its steering tables): removing the
    hooks would make the next call with taps recompile the decode step.
    """

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.sites = tuple(sites)
        self.phase = "prefill"  # "prefill" | "decode"; constant inside the compiled decode step
        self.prompt_states: list[Tensor | None] = [None] * len(sites)
        self.live: Tensor | None = None  # [B, 1] bool: the row is still generating
        self.latest: list[Tensor] = []  # per site [B, width]: each row's latest recorded state
        self._hooks = [
            install_site_hook(resolve_site(model, s), self._recorder(i)) for i, s in enumerate(sites)
        ]

    def _recorder(self, index: int):
        def record(x: Tensor) -> None:
            if self.phase == "prefill":
                # prompts are left-padded: the last column is every row's last prompt token
                self.prompt_states[index] = x[:, -1].detach().clone()
            else:
                buf = self.latest[index]
                buf.copy_(torch.where(self.live, x[:, -1], buf))

        return record

    def covers(self, sites: list[Site]) -> bool:
        return set(sites) <= set(self.sites)

    def prompt_state(self, site: Site) -> Tensor:
        """``[B_prefill, width]`` state of ``site`` at the last prompt token (after a prefill)."""
        return self.prompt_states[self.sites.index(site)]

    def start_decode(self, live: Tensor, buffers: list[Tensor], source_rows: Tensor) -> None:
        """Point the decode hooks at a slot's buffers, each row starting from its prompt's state."""
        self.phase, self.live, self.latest = "decode", live, buffers
        for buf, state in zip(buffers, self.prompt_states):
            buf.copy_(state.index_select(0, source_rows))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
