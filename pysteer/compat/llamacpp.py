"""llama.cpp control vectors: GGUF files with ``general.architecture = "controlvector"`` and one f32
tensor ``direction.{k}`` per steered layer (repeng's ``export_gguf`` and llama.cpp's
``cvector-generator`` write them; ``llama-cli --control-vector-scaled FILE s`` applies them).

llama.cpp adds ``s * direction.{k}`` to the output of decoder layer ``k`` (0-based, every token);
``k = 0`` is never applied there, so a file cannot name it. In pysteer that is
``VectorAdd(f"layers.{k}.resid", direction, alpha=s)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._files import atomic_path
from ..interventions import VectorAdd
from ..models.sites import parse_site

ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf ships with the demo extra
        raise ImportError(
            "reading and writing llama.cpp control vectors needs the 'gguf' package (pip install gguf)"
        ) from err
    return gguf


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, Tensor], dict]:
    """``({layer: direction [d] float32}, metadata)`` of a control-vector GGUF file.

    Raises:
        ValueError: not a control-vector file, a direction that is not a finite f32 vector, layer 0,
            directions of different widths, or no directions at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such control-vector file")
    try:
        reader = _gguf().GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError / struct errors on corrupt files
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from None
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith(("general.", ARCH + ".")) and fld.types:
            try:
                meta[name] = fld.contents()
            except Exception:  # noqa: BLE001 - metadata we cannot decode is skipped, not fatal
                continue
    if meta.get("general.architecture") != ARCH:
        raise ValueError(
            f"{path}: general.architecture is {meta.get('general.architecture')!r}, not {ARCH!r}"
        )
    directions: dict[int, Tensor] = {}
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if m is None:
            continue
        layer = int(m.group(1))
        if layer == 0:
            raise ValueError(f"{path}: {t.name}: llama.cpp never applies a direction to layer 0")
        data = np.asarray(t.data)
        if t.tensor_type != _gguf().GGMLQuantizationType.F32 or data.ndim != 1:
            raise ValueError(
                f"{path}: {t.name} must be a 1-D f32 tensor, got {t.tensor_type.name} of shape {data.shape}"
            )
        vec = torch.from_numpy(data.astype(np.float32, copy=True))
        if not torch.isfinite(vec).all():
            raise ValueError(f"{path}: {t.name} contains NaN or inf")
        directions[layer] = vec
    if not directions:
        raise ValueError(f"{path}: no direction.<layer> tensors")
    widths = {v.shape[0] for v in directions.values()}
    if len(widths) != 1:
        raise ValueError(f"{path}: directions of different widths {sorted(widths)}")
    return dict(sorted(directions.items())), meta


def write_control_vector(
    path: str | os.PathLike, directions: Mapping[int, Tensor | np.ndarray], model_hint: str = ""
) -> Path:
    """Write ``{layer: direction [d]}`` as a llama.cpp control vector (atomically).

    Raises:
        ValueError: layer 0 (llama.cpp cannot apply it), a negative layer, different widths, NaN/inf.
    """
    if not directions:
        raise ValueError("write_control_vector: no directions")
    rows = {}
    for layer, vec in directions.items():
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(
                f"write_control_vector: layer {layer!r}: llama.cpp applies directions to layers >= 1 only"
            )
        arr = np.asarray(vec.detach().cpu() if isinstance(vec, Tensor) else vec, dtype=np.float32).reshape(-1)
        if not np.isfinite(arr).all():
            raise ValueError(f"write_control_vector: direction of layer {layer} contains NaN or inf")
        rows[layer] = arr
    if len({a.shape[0] for a in rows.values()}) != 1:
        raise ValueError("write_control_vector: directions of different widths")
    gguf = _gguf()
    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        if model_hint:
            writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(rows))
        for layer in sorted(rows):
            writer.add_tensor(f"direction.{layer}", rows[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def to_interventions(source: str | os.PathLike | Mapping[int, Tensor], scale: float = 1.0) -> list[VectorAdd]:
    """A control vector (a file or ``{layer: direction}``) as pysteer interventions: ``scale *
    direction.{k}`` added to ``layers.{k}.resid`` at every token, as llama.cpp applies it."""
    directions = read_control_vector(source)[0] if isinstance(source, (str, os.PathLike)) else dict(source)
    return [
        VectorAdd(f"layers.{k}.resid", torch.as_tensor(v, dtype=torch.float32), alpha=scale)
        for k, v in sorted(directions.items())
    ]


def from_interventions(interventions: Sequence[VectorAdd]) -> dict[int, Tensor]:
    """``{layer: alpha * vector}`` of ``VectorAdd`` interventions at ``layers.{k}.resid`` (several at
    one layer add up); anything else has no control-vector form and raises."""
    out: dict[int, Tensor] = {}
    for iv in interventions:
        site = parse_site(iv.site_name) if isinstance(iv, VectorAdd) else None
        if site is None or site.kind != "resid":
            raise ValueError(
                f"from_interventions: {iv!r:.60} is not a VectorAdd at a layer's resid (the only control-vector form)"
            )
        vec = torch.as_tensor(iv.vector, dtype=torch.float32) * float(iv.alpha)
        out[site.layer] = out[site.layer] + vec if site.layer in out else vec
    return out
