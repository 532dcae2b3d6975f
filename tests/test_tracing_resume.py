"""Resuming a traced dataset: a killed run continues without losing or duplicating a row, and a
changed configuration or changed data is refused before anything on disk changes."""

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
from pysteer.tracing import TraceConfigError, TraceReader, trace_dataset
from pysteer.tracing.dataset import CRASH_ENV, CRASH_EXIT_CODE

SITES = ["layers.1.resid", "layers.0.attn.heads"]
N_DOCS = 30


def docs(n: int = N_DOCS, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 20, (n,), generator=g).tolist()
    return [torch.randint(3, 128, (length,), generator=g).tolist() for length in lengths]


RUN = dict(dtype=torch.float32, batch_size=4, shard_tokens=40)

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_tracing_resume import SITES, RUN, docs
    from pysteer.models.tiny import tiny_model
    from pysteer.tracing import trace_dataset
    trace_dataset(tiny_model("llama"), docs(), SITES, sys.argv[1], **RUN)
    """
)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def rows_by_key(directory: Path) -> dict[tuple[int, int], tuple[int, torch.Tensor, torch.Tensor]]:
    reader = TraceReader(directory)
    out = {}
    for shard in reader.iter_shards():
        for i, (d, p) in enumerate(zip(shard["doc_ids"].tolist(), shard["positions"].tolist())):
            assert (d, p) not in out, f"row (doc {d}, position {p}) stored twice"
            out[(d, p)] = (int(shard["token_ids"][i]), shard[SITES[0]][i], shard[SITES[1]][i])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    trace_dataset(tiny_model("llama"), docs(), SITES, out, **RUN)
    return out


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "run_trace.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, **{CRASH_ENV: "2"})
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr
    # killed while writing the third shard: two committed shards and a partial temp file
    state = json.loads((out / "rank0.manifest.json").read_text())
    assert len(state["shards"]) == 2 and not state["complete"]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == [".rank0-000002.safetensors.tmp"]
    assert TraceReader(out).num_rows == sum(s["rows"] for s in state["shards"])  # readable as it is
    # as if a kill had also come after a shard's rename but before the manifest named it, and
    # leftovers of an earlier attempt that cut shards differently (shard_tokens is not config)
    (out / "rank0-000002.safetensors").write_bytes(b"not listed in any manifest")
    (out / "rank0-000099.safetensors").write_bytes(b"not listed in any manifest")
    (out / ".rank0-000042.safetensors.tmp").write_bytes(b"partial")

    summary = trace_dataset(tiny_model("llama"), docs(), SITES, out, **RUN)
    assert summary.new_rows == summary.rows - sum(s["rows"] for s in state["shards"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "rank0-000099.safetensors").exists()
    TraceReader(out).verify()

    resumed, reference = rows_by_key(out), rows_by_key(uninterrupted)
    assert resumed.keys() == reference.keys()
    for key, (tok, a, b) in reference.items():
        r_tok, r_a, r_b = resumed[key]
        assert r_tok == tok
        # batches after the resume point are padded differently: equal up to float32 rounding
        torch.testing.assert_close(r_a, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_b, b, rtol=1e-5, atol=1e-6)
    # shards end at the same document boundaries whatever the batching
    ref_manifest = json.loads((uninterrupted / "manifest.json").read_text())
    res_manifest = json.loads((out / "manifest.json").read_text())
    assert [s["doc_ids"] for s in res_manifest["shards"]] == [s["doc_ids"] for s in ref_manifest["shards"]]
    assert res_manifest["complete"] and res_manifest["rows"] == ref_manifest["rows"]


def test_rerunning_a_complete_trace_changes_nothing(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(uninterrupted, out)
    before = snapshot(out)
    summary = trace_dataset(tiny_model("llama"), docs(), SITES, out, **RUN)
    assert summary.new_rows == 0 and summary.complete
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    assert json.loads(after["manifest.json"]) == json.loads(before["manifest.json"])


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(dtype=torch.float16), "dtype: 'float32' -> 'float16'"),
        (dict(sites=["layers.1.resid"]), "sites: "),
        (dict(max_length=10), "max_length: 256 -> 10"),
        (dict(max_tokens=50), "max_tokens: None -> 50"),
        (dict(model=tiny_model("llama", seed=1)), "model.weights_fingerprint"),
        (dict(model=tiny_model("llama", num_hidden_layers=3)), "model.config_sha256"),
    ],
    ids=["dtype", "sites", "max_length", "max_tokens", "weights", "model_config"],
)
def test_changed_configuration_is_refused_naming_the_change(uninterrupted, tmp_path, change, expected):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(uninterrupted, out)
    before = snapshot(out)
    kwargs = dict(RUN, **{k: v for k, v in change.items() if k not in ("model", "sites")})
    model = change.get("model") or tiny_model("llama")
    with pytest.raises(TraceConfigError, match="different configuration") as err:
        trace_dataset(model, docs(), change.get("sites", SITES), out, **kwargs)
    assert expected in str(err.value)
    assert snapshot(out) == before


def test_changed_data_is_refused(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(uninterrupted, out)
    # make the trace look interrupted after its first shard, then resume with other documents
    state = json.loads((out / "rank0.manifest.json").read_text())
    del state["shards"][1:]
    state.update(complete=False, docs_done=state["shards"][0]["docs"][1], rows=state["shards"][0]["rows"])
    (out / "rank0.manifest.json").write_text(json.dumps(state))
    before = snapshot(out)
    other = docs()
    other[1] = [5] * len(other[1]) if other[1] else [5]
    with pytest.raises(TraceConfigError, match="different data"):
        trace_dataset(tiny_model("llama"), other, SITES, out, **RUN)
    with pytest.raises(TraceConfigError, match="found 1 documents"):
        trace_dataset(tiny_model("llama"), docs()[:1], SITES, out, **RUN)
    assert snapshot(out) == before


def test_max_tokens_stores_exactly_the_budget(tmp_path):
    summary = trace_dataset(tiny_model("llama"), docs(), SITES, tmp_path, max_tokens=57, **RUN)
    reader = TraceReader(tmp_path)
    assert summary.stopped_by == "max_tokens" and reader.num_rows == 57
    flat = [(i, p) for i, d in enumerate(docs()) for p in range(len(d))][:57]
    assert list(zip(reader.doc_ids().tolist(), reader.positions().tolist())) == flat
    again = trace_dataset(tiny_model("llama"), docs(), SITES, tmp_path, max_tokens=57, **RUN)
    assert again.new_rows == 0 and TraceReader(tmp_path).num_rows == 57
