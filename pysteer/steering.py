"""Patch a Hugging Face causal LM with steering; return a handle that undoes it bit-exactly.

``steer(model, interventions)`` validates everything, then either *folds* static steering into
the projection weights (free at run time) or installs *dynamic* steering: one hook per site that
applies the affine steering op ``x * M[r] + A[r]`` with preallocated tables ``M, A [C, H, D]``
and a row index ``r`` per token. Row 0 of every table is the identity and is never written.

The row index is computed once per forward, in a pre-hook on the decoder stack, from the batch
row's config (``handle.rows``) and the position rule. Positions are counted from each sequence's
first real token (``attention_mask.cumsum - 1``), so left padding and the KV cache are handled:
padding tokens are never steered, and a decode step knows whether its token is in the prompt.

Tables and the per-row config index are updated **in place** (``update``, ``set_alpha``, ``rows``),
so a compiled model sees the same tensors and does not recompile.
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

from ._backend import resolve_backend
from .interventions import compile_affine, finite_number, is_affine
from .models import forward_args
from .models.sites import Site, install_site_hook, resolve_site, site_shape
from .models.specs import (
    ArchSpec,
    ModelGeometry,
    geometry,
    get_spec,
    get_submodule,
    proj_weight_in_out,
    unwrap_model,
)
from .ops.affine import affine_steer
from .ops.affine_linear import affine_linear

log = logging.getLogger("pysteer")

POSITION_RULES = ("all", "prompt", "generated", "last_prompt")
MODES = ("auto", "fold", "dynamic")
PROJECTIONS = ("separate", "fused")
# Site kinds that fold, as data: the projection whose input ("in") or output ("out") the site is.
FOLD_TARGETS: dict[str, tuple[str, str]] = {
    "attn.q": ("q_proj", "out"),
    "attn.k": ("k_proj", "out"),
    "attn.v": ("v_proj", "out"),
    "attn.heads": ("attn_out_proj", "in"),
    "attn.out": ("attn_out_proj", "out"),
    "mlp.hidden": ("mlp_out_proj", "in"),
    "mlp.out": ("mlp_out_proj", "out"),
}
FOLDABLE_KINDS = tuple(FOLD_TARGETS)


def _fold_target(model: nn.Module, spec: ArchSpec, site: Site) -> tuple[nn.Module, str, str]:
    """``(projection, "in"|"out", its path)`` that steering at ``site`` folds into."""
    attr, side = FOLD_TARGETS[site.kind]
    path = getattr(spec, attr)
    layer = get_submodule(model, spec.layers)[site.layer]
    return get_submodule(layer, path), side, f"layers.{site.layer}.{path}"
POSITION_SLOTS = 8  # explicit positions preallocated per row, so most changes are in place
_NO_POSITION = -(2**40)  # sentinel that matches no position, even after adding a prompt length

Positions = str | Sequence[int] | Sequence[Sequence[int]]


@dataclass
class SteeringSpec:
    """Named configs of interventions plus a position rule: what ``pysteer.save`` writes.

    Attributes:
        configs: ``{name: [intervention, ...]}``; the first config is the default for every batch row.
        positions: ``"all" | "prompt" | "generated" | "last_prompt"``, a list of positions (negative
            ones count back from the end of the prompt: ``-1`` is the last prompt token), or one such
            list per batch row.
        metadata: free-form JSON-able information (e.g. how a recipe produced the steering).
    """

    configs: dict[str, list]
    positions: Positions = "all"
    metadata: dict = field(default_factory=dict)


def _normalise_configs(interventions) -> tuple[dict[str, list], Positions | None, dict]:
    if isinstance(interventions, SteeringSpec):
        return {k: list(v) for k, v in interventions.configs.items()}, interventions.positions, interventions.metadata
    if isinstance(interventions, Mapping):
        configs = {str(k): list(v) for k, v in interventions.items()}
    elif is_affine(interventions) or hasattr(interventions, "make_applier"):
        configs = {"default": [interventions]}
    else:
        configs = {"default": list(interventions)}
    if not configs:
        raise ValueError("steer: no configs given")
    return configs, None, {}


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, str):
        if positions not in POSITION_RULES:
            raise ValueError(f"unknown position rule {positions!r}; use one of {POSITION_RULES} or a list of positions")
        return
    seq = list(positions)
    if not seq:
        raise ValueError("positions: empty list")
    if all(isinstance(p, int) for p in seq):
        return
    if all(isinstance(p, Sequence) and not isinstance(p, str) and all(isinstance(q, int) for q in p) for p in seq):
        return
    raise ValueError("positions: expected a rule name, a list of ints, or one list of ints per batch row")


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_position_range(positions: Positions, limit: int | None) -> None:
    """Explicit positions must be tokens the model can hold: a position past the context length
    (or further back than it) would steer nothing, silently."""
    if isinstance(positions, str) or limit is None:
        return
    flat = [p for q in positions for p in ([q] if isinstance(q, int) else q)]
    bad = [p for p in flat if not -limit <= p < limit]
    if bad:
        raise ValueError(
            f"positions: {bad[0]} is outside the model's {limit}-token context "
            f"(explicit positions are in [-{limit}, {limit}); negative ones count back from the prompt's end)"
        )


# ------------------------------------------------------------------------------------------------
# per-model state: position bookkeeping and one dispatcher hook per site
# ------------------------------------------------------------------------------------------------


class _ModelState:
    """Everything pysteer attached to one model instance (dynamic steering only)."""

    def __init__(self, model: nn.Module):
        self.spec: ArchSpec = get_spec(model)
        self.geo: ModelGeometry = geometry(model, self.spec)
        self.model_ref = weakref.ref(model)
        self.handles: list[SteeringHandle] = []
        self.site_handles: dict[Site, list[SteeringHandle]] = {}
        self.site_hooks: dict[Site, RemovableHandle] = {}
        self.fused: dict[Site, nn.Module] = {}  # attn.heads sites steered inside their projection
        stack_path = self.spec.layers.rsplit(".", 1)[0]
        self.stack = get_submodule(model, stack_path)
        self.root_hook: RemovableHandle | None = None
        self.prompt_len: Tensor | None = None  # [B] real prompt tokens per row, set at prefill
        # Set by a generation loop that owns positions (the fast path): (pos [B,S], valid [B,S], prompt_len [B])
        self.external: tuple[Tensor, Tensor, Tensor] | None = None

    # -- positions ---------------------------------------------------------------------------------
    def _root_pre_hook(self, module, args, kwargs):
        if self.external is not None:
            pos, valid, prompt_len = self.external
            for h in self.handles:
                h._compute_rows(pos, valid, prompt_len)
            return None
        ref = forward_args.input_tensor(args, kwargs)
        if ref is None:
            raise ValueError("pysteer: the forward got neither input_ids nor inputs_embeds")
        B, S = ref.shape[0], ref.shape[1]
        device = ref.device
        mask = forward_args.attention_mask_2d(args, kwargs)
        past_len = forward_args.past_length(module, args, kwargs, S)
        if mask is not None and mask.shape[-1] >= S:
            m = mask.to(torch.long)
            pos = (m.cumsum(-1) - 1)[:, -S:]
            valid = m[:, -S:].bool()
        else:
            pos = (torch.arange(S, device=device) + past_len).expand(B, S)
            valid = torch.ones(B, S, dtype=torch.bool, device=device)
        # A forward with an empty cache is a prefill: it fixes each row's prompt length (real tokens);
        # decode steps keep it. Without a cache every forward is a prefill. The test stays a tensor op
        # when the cache length is a tensor (static caches), so it neither syncs nor breaks a graph.
        new_len = valid.sum(-1)
        if self.prompt_len is None or self.prompt_len.shape[0] != B or not isinstance(past_len, Tensor):
            if self.prompt_len is None or self.prompt_len.shape[0] != B or past_len == 0:
                self.prompt_len = new_len
        else:
            self.prompt_len = torch.where(past_len == 0, new_len, self.prompt_len)
        for h in self.handles:
            h._compute_rows(pos, valid, self.prompt_len)
        return None

    # -- hooks -----------------------------------------------------------------------------------------
    def attach(self, handle: SteeringHandle, sites: Sequence[Site]) -> None:
        model = self.model_ref()
        if self.root_hook is None:
            self.root_hook = self.stack.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True, prepend=True)
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
            proj = resolve_site(model, site, self.spec).module
            proj.forward = _fused_forward(proj, handle, site)  # an instance attribute: nothing class-level
            self.fused[site] = proj
            return
        if site not in self.site_hooks:
            resolved = resolve_site(model, site, self.spec)
            self.site_hooks[site] = install_site_hook(resolved, self._make_site_fn(site), prepend=True)

    def _make_site_fn(self, site: Site):
        handles = self.site_handles[site]

        def site_fn(x: Tensor) -> Tensor:
            for h in handles:
                x = h._apply(site, x)
            return x

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
        if not self.handles and self.root_hook is not None:
            self.root_hook.remove()
            self.root_hook = None
            self.prompt_len = None


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
        rows = handle._rows
        if rows is None:
            return plain(proj, z)
        K = z.shape[-1]
        T = z.numel() // K
        _check_token_count(site, T, rows)
        M, A = handle.tables[site]
        out = affine_linear(z.reshape(T, K), rows, M, A, proj.weight, proj.bias, backend=handle.backend)
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
            raise ValueError(f"steer(projection='fused'): {where} already has its forward replaced (e.g. by accelerate)")


def _check_materialised(model: nn.Module) -> None:
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(
                f"steer: {name} is on the meta device (the model's weights are not loaded); "
                "load or materialise the weights before steering"
            )


def _unfoldable_projection(model: nn.Module, spec: ArchSpec, compiled) -> str | None:
    """Why a projection the steering would fold into cannot take it, or None.

    Fold rewrites ``weight`` and ``bias`` of a plain ``nn.Linear`` (or GPT-2's ``Conv1D``). A PEFT
    LoRA wrapper computes more than its weight (folding ignored the LoRA branch, and adding a bias
    to it failed after the weight was already scaled), and a quantised linear stores no float weight.
    """
    from transformers.pytorch_utils import Conv1D

    for rows in compiled.values():
        for site in rows:
            if site.kind not in FOLD_TARGETS:
                continue
            proj, _, where = _fold_target(model, spec, site)
            if type(proj) not in (nn.Linear, Conv1D):
                return f"{where} is a {type(proj).__module__}.{type(proj).__name__}, not a plain Linear (a wrapper such as PEFT LoRA, or a quantised layer)"
            weight = proj.weight
            if weight.is_meta or not weight.dtype.is_floating_point:
                return f"{where}.weight is {'on the meta device' if weight.is_meta else weight.dtype}"
    return None


def _state(model: nn.Module) -> _ModelState:
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = _ModelState(model)
    return st


# ------------------------------------------------------------------------------------------------
# folding into projection weights
# ------------------------------------------------------------------------------------------------


class _FoldSlot:
    """Original weights of one projection plus the folded edits applied to it, in order."""

    def __init__(self, module: nn.Module, layout: str):
        self.module = module
        self.layout = layout
        self.orig_weight = module.weight.detach().clone()
        bias = getattr(module, "bias", None)
        self.orig_bias = bias.detach().clone() if bias is not None else None
        self.entries: list[tuple[int, str, Tensor, Tensor]] = []  # (handle id, "in"|"out", m, a)

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
        for _, side, m, a in self.entries:
            if side == "in":
                m_in, a_in = m_in * m, a_in * m + a
            else:
                m_out, a_out = m_out * m, a_out * m + a
        W = self.orig_weight.float()
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


_FOLD_SLOTS: weakref.WeakKeyDictionary[nn.Module, _FoldSlot] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------
# the handle
# ------------------------------------------------------------------------------------------------

_handle_ids = itertools.count(1)


class SteeringHandle:
    """Steering attached to one model; use as a context manager or call ``remove()``.

    Attributes:
        mode: ``"fold"`` or ``"dynamic"`` (what ``"auto"`` resolved to).
        backend: op backend used by dynamic steering.
        config_names: names of the configs, in row order (row 1 is the first).
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
    ):
        if mode not in MODES:
            raise ValueError(f"steer: unknown mode {mode!r}; use one of {MODES}")
        if projection not in PROJECTIONS:
            raise ValueError(f"steer: unknown projection {projection!r}; use one of {PROJECTIONS}")
        self.projection = projection
        model = unwrap_model(model)
        _check_materialised(model)
        configs, spec_positions, metadata = _normalise_configs(interventions)
        positions = positions if positions is not None else (spec_positions if spec_positions is not None else "all")
        _check_positions(positions)
        _check_position_range(positions, _max_positions(model))
        spec = get_spec(model)
        geo = geometry(model, spec)
        # ---- validate and compile everything before touching the model ----
        compiled = {name: compile_affine(ivs, geo) for name, ivs in configs.items()}
        custom = {name: [iv for iv in ivs if not is_affine(iv)] for name, ivs in configs.items()}
        for name, ivs in configs.items():
            for iv in ivs:
                if not is_affine(iv) and not hasattr(iv, "make_applier"):
                    raise TypeError(f"steer: config {name!r}: {type(iv).__name__} is not an intervention")
        has_custom = any(custom.values())
        fold_reason = self._fold_blocker(compiled, has_custom, positions)
        if fold_reason is None:
            fold_reason = _unfoldable_projection(model, spec, compiled)
            if fold_reason is not None and mode == "auto":
                _log_once(f"pysteer: steering dynamically, not folded: {fold_reason}")
        if mode == "fold" and fold_reason:
            raise ValueError(f"steer(mode='fold'): cannot fold: {fold_reason}; use mode='dynamic'")
        self.mode = "fold" if mode == "fold" or (mode == "auto" and not fold_reason) else "dynamic"
        self.model_ref = weakref.ref(model)
        self.id = next(_handle_ids)
        self.spec, self.geo = spec, geo
        self.configs = configs
        self.positions = positions
        self.metadata = metadata
        self.config_names = list(configs)
        self.removed = False
        self._device = next(model.parameters()).device
        self.backend = resolve_backend(backend, self._device) if self.mode == "dynamic" else "torch"
        self._compiled = compiled
        if self.mode == "fold":
            self._fold(model)
            return
        # ---- dynamic: tables, row buffers, custom appliers ----
        n_cfg = len(configs)
        self.capacity = max(capacity or 0, n_cfg)
        C = 1 + self.capacity
        sites = sorted({s for rows in compiled.values() for s in rows})
        self.tables: dict[Site, tuple[Tensor, Tensor]] = {}
        for site in sites:
            self._new_table(site, C)
        self.appliers: dict[Site, list] = {}
        for row, name in enumerate(configs, start=1):
            self._write_row(row, compiled[name])
        # non-affine interventions: one applier per (site, key), built from every config's edits
        groups: dict[tuple, list[tuple[int, object]]] = {}
        for row, name in enumerate(configs, start=1):
            for iv in custom[name]:
                groups.setdefault((iv.site, iv.applier_key()), []).append((row, iv))
        for (site, _), items in groups.items():
            ivs = [iv for _, iv in items]
            applier = ivs[0].make_applier(model, resolve_site(model, site, spec), C, self._device, ivs)
            for row, iv in items:
                applier.write_row(row, iv)
            self.appliers.setdefault(site, []).append(applier)
        self._free_rows = list(range(1 + n_cfg, C))
        self._adhoc_rows: list[int] = []
        self._batch_rows: Tensor | None = None  # [n] int32: config row per batch row
        self._pinned_prompt_len: Tensor | None = None
        self._rows: Tensor | None = None  # [B*S] int32, computed per forward
        self._build_position_table()
        attach_sites = sorted(set(sites) | set(self.appliers))
        if self.projection == "fused":
            _check_fusable(model, spec, attach_sites)
        state = _state(model)
        state.check_attachable(self, attach_sites)
        try:
            state.attach(self, attach_sites)
        except BaseException:
            state.detach(self)  # no hook of a failed patch stays behind
            raise

    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _fold_blocker(compiled, has_custom: bool, positions) -> str | None:
        if len(compiled) != 1:
            return "several configs (per-request steering needs the dynamic op)"
        if positions != "all":
            return f"positions={positions!r} (folding applies to every token, prompt included)"
        if has_custom:
            return "non-affine interventions (e.g. SAE edits) do not fold"
        for rows in compiled.values():
            for site in rows:
                if site.kind not in FOLDABLE_KINDS:
                    return f"site {site} is not a projection's input or output (the kinds {FOLDABLE_KINDS} fold)"
        return None

    def _fold(self, model: nn.Module) -> None:
        (rows,) = self._compiled.values()
        self._fold_modules: list[nn.Module] = []
        planned = []
        for site, (m, a) in rows.items():
            proj, side, _ = _fold_target(model, self.spec, site)
            planned.append((proj, side, m.reshape(-1), a.reshape(-1)))
        try:
            for proj, side, m, a in planned:
                slot = _FOLD_SLOTS.get(proj)
                if slot is None:
                    slot = _FOLD_SLOTS[proj] = _FoldSlot(proj, self.spec.proj_layout)
                dev = slot.orig_weight.device
                self._fold_modules.append(proj)
                slot.entries.append((self.id, side, m.to(dev), a.to(dev)))
                slot.recompute()
        except BaseException:
            self._unfold()  # every projection this handle touched goes back to its kept original
            raise

    def _unfold(self) -> None:
        for proj in dict.fromkeys(self._fold_modules):
            slot = _FOLD_SLOTS.get(proj)
            if slot is None:
                continue
            slot.entries = [e for e in slot.entries if e[0] != self.id]
            slot.recompute()
            if not slot.entries:
                del _FOLD_SLOTS[proj]
        self._fold_modules = []

    def _new_table(self, site: Site, C: int) -> None:
        H, D = site_shape(site, self.geo)
        M = torch.ones(C, H, D, dtype=torch.float32, device=self._device)
        A = torch.zeros(C, H, D, dtype=torch.float32, device=self._device)
        self.tables[site] = (M, A)

    def _write_row(self, row: int, site_rows: dict[Site, tuple[Tensor, Tensor]]) -> None:
        """Write one config's rows in place; sites the config does not touch get the identity."""
        for site, (M, A) in self.tables.items():
            m, a = site_rows.get(site, (None, None))
            with torch.no_grad():
                if m is None:
                    M[row].fill_(1.0)
                    A[row].zero_()
                else:
                    M[row].copy_(m)
                    A[row].copy_(a)

    def _build_position_table(self) -> None:
        """Encode the position rule as tensors so changing it never recompiles a compiled model.

        ``_pos_code [R]`` holds a rule per batch row (R = 1 when shared): 0 all, 1 prompt,
        2 generated, 3 last prompt token, 4 explicit positions listed in ``_pos_list [R, P]``
        (unused slots hold a sentinel that matches nothing; negative entries count back from the
        end of the prompt).
        """
        p = self.positions
        if isinstance(p, str):
            codes, lists = [POSITION_RULES.index(p)], [[]]
        else:
            lists = [list(p)] if all(isinstance(q, int) for q in p) else [list(q) for q in p]
            codes = [4] * len(lists)
        width = max(POSITION_SLOTS, max(len(q) for q in lists))
        table = torch.full((len(lists), width), _NO_POSITION, dtype=torch.long)
        for i, q in enumerate(lists):
            table[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        code = torch.tensor(codes, dtype=torch.long)
        old_code, old_table = getattr(self, "_pos_code", None), getattr(self, "_pos_list", None)
        if old_code is not None and old_code.shape == code.shape and old_table.shape == table.shape:
            old_code.copy_(code)  # in place: same tensors, no recompilation
            old_table.copy_(table)
        else:
            self._pos_code = code.to(self._device)
            self._pos_list = table.to(self._device)

    def set_positions(self, positions: Positions) -> SteeringHandle:
        """Change the position rule, in place when the encoding keeps its shape."""
        self._require_dynamic("set_positions")
        _check_positions(positions)
        _check_position_range(positions, _max_positions(self.model_ref()))
        self.positions = positions
        self._build_position_table()
        return self

    # -- per forward -------------------------------------------------------------------------------
    def _compute_rows(self, pos: Tensor, valid: Tensor, prompt_len: Tensor) -> None:
        """Row index per token ``[B*S]`` int32 from positions ``[B, S]`` (tensor ops only)."""
        B, S = pos.shape
        if self._pinned_prompt_len is not None:
            prompt_len = self._pinned_prompt_len.to(pos.device)
        br = self._batch_rows
        if br is None:
            br = torch.ones(B, dtype=torch.int32, device=pos.device)
        elif br.shape[0] != B:
            if B % br.shape[0]:
                raise ValueError(
                    f"pysteer: handle.rows() was given {br.shape[0]} batch rows but the batch has {B}"
                )
            br = br.repeat_interleave(B // br.shape[0])  # generate() expands rows for beams / samples
        if not torch.compiler.is_compiling() and self.positions == "all":
            # Eager shortcut for the common rule (same result as the tensor encoding, a tenth of the
            # small ops). Compiled graphs keep the encoding (is_compiling() first, so Dynamo never
            # guards on the rule) and set_positions never recompiles.
            sel = valid
        else:
            sel = self._rule_selects(pos, prompt_len) & valid
        self._rows = torch.where(sel, br[:, None].to(pos.device), 0).reshape(-1).to(torch.int32)

    def _rule_selects(self, pos: Tensor, prompt_len: Tensor) -> Tensor:
        """``[B, S]`` bool: the tokens the tensor-encoded position rule selects."""
        B = pos.shape[0]
        code, plist = self._pos_code, self._pos_list
        if code.shape[0] not in (1, B):
            raise ValueError(f"pysteer: positions were given for {code.shape[0]} batch rows but the batch has {B}")
        pl = prompt_len[:, None]
        code = code[:, None]
        target = torch.where(plist < 0, plist + pl, plist)  # [R|B, P]
        explicit = (pos[:, :, None] == target[:, None, :]).any(-1)
        return torch.where(
            code == 0,
            True,
            torch.where(
                code == 1,
                pos < pl,
                torch.where(code == 2, pos >= pl, torch.where(code == 3, pos == pl - 1, explicit)),
            ),
        )

    def _apply(self, site: Site, x: Tensor) -> Tensor:
        rows = self._rows
        if rows is None:
            return x
        W = x.shape[-1]
        T = x.numel() // W  # [B, S, W], or [B*S, W] where a model flattens tokens (OPT's MLP)
        _check_token_count(site, T, rows)
        tab = self.tables.get(site)
        H = site_shape(site, self.geo)[0]
        y = x.reshape(T, H, W // H)
        if tab is not None:
            y = affine_steer(y, rows, tab[0], tab[1], self.backend)
        for applier in self.appliers.get(site, ()):
            y = applier.apply(y, rows, self.backend)
        return y.reshape(x.shape)

    # -- public API ------------------------------------------------------------------------------
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
            self._batch_rows = None
            return self
        for row in self._adhoc_rows:
            self._free_rows.append(row)
        self._adhoc_rows = []
        idx = []
        pending = []
        for item in per_request:
            if item is None:
                idx.append(0)
            elif isinstance(item, str):
                if item not in self.configs:
                    raise KeyError(f"rows: unknown config {item!r}; known: {self.config_names}")
                idx.append(1 + self.config_names.index(item))
            else:
                ivs = [item] if is_affine(item) else list(item)
                if any(not is_affine(iv) for iv in ivs):
                    raise TypeError("rows: ad-hoc configs may hold affine interventions only")
                compiled = compile_affine(ivs, self.geo)
                missing = [s for s in compiled if s not in self.tables]
                if missing:
                    raise ValueError(
                        f"rows: ad-hoc config steers {missing[0]}, which this handle has no table for; "
                        "include that site in one of the handle's configs"
                    )
                pending.append(compiled)
                idx.append(-len(pending))
        if len(pending) > len(self._free_rows):
            raise ValueError(
                f"rows: {len(pending)} ad-hoc configs but only {len(self._free_rows)} free table rows; "
                "pass capacity= to steer()"
            )
        for k, compiled in enumerate(pending, start=1):
            row = self._free_rows.pop(0)
            self._adhoc_rows.append(row)
            self._write_row(row, compiled)
            idx = [row if i == -k else i for i in idx]
        t = torch.tensor(idx, dtype=torch.int32, device=self._device)
        if self._batch_rows is not None and self._batch_rows.shape == t.shape:
            self._batch_rows.copy_(t)
        else:
            self._batch_rows = t
        return self

    @property
    def assigned_rows(self) -> int | None:
        """How many batch rows the last ``rows()`` call covered; None when every row takes the first config."""
        return None if self._batch_rows is None else int(self._batch_rows.shape[0])

    @contextmanager
    def padded_rows(self, batch: int) -> Iterator[SteeringHandle]:
        """Inside the block, batch rows past those ``rows()`` named are padding and stay unsteered.

        For a generation loop that pads a batch of requests up to a fixed size (the fast path's
        batch buckets); the assignment the user made is back in place afterwards.
        """
        self._require_dynamic("padded_rows")
        user = self._batch_rows
        if user is None or user.shape[0] >= batch:
            yield self
            return
        self._batch_rows = torch.cat([user, torch.zeros(batch - user.shape[0], dtype=torch.int32, device=user.device)])
        try:
            yield self
        finally:
            self._batch_rows = user

    def update(self, interventions, config: str | None = None) -> SteeringHandle:
        """Replace one config's interventions (same sites or a subset), in place."""
        self._require_live("update")
        name = config or self.config_names[0]
        if name not in self.configs:
            raise KeyError(f"update: unknown config {name!r}; known: {self.config_names}")
        ivs = [interventions] if is_affine(interventions) else list(interventions)
        compiled = compile_affine(ivs, self.geo)
        if self.mode == "fold":
            if set(compiled) - set(self._compiled[name]):
                raise ValueError("update: a folded handle cannot steer new sites; remove it and steer again")
            self.configs[name] = ivs
            self._compiled[name] = compiled
            self._unfold()
            self._fold(self.model_ref())
            return self
        new_sites = [s for s in compiled if s not in self.tables]
        if new_sites:
            raise ValueError(f"update: {new_sites[0]} has no table in this handle; steer it in a new handle")
        self.configs[name] = ivs
        self._compiled[name] = compiled
        self._write_row(1 + self.config_names.index(name), compiled)
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

    def spec_(self) -> SteeringSpec:
        self._require_live("spec_")
        return SteeringSpec(dict(self.configs), self.positions, dict(self.metadata))

    def remove(self) -> None:
        """Undo everything: folded weights are restored from the kept originals, hooks removed."""
        if self.removed:
            return
        model = self.model_ref()
        if self.mode == "fold":
            self._unfold()
        elif model is not None:
            _state(model).detach(self)
        self.removed = True

    def _require_live(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"{what}: the handle was removed; steer the model again for a new handle")

    def _require_dynamic(self, what: str) -> None:
        self._require_live(what)
        if self.mode != "dynamic":
            raise ValueError(f"{what}: needs mode='dynamic' (this handle folded its steering into the weights)")

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
            state.external = (pos, valid, prompt_len)

    def clear_positions(self) -> None:
        """Back to positions derived from each forward's own arguments."""
        state = self._state()
        if state is not None:
            state.external = None


def runtime(model: nn.Module) -> SteeringRuntime:
    """The :class:`SteeringRuntime` of ``model``."""
    return SteeringRuntime(model)


def _identity_at(site: Site):
    from .interventions import HeadScale, VectorScale

    return HeadScale(site.layer, scale=1.0) if site.kind == "attn.heads" else VectorScale(site.name, 1.0)


def reserve_tables(model: nn.Module, sites: Sequence[Site], capacity: int, backend: str | None = None) -> SteeringHandle:
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
) -> SteeringHandle:
    """Steer ``model`` (a Hugging Face causal LM instance; nothing class-level is patched).

    Args:
        model: the model to patch.
        interventions: one intervention, a list (one config), ``{name: list}`` (per-request configs,
            selected per batch row with ``handle.rows``), or a ``SteeringSpec`` (``pysteer.load``).
        positions: ``"all"`` (default), ``"prompt"``, ``"generated"``, ``"last_prompt"``, a list of
            positions counted from each sequence's first real token (negative: from the prompt's end),
            or one such list per batch row.
        mode: ``"fold"`` folds into projection weights (static, all positions, one config, sites
            ``attn.heads``/``attn.out``/``mlp.out``; prompt tokens are steered too), ``"dynamic"`` uses
            the steering op, ``"auto"`` folds when that is exact and uses the op otherwise.
        backend: op backend for dynamic steering (``cuda | triton | torch | auto``; default
            ``PYSTEER_BACKEND`` or auto).
        capacity: table rows to preallocate for configs (for ad-hoc per-request configs).
        projection: dynamic steering at ``attn.heads``: ``"separate"`` (default) applies the table
            op on the output projection's input; ``"fused"`` runs the projection as
            ``pysteer::affine_linear``, steering applied while it reads its input (one kernel, the
            steered input never written). Needs a plain ``nn.Linear`` projection and one handle per
            site; hooks on the projection's input (tracing ``attn.heads``) then see the unsteered
            input. Folded steering is unaffected.

    Returns:
        A ``SteeringHandle``; ``handle.remove()`` (or leaving its ``with`` block) restores the
        model bit-exactly.
    """
    return SteeringHandle(
        model, interventions, positions=positions, mode=mode, backend=backend, capacity=capacity, projection=projection
    )
