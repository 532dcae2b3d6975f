"""ITI, inference-time intervention (Li et al. 2023; likenneth/honest_llama): head directions as
pysteer interventions.

The math, from honest_llama's ``utils.get_interventions_dict`` and the hook that applies it
(``legacy/llama_validate_2fold.py: lt_modulated_vector_add``): per steered (layer ``l``, head ``h``),
a unit direction ``theta [d_head]`` and ``sigma`` (``proj_val_std``: the standard deviation of the
tuning activations projected on ``theta``), at strength ``alpha``,

    z[b, t, h, :] += alpha * sigma * theta

where ``z [B, S, H*D]`` (head-major) is the input of the attention output projection (their
``model.layers.{l}.self_attn.head_out``, an identity module in front of ``o_proj``): pysteer's
``layers.{l}.attn.heads``. Which tokens (``start_edit_location``):

- ``"lt"`` (generation, ``tqa_run_answers``): the last position of every forward,
  ``z[:, -1]``. With the KV cache that is the last prompt token at the prefill and each generated
  token after it: the rule ``"last_prompt+generated"``. (Without a cache their hook would steer only
  the newest token of each recomputed sequence; pysteer steers what the cached run steers.) The
  pyvene version (``validation/validate_2fold.py`` with ``interveners.ITI_Intervener`` on
  ``model.layers[l].self_attn.o_proj.input``) edits ``b[0, -1]``, the same tokens at batch size 1,
  the only size it runs; pysteer edits every row.
- ``0`` (``run_ce_loss``, ``run_kl_wrt_orig``): every position, the rule ``"all"``.
- Baked (``validation/edit_weight.py`` up to 2024-08-20): ``o_proj.bias = W_o (alpha sigma theta)``,
  every position: ``start_edit_location=0`` with ``pysteer.steer(..., mode="fold")`` writes exactly
  that bias. edit_weight.py since 2024-08-24 (commit a1be08a) stores ``alpha sigma theta`` itself as
  the bias (the projection ``F.linear`` removed, later left commented out): a different edit, which
  this module does not produce.

Forms read (``to_spec`` takes the object or a file ``torch.save`` wrote; files are read with
``torch.load(weights_only=True)``, numpy arrays and scalars allowed, nothing else):

- the interventions dict of ``get_interventions_dict``:
  ``{"model.layers.{l}.self_attn.head_out": [(head, direction [D], proj_val_std), ...]}``;
- the pyvene version's per-layer displacement: ``{"model.layers[{l}].self_attn.o_proj.input":
  direction [H*D]}``, each steered head's slice ``sigma * theta``, zeros elsewhere (``alpha`` is
  ``ITI_Intervener``'s multiplier).

A key may also be the layer index, or name the layer as ``...layers.{l}...`` / ``...h.{l}...``
(GPT-2) followed by ``self_attn`` / ``attn`` and ``head_out``, ``o_proj[.input]`` or
``c_proj[.input]``. honest_llama saves nothing else that describes an intervention: its probes are
pickled scikit-learn objects (never unpickled here) and its ``.npy`` files are activations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..interventions import HeadBias, VectorAdd, finite_number
from ..steering import SteeringHandle, SteeringSpec
from ..steering import steer as pysteer_steer

RULE_OF_START = {"lt": "last_prompt+generated", 0: "all"}
_LAYER_KEY = re.compile(
    r"^(?:[\w.]*\.)?(?:layers|h)(?:\.(\d+)|\[(\d+)\])\.(?:self_attn|attn)\."
    r"(?:head_out|o_proj|o_proj\.input|c_proj|c_proj\.input)$"
)
KEY_FORMS = (
    "model.layers.{l}.self_attn.head_out",
    "model.layers[{l}].self_attn.o_proj.input",
    "transformer.h.{l}.attn.c_proj.input",
    "the layer index",
)

HeadEntry = tuple[int, Tensor, float]  # (head, direction [D] float64, proj_val_std)


def _layer_of(key) -> int:
    """The decoder layer a key of the interventions dict names."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"iti: layer key {key} is negative")
        return int(key)
    m = _LAYER_KEY.match(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(f"iti: unknown layer key format {key!r}; the forms read are {KEY_FORMS}")
    return int(m.group(1) or m.group(2))


def _vector(value, what: str) -> Tensor:
    """A finite 1-D float64 tensor from a numpy array or a tensor."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().to(torch.float64)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        t = torch.from_numpy(np.asarray(value, dtype=np.float64))
    else:
        raise TypeError(f"iti: {what} must be a numeric array or tensor, got {type(value).__name__}")
    t = t.squeeze() if t.dim() > 1 else t  # get_interventions_dict squeezes a probe's [1, D] coef_
    if t.dim() != 1:
        raise ValueError(f"iti: {what} must be a vector, got shape {tuple(value.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"iti: {what} contains NaN or inf")
    return t


def _head_entries(layer: int, entries: Sequence) -> list[HeadEntry]:
    """``[(head, direction, proj_val_std)]`` of one layer, checked."""
    out = []
    for entry in entries:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            shape = f"{len(entry)} items" if isinstance(entry, (tuple, list)) else type(entry).__name__
            raise ValueError(
                f"iti: layer {layer}: an entry must be (head, direction, proj_val_std) as "
                f"get_interventions_dict writes it, got {shape}"
            )
        head, direction, std = entry
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head < 0:
            raise ValueError(f"iti: layer {layer}: head {head!r} is not a non-negative index")
        where = f"layer {layer}, head {int(head)}"
        out.append(
            (
                int(head),
                _vector(direction, f"{where}: direction"),
                finite_number(std, f"iti: {where}: proj_val_std"),
            )
        )
    heads = [h for h, _, _ in out]
    if len(set(heads)) != len(heads):
        raise ValueError(f"iti: layer {layer}: head listed twice in {sorted(heads)}")
    return out


def read(source) -> dict[int, list[HeadEntry] | Tensor]:
    """``{layer: [(head, direction, proj_val_std), ...]}`` (the interventions dict) or ``{layer:
    displacement [H*D]}`` (the pyvene version's) from the object or a file ``torch.save`` wrote.

    Raises:
        ValueError / TypeError: an unknown key format, an entry that is not ``(head, direction,
            proj_val_std)``, a negative head, a non-numeric or non-finite value, or a file holding
            anything but tensors, numpy arrays, numbers and containers.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _load_file(Path(source))
    if not isinstance(source, Mapping) or not source:
        raise TypeError(
            f"iti: expected a non-empty interventions dict or its file, got {type(source).__name__}"
        )
    out: dict[int, list[HeadEntry] | Tensor] = {}
    for key, value in source.items():
        layer = _layer_of(key)
        if layer in out:
            raise ValueError(f"iti: layer {layer} is named by two keys")
        if isinstance(value, (Tensor, np.ndarray)):
            out[layer] = _vector(value, f"layer {layer}: displacement")
        elif isinstance(value, (list, tuple)) and value:
            out[layer] = _head_entries(layer, value)
        else:
            got = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(
                f"iti: {key!r}: expected a list of (head, direction, proj_val_std) or a displacement "
                f"vector, got {got}"
            )
    return dict(sorted(out.items()))


def _numpy_safe_globals() -> list:
    """What ``torch.save`` of numpy arrays and scalars names in its pickle: numpy's array and
    scalar reconstructors and dtypes, as torch documents for ``weights_only`` loading."""
    core = getattr(np, "_core", None) or np.core
    kinds = (np.float16, np.float32, np.float64, np.int32, np.int64)
    return [
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        np.ndarray,
        np.dtype,
        *(type(np.dtype(k)) for k in kinds),
    ]


def _load_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ITI interventions file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error names what the restricted loader refused
        raise ValueError(
            f"{path}: not an ITI interventions file readable without unpickling code ({err})"
        ) from None


def _check_against(interventions: Mapping[int, list[HeadEntry] | Tensor], model: nn.Module) -> None:
    """Every layer, head and width fits ``model``: raise before it is touched."""
    from ..models.specs import geometry, unwrap_model

    geo = geometry(unwrap_model(model))
    for layer, value in interventions.items():
        if layer >= geo.n_layers:
            raise ValueError(f"iti: layer {layer} out of range, the model has {geo.n_layers} layers")
        if isinstance(value, Tensor):
            if value.shape[0] != geo.n_heads * geo.head_dim:
                raise ValueError(
                    f"iti: layer {layer}: displacement has {value.shape[0]} entries, the model's heads "
                    f"have {geo.n_heads} x {geo.head_dim} = {geo.n_heads * geo.head_dim}"
                )
            continue
        for head, direction, _ in value:
            if head >= geo.n_heads:
                raise ValueError(
                    f"iti: layer {layer}: head {head} out of range, the model has {geo.n_heads} heads"
                )
            if direction.shape[0] != geo.head_dim:
                raise ValueError(
                    f"iti: layer {layer}, head {head}: direction has {direction.shape[0]} entries, the "
                    f"model's d_head is {geo.head_dim}"
                )


def to_spec(
    source, alpha: float = 15.0, start_edit_location: str | int = "lt", model: nn.Module | None = None
) -> SteeringSpec:
    """A ``SteeringSpec`` equal to honest_llama's ITI with these directions; pass it to
    ``pysteer.steer``.

    Args:
        source: the interventions dict, the pyvene version's displacement dict, or a file holding
            either (module docstring).
        alpha: ITI's strength (honest_llama's ``--alpha``, default 15).
        start_edit_location: ``"lt"`` (the last token of every forward: ``"last_prompt+generated"``)
            or ``0`` (every token: ``"all"``, foldable into ``o_proj``'s bias with ``mode="fold"``).
        model: when given, every layer, head and width is checked against it (``pysteer.steer``
            checks them too, naming pysteer's kinds instead).

    Returns:
        One config: a ``HeadBias`` per layer (``vector = alpha * sigma * theta`` per head, computed in
        float64 as honest_llama does) or a ``VectorAdd`` at ``layers.{l}.attn.heads`` for a
        displacement.
    """
    if isinstance(start_edit_location, bool) or start_edit_location not in RULE_OF_START:
        raise ValueError(
            f"iti: start_edit_location {start_edit_location!r} is not one pysteer runs exactly: use 'lt' "
            "(the last prompt token and every generated one) or 0 (every token)"
        )
    alpha = finite_number(alpha, "iti: alpha")
    interventions = read(source)
    if model is not None:
        _check_against(interventions, model)
    ivs: list = []
    for layer, value in interventions.items():
        if isinstance(value, Tensor):
            ivs.append(VectorAdd(f"layers.{layer}.attn.heads", value.float(), alpha=alpha))
            continue
        heads = [h for h, _, _ in value]
        added = torch.stack([alpha * std * direction for _, direction, std in value])
        ivs.append(HeadBias(layer, head=heads, vector=added.float(), alpha=1.0))
    metadata = {
        "converted_from": "honest_llama ITI",
        "alpha": alpha,
        "start_edit_location": start_edit_location,
    }
    return SteeringSpec({"default": ivs}, RULE_OF_START[start_edit_location], metadata)


def steer(
    model: nn.Module, source, alpha: float = 15.0, start_edit_location: str | int = "lt", **steer_kwargs
) -> SteeringHandle:
    """``pysteer.steer(model, to_spec(source, alpha, start_edit_location, model=model), **steer_kwargs)``:
    ITI on ``model``, checked against it before anything is patched."""
    if steer_kwargs.get("mode") == "fold" and start_edit_location != 0:
        raise ValueError(
            f"iti.steer(mode='fold'): start_edit_location={start_edit_location!r} edits only some tokens; "
            "edit_weight.py's baked bias is start_edit_location=0 (every token)"
        )
    return pysteer_steer(model, to_spec(source, alpha, start_edit_location, model=model), **steer_kwargs)
