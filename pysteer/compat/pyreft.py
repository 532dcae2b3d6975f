"""Load LoReFT interventions saved by pyreft (``ReftModel.save``) as :class:`pysteer.LoReFT`.

pyreft (through pyvene) saves a directory with

- ``config.json``: ``representations`` (one per intervention, a list in the order of pyvene's
  ``RepresentationConfig``: ``layer, component, unit, max_number_of_units, low_rank_dimension, ...``,
  or a dict of those fields), ``intervention_types`` (``"<class 'pyreft.interventions.LoreftIntervention'>"``),
  ``sorted_keys`` (the intervention keys, e.g. ``layer_15_comp_block_output_unit_pos_nunit_1#0``) and
  ``intervention_dimensions`` (the site width);
- one ``intkey_<key>.bin`` per intervention: a ``torch.save``d state dict with ``weight`` ``[r, d]``
  and ``bias`` ``[r]`` (the learned source ``nn.Linear(d, r)``, ``W h + b``) and ``rotate_layer``
  ``[d, r]``: the *parametrized* (orthogonal) weight of pyreft's ``LowRankRotateLayer``, whose
  columns are orthonormal. pyreft computes ``h + (W h + b - h @ P) @ P.T`` with that ``P``, so
  pysteer's ``R`` (``[r, d]``, orthonormal rows) is ``P.T``.

The weights are read with ``torch.load(..., weights_only=True)`` (never an arbitrary pickle), or from
``intkey_<key>.safetensors`` where such a file is present.

pyreft does not save the token positions: they come from its data module (``"l1"`` for
``make_last_position_supervised_data_module``, ``"f<k>+l<m>"`` from a ``positions`` argument) or
from the ``unit_locations`` given at inference, so :func:`load_pyreft` takes them as an argument.
With ``share_weights=False`` (pyreft's default) a ``"f1+l1"`` run has two interventions per layer,
the first half of them on the first tokens and the second half on the last ones: pass one position
spec per intervention, e.g. ``positions=["f1", "l1"]``.

Only ``LoreftIntervention`` maps onto :class:`~pysteer.LoReFT`, with pyreft's default linear
activation (pyvene's load does not restore another one either) and at ``unit="pos"``; the
components map to sites as in pyvene's model cards: ``block_output`` -> ``layers.{L}.resid``,
``block_input`` -> ``resid_pre``, ``mlp_output`` -> ``mlp.out``, ``attention_output`` -> ``attn.out``,
``attention_value_output`` -> ``attn.heads``, ``query_output``/``key_output``/``value_output`` ->
``attn.q``/``attn.k``/``attn.v``. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..reft import LoReFT, parse_reft_positions

COMPONENT_SITES = {
    "block_output": "resid",
    "block_input": "resid_pre",
    "mlp_output": "mlp.out",
    "attention_output": "attn.out",
    "attention_value_output": "attn.heads",
    "query_output": "attn.q",
    "key_output": "attn.k",
    "value_output": "attn.v",
}
# pyvene's RepresentationConfig field order (pyvene 0.1.x); a saved config lists its values in it
REPRESENTATION_FIELDS = (
    "layer",
    "component",
    "unit",
    "max_number_of_units",
    "low_rank_dimension",
    "intervention_type",
    "intervention",
    "subspace_partition",
    "group_key",
    "intervention_link_key",
    "moe_key",
    "source_representation",
    "hidden_source_representation",
    "latent_dim",
)
_DEFAULTS = {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1}
LOREFT_TYPE = "LoreftIntervention"
STATE_KEYS = ("weight", "bias", "rotate_layer")


class PyreftFormatError(ValueError):
    """A pyreft directory that cannot be read as LoReFT interventions (the message says why)."""


def load_pyreft(
    directory: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    *,
    positions: str | Sequence[int] | Sequence[str | Sequence[int]],
    every_step: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[LoReFT]:
    """Read a directory written by pyreft's ``ReftModel.save`` as a list of :class:`~pysteer.LoReFT`.

    Args:
        directory: the saved directory (``config.json`` and ``intkey_*.bin``).
        model: when given, each site is resolved on it and its width checked against the weights.
        positions: pyreft's positions (not saved by pyreft): one spec for every intervention
            (``"l1"``, ``"f1+l1"``, a list of ints) or a list with one spec per intervention, in the
            saved order.
        every_step: also edit generated tokens (pyreft's ``intervene_on_prompt=True`` is ``False``).
        dtype: dtype of the returned tensors (pyreft may save bfloat16 learned sources).

    Returns:
        The interventions in pyreft's order, ready for ``pysteer.steer(model, ivs)``.

    Raises:
        FileNotFoundError: the directory, its ``config.json`` or a weights file is missing.
        PyreftFormatError: the config or a weights file is corrupt, of an unsupported intervention
            type or component, or its tensors have the wrong keys, shapes or values.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"pyreft directory {str(root)!r} does not exist or is not a directory")
    config = _read_config(root)
    reprs = [_representation(r, i, root) for i, r in enumerate(config["representations"])]
    n = len(reprs)
    types = config.get("intervention_types")
    if not isinstance(types, list) or len(types) != n:
        raise PyreftFormatError(
            f"{root / 'config.json'}: intervention_types must list one type per representation ({n}), got {types!r:.200}"
        )
    keys = config.get("sorted_keys") or _keys(reprs)
    if not isinstance(keys, list) or len(keys) != n or not all(isinstance(k, str) for k in keys):
        raise PyreftFormatError(
            f"{root / 'config.json'}: sorted_keys must list {n} intervention keys, got {keys!r:.200}"
        )
    dims = config.get("intervention_dimensions") or [None] * n
    if not isinstance(dims, list) or len(dims) != n:
        raise PyreftFormatError(
            f"{root / 'config.json'}: intervention_dimensions must have {n} entries, got {dims!r:.200}"
        )
    per_iv = _positions_per_intervention(positions, n)

    out = []
    for i, (rep, type_name, key, dim) in enumerate(zip(reprs, types, keys, dims)):
        what = f"{root.name}: intervention {i} ({key})"
        if not isinstance(type_name, str) or type_name.rsplit(".", 1)[-1].rstrip("'>") != LOREFT_TYPE:
            raise PyreftFormatError(
                f"{what}: type {type_name!r} is not pyreft's LoreftIntervention; only LoReFT maps onto pysteer.LoReFT"
            )
        site = f"layers.{rep['layer']}.{COMPONENT_SITES[rep['component']]}"
        state = _read_state(root, key, what)
        rotation, weight, bias = _loreft_tensors(state, what, rep.get("low_rank_dimension"), dim)
        if model is not None:
            from ..models.sites import resolve_site

            try:
                width = resolve_site(model, site).width
            except ValueError as err:
                raise PyreftFormatError(f"{what}: {err}") from None
            if width != rotation.shape[1]:
                raise PyreftFormatError(
                    f"{what}: saved for width {rotation.shape[1]}, but {site} of this model has width {width}"
                )
        out.append(LoReFT(site, rotation.to(dtype), weight.to(dtype), bias.to(dtype), per_iv[i], every_step))
    return out


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (pyreft's ReftModel.save writes it)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PyreftFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PyreftFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    reprs = config.get("representations")
    if not isinstance(reprs, list) or not reprs:
        raise PyreftFormatError(f"{path}: no 'representations' list; not a pyreft/pyvene intervention config")
    return config


def _representation(raw: Any, i: int, root: Path) -> dict[str, Any]:
    where = f"{root / 'config.json'}: representations[{i}]"
    if isinstance(raw, list):
        if len(raw) > len(REPRESENTATION_FIELDS):
            raise PyreftFormatError(
                f"{where}: {len(raw)} fields, pyvene's RepresentationConfig has {len(REPRESENTATION_FIELDS)}"
            )
        rep = dict(zip(REPRESENTATION_FIELDS, raw))
    elif isinstance(raw, dict):
        unknown = set(raw) - set(REPRESENTATION_FIELDS)
        if unknown:
            raise PyreftFormatError(f"{where}: unknown fields {sorted(unknown)}")
        rep = dict(raw)
    else:
        raise PyreftFormatError(f"{where}: expected a list or an object, got {type(raw).__name__}")
    rep = {**_DEFAULTS, **{k: v for k, v in rep.items() if v is not None}}
    layer, component = rep["layer"], rep["component"]
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise PyreftFormatError(f"{where}: layer must be a non-negative int, got {layer!r}")
    if component not in COMPONENT_SITES:
        raise PyreftFormatError(
            f"{where}: component {component!r} has no pysteer site; supported: {', '.join(COMPONENT_SITES)}"
        )
    if rep["unit"] != "pos" or rep["max_number_of_units"] != 1:
        raise PyreftFormatError(
            f"{where}: unit {rep['unit']!r} x {rep['max_number_of_units']}; only unit 'pos' with one unit maps onto LoReFT"
        )
    for field in ("subspace_partition", "moe_key"):
        if field in rep:
            raise PyreftFormatError(
                f"{where}: {field} is set ({rep[field]!r:.80}); LoReFT over subspaces is not supported"
            )
    return rep


def _keys(reprs: list[dict[str, Any]]) -> list[str]:
    """pyvene's intervention keys, for configs saved without ``sorted_keys``."""
    seen: dict[str, int] = {}
    keys = []
    for rep in reprs:
        proposal = f"layer_{rep['layer']}_comp_{rep['component']}_unit_{rep['unit']}_nunit_{rep['max_number_of_units']}"
        seen[proposal] = seen.get(proposal, -1) + 1
        keys.append(f"{proposal}#{seen[proposal]}")
    return keys


def _positions_per_intervention(positions, n: int) -> list[str | list[int]]:
    if isinstance(positions, str) or (
        isinstance(positions, Sequence) and positions and all(isinstance(p, int) for p in positions)
    ):
        parse_reft_positions(positions)
        return [positions if isinstance(positions, str) else list(positions)] * n
    specs = list(positions) if isinstance(positions, Sequence) else None
    if specs is None or len(specs) != n:
        raise ValueError(
            f"load_pyreft: positions must be one spec ('l1', 'f1+l1', a list of ints) or a list of {n} "
            f"(one per saved intervention), got {positions!r}"
        )
    for p in specs:
        parse_reft_positions(p)
    return [p if isinstance(p, str) else list(p) for p in specs]


def _read_state(root: Path, key: str, what: str) -> dict[str, Tensor]:
    st_path = root / f"intkey_{key}.safetensors"
    bin_path = root / f"intkey_{key}.bin"
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise PyreftFormatError(
                f"{what}: {st_path.name} is not a readable safetensors file ({err})"
            ) from None
    if not bin_path.is_file():
        raise FileNotFoundError(f"{what}: weights file {bin_path} is missing")
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PyreftFormatError(
            f"{what}: {bin_path.name} cannot be read as a weights-only state dict ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PyreftFormatError(f"{what}: {bin_path.name} does not hold a state dict of tensors")
    return state


def _loreft_tensors(
    state: dict[str, Tensor], what: str, rank: Any, dim: Any
) -> tuple[Tensor, Tensor, Tensor]:
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise PyreftFormatError(
            f"{what}: state dict lacks {missing} (has {sorted(state)}); pyreft's LoreftIntervention saves {list(STATE_KEYS)}"
        )
    P, W, b = (state[k].detach().to(torch.float64) for k in ("rotate_layer", "weight", "bias"))
    if P.ndim != 2 or P.shape[1] > P.shape[0]:
        raise PyreftFormatError(f"{what}: rotate_layer must be [d, r] with r <= d, got {list(P.shape)}")
    d, r = P.shape
    if rank is not None and r != rank:
        raise PyreftFormatError(
            f"{what}: rotate_layer has rank {r}, the config's low_rank_dimension is {rank}"
        )
    if dim is not None and d != dim:
        raise PyreftFormatError(
            f"{what}: rotate_layer has width {d}, the config's intervention dimension is {dim}"
        )
    if tuple(W.shape) != (r, d) or tuple(b.shape) != (r,):
        raise PyreftFormatError(
            f"{what}: weight must be [{r}, {d}] and bias [{r}] (rank {r}, width {d}), got {list(W.shape)} and {list(b.shape)}"
        )
    for name, t in (("rotate_layer", P), ("weight", W), ("bias", b)):
        if not torch.isfinite(t).all():
            raise PyreftFormatError(f"{what}: {name} contains NaN or inf")
    # pyreft saves the orthogonal-parametrized weight; loosely checked (bfloat16 saves round it)
    tol = 1e-3 if state["rotate_layer"].dtype in (torch.float32, torch.float64) else 5e-2
    err = (P.T @ P - torch.eye(r, dtype=P.dtype)).abs().max().item()
    if err > tol:
        raise PyreftFormatError(
            f"{what}: rotate_layer's columns are not orthonormal (max |P^T P - I| = {err:.3g})"
        )
    return P.T.contiguous(), W, b
