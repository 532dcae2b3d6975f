"""Save and load steering as one safetensors file: tensors plus a JSON description in its metadata.

No pickle anywhere: intervention types are looked up in a registry of known classes, fields are
JSON values or tensors stored under their own keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .interventions import HeadBias, HeadScale, VectorAdd, VectorScale
from .steering import SteeringHandle, SteeringSpec

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        if not tensors:  # safetensors needs at least one tensor
            tensors["__empty__"] = torch.zeros(0)
        save_file(tensors, tmp, metadata={"pysteer": json.dumps(doc)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a steering file is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | os.PathLike) -> SteeringSpec:
    """Read a steering file written by ``save``; pass the result to ``pysteer.steer(model, spec)``.

    Raises:
        ValueError: not a pysteer steering file, unknown intervention type, or a missing tensor.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"steering file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if "pysteer" not in meta:
        raise ValueError(f"{path}: safetensors file without pysteer metadata (not a steering file)")
    doc = json.loads(meta["pysteer"])
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {doc.get('format')!r}, expected {FORMAT}")
    configs = {}
    for name, items in doc["configs"].items():
        ivs = []
        for item in items:
            cls = INTERVENTION_TYPES.get(item["type"])
            if cls is None:
                raise ValueError(f"{path}: unknown intervention type {item['type']!r}")
            kwargs = {}
            for k, v in item["fields"].items():
                if isinstance(v, dict) and set(v) == {"tensor"}:
                    if v["tensor"] not in tensors:
                        raise ValueError(f"{path}: missing tensor {v['tensor']!r}")
                    v = tensors[v["tensor"]]
                kwargs[k] = v
            ivs.append(cls(**kwargs))
        configs[name] = ivs
    positions = doc.get("positions", "all")
    return SteeringSpec(configs, positions, doc.get("metadata", {}))
