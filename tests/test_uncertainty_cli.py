"""``pysteer uncertainty`` end to end on a tiny random model (the plumbing, not the figures)."""

import json

import pytest
from conftest import write_questions

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_cli_writes_json_pngs_and_loadable_probes(tiny_dir, tmp_path, monkeypatch, capsys):
    from pysteer.cli import main
    from pysteer.uncertainty import experiment
    from pysteer.uncertainty.probes import LinearProbe

    # a random model is never right: alternate correctness by question so every split has both
    calls = iter(range(10_000))
    monkeypatch.setattr(experiment, "is_correct", lambda answer, refs: next(calls) % 2 == 0)
    qfile = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "out"
    rc = main(
        [
            "uncertainty",
            "--model",
            str(tiny_dir),
            "--questions",
            str(qfile),
            "--samples",
            "3",
            "--max-new-tokens",
            "3",
            "--min-layers",
            "1",
            "--out-dir",
            str(out),
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "uncertainty.json").read_text())
    assert summary["n_questions"] == 16 and summary["n_unanswerable"] == 3
    ev = summary["evaluation_test"]
    for name in experiment.SCORES:
        assert 0.0 <= ev[name]["auroc"] <= 1.0
        assert len(ev[name]["rejection_accuracy"]) == len(ev["coverages"])
    for key in ("sep_tbg", "sep_slt", "accuracy_probe_tbg", "accuracy_probe_slt"):
        r = summary["probes"][key]
        assert len(r["layer_auroc_test"]) == 2
        probe = LinearProbe.load(r["file"])
        assert probe.sites == [f"layers.{i}.resid" for i in range(*r["layer_range"])]
    assert all(len(a["samples"]) == 3 and len(a["semantic_ids"]) == 3 for a in summary["answers"])
    assert (out / "probe_layers.png").stat().st_size > 0 and (out / "rejection.png").stat().st_size > 0
    assert "semantic_entropy" in capsys.readouterr().out


def test_cli_rejects_an_empty_split_before_loading_a_model(tmp_path, capsys):
    from pysteer.cli import main

    qfile = write_questions(tmp_path / "q.jsonl")
    rc = main(
        [
            "uncertainty",
            "--model",
            str(tmp_path / "nowhere"),
            "--questions",
            str(qfile),
            "--per-split",
            "2",
            "0",
            "1",
            "--out-dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 1
    assert "--per-split" in capsys.readouterr().err
