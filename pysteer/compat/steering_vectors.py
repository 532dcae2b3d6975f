"""steering-vectors (steering-vectors/steering-vectors): a ``SteeringVector`` as pysteer interventions.

``SteeringVector(layer_activations, layer_type).apply(model, multiplier)`` adds ``multiplier *
layer_activations[k]`` to the output of the module of layer ``k`` named by ``layer_type``, at every
token (or the listed ``token_indices``); the sites are ``decoder_block`` -> ``layers.{k}.resid``,
``self_attn`` -> ``layers.{k}.attn.out``, ``mlp`` -> ``layers.{k}.mlp.out``. Token indices become
explicit positions (equal when prompts are not left-padded; pysteer counts from each row's first
real token).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from ..interventions import VectorAdd, finite_number
from ..models.sites import parse_site, resolve_site, site_shape
from ..models.specs import UnsupportedArchitecture, geometry, get_spec, get_submodule, unwrap_model
from ..steering import SteeringSpec

LAYER_TYPES = {"decoder_block": "resid", "self_attn": "attn.out", "mlp": "mlp.out"}


def to_spec(
    steering_vector, multiplier: float = 1.0, token_indices: Sequence[int] | None = None
) -> SteeringSpec:
    """A ``SteeringSpec`` (interventions + positions) equal to ``steering_vector.apply(model,
    multiplier, token_indices=...)``; pass it to ``pysteer.steer``.

    The steering is added (steering-vectors' default operator; a custom ``operator`` passed to
    ``apply`` has no pysteer form).

    Raises:
        TypeError: not a SteeringVector; ValueError: a layer type with no pysteer site, or a negative layer.
    """
    acts = getattr(steering_vector, "layer_activations", None)
    if not isinstance(acts, dict) or not acts:
        raise TypeError(
            f"steering_vectors.to_spec: expected a SteeringVector, got {type(steering_vector).__name__}"
        )
    layer_type = getattr(steering_vector, "layer_type", "decoder_block")
    if layer_type not in LAYER_TYPES:
        raise ValueError(
            f"steering_vectors.to_spec: layer_type {layer_type!r} has no pysteer site (supported: {sorted(LAYER_TYPES)})"
        )
    multiplier = finite_number(multiplier, "steering_vectors.to_spec: multiplier")
    ivs = []
    for layer, act in sorted(acts.items()):
        if layer < 0:
            raise ValueError(f"steering_vectors.to_spec: layer {layer} is negative; use the layer's index")
        v = torch.as_tensor(act).detach().float().reshape(-1)
        ivs.append(VectorAdd(f"layers.{int(layer)}.{LAYER_TYPES[layer_type]}", v, alpha=multiplier))
    positions = "all" if token_indices is None else [int(i) for i in token_indices]
    return SteeringSpec(
        {"default": ivs}, positions, {"converted_from": "steering-vectors", "layer_type": layer_type}
    )


# ------------------------------------------------------------------------------------------------
# in place: ``pysteer.compat.accelerate("steering_vectors")``
# ------------------------------------------------------------------------------------------------

LIBRARY = "steering-vectors"
KNOWN_FIELDS = ("layer_activations", "layer_type")  # steering-vectors 0.12.2's SteeringVector
KNOWN_PARAMETERS = (
    "self",
    "model",
    "layer_config",
    "operator",
    "multiplier",
    "min_token_index",
    "token_indices",
)
ADDITION_OPERATOR = "addition_operator.<locals>._addition_operator"


class _PatchHandle:
    """What the library's ``SteeringPatchHandle`` removes: pysteer's handle (parked for reuse), or,
    once acceleration ended, the library's own hooks that took over."""

    def __init__(self, accelerator: Accelerator, handle, call: dict):
        self.accelerator = accelerator
        self.handle = handle
        self.call = call
        self.library_handle = None

    def remove(self) -> None:
        if self.library_handle is not None:
            self.library_handle.remove()
            self.library_handle = None
        elif self.handle is not None:
            self.accelerator.pool.park(self.handle)
            self.accelerator.open.discard(self)
        self.handle = None


class Accelerator:
    """steering-vectors' ``SteeringVector.patch_activations`` (which ``apply`` calls) routed through
    pysteer.

    A covered call becomes ``VectorAdd(multiplier * activation)`` rows at the layer type's sites
    (``LAYER_TYPES``) of a pooled dynamic handle, returned inside the library's own
    ``SteeringPatchHandle``; its ``remove()`` parks the handle at the identity, and the next call on
    the same sites (a new multiplier, another vector) rewrites its rows in place.

    Covered: the default (addition) operator, every token patched (``min_token_index`` 0 or None,
    no ``token_indices``), a layer type whose module the library resolves to pysteer's site module.
    The library's token indices count within each forward's own sequence (a KV-cache decode step is
    index 0), which pysteer's positions (from each sequence's first token) do not express, so they
    run on the library's path, as do the ablation operators. The library patches padding tokens
    too and pysteer leaves them alone: only the padding positions' own outputs differ, which no real
    token attends to.

    The library adds to the layer's output tensor in place, pysteer returns a new tensor.
    transformers 4.57's Llama, Mistral, Gemma and Qwen2 record ``output_hidden_states`` by wrapping
    each layer's ``forward``, before forward hooks run; pysteer swaps its steered layer outputs into
    the reported hidden states (``pysteer.steering``: ``_report_steered_hidden_states``), so they
    show the steering as the library's in-place add does (its suite checks it:
    ``test_SteeringVector_apply_gemma`` / ``_mistral``).
    """

    def __init__(self, module, version: str):
        from .inplace import SteeringPool, check_fields, check_parameters

        check_fields(LIBRARY, version, module.SteeringVector, KNOWN_FIELDS)
        check_parameters(LIBRARY, version, module.SteeringVector.patch_activations, KNOWN_PARAMETERS)
        self.library = module
        self.layer_matching = importlib.import_module(f"{module.__name__}.layer_matching")
        self.pool = SteeringPool()
        self.open: set[_PatchHandle] = set()
        self.originals: dict = {}

    def replacements(self) -> list:
        from .inplace import Replacement

        return [Replacement(self.library.SteeringVector, "patch_activations", self._replacement())]

    def _replacement(self):
        def patch_activations(
            steering_vector,
            model,
            layer_config=None,
            operator=None,
            multiplier=1.0,
            min_token_index=None,
            token_indices=None,
        ):
            """steering-vectors' ``SteeringVector.patch_activations``, through pysteer's tables where it can."""
            call = dict(
                layer_config=layer_config,
                operator=operator,
                multiplier=multiplier,
                min_token_index=min_token_index,
                token_indices=token_indices,
            )
            return self.patch_activations(steering_vector, model, call)

        return patch_activations

    def patch_activations(self, steering_vector, model, call: dict):
        from .inplace import warn_fallback

        ivs_or_reason = self.convert(steering_vector, model, call)
        if isinstance(ivs_or_reason, str):
            warn_fallback(LIBRARY, ivs_or_reason)
            return self.originals["patch_activations"](steering_vector, model, **call)
        patch = _PatchHandle(
            self,
            self.pool.acquire(unwrap_model(model), ivs_or_reason),
            dict(call, steering_vector=steering_vector, model=model),
        )
        self.open.add(patch)
        return self.library.SteeringPatchHandle([patch])

    def convert(self, steering_vector, model, call: dict) -> list[VectorAdd] | str:
        """The call as interventions, or the reason pysteer cannot run it exactly."""
        operator = call["operator"]
        if operator is not None and getattr(operator, "__qualname__", None) != ADDITION_OPERATOR:
            return f"operator {getattr(operator, '__qualname__', type(operator).__name__)} (pysteer adds the vector)"
        if call["token_indices"] is not None or call["min_token_index"] not in (None, 0):
            return "token_indices / min_token_index (they count within each forward, decode steps included)"
        layer_type = steering_vector.layer_type
        if layer_type not in LAYER_TYPES:
            return f"layer_type {layer_type!r} has no pysteer site"
        inner = unwrap_model(model)
        try:
            spec = get_spec(inner)
        except UnsupportedArchitecture:
            return f"model_type {getattr(getattr(inner, 'config', None), 'model_type', None)!r} has no pysteer architecture spec"
        config = self.layer_matching.guess_and_enhance_layer_config(model, call["layer_config"], layer_type)
        if layer_type not in config:
            return f"no {layer_type} layers found in the model"
        names = self.layer_matching.collect_matching_layers(model, config[layer_type])
        modules = dict(model.named_modules())
        ivs = []
        for layer, act in steering_vector.layer_activations.items():
            if not -len(names) <= layer < len(names):
                return f"layer {layer} of {len(names)} {layer_type} layers"
            k = layer % len(names)
            site = f"layers.{k}.{LAYER_TYPES[layer_type]}"
            if not _same_tensor(modules[names[k]], inner, spec, site, layer_type):
                return f"{names[k]} is not the module of pysteer's {site}"
            if act.dim() != 1 or act.shape[0] != site_shape(parse_site(site), geometry(inner, spec))[1]:
                return f"activation of layer {layer} has shape {tuple(act.shape)}"
            ivs.append(VectorAdd(site, (call["multiplier"] * act).detach(), alpha=1.0))
        return ivs

    def release(self) -> None:
        """Patches still applied move to the library's own hooks; pysteer's handles are removed."""
        for patch in list(self.open):
            call = dict(patch.call)
            patch.library_handle = self.originals["patch_activations"](
                call.pop("steering_vector"), call.pop("model"), **call
            )
            patch.handle = None
        self.open = set()
        self.pool.clear()


def _same_tensor(module, model, spec, site: str, layer_type: str) -> bool:
    """Whether the library's hooked module outputs pysteer's site tensor: the same module for
    ``decoder_block`` and ``mlp``; for ``self_attn``, the attention module whose last step is the
    output projection (pysteer's ``attn.out``; GPT-2's dropout after it is the identity in eval)."""
    resolved = resolve_site(model, site, spec).module
    if layer_type != "self_attn":
        return module is resolved
    layer = get_submodule(model, spec.layers)[parse_site(site).layer]
    parent = spec.attn_out_proj.rsplit(".", 1)[0] if "." in spec.attn_out_proj else ""
    return bool(parent) and get_submodule(layer, parent) is module and not module.training
