"""Save and load steering as one safetensors file: tensors plus a JSON description in its metadata.

No pickle anywhere: intervention types are looked up in a registry of known classes, fields are
JSON values or tensors stored under their own keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ._files import read_safetensors_doc, write_safetensors
from .interventions import KINDS, intervention_kind
from .positions import check_positions
from .steering import SteeringHandle, SteeringSpec

FORMAT = "pysteer.steering/1"
INTERVENTION_TYPES = KINDS  # every registered intervention kind, by name


def register_intervention_type(cls: type) -> type:
    """Make a dataclass intervention saveable (its fields must be JSON values or tensors, or it
    defines ``to_fields`` / ``from_fields``). Same as the ``@intervention_kind`` decorator."""
    return intervention_kind(cls)


BUILTIN_KIND_MODULES = (
    "pysteer.sae_steering",
    "pysteer.scalars",
    "pysteer.patching",
    "pysteer.reft",
    "pysteer.weight_delta",
)


def _register_builtin_kinds() -> None:
    """Import the modules that define pysteer's own non-affine kinds, so files naming them load."""
    import importlib

    for name in BUILTIN_KIND_MODULES:
        importlib.import_module(name)


def _object_types() -> dict[str, type]:
    """Objects a field may hold besides tensors and JSON values: classes with ``to_state`` /
    ``from_state`` (an SAE is stored once per file however many edits use it)."""
    from .sae import SAE

    return {"SAE": SAE}


def _as_spec(obj) -> SteeringSpec:
    if isinstance(obj, SteeringSpec):
        return obj
    if isinstance(obj, SteeringHandle):
        return obj.to_spec()
    if isinstance(obj, dict):
        return SteeringSpec({str(k): list(v) for k, v in obj.items()})
    return SteeringSpec({"default": list(obj) if isinstance(obj, (list, tuple)) else [obj]})


class _Writer:
    """Collects the tensors and stored objects of one file while interventions encode their fields."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.tensor_keys: dict[int, str] = {}
        self.objects: dict[int, tuple[str, dict]] = {}  # id(obj) -> (key, {"type", "config"})

    def put(self, value, key: str):
        """The JSON form of ``value`` (a tensor or stored object becomes a reference)."""
        if isinstance(value, torch.Tensor):
            stored = self.tensor_keys.get(id(value))
            if stored is None:  # a tensor shared by several fields (both betas of a config) is stored once
                stored = self.tensor_keys[id(value)] = key
                self.tensors[key] = (
                    value.detach().to("cpu", copy=True).contiguous()
                )  # views of one storage part
            return {"tensor": stored}
        if hasattr(value, "to_state") and type(value).__name__ in _object_types():
            entry = self.objects.get(id(value))
            if entry is None:
                obj_key = f"objects/{len(self.objects)}"
                tensors, config = value.to_state()
                for name, t in tensors.items():
                    self.tensors[f"{obj_key}/{name}"] = t.detach().to("cpu").contiguous()
                entry = self.objects[id(value)] = (
                    obj_key,
                    {"type": type(value).__name__, "config": config, "tensors": sorted(tensors)},
                )
            return {"object": entry[0]}
        if isinstance(value, tuple):
            return list(value)
        return value

    def encode(self, iv, key: str) -> dict:
        cls = type(iv).__name__
        if KINDS.get(cls) is not type(iv):
            raise TypeError(f"save: {cls} is not a registered intervention type ({sorted(KINDS)})")
        if hasattr(iv, "to_fields"):
            fields = iv.to_fields(lambda value, name: self.put(value, f"{key}/{name}"))
        elif dataclasses.is_dataclass(iv):
            fields = {
                f.name: self.put(getattr(iv, f.name), f"{key}/{f.name}") for f in dataclasses.fields(iv)
            }
        else:
            raise TypeError(f"save: {cls} is neither a dataclass nor defines to_fields")
        return {"type": cls, "fields": fields}


def save(obj, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a handle, a ``SteeringSpec``, a config dict or a list of interventions to ``path``.

    The file is written atomically (temporary file + rename).
    """
    _register_builtin_kinds()
    spec = _as_spec(obj)
    writer = _Writer()
    configs = {
        name: [writer.encode(iv, f"{name}/{i}") for i, iv in enumerate(ivs)]
        for name, ivs in spec.configs.items()
    }
    doc = {
        "format": FORMAT,
        "configs": configs,
        "positions": spec.positions
        if isinstance(spec.positions, str)
        else [list(p) if not isinstance(p, int) else p for p in spec.positions],
        "metadata": {**spec.metadata, **(metadata or {})},
    }
    if writer.objects:
        doc["objects"] = dict(writer.objects.values())
    tensors = writer.tensors
    if not tensors:  # safetensors needs at least one tensor
        tensors["__empty__"] = torch.zeros(0)
    return write_safetensors(tensors, path, metadata={"pysteer": json.dumps(doc)})


class _Reader:
    """Resolves references of one file: tensors by key, stored objects built once each."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], objects: dict):
        self.path, self.tensors, self.objects = path, tensors, objects
        self.built: dict[str, object] = {}

    def get(self, value, where: str):
        if isinstance(value, dict) and set(value) == {"tensor"}:
            if value["tensor"] not in self.tensors:
                raise ValueError(f"{where}: names tensor {value['tensor']!r}, which the file does not hold")
            return self.tensors[value["tensor"]]
        if isinstance(value, dict) and set(value) == {"object"}:
            return self._object(value["object"], where)
        return value

    def _object(self, key, where: str):
        if key in self.built:
            return self.built[key]
        entry = self.objects.get(key) if isinstance(self.objects, dict) else None
        if not isinstance(entry, dict) or entry.get("type") not in _object_types():
            raise ValueError(f"{where}: names stored object {key!r}, which the file does not describe")
        names = entry.get("tensors", [])
        missing = [n for n in names if f"{key}/{n}" not in self.tensors]
        if missing:
            raise ValueError(f"{where}: stored object {key!r} lacks tensor {missing[0]!r}")
        try:
            obj = _object_types()[entry["type"]].from_state(
                {n: self.tensors[f"{key}/{n}"] for n in names}, entry.get("config", {})
            )
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{self.path}: stored {entry['type']} {key!r}: {err}") from None
        self.built[key] = obj
        return obj


def _read_intervention(reader: _Reader, config: str, index: int, item):
    where = f"{reader.path}: configs[{config!r}][{index}]"
    if (
        not isinstance(item, dict)
        or not isinstance(item.get("type"), str)
        or not isinstance(item.get("fields"), dict)
    ):
        raise ValueError(f"{where}: expected {{'type': name, 'fields': {{...}}}}, got {item!r:.80}")
    cls = KINDS.get(item["type"])
    if cls is None:
        raise ValueError(f"{where}: unknown intervention type {item['type']!r}; known: {sorted(KINDS)}")
    get: Callable = lambda value, name="": reader.get(value, f"{where}: field {name!r}")  # noqa: E731
    try:
        if hasattr(cls, "from_fields"):
            return cls.from_fields(item["fields"], get)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(item["fields"]) - known)
        if unknown:
            raise ValueError(
                f"{item['type']} has no field {unknown[0]!r} (its fields: {sorted(known)}); "
                "the file may come from a newer pysteer"
            )
        return cls(**{k: get(v, k) for k, v in item["fields"].items()})
    except (TypeError, ValueError, KeyError) as err:
        msg = str(err)
        raise ValueError(
            msg if msg.startswith(str(reader.path)) else f"{where}: {item['type']}: {msg}"
        ) from None


def load(path: str | os.PathLike) -> SteeringSpec:
    """Read a steering file written by ``save``; pass the result to ``pysteer.steer(model, spec)``.

    Raises:
        ValueError: not a pysteer steering file, unknown intervention type, or a missing tensor.
    """
    _register_builtin_kinds()
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
        raise ValueError(
            f"{path}: field 'configs' must be a non-empty object of config name -> interventions"
        )
    reader = _Reader(path, tensors, doc.get("objects", {}))
    configs = {}
    for name, items in doc["configs"].items():
        if not isinstance(items, list):
            raise ValueError(f"{path}: config {name!r} must be a list of interventions")
        configs[name] = [_read_intervention(reader, name, i, item) for i, item in enumerate(items)]
    positions = doc.get("positions", "all")
    try:
        check_positions(positions)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: field 'positions': {err}") from None
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: field 'metadata' must be a JSON object")
    return SteeringSpec(configs, positions, metadata)
