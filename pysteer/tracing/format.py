"""On-disk layout of a traced dataset, shared by the writer and the reader.

    out_dir/
      manifest.json                  dataset manifest: configuration, sites, world size, merged shard list
      rank0.manifest.json            what rank 0 has committed (the source of truth for its shards)
      rank0-000000.safetensors       shard: whole documents, rows = (document, position) pairs
      .rank0-000001.safetensors.tmp  a shard being written (ignored by readers, removed on resume)

A shard holds, for N rows: one tensor per dense site (``[N, d_model]`` or ``[N, H, D]`` for
``attn.heads``), ``{site}.sae_indices`` / ``{site}.sae_values`` (``[N, k]``) for SAE sites, and
``doc_ids`` (int64), ``positions`` (int32) and ``token_ids`` (int32), each ``[N]``. Every file
is written to a temporary name, fsynced and renamed into place, so a reader or a resumed run sees
either the old or the new file, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "pysteer.trace/1"
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
_SHARD_RE = re.compile(r"^rank(\d+)-(\d{6})\.safetensors$")
_RANK_MANIFEST_RE = re.compile(r"^rank(\d+)\.manifest\.json$")

META_TENSORS = ("doc_ids", "positions", "token_ids")
SAE_INDICES = ".sae_indices"
SAE_VALUES = ".sae_values"


class TraceConfigError(ValueError):
    """``out_dir`` holds a trace made with a different configuration, or foreign files."""


class CorruptShardError(RuntimeError):
    """A shard is missing or its bytes do not match the checksum in the manifest."""


def shard_name(rank: int, index: int) -> str:
    return f"rank{rank}-{index:06d}.safetensors"


def rank_manifest_name(rank: int) -> str:
    return f"rank{rank}.manifest.json"


def is_trace_file(name: str) -> bool:
    """True for every file name a trace directory may hold (including temporaries)."""
    base = name[1 : -len(TMP_SUFFIX)] if name.startswith(".") and name.endswith(TMP_SUFFIX) else name
    return base == MANIFEST or bool(_SHARD_RE.match(base) or _RANK_MANIFEST_RE.match(base))


def shard_rank(name: str) -> int | None:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def temp_name(name: str) -> str:
    return f".{name}{TMP_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to the temporary name of ``name`` and fsync it; returns the temp path."""
    tmp = directory / temp_name(name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def commit(directory: Path, tmp: Path, name: str) -> None:
    """Atomically rename a fsynced temporary file to ``name``."""
    os.replace(tmp, directory / name)
    fsync_dir(directory)


def atomic_write(directory: Path, name: str, data: bytes) -> None:
    commit(directory, write_temp(directory, name, data), name)


def write_json(directory: Path, name: str, obj: Any) -> None:
    atomic_write(directory, name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """A trace directory's JSON file; a damaged one raises ``ValueError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON manifest ({err})") from None


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like configurations."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out.extend(config_diff(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix or 'config'}: {old!r} -> {new!r}"]
