"""``pysteer trace``: trace sites of a model over a text / JSONL file into a resumable dataset."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HELP = "trace activations of a model over a dataset into safetensors shards (resumable)"
# Under torchrun (WORLD_SIZE > 1) every rank traces its share of the documents into the same --out.

_DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="'default' (embedded SmolLM2-135M) or a local model dir"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="documents: .txt (one per non-empty line) or .jsonl (objects with a text field or "
        "'input_ids', or bare strings)",
    )
    parser.add_argument(
        "--sites",
        required=True,
        nargs="+",
        help="sites, e.g. layers.15.resid layers.3.attn.heads (comma-separated also works)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (new, empty, or a trace to resume)"
    )
    parser.add_argument("--dtype", default="float16", choices=_DTYPES, help="storage dtype (default float16)")
    parser.add_argument(
        "--model-dtype", default="float32", choices=_DTYPES, help="model dtype (default float32)"
    )
    parser.add_argument("--device", default=None, help="model device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward (default 8)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many stored tokens")
    parser.add_argument("--shard-tokens", type=int, default=None, help="rows per shard (default ~256 MiB)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate documents to this many tokens")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the trace files already in --out (another run's trace) and start afresh",
    )


def read_documents(path: Path, text_field: str = "text") -> Iterator[str | list[int]]:
    """Documents of a ``.txt`` (one per non-empty line) or ``.jsonl`` file, in file order."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--data {path}: expected a .txt or .jsonl file")
    with open(path, encoding="utf-8") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"--data {path}: line {lineno + 1} is not UTF-8 text ({err.reason})"
                ) from None
            if not line:
                return
            lineno += 1
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if suffix == ".txt":
                yield line
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--data {path}:{lineno}: not valid JSON ({err.msg}, column {err.colno})"
                ) from None
            if isinstance(obj, str):
                yield obj
            elif isinstance(obj, dict) and isinstance(obj.get(text_field), str):
                yield obj[text_field]
            elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
                yield obj["input_ids"]
            else:
                raise ValueError(
                    f"{path}:{lineno}: expected a string or an object with {text_field!r} or 'input_ids'"
                )


def _count_tokens(path: Path, text_field: str, tokenizer: Any, max_length: int, rank: int, world: int) -> int:
    """Tokens this rank will trace (for the progress bar's total and ETA)."""
    total, chunk = 0, []

    def flush() -> int:
        if not chunk:
            return 0
        ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        return sum(len(t) for t in ids)

    for i, doc in enumerate(read_documents(path, text_field)):
        if i % world != rank:
            continue
        if isinstance(doc, list):
            total += min(len(doc), max_length)
            continue
        chunk.append(doc)
        if len(chunk) == 512:
            total += flush()
            chunk = []
    return total + flush()


def _init_distributed(device: str) -> tuple[int, int, bool]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): ``(rank, world, created)``."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..default_model import load_model
    from .dataset import resolve_max_length, trace_dataset
    from .format import TraceConfigError, rank_manifest_name, read_json

    if not args.data.is_file():
        print(f"pysteer trace: --data {args.data} does not exist", file=sys.stderr)
        return 2
    for _ in read_documents(args.data, args.text_field):  # the whole file is checked before the model loads
        pass
    sites = [s for part in args.sites for s in part.split(",") if s.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, own_group = _init_distributed(device)
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    try:
        model, tokenizer = load_model(args.model, dtype=args.model_dtype, device=device, progress=rank == 0)
        max_length = resolve_max_length(model, args.max_length)

        total = _count_tokens(args.data, args.text_field, tokenizer, max_length, rank, world)
        if args.max_tokens is not None:
            total = min(total, args.max_tokens // world + (1 if rank < args.max_tokens % world else 0))
        done = 0
        state_path = args.out / rank_manifest_name(rank)
        if state_path.exists():
            done = int(read_json(state_path).get("rows", 0))
        bar = tqdm(
            total=total,
            initial=done,
            unit="tok",
            unit_scale=True,
            desc="trace" if world == 1 else f"trace (rank 0 of {world})",
            smoothing=0.1,
            file=sys.stderr,
            disable=rank != 0,
        )
        start = time.perf_counter()
        try:
            summary = trace_dataset(
                model,
                read_documents(args.data, args.text_field),
                sites,
                args.out,
                tokenizer=tokenizer,
                dtype=getattr(torch, args.dtype),
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                shard_tokens=args.shard_tokens,
                max_length=max_length,
                progress=bar.update,
                overwrite=args.overwrite,
            )
        except (TraceConfigError, ValueError) as err:
            print(f"pysteer trace: {err}", file=sys.stderr)
            return 2
        finally:
            bar.close()
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    resumed = f" (resumed: {summary.rows - summary.new_rows} rows were already there)" if done else ""
    ranks = f" (rank 0 of {world})" if world > 1 else ""
    rows, docs, shards = summary.rows, summary.docs, summary.shards
    if world > 1:  # the merged view rank 0 wrote after every rank finished
        merged = read_json(args.out / "manifest.json")
        rows, docs, shards = merged["rows"], merged["docs"], len(merged["shards"])
    print(
        f"traced {summary.new_rows} tokens in {elapsed:.1f} s ({summary.tokens_per_s:.0f} tokens/s){resumed}{ranks}\n"
        f"dataset {summary.out_dir}: {rows} rows from {docs} documents in {shards} "
        f"shards, {size / 2**20:.1f} MiB; sites {', '.join(sites)}; dtype {args.dtype}; "
        f"stopped by {summary.stopped_by}"
    )
    return 0
