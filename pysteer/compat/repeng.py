"""repeng (vgel/repeng): a ``ControlVector`` and a coefficient as pysteer interventions.

``ControlModel(model, layer_ids).set_control(vector, coeff)`` adds ``coeff * vector.directions[k]``
to the output of decoder layer ``k`` (``model.model.layers[k]``) at every real token; in pysteer
that is ``VectorAdd(f"layers.{k}.resid", direction, alpha=coeff)``. ``ControlVector.export_gguf``
writes llama.cpp's format, which ``pysteer.compat.llamacpp`` reads.
"""

from __future__ import annotations

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
    directions = control_vector if isinstance(control_vector, Mapping) else getattr(control_vector, "directions", None)
    if not isinstance(directions, Mapping) or not directions:
        raise TypeError(f"repeng.to_interventions: expected a ControlVector (a non-empty .directions mapping), got {type(control_vector).__name__}")
    coeff = finite_number(coeff, "repeng.to_interventions: coeff")
    out = []
    for layer, vec in sorted(directions.items()):
        if not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"repeng.to_interventions: layer {layer!r} is not a non-negative index")
        v = torch.as_tensor(np.asarray(vec), dtype=torch.float32)
        if v.dim() != 1:
            raise ValueError(f"repeng.to_interventions: direction of layer {layer} must be 1-D, got shape {tuple(v.shape)}")
        out.append(VectorAdd(f"layers.{int(layer)}.resid", v, alpha=coeff))
    return out
