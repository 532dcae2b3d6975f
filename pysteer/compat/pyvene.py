"""pyvene (stanfordnlp/pyvene) and pyreft, in place: ``IntervenableModel`` calls through pysteer's hooks.

``pysteer.compat.accelerate("pyvene")`` (or ``"pyreft"``, whose ``ReftModel`` is an
``IntervenableModel``) replaces ``IntervenableModel.forward`` and ``generate`` with versions that
convert the call's interventions and ``unit_locations`` into pysteer interventions and positions,
run the wrapped model under one dynamic ``pysteer.steer`` handle per intervention (in pyvene's
order), and return what pyvene returns. What converts (everything else runs pyvene's own code):

- intervention types, taken exactly (not subclasses, which may override ``forward``):
  ``AdditionIntervention`` / ``SubtractionIntervention`` with a fixed ``source_representation``
  (``VectorAdd``), ``ZeroIntervention`` (``VectorScale`` by 0), ``VanillaIntervention`` with a fixed
  source (``x * 0 + source``), and pyreft's ``LoreftIntervention`` with its linear activation and
  no active dropout (``pysteer.LoReFT``); each on the first ``interchange_dim`` channels as pyvene;
- components whose tensor is a pysteer site (``COMPONENT_SITES``; ``mlp_input``,
  ``attention_input``, ``mlp_activation`` and the per-head ``head_*`` forms have none), unit
  ``"pos"`` with one unit;
- ``unit_locations`` for the base only, one list of positions per batch row (or the broadcast forms
  pyvene accepts); they index the padded batch, and pysteer counts from each row's first real
  token, so each is converted through the row's attention mask. ``generate``:
  ``intervene_on_prompt=True`` edits those prompt positions in the prompt's forward,
  ``intervene_on_prompt=False`` (position 0 of each decode step, pyvene's default) every generated
  token, and no locations at all every token of every forward.

Falling back, with a one-time warning naming the reason: sources (interchange from a source run),
``source_representations``, ``subspaces``, ``CollectIntervention`` and other types, trainable types
other than LoReFT, linked or adaptor interventions, ``mode="serial"``, a base with
``past_key_values`` / ``position_ids``, a location on a padding token, a model that is not float32
(pyvene rounds the edit in the model's dtype), and a ``forward`` that needs gradients for the
interventions' parameters: training through pyvene (pyreft's trainer) runs on pyvene's path,
because pysteer would treat the weights as constants. One difference logits do not show: with no
locations pyvene also edits padding tokens, pysteer leaves them alone; only the padding positions'
own outputs differ, which no real token attends to.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..interventions import VectorAdd, VectorScale
from ..models.sites import resolve_site
from ..models.specs import UnsupportedArchitecture, get_spec, get_submodule
from ..reft import LoReFT
from .pyreft import COMPONENT_SITES, REPRESENTATION_FIELDS

LIBRARY = "pyvene"
KNOWN_REPRESENTATION_FIELDS = REPRESENTATION_FIELDS  # pyvene 0.1.8's RepresentationConfig
FORWARD_PARAMETERS = (
    "self",
    "base",
    "sources",
    "unit_locations",
    "source_representations",
    "subspaces",
    "labels",
    "output_original_output",
    "return_dict",
    "use_cache",
    "intervention_additional_kwargs",
)
GENERATE_PARAMETERS = (
    "self",
    "base",
    "sources",
    "unit_locations",
    "source_representations",
    "intervene_on_prompt",
    "subspaces",
    "output_original_output",
    "intervention_additional_kwargs",
    "kwargs",
)
LOREFT_FORWARD_PARAMETERS = ("self", "base", "source", "subspaces")  # pyreft 0.1.0
ADDITIVE_TYPES = {"AdditionIntervention": 1.0, "SubtractionIntervention": -1.0}
BASE_KEYS_WITH_OWN_POSITIONS = ("past_key_values", "position_ids", "cache_position")
EVERY_PROMPT_TOKEN = f"f{2**31 - 1}"  # LoReFT positions that leave the choice to the handle's rule


@dataclass
class Edit:
    """One pyvene intervention as pysteer interventions and the positions of one handle."""

    key: str
    interventions: list
    positions: str | list[list[int]]


class Accelerator:
    """pyvene's ``IntervenableModel.forward`` / ``generate`` routed through pysteer (module docstring).

    Each covered call steers the wrapped model with fresh dynamic handles and removes them before
    returning, as pyvene registers and removes its hooks per call; pyvene's own per-call state
    (its hook clean-up, which removes every hook of the model, and its counters) is kept as pyvene
    keeps it.
    """

    def __init__(self, module, version: str):
        from .inplace import _check_names, check_parameters

        self.library = importlib.import_module("pyvene") if module.__name__ != "pyvene" else module
        self.version = version
        cls = self.library.IntervenableModel
        fields = self.library.RepresentationConfig._fields
        _check_names(LIBRARY, version, "RepresentationConfig field", fields, KNOWN_REPRESENTATION_FIELDS)
        check_parameters(LIBRARY, version, cls.forward, FORWARD_PARAMETERS)
        check_parameters(LIBRARY, version, cls.generate, GENERATE_PARAMETERS)
        self.loreft = _loreft_class(version)
        self.interventions = importlib.import_module("pyvene.models.interventions")
        self.base_module = importlib.import_module("pyvene.models.intervenable_base")
        self.originals: dict = {}

    def replacements(self) -> list:
        from .inplace import Replacement

        cls = self.library.IntervenableModel
        return [
            Replacement(cls, "forward", self._replacement_forward()),
            Replacement(cls, "generate", self._replacement_generate()),
        ]

    def _replacement_forward(self):
        def forward(
            intervenable,
            base,
            sources=None,
            unit_locations=None,
            source_representations=None,
            subspaces=None,
            labels=None,
            output_original_output=False,
            return_dict=None,
            use_cache=None,
            intervention_additional_kwargs=None,
        ):
            """pyvene's ``IntervenableModel.forward``, through pysteer's hooks where it can."""
            call = dict(
                sources=sources,
                unit_locations=unit_locations,
                source_representations=source_representations,
                subspaces=subspaces,
                labels=labels,
                output_original_output=output_original_output,
                return_dict=return_dict,
                use_cache=use_cache,
                intervention_additional_kwargs=intervention_additional_kwargs,
            )
            return self.forward(intervenable, base, call)

        return forward

    def _replacement_generate(self):
        def generate(
            intervenable,
            base,
            sources=None,
            unit_locations=None,
            source_representations=None,
            intervene_on_prompt=False,
            subspaces=None,
            output_original_output=False,
            intervention_additional_kwargs=None,
            **kwargs,
        ):
            """pyvene's ``IntervenableModel.generate``, through pysteer's hooks where it can."""
            call = dict(
                sources=sources,
                unit_locations=unit_locations,
                source_representations=source_representations,
                intervene_on_prompt=intervene_on_prompt,
                subspaces=subspaces,
                output_original_output=output_original_output,
                intervention_additional_kwargs=intervention_additional_kwargs,
            )
            return self.generate(intervenable, base, call, kwargs)

        return generate

    def release(self) -> None:
        """Nothing to hand back: no pysteer handle outlives the call that made it."""

    # -- the two calls -------------------------------------------------------------------------------
    def forward(self, intervenable, base, call: dict):
        from .inplace import warn_fallback

        edits = self.plan(intervenable, base, call, generation=None)
        if isinstance(edits, str):
            warn_fallback(LIBRARY, edits)
            return self.originals["forward"](intervenable, base, **call)
        model = intervenable.model
        intervenable.full_intervention_outputs.clear()
        intervenable._cleanup_states()
        try:
            original = model(**base) if call["output_original_output"] else None
            model_kwargs = {}
            if call["labels"] is not None:
                model_kwargs["labels"] = call["labels"]
            if call["use_cache"] is not None and "use_cache" in model.config.to_dict():
                model_kwargs["use_cache"] = call["use_cache"]
            with _steered(model, edits):
                intervened = model(**base, **model_kwargs)
        finally:
            intervenable._cleanup_states()
        if call["return_dict"]:
            return self.base_module.IntervenableModelOutput(
                original_outputs=original, intervened_outputs=intervened, collected_activations=None
            )
        return original, intervened

    def generate(self, intervenable, base, call: dict, kwargs: dict):
        from .inplace import warn_fallback

        edits = self.plan(intervenable, base, call, generation=kwargs)
        if isinstance(edits, str):
            warn_fallback(LIBRARY, edits)
            return self.originals["generate"](intervenable, base, **call, **kwargs)
        model = intervenable.model
        intervenable._cleanup_states()
        intervenable._intervene_on_prompt = call["intervene_on_prompt"]
        try:
            original = model.generate(**base, **kwargs) if call["output_original_output"] else None
            with _steered(model, edits):
                intervened = model.generate(**base, **kwargs)
        finally:
            intervenable._cleanup_states()
        return original, intervened

    # -- conversion ----------------------------------------------------------------------------------
    def plan(self, intervenable, base, call: dict, generation: dict | None) -> list[Edit] | str:
        """The call as one ``Edit`` per intervention in pyvene's order, or why pysteer cannot run it
        exactly. ``generation`` is ``generate``'s keyword arguments (None for ``forward``)."""
        reason = _uncovered_call(intervenable, base, call, generation)
        if reason is not None:
            return reason
        model = intervenable.model
        try:
            spec = get_spec(model)
        except UnsupportedArchitecture:
            return (
                f"model_type {getattr(model.config, 'model_type', None)!r} has no pysteer architecture spec"
            )
        try:
            get_submodule(model, spec.layers)
        except AttributeError:  # a bare base model (GPT2Model, LlamaModel): pysteer steers *ForCausalLM
            return f"{type(model).__name__} has no {spec.layers} (pysteer's sites are on the causal LM)"
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            return (
                f"model dtype {dtype} (pyvene rounds each edit in the model's dtype; pysteer covers float32)"
            )
        batch = _batch(base)
        if batch is None:
            return "base has neither input_ids nor inputs_embeds"
        locations = intervenable._broadcast_unit_locations(batch[0], _default_locations(call, generation))
        base_locations = locations.get("sources->base", (None, None))[1]
        if base_locations is None:
            return "unit_locations without base locations"
        mask = base.get("attention_mask")
        edits = []
        for key in [k for keys in intervenable._intervention_group.values() for k in keys]:
            edit = self._edit(intervenable, key, model, spec, base_locations, batch, mask, call, generation)
            if isinstance(edit, str):
                return f"{key}: {edit}"
            edits.append(edit)
        return edits

    def _edit(self, intervenable, key, model, spec, base_locations, batch, mask, call, generation):
        rep = intervenable.representations[key]
        if rep.unit != "pos" or rep.max_number_of_units != 1:
            return f"unit {rep.unit!r} x {rep.max_number_of_units} (pysteer covers unit 'pos' with one unit)"
        if rep.component not in COMPONENT_SITES:
            return f"component {rep.component!r} has no pysteer site"
        site = f"layers.{rep.layer}.{COMPONENT_SITES[rep.component]}"
        try:
            resolved = resolve_site(model, site, spec)
        except ValueError as err:
            return str(err)
        if not _hooks_site_tensor(intervenable.intervention_hooks[key], resolved, model, spec, rep.component):
            return f"pyvene hooks another tensor than pysteer's {site}"
        ivs = self._interventions(intervenable.interventions[key], site, resolved.width)
        if isinstance(ivs, str):
            return ivs
        index = intervenable.sorted_keys.index(key)
        locs = base_locations[index] if index < len(base_locations) else None
        positions, reason = _positions(locs, batch, mask, intervenable.use_fast, call, generation)
        if reason is not None:
            return reason
        for iv in ivs:
            if isinstance(iv, LoReFT):
                iv.every_step = positions in ("all", "generated")
        return Edit(key, ivs, positions)

    def _interventions(self, iv, site: str, width: int) -> list | str:
        """pysteer interventions computing what ``iv`` computes at ``site``, or why none do."""
        name = type(iv).__name__
        exact = type(iv) is getattr(self.interventions, name, None)
        if isinstance(self.loreft, type) and type(iv) is self.loreft:
            return _loreft(iv, site, width)
        if not exact or name not in (*ADDITIVE_TYPES, "ZeroIntervention", "VanillaIntervention"):
            return f"intervention type {name}"
        k = _interchange_width(iv, width)
        if isinstance(k, str):
            return k
        keep = torch.ones(width)
        keep[:k] = 0.0
        if name == "ZeroIntervention":
            return [VectorScale(site, keep)]
        source = getattr(iv, "source_representation", None)
        if not iv.is_source_constant or not isinstance(source, Tensor):
            return f"{name} without a fixed source_representation (it needs a source run)"
        if source.numel() != width or source.shape[-1] != width:
            return f"{name}: source_representation of shape {tuple(source.shape)} (pysteer adds one [{width}] vector)"
        vector = torch.zeros(width)
        vector[:k] = source.detach().reshape(-1)[:k].float()
        if name == "VanillaIntervention":
            return [VectorScale(site, keep), VectorAdd(site, vector, alpha=1.0)]
        return [VectorAdd(site, vector, alpha=ADDITIVE_TYPES[name])]


def _loreft_class(version: str):
    """pyreft's ``LoreftIntervention`` (checked against the parameters pysteer knows), or None
    where pyreft is not installed."""
    from .inplace import check_parameters

    try:
        interventions = importlib.import_module("pyreft.interventions")
    except ImportError:
        return None
    from .inplace import library_version

    cls = interventions.LoreftIntervention
    check_parameters(
        "pyreft", library_version(importlib.import_module("pyreft")), cls.forward, LOREFT_FORWARD_PARAMETERS
    )
    return cls


def _uncovered_call(intervenable, base, call: dict, generation: dict | None) -> str | None:
    """Why the call as a whole has no pysteer form, or None."""
    sources = call["sources"]
    if sources is not None and any(
        s is not None for s in (sources if isinstance(sources, list) else [sources])
    ):
        return "sources (activations taken from a source run)"
    if call["source_representations"] is not None:
        return "source_representations"
    if call["subspaces"] is not None:
        return "subspaces"
    if call["intervention_additional_kwargs"]:
        return "intervention_additional_kwargs"
    if intervenable.mode != "parallel":
        return f"mode {intervenable.mode!r}"
    if intervenable.as_adaptor:
        return "as_adaptor=True"
    if intervenable.return_collect_activations:
        return "CollectIntervention"
    if intervenable._intervention_reverse_link:
        return "linked interventions (intervention_link_key)"
    if not intervenable.interventions:
        return "no interventions"
    if not isinstance(base, Mapping):
        return f"base of type {type(base).__name__}"
    own = [k for k in BASE_KEYS_WITH_OWN_POSITIONS if base.get(k) is not None]
    if own:
        return f"base with {own[0]} (pyvene counts positions within each forward)"
    from ..steering import runtime

    if runtime(intervenable.model).active:
        return "the model already has pysteer steering (pyvene's call removes every hook of the model)"
    if generation is None and torch.is_grad_enabled():
        if any(p.requires_grad for p in intervenable.interventions.parameters()):
            return "gradients to the interventions' parameters (training; pysteer reads them as constants)"
    if generation is not None:
        expand = max(int(generation.get("num_beams") or 1), int(generation.get("num_return_sequences") or 1))
        if expand > 1 and call["unit_locations"] is not None:
            return "num_beams / num_return_sequences > 1 with unit_locations (rows are expanded)"
    return None


def _batch(base: dict) -> tuple[int, int] | None:
    ref = base.get("input_ids")
    if ref is None:
        ref = base.get("inputs_embeds")
    if not isinstance(ref, Tensor) or ref.dim() < 2:
        return None
    return int(ref.shape[0]), int(ref.shape[1])


def _default_locations(call: dict, generation: dict | None):
    """pyvene's ``generate`` intervenes at position 0 of every decode step when given no locations
    and ``intervene_on_prompt=False``."""
    if generation is not None and not call["intervene_on_prompt"] and call["unit_locations"] is None:
        return {"base": 0}
    return call["unit_locations"]


def _positions(locs, batch, mask, use_fast: bool, call: dict, generation: dict | None):
    """``(positions, None)``: pysteer's positions for one intervention's base locations ``[B][n]``
    (None: every token), or ``(None, reason)`` where they have no pysteer form."""
    if locs is None:
        return "all", None
    B, S = batch
    rows = _int_rows(locs)
    if rows is None or len(rows) != B:
        return None, f"unit_locations {str(locs)[:80]} are not one list of positions per batch row ({B})"
    if generation is not None and not call["intervene_on_prompt"]:
        if any(set(r) != {0} for r in rows):
            return (
                None,
                "unit_locations other than 0 with intervene_on_prompt=False (pyvene indexes each decode step)",
            )
        return "generated", None
    if use_fast and any(r != rows[0] for r in rows):
        return (
            None,
            "positions that differ between rows while pyvene's use_fast is on (it writes every row at the first row's)",
        )
    valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    real = valid.long().cumsum(-1) - 1
    out = []
    for b, row in enumerate(rows):
        for p in row:
            if not 0 <= p < S:
                return None, f"position {p} of row {b} is outside the {S}-token base"
            if not valid[b, p]:
                return None, f"position {p} of row {b} is a padding token"
        out.append(sorted({int(real[b, p]) for p in row}))
    return out, None


def _int_rows(locs) -> list[list[int]] | None:
    if isinstance(locs, Tensor):
        locs = locs.tolist()
    if not isinstance(locs, Sequence) or isinstance(locs, str):
        return None
    rows = []
    for row in locs:
        if isinstance(row, Tensor):
            row = row.tolist()
        if not isinstance(row, Sequence) or not row or not all(isinstance(p, int) for p in row):
            return None
        rows.append([int(p) for p in row])
    return rows if len({len(r) for r in rows}) == 1 else None  # pyvene makes one [B, n] tensor of them


def _interchange_width(iv, width: int) -> int | str:
    """How many leading channels pyvene edits (``interchange_dim``, the site width by default)."""
    dim = iv.interchange_dim
    if dim is None:
        return width
    k = int(dim.item() if isinstance(dim, Tensor) else dim)
    if getattr(iv, "subspace_partition", None) is not None:
        return "subspace_partition"
    return min(max(k, 0), width)


def _loreft(iv, site: str, width: int) -> list | str:
    """pyreft's ``LoreftIntervention`` as ``pysteer.LoReFT`` (``R = Pᵀ`` of its parametrized
    ``rotate_layer.weight`` ``[d, r]``; ``W``, ``b`` of its ``learned_source``)."""
    if type(iv.act_fn).__name__ != "LinearActivation":
        return f"LoreftIntervention with act_fn {type(iv.act_fn).__name__} (pysteer's LoReFT is linear)"
    if iv.dropout.training and iv.dropout.p > 0:
        return "LoreftIntervention with active dropout (training mode)"
    P = iv.rotate_layer.weight.detach()
    W = iv.learned_source.weight.detach()
    b = iv.learned_source.bias
    if b is None:
        return "LoreftIntervention without a learned_source bias"
    if any(t.dtype != torch.float32 for t in (P, W, b)):
        return f"LoreftIntervention weights in {W.dtype} (pysteer covers float32)"
    if P.shape[0] != width:
        return f"LoreftIntervention of width {P.shape[0]} at a site of width {width}"
    return [LoReFT(site, P.T.contiguous(), W.clone(), b.detach().clone(), EVERY_PROMPT_TOKEN)]


def _hooks_site_tensor(hook, resolved, model, spec, component: str) -> bool:
    """Whether pyvene's hook (a bound ``register_forward[_pre]_hook``) sees pysteer's site tensor:
    the same module and side, or for ``attention_output`` the attention module (or GPT-2's
    ``resid_dropout``, the identity in eval) whose last step is the output projection."""
    module = getattr(hook, "__self__", None)
    pre = getattr(hook, "__name__", "") == "register_forward_pre_hook"
    if module is None:
        return False
    if component != "attention_output":
        return module is resolved.module and pre == resolved.pre
    if pre:
        return False
    layer = get_submodule(model, spec.layers)[resolved.site.layer]
    parent_path = spec.attn_out_proj.rsplit(".", 1)[0] if "." in spec.attn_out_proj else ""
    parent = get_submodule(layer, parent_path) if parent_path else None
    if parent is None:
        return False
    if module is parent:
        return True
    return (
        isinstance(module, torch.nn.Dropout)
        and any(m is module for m in parent.children())
        and not (module.training and module.p > 0)
    )


class _steered:
    """One dynamic handle per edit, attached in pyvene's order, removed on exit."""

    def __init__(self, model, edits: list[Edit]):
        self.model = model
        self.edits = edits
        self.handles: list = []

    def __enter__(self):
        from ..steering import steer

        try:
            for edit in self.edits:
                self.handles.append(steer(self.model, edit.interventions, edit.positions, mode="dynamic"))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []
