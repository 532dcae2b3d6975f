"""Writing files: atomically (temporary file + rename) and with ordinary permissions.

safetensors' ``save_file`` and ``tempfile.mkstemp`` create files readable by their owner only
(0600); every file pysteer writes for a user (steering files, SAEs, recipe results) gets the mode
the user's umask gives an ordinary file instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def ordinary_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save ``tensors`` to ``path`` atomically: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
