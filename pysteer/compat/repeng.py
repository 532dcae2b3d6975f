"""repeng (vgel/repeng): a ``ControlVector`` and a coefficient as pysteer interventions.

``ControlModel(model, layer_ids).set_control(vector, coeff)`` adds ``coeff * vector.directions[k]``
to the output of decoder layer ``k`` (``model.model.layers[k]``) at every real token; in pysteer
that is ``VectorAdd(f"layers.{k}.resid", direction, alpha=coeff)``. ``ControlVector.export_gguf``
writes llama.cpp's format, which ``pysteer.compat.llamacpp`` reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import weakref
from collections.abc import Mapping

import numpy as np
import torch

from ..interventions import VectorAdd, finite_number


def to_interventions(control_vector, coeff: float = 1.0) -> list[VectorAdd]:
    """``coeff * directions[k]`` at ``layers.{k}.resid`` for every layer of a repeng ``ControlVector``
    (any object with a ``directions`` mapping of layer -> vector, or the mapping itself).

    Raises:
        TypeError: no ``directions`` mapping; ValueError: a negative layer (repeng stores them
            normalised to non-negative indices) or a vector that is not 1-D.
    """
    directions = (
        control_vector if isinstance(control_vector, Mapping) else getattr(control_vector, "directions", None)
    )
    if not isinstance(directions, Mapping) or not directions:
        raise TypeError(
            f"repeng.to_interventions: expected a ControlVector (a non-empty .directions mapping), got {type(control_vector).__name__}"
        )
    coeff = finite_number(coeff, "repeng.to_interventions: coeff")
    out = []
    for layer, vec in sorted(directions.items()):
        if not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"repeng.to_interventions: layer {layer!r} is not a non-negative index")
        v = torch.as_tensor(np.asarray(vec), dtype=torch.float32)
        if v.dim() != 1:
            raise ValueError(
                f"repeng.to_interventions: direction of layer {layer} must be 1-D, got shape {tuple(v.shape)}"
            )
        out.append(VectorAdd(f"layers.{int(layer)}.resid", v, alpha=coeff))
    return out


# ------------------------------------------------------------------------------------------------
# in place: ``pysteer.compat.accelerate("repeng")``
# ------------------------------------------------------------------------------------------------

LIBRARY = "repeng"
KNOWN_FIELDS = {  # repeng 0.4.0's dataclasses, as pysteer reads them
    "ControlVector": ("model_type", "directions"),
    "BlockControlParams": ("control", "normalize", "operator"),
}
KNOWN_PARAMETERS = {
    "set_raw_control": ("self", "control", "kwargs"),
    "set_control": ("self", "control", "coeff", "kwargs"),
    "unwrap": ("self",),
}
CONTROL_KWARGS = ("normalize", "operator")


class _Live:
    """A ControlModel steered by pysteer: its handle, the library call that last set it, and the
    library's ``ControlModule`` wrappers lifted out of the layer list while pysteer steers."""

    def __init__(self, handle, control, kwargs, wrappers: dict):
        self.handle = handle
        self.control = control
        self.kwargs = kwargs
        self.wrappers = wrappers


class Accelerator:
    """repeng's ``ControlModel.set_raw_control`` (which ``set_control`` and ``reset`` call) and
    ``unwrap``, routed through pysteer.

    A covered control becomes ``VectorAdd`` rows at ``layers.{k}.resid`` of one dynamic handle per
    ``ControlModel`` (created at its first ``set_control``, rewritten in place afterwards; ``reset``
    writes the identity). While pysteer steers, the library's ``ControlModule`` wrappers are out of
    the layer list (the plain layers are where pysteer's sites are, and a compiled forward has no
    wrapper to run); ``unwrap``, a call that falls back and ``Acceleration.remove`` put them back.
    Not covered, run by repeng itself: ``normalize=True``, a custom ``operator``, a per-token
    control tensor, and models pysteer has no architecture spec for.
    """

    def __init__(self, module, version: str):
        from .inplace import check_fields, check_parameters

        check_fields(LIBRARY, version, module.ControlVector, KNOWN_FIELDS["ControlVector"])
        control = importlib.import_module(f"{module.__name__}.control")
        check_fields(LIBRARY, version, control.BlockControlParams, KNOWN_FIELDS["BlockControlParams"])
        for name, params in KNOWN_PARAMETERS.items():
            check_parameters(LIBRARY, version, getattr(control.ControlModel, name), params)
        self.library = control
        self.default_operator = {f.name: f for f in dataclasses.fields(control.BlockControlParams)}[
            "operator"
        ].default
        self.live: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ControlModel -> _Live
        self.originals: dict = {}

    def replacements(self) -> list:
        from .inplace import Replacement

        cls = self.library.ControlModel
        return [
            Replacement(cls, "set_raw_control", self._replacement_set_raw_control()),
            Replacement(cls, "unwrap", self._replacement_unwrap()),
        ]

    def _replacement_set_raw_control(self):
        def set_raw_control(control_model, control, **kwargs):
            """repeng's ``ControlModel.set_raw_control``, through pysteer's tables where it can."""
            return self.set_raw_control(control_model, control, kwargs)

        return set_raw_control

    def _replacement_unwrap(self):
        def unwrap(control_model):
            """repeng's ``ControlModel.unwrap``, after removing pysteer's steering of that model."""
            live = self.live.pop(control_model, None)
            if live is not None:
                live.handle.remove()
                self._put_back_wrappers(control_model, live)
            return self.originals["unwrap"](control_model)

        return unwrap

    def set_raw_control(self, control_model, control, kwargs: dict) -> None:
        from .inplace import warn_fallback

        reason = self.uncovered(control_model, control, kwargs)
        live = self.live.get(control_model)
        if reason is not None:
            warn_fallback(LIBRARY, reason)
            if live is not None:
                live.handle.update(_identity(live.handle))
                live.control, live.kwargs = None, {}
                self._put_back_wrappers(control_model, live)
            return self.originals["set_raw_control"](control_model, control, **kwargs)
        if live is None or not live.wrappers:
            self.originals["set_raw_control"](control_model, None)  # the library's modules hold no control
        if control is None:
            if live is not None:
                live.handle.update(_identity(live.handle))
                live.control, live.kwargs = None, {}
            return None
        ivs = [
            VectorAdd(f"layers.{k}.resid", control[k].detach().reshape(-1), alpha=1.0)
            for k in control_model.layer_ids
        ]
        if live is None:
            from ..steering import steer

            wrappers = self._lift_wrappers(control_model)
            try:
                handle = steer(control_model.model, ivs, mode="dynamic")
            except BaseException:
                self._put_back_wrappers(control_model, _Live(None, None, {}, wrappers))
                raise
            self.live[control_model] = _Live(handle, control, kwargs, wrappers)
            return None
        if not live.wrappers:
            live.wrappers = self._lift_wrappers(control_model)
        live.handle.update(ivs)
        live.control, live.kwargs = control, kwargs
        return None

    def _lift_wrappers(self, control_model) -> dict:
        """Take repeng's ``ControlModule`` wrappers out of the layer list (the plain layers back in,
        where pysteer's sites are); they are kept to put back."""
        layers = self.library.model_layer_list(control_model)
        wrappers = {}
        for k in control_model.layer_ids:
            if isinstance(layers[k], self.library.ControlModule):
                wrappers[k] = layers[k]
                layers[k] = layers[k].block
        return wrappers

    def _put_back_wrappers(self, control_model, live: _Live) -> None:
        layers = self.library.model_layer_list(control_model)
        for k, wrapper in live.wrappers.items():
            layers[k] = wrapper
        live.wrappers = {}

    def uncovered(self, control_model, control, kwargs: dict) -> str | None:
        """Why pysteer cannot run this ``set_raw_control`` call exactly, or None when it can."""
        from ..models.specs import UnsupportedArchitecture, get_spec, get_submodule, unwrap_model

        unknown = [k for k in kwargs if k not in CONTROL_KWARGS]
        if unknown:
            return f"set_control keyword {unknown[0]!r}"
        if kwargs.get("normalize"):
            return "normalize=True (the steered activation is rescaled to its old norm)"
        if kwargs.get("operator", self.default_operator) is not self.default_operator:
            return "a custom operator= (pysteer adds the control)"
        model = unwrap_model(control_model.model)
        try:
            spec = get_spec(model)
        except UnsupportedArchitecture:
            return (
                f"model_type {getattr(model.config, 'model_type', None)!r} has no pysteer architecture spec"
            )
        if get_submodule(model, spec.layers) is not self.library.model_layer_list(control_model):
            return f"repeng's layer list is not the model's {spec.layers}"
        if control is None:
            return None
        for k in control_model.layer_ids:
            t = control.get(k) if isinstance(control, dict) else None
            if not isinstance(t, torch.Tensor):
                return f"control of layer {k} is {type(t).__name__}, not a tensor"
            if any(s != 1 for s in t.shape[:-1]):
                return f"control of layer {k} has shape {tuple(t.shape)} (one vector per token)"
        return None

    def release(self) -> None:
        """Hand every live control back to repeng's own modules and remove pysteer's hooks."""
        for control_model, live in list(self.live.items()):
            live.handle.remove()
            self._put_back_wrappers(control_model, live)
            if live.control is not None:
                self.originals["set_raw_control"](control_model, live.control, **live.kwargs)
        self.live = weakref.WeakKeyDictionary()


def _identity(handle) -> list[VectorAdd]:
    """The handle's sites with nothing added."""
    from .inplace import identity_of

    return identity_of(handle.configs[handle.config_names[0]])
