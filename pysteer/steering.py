"""Patch a Hugging Face causal LM with steering; return a handle that undoes it bit-exactly.

``steer(model, interventions)`` validates everything, then either *folds* static steering into
the projection weights (free at run time; ``pysteer/folding.py``) or installs *dynamic* steering:
one hook per site that applies the affine steering op ``x * M[r] + A[r]`` with preallocated tables
``M, A [C, H, D]`` and a table row ``r`` per token, then the site's non-affine appliers (SAE edits,
activation-dependent scalars, patches: any intervention kind with ``make_applier``). Row 0 of
every table is the identity and is never written.

The row of every token is computed once per forward, in a pre-hook on the decoder stack, from the
batch row's config (``handle.rows``) and the position rule (``pysteer/positions.py``).

Tables and the per-request config rows are updated **in place** (``update``, ``set_alpha``,
``rows``), so a compiled model sees the same tensors and does not recompile. A handle made with
``trainable=True`` instead rebuilds its tables from the interventions at every forward, so the
gradients of ``handle.parameters()`` flow through the ops' backward.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import folding
from ._backend import resolve_backend
from .interventions import check_intervention, compose_affine, finite_number, is_affine, trainable_tensors
from .models import forward_args
from .models.sites import SITE_TABLE, Site, install_site_hook, resolve_site, site_shape
from .models.specs import ArchSpec, ModelGeometry, geometry, get_spec, get_submodule, unwrap_model
from .ops.affine import affine_steer
from .ops.affine_linear import affine_linear
from .positions import (
    Positions,
    PositionTable,
    PromptLengths,
    TokenContext,
    check_position_range,
    check_positions,
    forward_positions,
    max_positions,
    token_rows,
)

log = logging.getLogger("pysteer")

MODES = ("auto", "fold", "dynamic")
PROJECTIONS = ("separate", "fused")


@dataclass
class SteeringSpec:
    """Named configs of interventions plus a position rule: what ``pysteer.save`` writes.

    Attributes:
        configs: ``{name: [intervention, ...]}``; the first config is the default for every batch row.
        positions: ``"all" | "prompt" | "generated" | "last_prompt" | "last_prompt+generated"``, a list
            of positions (negative ones count back from the end of the prompt: ``-1`` is the last
            prompt token), or one such list per batch row.
        metadata: free-form JSON-able information (e.g. how a recipe produced the steering).
    """

    configs: dict[str, list]
    positions: Positions = "all"
    metadata: dict = field(default_factory=dict)


def _normalise_configs(interventions) -> tuple[dict[str, list], Positions | None, dict]:
    if isinstance(interventions, SteeringSpec):
        return (
            {k: list(v) for k, v in interventions.configs.items()},
            interventions.positions,
            interventions.metadata,
        )
    if isinstance(interventions, Mapping):
        configs = {str(k): list(v) for k, v in interventions.items()}
    elif is_affine(interventions) or hasattr(interventions, "make_applier"):
        configs = {"default": [interventions]}
    else:
        configs = {"default": list(interventions)}
    if not configs:
        raise ValueError("steer: no configs given")
    for name, ivs in configs.items():
        for iv in ivs:
            check_intervention(iv, f"steer: config {name!r}")
    return configs, None, {}


# ------------------------------------------------------------------------------------------------
# per-model state: the position pre-hook and one dispatcher hook per site
# ------------------------------------------------------------------------------------------------


class _ModelState:
    """Everything pysteer attached to one model instance (dynamic steering only)."""

    def __init__(self, model: nn.Module):
        self.arch: ArchSpec = get_spec(model)
        self.geo: ModelGeometry = geometry(model, self.arch)
        self.model_ref = weakref.ref(model)
        self.handles: list[SteeringHandle] = []
        self.site_handles: dict[Site, list[SteeringHandle]] = {}
        self.site_hooks: dict[Site, RemovableHandle] = {}
        self.fused: dict[Site, nn.Module] = {}  # attn.heads sites steered inside their projection
        stack_path = self.arch.layers.rsplit(".", 1)[0]
        self.stack = get_submodule(model, stack_path)
        self.root_hook: RemovableHandle | None = None
        # transformers 4.57 records output_hidden_states inside each layer's forward, before its
        # forward hooks: the stack's post-hook swaps the steered layer outputs in (held only then).
        self.hidden_states_hook: RemovableHandle | None = None
        self.steered_resid: list[tuple[Tensor, Tensor]] | None = None  # (unsteered, steered) per layer
        self.prompt_lengths = PromptLengths()
        # Positions supplied by a generation loop that owns them (SteeringRuntime): (pos, valid, prompt_len)
        self.supplied_positions: tuple[Tensor, Tensor, Tensor] | None = None

    def _root_pre_hook(self, module, args, kwargs):
        if self.supplied_positions is not None:
            pos, valid, prompt_len = self.supplied_positions
        else:
            pos, valid, past_len = forward_positions(module, args, kwargs)
            prompt_len = self.prompt_lengths.update(valid, past_len)
        for h in self.handles:
            h._begin_forward(pos, valid, prompt_len)
        if not torch.compiler.is_compiling():  # compiled steps never report hidden states
            wanted = self.hidden_states_hook is not None and forward_args.reports_hidden_states(
                module, kwargs
            )
            self.steered_resid = [] if wanted else None
        return None

    def _report_steered_hidden_states(self, module, args, output):
        """Where the stack's ``hidden_states`` holds a steered layer's unsteered output (transformers
        4.57 records it inside the layer's forward, before the forward hooks), put the steered one.
        Matched by identity: on releases that record after the hooks nothing matches."""
        pairs, self.steered_resid = self.steered_resid, None
        reported = getattr(output, "hidden_states", None)
        if not pairs or not isinstance(reported, tuple):
            return None
        steered = {id(x): y for x, y in pairs}
        output.hidden_states = tuple(steered.get(id(h), h) for h in reported)
        return None

    def attach(self, handle: SteeringHandle, sites: Sequence[Site]) -> None:
        model = self.model_ref()
        if self.root_hook is None:
            self.root_hook = self.stack.register_forward_pre_hook(
                self._root_pre_hook, with_kwargs=True, prepend=True
            )
        self.handles.append(handle)
        for site in sites:
            self._attach_site(model, handle, site)

    def check_attachable(self, handle: SteeringHandle, sites: Sequence[Site]) -> None:
        """Raise before anything is attached if ``handle`` cannot share a site with the handles there:
        a fused projection applies exactly one handle's rows."""
        for site in sites:
            others = self.site_handles.get(site, [])
            if site in self.fused or (handle.projection == "fused" and site.kind == "attn.heads" and others):
                raise ValueError(
                    f"steer: {site} is already steered by another handle, and a fused projection "
                    "(projection='fused') takes one handle per site; remove the other handle first"
                )

    def _attach_site(self, model, handle: SteeringHandle, site: Site) -> None:
        lst = self.site_handles.setdefault(site, [])
        lst.append(handle)
        if handle.projection == "fused" and site.kind == "attn.heads":
            proj = resolve_site(model, site, self.arch).module
            proj.forward = _fused_forward(proj, handle, site)  # an instance attribute: nothing class-level
            self.fused[site] = proj
            return
        if site.kind == "resid" and self.hidden_states_hook is None:
            self.hidden_states_hook = self.stack.register_forward_hook(self._report_steered_hidden_states)
        if site not in self.site_hooks:
            resolved = resolve_site(model, site, self.arch)
            with_input = SITE_TABLE[site.kind].with_input
            self.site_hooks[site] = install_site_hook(
                resolved, self._make_site_fn(site), prepend=True, with_input=with_input
            )

    def _make_site_fn(self, site: Site):
        handles = self.site_handles[site]
        layer_output = site.kind == "resid"

        def site_fn(x: Tensor, site_input: Tensor | None = None) -> Tensor:
            y = x
            for h in handles:
                y = h._apply(site, y, site_input)
            if layer_output and not torch.compiler.is_compiling() and self.steered_resid is not None:
                self.steered_resid.append((x, y))
            return y

        return site_fn

    def detach(self, handle: SteeringHandle) -> None:
        if handle in self.handles:
            self.handles.remove(handle)
        for site in list(self.site_handles):
            lst = self.site_handles[site]
            if handle in lst:
                lst.remove(handle)
            if not lst:
                hook = self.site_hooks.pop(site, None)  # absent when attaching failed at this site
                if hook is not None:
                    hook.remove()
                proj = self.fused.pop(site, None)
                if proj is not None:
                    del proj.forward  # the class's forward again
                del self.site_handles[site]
        if (
            not any(site.kind == "resid" for site in self.site_handles)
            and self.hidden_states_hook is not None
        ):
            self.hidden_states_hook.remove()
            self.hidden_states_hook = None
            self.steered_resid = None
        if not self.handles and self.root_hook is not None:
            self.root_hook.remove()
            self.root_hook = None
            self.prompt_lengths.reset()


def _fold_deltas(ivs: Sequence) -> list:
    """The weight deltas of a config's interventions that fold (kinds with ``fold_delta``)."""
    return [iv.fold_delta() for iv in ivs if not is_affine(iv) and hasattr(iv, "fold_delta")]


def _check_token_count(site: Site, T: int, rows: Tensor) -> None:
    """The site saw as many tokens as the decoder stack's forward announced (one row index each)."""
    if rows.shape[0] != T:
        raise RuntimeError(
            f"pysteer: {site} saw {T} tokens but the decoder stack's forward announced "
            f"{rows.shape[0]}; call the model (or its decoder stack), not a single layer"
        )


def _fused_forward(proj: nn.Linear, handle: SteeringHandle, site: Site):
    """``proj``'s forward with the handle's rows applied while it reads its input (``affine_linear``)."""
    plain = type(proj).forward

    def forward(z: Tensor) -> Tensor:
        ctx = handle._ctx
        if ctx is None:
            return plain(proj, z)
        K = z.shape[-1]
        T = z.numel() // K
        _check_token_count(site, T, ctx.rows)
        M, A = handle.tables[site]
        out = affine_linear(z.reshape(T, K), ctx.rows, M, A, proj.weight, proj.bias, backend=handle.backend)
        return out.reshape(*z.shape[:-1], out.shape[-1])

    return forward


_STATES: weakref.WeakKeyDictionary[nn.Module, _ModelState] = weakref.WeakKeyDictionary()
_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def _check_fusable(model: nn.Module, spec: ArchSpec, sites: Sequence[Site]) -> None:
    """``projection='fused'`` replaces the attention output projection's forward: it must be a plain
    ``nn.Linear`` whose forward nobody else replaced (an accelerate or PEFT wrapper computes more)."""
    for site in sites:
        if site.kind != "attn.heads":
            continue
        proj = resolve_site(model, site, spec).module
        where = f"layers.{site.layer}.{spec.attn_out_proj}"
        if type(proj) is not nn.Linear:
            raise ValueError(
                f"steer(projection='fused'): {where} is a {type(proj).__name__}, not a plain nn.Linear "
                "(GPT-2's Conv1D, a LoRA or quantised layer); use projection='separate'"
            )
        if "forward" in proj.__dict__:
            raise ValueError(
                f"steer(projection='fused'): {where} already has its forward replaced (e.g. by accelerate)"
            )


def _check_materialised(model: nn.Module) -> None:
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(
                f"steer: {name} is on the meta device (the model's weights are not loaded); "
                "load or materialise the weights before steering"
            )


def _state(model: nn.Module) -> _ModelState:
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = _ModelState(model)
    return st


# ------------------------------------------------------------------------------------------------
# the handle
# ------------------------------------------------------------------------------------------------

_handle_ids = itertools.count(1)


_PLAIN = (int, float, bool, str, type(None))


def _adopt(old, new) -> bool:
    """Write ``new`` into ``old`` in place when they have the same layout: containers of the same
    keys and lengths, tensors of the same shape, dtype and device, objects of the same type with the
    same attributes, and everything else either plain values (taken from ``new``) or the very same
    object. Checks everything before writing anything; False (nothing written) when the layouts
    differ. Keeping ``old``'s tensors is what lets a compiled graph that captured them run on."""
    if not _same_layout(old, new):
        return False
    _copy_into(old, new)
    return True


def _same_layout(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and not a.requires_grad
        )
    if isinstance(a, _PLAIN) and isinstance(b, _PLAIN):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_layout(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        frozen = isinstance(a, tuple)  # plain items of a tuple cannot be written: they must be equal
        return len(a) == len(b) and all(
            x == y if frozen and isinstance(x, _PLAIN) else _same_layout(x, y)
            for x, y in zip(a, b, strict=True)
        )
    if a is b:
        return True
    if isinstance(a, nn.Module) or not hasattr(a, "__dict__"):
        return False  # a user's module or an opaque object: only the very same one is the same layout
    return _same_layout(vars(a), vars(b))


def _copy_into(a, b) -> None:
    if isinstance(a, dict):
        for k in a:
            if isinstance(a[k], (Tensor, dict, list, tuple)) or hasattr(a[k], "__dict__"):
                _copy_into(a[k], b[k])
            else:
                a[k] = b[k]
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if isinstance(x, _PLAIN):
                if isinstance(a, list):
                    a[i] = y
            else:
                _copy_into(x, y)
    elif isinstance(a, Tensor):
        a.copy_(b)
    elif a is not b and hasattr(a, "__dict__"):
        _copy_into(vars(a), vars(b))


class SteeringHandle:
    """Steering attached to one model; use as a context manager or call ``remove()``.

    Attributes:
        mode: ``"fold"`` or ``"dynamic"`` (what ``"auto"`` resolved to).
        backend: op backend used by dynamic steering.
        config_names: names of the configs, in row order (row 1 is the first).
        arch: the model's ``ArchSpec`` (where its layers and projections are).
        trainable: whether the tables are rebuilt from the interventions at every forward.
    """

    def __init__(
        self,
        model: nn.Module,
        interventions,
        positions: Positions | None = None,
        mode: str = "auto",
        backend: str | None = None,
        capacity: int | None = None,
        projection: str = "separate",
        trainable: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"steer: unknown mode {mode!r}; use one of {MODES}")
        if projection not in PROJECTIONS:
            raise ValueError(f"steer: unknown projection {projection!r}; use one of {PROJECTIONS}")
        if trainable and mode == "fold":
            raise ValueError(
                "steer(trainable=True): a trainable handle needs the dynamic op, not mode='fold'"
            )
        model = unwrap_model(model)
        _check_materialised(model)
        configs, spec_positions, metadata = _normalise_configs(interventions)
        positions = (
            positions if positions is not None else (spec_positions if spec_positions is not None else "all")
        )
        check_positions(positions)
        check_position_range(positions, max_positions(model))
        self.arch = get_spec(model)
        self.geo = geometry(model, self.arch)
        # ---- validate and compose everything before touching the model ----
        terms = {name: compose_affine(ivs, self.geo) for name, ivs in configs.items()}
        self.projection = projection
        self.trainable = bool(trainable)
        self.mode = "dynamic" if trainable else self._choose_mode(mode, model, terms, configs, positions)
        self.model_ref = weakref.ref(model)
        self.id = next(_handle_ids)
        self.configs = configs
        self.positions = positions
        self.metadata = metadata
        self.config_names = list(configs)
        self.removed = False
        self._device = next(model.parameters()).device
        self.backend = resolve_backend(backend, self._device) if self.mode == "dynamic" else "torch"
        self._terms = terms
        if self.mode == "fold":
            (only,) = terms.values()
            (ivs,) = configs.values()
            self._folded = folding.fold(self.id, model, self.arch, only, _fold_deltas(ivs))
            return
        self.capacity = max(capacity or 0, len(configs))
        self._request_rows: Tensor | None = None  # [n] int32: config row per batch row (handle.rows)
        self._pinned_prompt_len: Tensor | None = None
        self._ctx: TokenContext | None = None  # this forward's token rows and positions
        self._free_rows = list(range(1 + len(configs), 1 + self.capacity))
        self._adhoc: dict[int, object] = {}  # free rows now holding ad-hoc configs of rows(): their terms
        self._build_tables(model)
        self._position_table = PositionTable(positions, self._device)
        self._attach(model)

    def _choose_mode(self, mode: str, model: nn.Module, terms, configs, positions) -> str:
        non_affine = any(
            not is_affine(iv) and not hasattr(iv, "fold_delta") for ivs in configs.values() for iv in ivs
        )
        reason = folding.fold_blocker(terms, non_affine, positions)
        if reason is None:
            delta_sites = [site for ivs in configs.values() for site, _, _ in _fold_deltas(ivs)]
            reason = folding.unfoldable_projection(model, self.arch, terms, delta_sites)
            if reason is not None and mode == "auto":
                _log_once(f"pysteer: steering dynamically, not folded: {reason}")
        if mode == "fold" and reason:
            raise ValueError(f"steer(mode='fold'): cannot fold: {reason}; use mode='dynamic'")
        return "fold" if mode == "fold" or (mode == "auto" and not reason) else "dynamic"

    # -- tables and appliers -----------------------------------------------------------------------
    def _build_tables(self, model: nn.Module) -> None:
        """Affine tables ``M, A [1 + capacity, H, D]`` per site and one applier per non-affine group,
        every config written into its row. A trainable handle calls this at every forward."""
        C = 1 + self.capacity
        sites = sorted({s for t in self._terms.values() for s in t})
        self.tables: dict[Site, tuple[Tensor, Tensor]] = {}
        for site in sites:
            H, D = site_shape(site, self.geo)
            self.tables[site] = (
                torch.ones(C, H, D, dtype=torch.float32, device=self._device),
                torch.zeros(C, H, D, dtype=torch.float32, device=self._device),
            )
        for row, name in enumerate(self.configs, start=1):
            self._write_row(row, self._terms[name])
        for row, terms in self._adhoc.items():
            self._write_row(row, terms)
        # non-affine interventions: one applier per (site, key), built from every config's edits
        groups: dict[tuple, list[tuple[int, object]]] = {}
        for row, name in enumerate(self.configs, start=1):
            for iv in self.configs[name]:
                if not is_affine(iv):
                    groups.setdefault((iv.site, iv.applier_key()), []).append((row, iv))
        self.appliers: dict[Site, list] = {}
        for (site, _), items in groups.items():
            ivs = [iv for _, iv in items]
            applier = ivs[0].make_applier(model, resolve_site(model, site, self.arch), C, self._device, ivs)
            with torch.set_grad_enabled(self.trainable):
                for row, iv in items:
                    applier.write_row(row, iv)
            self.appliers.setdefault(site, []).append(applier)

    def _write_row(self, row: int, site_terms) -> None:
        """Write one config's rows in place; sites the config does not touch get the identity."""
        with torch.set_grad_enabled(self.trainable):
            for site, (M, A) in self.tables.items():
                m, a = site_terms.get(site, (None, None))
                if m is None:
                    M[row].fill_(1.0)
                    A[row].zero_()
                else:
                    M[row].copy_(m)
                    A[row].copy_(a)

    def _attach(self, model: nn.Module) -> None:
        sites = sorted(set(self.tables) | set(self.appliers))
        if self.projection == "fused":
            _check_fusable(model, self.arch, sites)
        state = _state(model)
        state.check_attachable(self, sites)
        try:
            state.attach(self, sites)
        except BaseException:
            state.detach(self)  # no hook of a failed patch stays behind
            raise

    # -- per forward -------------------------------------------------------------------------------
    def _begin_forward(self, pos: Tensor, valid: Tensor, prompt_len: Tensor) -> None:
        """Table row of every token of this forward (and fresh tables when trainable)."""
        if self.trainable:
            self._terms = {name: compose_affine(ivs, self.geo) for name, ivs in self.configs.items()}
            self._build_tables(self.model_ref())
        if self._pinned_prompt_len is not None:
            prompt_len = self._pinned_prompt_len.to(pos.device)
        rows = token_rows(self._position_table, self._request_rows, pos, valid, prompt_len)
        self._ctx = TokenContext(rows, pos, prompt_len, self.backend)

    def _apply(self, site: Site, x: Tensor, site_input: Tensor | None = None) -> Tensor:
        ctx = self._ctx
        if ctx is None:
            return x
        W = x.shape[-1]
        T = x.numel() // W  # [B, S, W], or [B*S, W] where a model flattens tokens (OPT's MLP)
        _check_token_count(site, T, ctx.rows)
        tab = self.tables.get(site)
        H = site_shape(site, self.geo)[0]
        y = x.reshape(T, H, W // H)
        if tab is not None:
            y = affine_steer(y, ctx.rows, tab[0], tab[1], self.backend)
        appliers = self.appliers.get(site, ())
        if appliers and site_input is not None:
            ctx = ctx.with_site_input(site_input)
        for applier in appliers:
            y = applier.apply(y, ctx)
        return y.reshape(x.shape)

    # -- public API ------------------------------------------------------------------------------
    def set_positions(self, positions: Positions) -> SteeringHandle:
        """Change the position rule, in place when the encoding keeps its shape."""
        self._require_dynamic("set_positions")
        check_positions(positions)
        check_position_range(positions, max_positions(self.model_ref()))
        self.positions = positions
        self._position_table.set(positions)
        return self

    def rows(self, per_request: Sequence | None) -> SteeringHandle:
        """Choose the config of each batch row: a config name, an intervention, a list of
        interventions, or None (unsteered). A flat list ``[iv_a, iv_b]`` is one config per row.

        ``None`` as the whole argument resets every row to the first config. Lists of interventions
        are written into free table rows in place (no recompilation). A batch of ``len(per_request)
        * n`` rows gives each entry ``n`` consecutive rows: the layout ``generate()`` uses for
        ``num_return_sequences`` and beams. Any other batch size raises at the forward.
        """
        self._require_dynamic("rows")
        if per_request is None:
            self._request_rows = None
            return self
        self._free_rows.extend(self._adhoc)
        self._adhoc = {}
        idx: list[int] = []
        pending: list = []
        for item in per_request:
            if item is None:
                idx.append(0)
            elif isinstance(item, str):
                if item not in self.configs:
                    raise KeyError(f"rows: unknown config {item!r}; known: {self.config_names}")
                idx.append(1 + self.config_names.index(item))
            else:
                pending.append(self._adhoc_terms(item))
                idx.append(-len(pending))
        if len(pending) > len(self._free_rows):
            raise ValueError(
                f"rows: {len(pending)} ad-hoc configs but only {len(self._free_rows)} free table rows; "
                "pass capacity= to steer()"
            )
        for k, terms in enumerate(pending, start=1):
            row = self._free_rows.pop(0)
            self._adhoc[row] = terms
            self._write_row(row, terms)
            idx = [row if i == -k else i for i in idx]
        t = torch.tensor(idx, dtype=torch.int32, device=self._device)
        if self._request_rows is not None and self._request_rows.shape == t.shape:
            self._request_rows.copy_(t)
        else:
            self._request_rows = t
        return self

    def _adhoc_terms(self, item):
        if self.trainable:
            raise TypeError(
                "rows: a trainable handle takes config names (or None) per batch row, not interventions"
            )
        ivs = [item] if is_affine(item) else list(item)
        if any(not is_affine(iv) for iv in ivs):
            raise TypeError("rows: ad-hoc configs may hold affine interventions only")
        terms = compose_affine(ivs, self.geo)
        missing = [s for s in terms if s not in self.tables]
        if missing:
            raise ValueError(
                f"rows: ad-hoc config steers {missing[0]}, which this handle has no table for; "
                "include that site in one of the handle's configs"
            )
        return terms

    @property
    def assigned_rows(self) -> int | None:
        """How many batch rows the last ``rows()`` call covered; None when every row takes the first config."""
        return None if self._request_rows is None else int(self._request_rows.shape[0])

    @contextmanager
    def padded_rows(self, batch: int, source_rows: Tensor | None = None) -> Iterator[SteeringHandle]:
        """Inside the block, batch rows past those ``rows()`` named are padding and stay unsteered.

        A handle whose ``rows()`` was never called steers every row with its one config, padding
        included: it keeps the broadcast form (no per-row gather), and the caller discards the
        padding rows' outputs anyway. For a generation loop that pads a batch of requests up to a fixed size (the fast path's
        batch buckets); the assignment the user made is back in place afterwards. With
        ``source_rows`` (``[k]`` int, k <= batch), batch row j takes the config of the request row
        ``source_rows[j]``: the samples of one prompt share its config, and prompts left out
        (abstained) take no row.
        """
        self._require_dynamic("padded_rows")
        user = self._request_rows
        if user is None or (source_rows is None and user.shape[0] >= batch):
            yield self
            return
        if source_rows is not None:
            user = user.index_select(0, source_rows.to(user.device))
        pad = torch.zeros(batch - user.shape[0], dtype=torch.int32, device=user.device)
        self._request_rows, user = torch.cat([user, pad]), self._request_rows
        try:
            yield self
        finally:
            self._request_rows = user

    def update(self, interventions, config: str | None = None) -> SteeringHandle:
        """Replace one config's interventions (same sites or a subset), in place."""
        self._require_live("update")
        name = config or self.config_names[0]
        if name not in self.configs:
            raise KeyError(f"update: unknown config {name!r}; known: {self.config_names}")
        ivs = [interventions] if is_affine(interventions) else list(interventions)
        for iv in ivs:
            check_intervention(iv, "update")
        terms = compose_affine(ivs, self.geo)
        if any(not is_affine(iv) for iv in [*ivs, *self.configs[name]]):
            return self._rebuild_with(name, ivs, terms)
        if self.mode == "fold":
            if set(terms) - set(self._terms[name]):
                raise ValueError("update: a folded handle cannot steer new sites; remove it and steer again")
            self.configs[name] = ivs
            self._terms[name] = terms
            folding.unfold(self.id, self._folded)
            self._folded = folding.fold(self.id, self.model_ref(), self.arch, terms)
            return self
        new_sites = [s for s in terms if s not in self.tables]
        if new_sites:
            raise ValueError(f"update: {new_sites[0]} has no table in this handle; steer it in a new handle")
        self.configs[name] = ivs
        self._terms[name] = terms
        self._write_row(1 + self.config_names.index(name), terms)
        return self

    def _rebuild_with(self, name: str, ivs: list, terms) -> SteeringHandle:
        """Replace a config that holds non-affine interventions: every table and applier is rebuilt,
        then written into the old tensors when the layout is unchanged (same kinds, sites and
        shapes), so a compiled model keeps its graphs; otherwise the new tensors replace them and a
        compiled model recompiles once. The steered sites may not grow."""
        self._require_dynamic("update")
        old_sites = set(self.tables) | set(self.appliers)
        new_sites = set(terms) | {iv.site for iv in ivs if not is_affine(iv)}
        if new_sites - old_sites:
            raise ValueError(
                f"update: {sorted(new_sites - old_sites)[0]} is not steered by this handle; steer it in a new handle"
            )
        self.configs[name] = ivs
        self._terms[name] = terms
        tables, appliers = self.tables, self.appliers
        self._build_tables(self.model_ref())
        if not self.trainable and _adopt((tables, appliers), (self.tables, self.appliers)):
            self.tables, self.appliers = tables, appliers
        return self

    def set_alpha(self, alpha: float, config: str | None = None) -> SteeringHandle:
        """Set ``alpha`` on every intervention of a config (all configs when None) that has one; in place."""
        self._require_live("set_alpha")
        alpha = finite_number(alpha, "set_alpha: alpha")
        names = [config] if config else self.config_names
        for name in names:
            if name not in self.configs:
                raise KeyError(f"set_alpha: unknown config {name!r}; known: {self.config_names}")
        for name in names:
            ivs = self.configs[name]
            for iv in ivs:
                if hasattr(iv, "alpha"):
                    iv.alpha = alpha
            self.update(ivs, name)
        return self

    @contextmanager
    def prompt_length(self, lengths: int | Sequence[int]) -> Iterator[SteeringHandle]:
        """Treat the first ``lengths`` tokens as the prompt (for full forwards of generated text)."""
        self._require_dynamic("prompt_length")
        t = torch.as_tensor(lengths, dtype=torch.long, device=self._device).reshape(-1)
        self._pinned_prompt_len = t
        try:
            yield self
        finally:
            self._pinned_prompt_len = None

    def parameters(self) -> list[Tensor]:
        """The trainable tensors of every intervention (each kind's ``trainable`` fields), made
        leaves that require grad; shared tensors are listed once. Pass them to an optimizer: a
        forward's loss reaches them through the steering ops' backward.

        Raises:
            ValueError: the handle was not made with ``steer(..., trainable=True)``.
        """
        self._require_live("parameters")
        if not self.trainable:
            raise ValueError("parameters: steer the model with trainable=True to train the interventions")
        seen: dict[int, Tensor] = {}
        for ivs in self.configs.values():
            for iv in ivs:
                for t in trainable_tensors(iv, self._device):
                    seen.setdefault(id(t), t)
        return list(seen.values())

    def frozen_prefix(self, max_bytes: int = 2 << 30):
        """A :class:`~pysteer.prefix_cache.FrozenPrefix` for the layers below this handle's lowest
        steered layer: training on repeated batches replays them instead of recomputing them.

        Raises:
            ValueError: a steered site is the embedding or layer 0 (there is no prefix to replay).
        """
        from .prefix_cache import FrozenPrefix

        self._require_dynamic("frozen_prefix")
        # a layer-output site (resid) is a hook on the layer itself, which runs on a replayed output
        first_live = {
            s: s.layer + 1 if s.kind == "resid" else s.layer for s in set(self.tables) | set(self.appliers)
        }
        lowest = min(first_live, key=first_live.get, default=None)
        if lowest is None or first_live[lowest] < 1:
            raise ValueError(
                f"frozen_prefix: the handle steers {lowest or 'nothing'}, so no frozen layer lies below it"
            )
        return FrozenPrefix(self.model_ref(), upto=first_live[lowest], max_bytes=max_bytes)

    def to_spec(self) -> SteeringSpec:
        """The handle's configs, positions and metadata (what ``pysteer.save`` writes)."""
        self._require_live("to_spec")
        return SteeringSpec(dict(self.configs), self.positions, dict(self.metadata))

    def remove(self) -> None:
        """Undo everything: folded weights are restored from the kept originals, hooks removed."""
        if self.removed:
            return
        model = self.model_ref()
        if self.mode == "fold":
            folding.unfold(self.id, self._folded)
            self._folded = []
        elif model is not None:
            _state(model).detach(self)
        self.removed = True

    def _require_live(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"{what}: the handle was removed; steer the model again for a new handle")

    def _require_dynamic(self, what: str) -> None:
        self._require_live(what)
        if self.mode != "dynamic":
            raise ValueError(
                f"{what}: needs mode='dynamic' (this handle folded its steering into the weights)"
            )

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else self.mode
        return f"SteeringHandle({state}, configs={self.config_names}, positions={self.positions!r}, backend={self.backend})"


class SteeringRuntime:
    """What a generation loop that owns positions (``pysteer.generate``'s fast path) tells the
    dynamic steering of one model.

    Outside a generation loop the decoder stack's pre-hook derives each token's position from the
    forward's attention mask and KV cache. A loop with a static cache and a compiled decode step
    keeps positions in fixed-address buffers instead and supplies them here; every forward until
    ``clear_positions()`` reads them.
    """

    def __init__(self, model: nn.Module):
        self._model_ref = weakref.ref(unwrap_model(model))

    def _state(self) -> _ModelState | None:
        model = self._model_ref()
        return None if model is None else _STATES.get(model)

    @property
    def active(self) -> bool:
        """Whether any dynamic steering is attached to the model."""
        state = self._state()
        return state is not None and bool(state.handles)

    def supply_positions(self, pos: Tensor, valid: Tensor, prompt_len: Tensor) -> None:
        """Positions of the next forwards: ``pos [B, S]`` from each row's first real token,
        ``valid [B, S]`` (False for padding) and ``prompt_len [B]`` real prompt tokens per row."""
        state = self._state()
        if state is not None:
            state.supplied_positions = (pos, valid, prompt_len)

    def clear_positions(self) -> None:
        """Back to positions derived from each forward's own arguments."""
        state = self._state()
        if state is not None:
            state.supplied_positions = None


def runtime(model: nn.Module) -> SteeringRuntime:
    """The :class:`SteeringRuntime` of ``model``."""
    return SteeringRuntime(model)


def _identity_at(site: Site):
    from .interventions import HeadScale, VectorScale

    return HeadScale(site.layer, scale=1.0) if site.kind == "attn.heads" else VectorScale(site.name, 1.0)


def reserve_tables(
    model: nn.Module, sites: Sequence[Site], capacity: int, backend: str | None = None
) -> SteeringHandle:
    """A dynamic handle with identity tables at ``sites`` and ``capacity`` free rows, steering nothing
    until ``handle.rows([...])`` writes per-request configs into it (the fast path's managed steering)."""
    if not sites:
        raise ValueError("reserve_tables: no sites")
    identity = [_identity_at(site) for site in sorted(set(sites))]
    return SteeringHandle(model, {"_reserved": identity}, mode="dynamic", backend=backend, capacity=capacity)


def steer(
    model: nn.Module,
    interventions,
    positions: Positions | None = None,
    mode: str = "auto",
    backend: str | None = None,
    capacity: int | None = None,
    projection: str = "separate",
    trainable: bool = False,
) -> SteeringHandle:
    """Steer ``model`` (a Hugging Face causal LM instance; nothing class-level is patched).

    Args:
        model: the model to patch.
        interventions: one intervention, a list (one config), ``{name: list}`` (per-request configs,
            selected per batch row with ``handle.rows``), or a ``SteeringSpec`` (``pysteer.load``).
        positions: ``"all"`` (default), ``"prompt"``, ``"generated"``, ``"last_prompt"``,
            ``"last_prompt+generated"`` (the last prompt token and every generated one: ITI), a list of
            positions counted from each sequence's first real token (negative: from the prompt's end),
            or one such list per batch row.
        mode: ``"fold"`` folds into projection weights (static, all positions, one config, affine
            interventions at a projection's input or output: ``pysteer.folding.FOLD_TARGETS``; prompt
            tokens are steered too), ``"dynamic"`` uses the steering ops, ``"auto"`` folds when that is
            exact and uses the ops otherwise.
        backend: op backend for dynamic steering (``cuda | triton | torch | auto``; default
            ``PYSTEER_BACKEND`` or auto).
        capacity: table rows to preallocate for configs (for ad-hoc per-request configs).
        projection: dynamic steering at ``attn.heads``: ``"separate"`` (default) applies the table
            op on the output projection's input; ``"fused"`` runs the projection as
            ``pysteer::affine_linear``, steering applied while it reads its input (one kernel, the
            steered input never written). Needs a plain ``nn.Linear`` projection and one handle per
            site; hooks on the projection's input (tracing ``attn.heads``) then see the unsteered
            input. Folded steering is unaffected.
        trainable: rebuild the tables from the interventions at every forward, so a loss reaches
            ``handle.parameters()`` (each kind's ``trainable`` tensor fields) through the ops'
            backward. Dynamic; per-request rows take config names.

    Returns:
        A ``SteeringHandle``; ``handle.remove()`` (or leaving its ``with`` block) restores the
        model bit-exactly.
    """
    return SteeringHandle(
        model,
        interventions,
        positions=positions,
        mode=mode,
        backend=backend,
        capacity=capacity,
        projection=projection,
        trainable=trainable,
    )
