"""Writing files: atomically (temporary file + rename) and with ordinary permissions.

safetensors' ``save_file`` and ``tempfile.mkstemp`` create files readable by their owner only
(0600); every file pysteer writes for a user (steering files, SAEs, recipe results) gets the mode
the user's umask gives an ordinary file instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def ordinary_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write; renamed onto ``path`` (ordinary mode) when the
    block ends without error, removed otherwise: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` to ``path`` atomically: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata
        )
    return Path(path)


def read_safetensors_doc(path: str | os.PathLike, key: str, what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of a safetensors file and the JSON document stored under metadata ``key``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, no ``key`` metadata (not ``what``), or
            metadata that is not JSON; each names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if key not in meta:
        raise ValueError(f"{path}: not a {what} (no {key} metadata)")
    try:
        return tensors, json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {key!r} metadata is not valid JSON ({err})") from None
