"""Save and load steering as one safetensors file: tensors plus a JSON description in its metadata.

No pickle anywhere: intervention types are looked up in a registry of known classes, fields are
JSON values or tensors stored under their own keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ._files import read_safetensors_doc, write_safetensors
from .interventions import HeadBias, HeadScale, VectorAdd, VectorScale
from .steering import SteeringHandle, SteeringSpec, _check_positions

FORMAT = "pysteer.steering/1"
INTERVENTION_TYPES: dict[str, type] = {c.__name__: c for c in (HeadBias, HeadScale, VectorAdd, VectorScale)}


def register_intervention_type(cls: type) -> type:
    """Make a dataclass intervention saveable (its fields must be JSON values or tensors)."""
    INTERVENTION_TYPES[cls.__name__] = cls
    return cls


def _as_spec(obj) -> SteeringSpec:
    if isinstance(obj, SteeringSpec):
        return obj
    if isinstance(obj, SteeringHandle):
        return obj.spec_()
    if isinstance(obj, dict):
        return SteeringSpec({str(k): list(v) for k, v in obj.items()})
    return SteeringSpec({"default": list(obj) if isinstance(obj, (list, tuple)) else [obj]})


def save(obj, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a handle, a ``SteeringSpec``, a config dict or a list of interventions to ``path``.

    The file is written atomically (temporary file + rename).
    """
    spec = _as_spec(obj)
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for name, ivs in spec.configs.items():
        items = []
        for i, iv in enumerate(ivs):
            cls = type(iv).__name__
            if cls not in INTERVENTION_TYPES or not dataclasses.is_dataclass(iv):
                raise TypeError(f"save: {cls} is not a registered intervention type ({sorted(INTERVENTION_TYPES)})")
            fields = {}
            for f in dataclasses.fields(iv):
                value = getattr(iv, f.name)
                if isinstance(value, torch.Tensor):
                    key = f"{name}/{i}/{f.name}"
                    tensors[key] = value.detach().to("cpu").contiguous()
                    fields[f.name] = {"tensor": key}
                elif isinstance(value, tuple):
                    fields[f.name] = list(value)
                else:
                    fields[f.name] = value
            items.append({"type": cls, "fields": fields})
        configs[name] = items
    doc = {
        "format": FORMAT,
        "configs": configs,
        "positions": spec.positions if isinstance(spec.positions, str) else [list(p) if not isinstance(p, int) else p for p in spec.positions],
        "metadata": {**spec.metadata, **(metadata or {})},
    }
    if not tensors:  # safetensors needs at least one tensor
        tensors["__empty__"] = torch.zeros(0)
    return write_safetensors(tensors, path, metadata={"pysteer": json.dumps(doc)})


def _read_intervention(path: Path, config: str, index: int, item, tensors: dict[str, torch.Tensor]):
    where = f"{path}: configs[{config!r}][{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(item.get("fields"), dict):
        raise ValueError(f"{where}: expected {{'type': name, 'fields': {{...}}}}, got {item!r:.80}")
    cls = INTERVENTION_TYPES.get(item["type"])
    if cls is None:
        raise ValueError(f"{where}: unknown intervention type {item['type']!r}; known: {sorted(INTERVENTION_TYPES)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(item["fields"]) - known)
    if unknown:
        raise ValueError(
            f"{where}: {item['type']} has no field {unknown[0]!r} (its fields: {sorted(known)}); "
            "the file may come from a newer pysteer"
        )
    kwargs = {}
    for k, v in item["fields"].items():
        if isinstance(v, dict) and set(v) == {"tensor"}:
            if v["tensor"] not in tensors:
                raise ValueError(f"{where}: field {k!r} names tensor {v['tensor']!r}, which the file does not hold")
            v = tensors[v["tensor"]]
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {item['type']}: {err}") from None


def load(path: str | os.PathLike) -> SteeringSpec:
    """Read a steering file written by ``save``; pass the result to ``pysteer.steer(model, spec)``.

    Raises:
        ValueError: not a pysteer steering file, unknown intervention type, or a missing tensor.
    """
    path = Path(path)
    tensors, doc = read_safetensors_doc(path, "pysteer", "steering file")
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the 'pysteer' metadata must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {doc.get('format')!r}, expected {FORMAT}")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key!r} contains NaN or inf")
    if not isinstance(doc.get("configs"), dict) or not doc["configs"]:
        raise ValueError(f"{path}: field 'configs' must be a non-empty object of config name -> interventions")
    configs = {}
    for name, items in doc["configs"].items():
        if not isinstance(items, list):
            raise ValueError(f"{path}: config {name!r} must be a list of interventions")
        configs[name] = [_read_intervention(path, name, i, item, tensors) for i, item in enumerate(items)]
    positions = doc.get("positions", "all")
    try:
        _check_positions(positions)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: field 'positions': {err}") from None
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: field 'metadata' must be a JSON object")
    return SteeringSpec(configs, positions, metadata)
