"""In-memory tracing: capture site tensors during a forward or ``generate()`` call.

    with pysteer.trace(model, sites=["layers.3.resid", "layers.3.attn.heads"]) as cache:
        model(input_ids)
    cache["layers.3.resid"]        # [B, S, d_model]
    cache["layers.3.attn.heads"]   # [B, S, H, D]

Capture hooks are appended to the site modules, so they run after interventions, which register
theirs with ``prepend=True``: the cache holds what the next module actually received.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models import forward_args
from ..models.sites import ResolvedSite, Site, install_site_hook, parse_site, resolve_site
from ..models.specs import get_spec, unwrap_model

Positions = None | str | int | slice | Sequence[int] | Tensor


def normalize_sites(sites: str | Site | Sequence[str | Site]) -> list[Site]:
    """Parse one site or a list of them into unique ``Site``s, in the order given."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    parsed: list[Site] = []
    for s in sites:
        p = parse_site(s)
        if p in parsed:
            raise ValueError(f"site {p.name} is listed twice")
        parsed.append(p)
    if not parsed:
        raise ValueError("no sites given: name at least one, e.g. 'layers.0.resid'")
    return parsed


@dataclass
class _Run:
    """Captures of one sequence: the first forward (empty KV cache) and its decode steps."""

    chunks: dict[str, list[Tensor]] = field(default_factory=dict)


class TraceCache(Mapping[str, Tensor]):
    """Site name -> captured tensor, filled while a :func:`trace` context is open.

    ``cache[site]`` is ``[B, S, width]`` (``[B, S, H, D]`` for ``attn.heads``). Forward calls that
    continue a sequence through the KV cache (``generate()`` decode steps) are concatenated along
    S; a forward with an empty cache starts a new run, and :meth:`runs` returns each run separately.
    With ``positions="last"`` each forward contributes one position per batch row, so after
    ``generate()`` S is the number of forward calls. ``generate()`` never runs the model on the
    token it emits last, so that token has no activations.
    """

    def __init__(self, resolved: dict[str, ResolvedSite]) -> None:
        self._resolved = resolved
        self._runs: list[_Run] = []

    def _new_run(self) -> None:
        self._runs.append(_Run({name: [] for name in self._resolved}))

    def _append(self, name: str, value: Tensor) -> None:
        if not self._runs:
            self._new_run()
        self._runs[-1].chunks[name].append(value)

    def _shape(self, name: str, t: Tensor) -> Tensor:
        r = self._resolved[name]
        if r.n_heads > 1:  # head-major sites come back as [..., H, D]
            return t.reshape(*t.shape[:-1], r.n_heads, r.width // r.n_heads)
        return t

    def _key(self, site: str | Site) -> str:
        name = parse_site(site).name
        if name not in self._resolved:
            raise KeyError(f"site {name} was not traced; traced sites: {', '.join(self._resolved)}")
        return name

    def runs(self, site: str | Site) -> list[Tensor]:
        """One tensor per run (``[B, S_run, ...]``), in the order the runs happened."""
        name = self._key(site)
        return [self._shape(name, torch.cat(r.chunks[name], dim=1)) for r in self._runs if r.chunks[name]]

    def __getitem__(self, site: str | Site) -> Tensor:
        runs = self.runs(site)
        if not runs:
            raise KeyError(f"site {self._key(site)} captured nothing: run the model inside the trace context")
        if len(runs) > 1:
            raise ValueError(
                f"site {self._key(site)} holds {len(runs)} separate runs (forward calls that each start "
                "from an empty KV cache); use cache.runs(site) to get them one by one"
            )
        return runs[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved)

    def __len__(self) -> int:
        return len(self._resolved)

    def clear(self) -> None:
        """Drop everything captured so far (the hooks stay installed)."""
        self._runs.clear()


class _Selector:
    """Turns ``positions`` into a per-call row/position selection of a ``[B, S, W]`` tensor."""

    def __init__(self, positions: Positions) -> None:
        if isinstance(positions, str) and positions != "last":
            raise ValueError(
                f"positions={positions!r}: expected None, 'last', an int, a slice or a list of ints"
            )
        if isinstance(positions, Tensor):
            positions = positions.tolist()
        if isinstance(positions, int):
            positions = [positions]
        self.positions = positions
        self.offset = 0  # absolute position of the current call's first token
        self.mask: Tensor | None = None  # [B, offset + S] attention mask of the current call
        self.batch_seq: tuple[int, int] | None = None  # (B, S) of the current call's input
        self.active = True  # whether the current call is captured (``prefill_only`` skips decode steps)

    def as_bsw(self, x: Tensor) -> Tensor:
        """Site tensors are ``[B, S, W]``, except where a model flattens tokens (OPT's MLP runs on
        ``[B*S, W]``): restore the batch and sequence dims from the call's input shape."""
        if (
            x.dim() == 2
            and self.batch_seq is not None
            and x.shape[0] == self.batch_seq[0] * self.batch_seq[1]
        ):
            return x.view(*self.batch_seq, x.shape[-1])
        return x

    def select(self, x: Tensor) -> Tensor:
        """``x`` ``[B, S, W]`` -> ``[B, S', W]`` with the requested positions."""
        p = self.positions
        if p is None:
            return x
        b, s = x.shape[0], x.shape[1]
        if p == "last":
            if self.mask is not None and self.mask.shape[0] == b:
                m = self.mask[:, -s:].to(torch.bool)
                # last real token of each row (right padding); rows with no real token keep S-1
                last = s - 1 - torch.flip(m, dims=[1]).to(torch.int8).argmax(dim=1)
                return x[torch.arange(b, device=x.device), last.to(x.device)].unsqueeze(1)
            return x[:, -1:]
        if isinstance(p, slice):
            absolute = range(self.offset, self.offset + s)
            wanted = set(range(*p.indices(self.offset + s)))
            idx = [i for i, a in enumerate(absolute) if a in wanted]
        else:
            end = self.offset + s
            wanted = {q if q >= 0 else end + q for q in p}
            idx = [i for i in range(s) if self.offset + i in wanted]
        return x[:, torch.tensor(idx, dtype=torch.long, device=x.device)]


@contextmanager
def trace(
    model: nn.Module,
    sites: str | Site | Sequence[str | Site],
    positions: Positions = None,
    *,
    device: str | torch.device | None = None,
    prefill_only: bool = False,
) -> Iterator[TraceCache]:
    """Capture site tensors of every forward run inside the context.

    Args:
        model: a Hugging Face causal LM of a supported architecture.
        sites: site names (``"layers.{i}.attn.heads|attn.out|mlp.out|resid"``) or one name.
        positions: which sequence positions to keep: ``None`` (all), ``"last"`` (the last real
            token of each row per forward call, found from the ``attention_mask`` when one is
            passed), an int, a list of ints or a slice of absolute positions (a position counts
            tokens already in the KV cache; negative ints count from the end of each forward call).
        device: where captures are stored (default: the model's device; ``"cpu"`` offloads).
        prefill_only: capture only forward calls that start from an empty KV cache (a prompt's
            forward; in ``generate()`` its prefill), skipping the calls that continue a cache
            (decode steps). With ``positions="last"`` each run then holds ``[B, 1, ...]``: every
            row's last prompt token, left or right padding alike.

    Yields:
        A :class:`TraceCache`: ``cache[site]`` is ``[B, S, d_model]``, or ``[B, S, H, D]`` for
        ``attn.heads``; S spans the prompt and the decode steps of a ``generate()`` call.
    """
    model = unwrap_model(model)
    parsed = normalize_sites(sites)
    spec = get_spec(model)
    resolved = {s.name: resolve_site(model, s, spec) for s in parsed}
    cache = TraceCache(resolved)
    selector = _Selector(positions)

    def root_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = forward_args.input_tensor(args, kwargs)
        mask = forward_args.attention_mask_2d(args, kwargs)
        if inputs is None:  # the model itself rejects such a call; nothing to record
            return
        past = int(forward_args.past_length(module, args, kwargs, inputs.shape[1]))
        if past == 0 or not cache._runs:
            cache._new_run()
        selector.active = past == 0 or not prefill_only
        selector.offset = past
        selector.mask = mask
        selector.batch_seq = tuple(inputs.shape[:2])

    def make_capture(name: str):
        def capture(x: Tensor) -> None:
            if not selector.active:
                return
            x = selector.as_bsw(x.detach())
            kept = selector.select(x)
            if device is not None:
                kept = kept.to(device)
            if kept.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                # still a view of the live activation, which a later module may change in place
                kept = kept.clone()
            cache._append(name, kept)

        return capture

    handles = [model.register_forward_pre_hook(root_pre_hook, with_kwargs=True)]
    try:
        for name, r in resolved.items():
            handles.append(install_site_hook(r, make_capture(name)))
        yield cache
    finally:
        for h in handles:
            h.remove()
