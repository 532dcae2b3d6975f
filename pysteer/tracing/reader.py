"""Read a traced dataset: shards as tensors or memory-mapped numpy arrays, checksums verified,
shuffled batches for probe / SAE training.

    reader = pysteer.TraceReader("traces/")
    for x in reader.batches("layers.15.resid", batch_size=4096, shuffle=True, seed=0):
        ...  # x: [4096, d_model]
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models.sites import parse_site
from .format import (
    FORMAT,
    MANIFEST,
    META_TENSORS,
    SAE_INDICES,
    SAE_VALUES,
    CorruptShardError,
    rank_manifest_name,
    read_json,
    sha256_bytes,
    sha256_file,
)

_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Rows gathered before one shuffle when streaming batches: ~1M rows mixes several default-sized
# shards while holding e.g. 1.2 GB of d_model=576 float16 rows.
DEFAULT_SHUFFLE_ROWS = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard: file name, owning rank, rows, byte size and sha256."""

    file: str
    rank: int
    rows: int
    bytes: int
    sha256: str
    doc_range: tuple[int, int]  # document ids of its first and last rows


def _field(doc: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in doc:
        raise ValueError(f"{path}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


class TraceReader:
    """A traced dataset written by :func:`pysteer.trace_dataset` (any number of ranks), as one dataset.

    Args:
        out_dir: the dataset directory.
        verify: check each shard's sha256 against the manifest the first time it is read
            (a mismatch raises :class:`CorruptShardError` naming the file).

    Attributes:
        config: the configuration the trace was made with (model identity, sites, dtype, ...).
        sites: ``{site: info}``: ``kind`` ``"dense"`` (``shape`` per row) or ``"sae_topk"`` (``k``,
            ``d_sae``, ``compression_ratio``).
        shards: the committed shards, rank by rank.
        complete: every rank finished (False while a run is under way or was interrupted; the
            committed shards are readable either way).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.out_dir = Path(out_dir)
        path = self.out_dir / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{self.out_dir} is not a trace directory: it has no {MANIFEST}")
        self.manifest: dict[str, Any] = read_json(path)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else self.manifest
            raise ValueError(f"{path}: unknown format {found!r}, expected {FORMAT!r}")
        self.config: dict[str, Any] = _field(self.manifest, "config", dict, path)
        self.sites: dict[str, dict[str, Any]] = _field(self.manifest, "sites", dict, path)
        dtype = getattr(torch, str(_field(self.config, "dtype", str, path)), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{path}: field 'config.dtype' is {self.config['dtype']!r}, not a torch dtype")
        self.dtype: torch.dtype = dtype
        self.verify_checksums = verify
        self._verified: set[str] = set()
        shards: list[ShardInfo] = []
        complete = True
        for rank in range(_field(self.manifest, "world_size", int, path)):
            rpath = self.out_dir / rank_manifest_name(rank)
            if not rpath.exists():
                complete = False
                continue
            state = read_json(rpath)
            if not isinstance(state, dict) or state.get("config_hash") != self.manifest.get("config_hash"):
                raise ValueError(f"{rpath} belongs to a different configuration than {path}")
            complete = complete and bool(state.get("complete"))
            for s in _field(state, "shards", list, rpath):
                try:
                    info = ShardInfo(
                        str(s["file"]),
                        rank,
                        int(s["rows"]),
                        int(s["bytes"]),
                        str(s["sha256"]),
                        tuple(s["doc_ids"]),
                    )
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"{rpath}: a shard entry lacks or mistypes field {err}: {s!r:.120}"
                    ) from None
                if Path(info.file).name != info.file:
                    raise ValueError(f"{rpath}: shard file {info.file!r} is not a plain file name")
                shards.append(info)
        self.shards: list[ShardInfo] = shards
        self.complete = complete

    # ------------------------------------------------------------------ summary

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"TraceReader({str(self.out_dir)!r}, rows={self.num_rows}, shards={len(self.shards)}, "
            f"sites={list(self.sites)}, dtype={self.config['dtype']}, complete={self.complete})"
        )

    def _site_keys(self, sites: str | Sequence[str] | None) -> list[str]:
        names = list(self.sites) if sites is None else [sites] if isinstance(sites, str) else list(sites)
        keys: list[str] = []
        for name in names:
            try:
                norm = parse_site(name).name
            except ValueError:
                norm = str(name)
            info = self.sites.get(norm)
            if info is None:
                raise KeyError(f"site {name!r} is not in this trace; traced sites: {', '.join(self.sites)}")
            keys += [norm + SAE_INDICES, norm + SAE_VALUES] if info["kind"] == "sae_topk" else [norm]
        return keys

    # ------------------------------------------------------------------ checksums

    def _path(self, shard: ShardInfo) -> Path:
        path = self.out_dir / shard.file
        if not path.exists():
            raise CorruptShardError(f"shard {path} is listed in the manifest but missing")
        return path

    def _check(self, shard: ShardInfo, digest: str) -> None:
        if digest != shard.sha256:
            raise CorruptShardError(
                f"shard {self.out_dir / shard.file} is corrupt: sha256 {digest} does not match the manifest's "
                f"{shard.sha256}; re-trace it (delete the file and the directory's manifests, or trace anew)"
            )
        self._verified.add(shard.file)

    def verify(self) -> None:
        """Check every shard's checksum now; raises :class:`CorruptShardError` on the first mismatch."""
        for shard in self.shards:
            self._check(shard, sha256_file(self._path(shard)))

    # ------------------------------------------------------------------ loading

    def _load_torch(self, shard: ShardInfo, keys: Sequence[str]) -> dict[str, Tensor]:
        from safetensors.torch import load

        path = self._path(shard)
        data = path.read_bytes()
        if self.verify_checksums and shard.file not in self._verified:
            self._check(shard, sha256_bytes(data))
        tensors = load(data)
        return {k: tensors[k] for k in keys}

    def _load_numpy(self, shard: ShardInfo, keys: Sequence[str]) -> dict[str, np.ndarray]:
        # safetensors' own numpy loader copies into memory; parsing the header lets the arrays be
        # read-only memory maps of the file itself.
        path = self._path(shard)
        if self.verify_checksums and shard.file not in self._verified:
            self._check(shard, sha256_file(path))
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out: dict[str, np.ndarray] = {}
        for k in keys:
            info = header[k]
            dtype = _NP_DTYPES.get(info["dtype"])
            if dtype is None:
                raise TypeError(
                    f"{k} is stored as {info['dtype']}, which numpy has no type for; use format='pt'"
                )
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end == start:
                out[k] = np.empty(shape, dtype=dtype)
            else:
                out[k] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
        return out

    def iter_shards(
        self, sites: str | Sequence[str] | None = None, *, format: str = "pt", meta: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Yield each shard as ``{key: tensor}`` (``format="pt"``) or ``{key: np.memmap}`` (``"np"``).

        Keys: the site names (dense ``[N, *shape]``), ``{site}.sae_indices`` / ``{site}.sae_values``
        (``[N, k]``) for SAE sites, and with ``meta`` ``doc_ids`` / ``positions`` / ``token_ids`` ``[N]``.
        """
        if format not in ("pt", "np"):
            raise ValueError(f"format must be 'pt' or 'np', got {format!r}")
        keys = self._site_keys(sites) + (list(META_TENSORS) if meta else [])
        for shard in self.shards:
            yield self._load_torch(shard, keys) if format == "pt" else self._load_numpy(shard, keys)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_shards()

    def _concat(self, key: str) -> Tensor:
        parts = [self._load_torch(s, [key])[key] for s in self.shards]
        if not parts:
            raise ValueError(f"{self.out_dir} has no committed shards yet")
        return torch.cat(parts)

    def load(self, site: str) -> Tensor | tuple[Tensor, Tensor]:
        """All rows of one site: ``[N, *shape]``, or ``(indices, values)`` for an SAE site."""
        keys = self._site_keys(site)
        if len(keys) == 2:
            return self._concat(keys[0]), self._concat(keys[1])
        return self._concat(keys[0])

    def doc_ids(self) -> Tensor:
        """Document id of every row, ``[N]`` int64 (the document's index in the traced input)."""
        return self._concat("doc_ids")

    def positions(self) -> Tensor:
        """Token position of every row within its document, ``[N]`` int32."""
        return self._concat("positions")

    def token_ids(self) -> Tensor:
        """Token id of every row, ``[N]`` int32."""
        return self._concat("token_ids")

    # ------------------------------------------------------------------ training batches

    def batches(
        self,
        site: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
        with_meta: bool = False,
    ) -> Iterator[Any]:
        """Stream one epoch of batches of ``site``, every row exactly once.

        With ``shuffle``, shards are visited in a seeded random order and rows are shuffled within a
        buffer of at least ``shuffle_rows`` rows (memory stays bounded by the buffer, not the
        dataset); the same seed gives the same batches.

        Yields:
            ``[batch_size, *shape]`` tensors; ``(indices, values)`` ``[batch_size, k]`` for an SAE
            site; with ``with_meta`` a dict with the site key(s) and ``doc_ids``/``positions``/``token_ids``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys = self._site_keys(site)
        load_keys = keys + (list(META_TENSORS) if with_meta else [])
        gen = torch.Generator().manual_seed(seed)
        order = (
            torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else range(len(self.shards))
        )

        def emit(pool: dict[str, Tensor], upto: int) -> Iterator[Any]:
            for start in range(0, upto, batch_size):
                part = {k: v[start : start + batch_size] for k, v in pool.items()}
                if with_meta:
                    yield part
                elif len(keys) == 2:
                    yield part[keys[0]], part[keys[1]]
                else:
                    yield part[keys[0]]

        pool: dict[str, Tensor] = {}
        pool_rows = 0
        for i in order:
            shard = self.shards[i]
            if shard.rows == 0:
                continue
            loaded = self._load_torch(shard, load_keys)
            pool = {k: torch.cat([pool[k], loaded[k]]) if pool else loaded[k] for k in load_keys}
            pool_rows += shard.rows
            if pool_rows >= max(shuffle_rows, batch_size):
                if shuffle:
                    perm = torch.randperm(pool_rows, generator=gen)
                    pool = {k: v[perm] for k, v in pool.items()}
                full = pool_rows // batch_size * batch_size
                yield from emit(pool, full)
                pool = {k: v[full:] for k, v in pool.items()}
                pool_rows -= full
        if pool_rows:
            if shuffle:
                perm = torch.randperm(pool_rows, generator=gen)
                pool = {k: v[perm] for k, v in pool.items()}
            full = pool_rows // batch_size * batch_size
            yield from emit(pool, full)
            if not drop_last and pool_rows > full:
                rest = {k: v[full:] for k, v in pool.items()}
                yield from emit(rest, pool_rows - full)
