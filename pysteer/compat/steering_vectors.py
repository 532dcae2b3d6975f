"""steering-vectors (steering-vectors/steering-vectors): a ``SteeringVector`` as pysteer interventions.

``SteeringVector(layer_activations, layer_type).apply(model, multiplier)`` adds ``multiplier *
layer_activations[k]`` to the output of the module of layer ``k`` named by ``layer_type``, at every
token (or the listed ``token_indices``); the sites are ``decoder_block`` -> ``layers.{k}.resid``,
``self_attn`` -> ``layers.{k}.attn.out``, ``mlp`` -> ``layers.{k}.mlp.out``. Token indices become
explicit positions (equal when prompts are not left-padded; pysteer counts from each row's first
real token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..interventions import VectorAdd, finite_number
from ..steering import SteeringSpec

LAYER_TYPES = {"decoder_block": "resid", "self_attn": "attn.out", "mlp": "mlp.out"}


def to_spec(steering_vector, multiplier: float = 1.0, token_indices: Sequence[int] | None = None) -> SteeringSpec:
    """A ``SteeringSpec`` (interventions + positions) equal to ``steering_vector.apply(model,
    multiplier, token_indices=...)``; pass it to ``pysteer.steer``.

    The steering is added (steering-vectors' default operator; a custom ``operator`` passed to
    ``apply`` has no pysteer form).

    Raises:
        TypeError: not a SteeringVector; ValueError: a layer type with no pysteer site, or a negative layer.
    """
    acts = getattr(steering_vector, "layer_activations", None)
    if not isinstance(acts, dict) or not acts:
        raise TypeError(f"steering_vectors.to_spec: expected a SteeringVector, got {type(steering_vector).__name__}")
    layer_type = getattr(steering_vector, "layer_type", "decoder_block")
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"steering_vectors.to_spec: layer_type {layer_type!r} has no pysteer site (supported: {sorted(LAYER_TYPES)})")
    multiplier = finite_number(multiplier, "steering_vectors.to_spec: multiplier")
    ivs = []
    for layer, act in sorted(acts.items()):
        if layer < 0:
            raise ValueError(f"steering_vectors.to_spec: layer {layer} is negative; use the layer's index")
        v = torch.as_tensor(act).detach().float().reshape(-1)
        ivs.append(VectorAdd(f"layers.{int(layer)}.{LAYER_TYPES[layer_type]}", v, alpha=multiplier))
    positions = "all" if token_indices is None else [int(i) for i in token_indices]
    return SteeringSpec({"default": ivs}, positions, {"converted_from": "steering-vectors", "layer_type": layer_type})
