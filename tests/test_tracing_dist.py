"""Multi-rank tracing under torchrun (gloo on CPU): ranks write disjoint rank-tagged shards into one
dataset that reads as the same rows as a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pysteer.models.tiny import tiny_model
from pysteer.tracing import TraceReader, trace_dataset

SITES = ["layers.0.mlp.out", "layers.1.attn.heads"]
RUN = dict(dtype=torch.float32, batch_size=3, shard_tokens=25)


def docs() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 16, (21,), generator=g).tolist()
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_tracing_dist import SITES, RUN, docs
    from pysteer.models.tiny import tiny_model
    from pysteer.tracing import trace_dataset
    dist.init_process_group("gloo")
    summary = trace_dataset(tiny_model("gpt_neox"), docs(), SITES, sys.argv[1], **RUN)
    print("rank", dist.get_rank(), "rows", summary.rows, flush=True)
    dist.destroy_process_group()
    """
)


def rows(directory: Path) -> dict[tuple[int, int], list[torch.Tensor]]:
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for shard in TraceReader(directory).iter_shards():
        for i, key in enumerate(zip(shard["doc_ids"].tolist(), shard["positions"].tolist())):
            assert key not in out, f"row {key} stored twice"
            out[key] = [shard["token_ids"][i], *(shard[s][i] for s in SITES)]
    return out


def test_two_ranks_equal_one_rank(tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    two = tmp_path / "two_ranks"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(two),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    one = tmp_path / "one_rank"
    trace_dataset(tiny_model("gpt_neox"), docs(), SITES, one, **RUN)

    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["complete"]
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert sorted(p.name for p in two.glob("rank*.manifest.json")) == [
        "rank0.manifest.json",
        "rank1.manifest.json",
    ]
    for r in (0, 1):  # rank r traced exactly documents i with i % 2 == r
        state = json.loads((two / f"rank{r}.manifest.json").read_text())
        assert all(d % 2 == r for s in state["shards"] for d in s["doc_ids"])

    got, expected = rows(two), rows(one)
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        assert got[key][0] == values[0]
        for a, b in zip(got[key][1:], values[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    reader = TraceReader(two)
    reader.verify()
    assert reader.num_rows == sum(len(d) for d in docs()) and reader.complete
