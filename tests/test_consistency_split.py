"""The honest split of the paraphrase-consistency recipes: test facts set aside, K and alpha chosen on
validation, a bootstrap interval by fact, and committed results whose files agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pysteer
from pysteer.recipes import locate as locate_mod
from pysteer.recipes import selection

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "bench/results/recipes-smollm2.json"
EDIT_FILE = ROOT / "bench/results/recipes/consistency-edit.safetensors"
LOCATED_FILE = ROOT / "bench/results/recipes/located-smollm2.safetensors"
LF_JSON = ROOT / "bench/results/lf-steering-smollm2.json"


def _fact(rel: str, subject: str, answer: str, n: int = 3) -> locate_mod.ParaphraseFact:
    return locate_mod.ParaphraseFact(rel, subject, answer, (), tuple(f"q{i} {subject}" for i in range(n)))


def test_test_split_is_stratified_disjoint_and_seeded():
    facts = locate_mod.load_paraphrases()
    dev, test = selection.split_test_facts(facts, 0.3, seed=0)
    assert len(dev) + len(test) == len(facts)
    assert not {(f.relation, f.subject) for f in dev} & {(f.relation, f.subject) for f in test}
    for rel in {f.relation for f in facts}:
        n = sum(f.relation == rel for f in facts)
        assert sum(f.relation == rel for f in test) == round(0.3 * n)
    assert selection.split_test_facts(facts, 0.3, seed=0)[1] == test
    assert selection.split_test_facts(facts, 0.3, seed=1)[1] != test


def test_split_rejects_bad_fractions_and_lone_relations():
    facts = [_fact("capital", "A", "a"), _fact("capital", "B", "b"), _fact("currency", "C", "c")]
    with pytest.raises(ValueError, match="test_fraction"):
        selection.split_test_facts(facts, 1.0)
    with pytest.raises(ValueError, match="'currency' has 1 fact"):
        selection.split_test_facts(facts, 0.3)


def test_fact_counts_sum_to_the_consistency_metrics():
    facts = [_fact("capital", "A", "Paris"), _fact("capital", "B", "Rome")]
    answers = ["Paris", "Paris", "Rome", "Rome", "Rome", "no idea"]
    counts = selection.fact_counts(facts, answers)
    assert counts.tolist() == [[1, 3, 2, 3], [1, 3, 2, 3]]
    m = locate_mod.consistency_metrics(facts, answers)
    s = counts.sum(0)
    assert float(s[0] / s[1]) == pytest.approx(m["consistency"])
    assert float(s[2] / s[3]) == pytest.approx(m["accuracy"])


def test_bootstrap_resamples_facts_and_pairs_before_with_after():
    facts = [_fact("capital", s, "Paris") for s in "ABCDEFGH"]
    before = ["Paris", "Rome", "Oslo"] * 4 + ["Paris"] * 12  # 4 facts never agree, 4 always do
    after = ["Paris"] * 24
    boot = selection.bootstrap_consistency(facts, before, after, n_resamples=500, seed=3)
    assert boot["n_resamples"] == 500 and "facts" in boot["resampled"]
    b, a, c = (boot[k]["consistency"] for k in ("before", "after", "change"))
    assert b["value"] == pytest.approx(0.5) and a["value"] == 1.0 and c["value"] == pytest.approx(0.5)
    assert b["ci"][0] < 0.5 < b["ci"][1]  # facts differ, so the interval has width
    assert a["ci"] == [1.0, 1.0]  # every fact agrees after: no resample can change that
    # paired: each draw's change is 1 - its own before, so the change interval mirrors before's
    assert c["ci"][0] == pytest.approx(1 - b["ci"][1]) and c["ci"][1] == pytest.approx(1 - b["ci"][0])
    same = selection.bootstrap_consistency(facts, before, before, n_resamples=50)
    assert same["change"]["consistency"]["ci"] == [0.0, 0.0]


def test_choose_config_refuses_configurations_that_cost_accuracy():
    before = {"consistency": 0.4, "accuracy": 0.5}
    rows = [
        {"k": 2, "alpha": 5, "consistency": 0.9, "accuracy": 0.3},  # consistent but wrong
        {"k": 4, "alpha": 5, "consistency": 0.6, "accuracy": 0.5},
        {"k": 8, "alpha": 5, "consistency": 0.6, "accuracy": 0.7},
    ]
    chosen = selection.choose_config(rows, before)
    assert (chosen["k"], chosen["keeps_accuracy"]) == (8, True)
    fallback = selection.choose_config(rows[:1], before)
    assert (fallback["k"], fallback["keeps_accuracy"]) == (2, False)


def _split_located(facts, heldout, test, L=2, H=4, D=16) -> locate_mod.LocateResult:
    g = torch.Generator().manual_seed(0)
    meta = {
        "facts": [{"relation": f.relation, "subject": f.subject} for f in facts],
        "test_facts": [{"relation": f.relation, "subject": f.subject} for f in test],
        "chat": True,
        "max_new_tokens": 2,
    }
    return locate_mod.LocateResult(
        torch.rand(L, H, generator=g),
        torch.rand(L, H, generator=g),
        torch.randn(L, H, D, generator=g),
        torch.rand(L, H, generator=g) + 0.5,
        heldout,
        meta,
    )


def test_cli_edit_choose_writes_the_validation_choice_and_reports_test(tiny_dir, tmp_path):
    from pysteer.cli import main

    dataset = locate_mod.load_paraphrases()
    dev, test = dataset[:4], dataset[4:6]
    located = _split_located(dev, [2, 3], test).save(tmp_path / "located.safetensors")
    out, js = tmp_path / "edit.safetensors", tmp_path / "edit.json"
    argv = ["edit", "--located", str(located), "--model", str(tiny_dir), "--out", str(out)]
    argv += ["--sweep-k", "1", "3", "--sweep-alpha", "2", "--choose", "--bootstrap", "50"]
    assert main([*argv, "--json-out", str(js)]) == 0
    summary = json.loads(js.read_text())
    assert [r["k"] for r in summary["after"]] == [1, 3]
    assert summary["validation_facts"] == 2 and summary["test"]["n_facts"] == 2
    assert summary["test"]["bootstrap"]["n_resamples"] == 50
    meta = pysteer.load(out).metadata
    assert (meta["k"], meta["alpha"]) == (summary["chosen"]["k"], summary["chosen"]["alpha"])


def test_cli_edit_choose_needs_a_sweep_and_a_test_split(tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    dataset = locate_mod.load_paraphrases()
    located = _split_located(dataset[:4], [2, 3], []).save(tmp_path / "located.safetensors")
    base = ["edit", "--located", str(located), "--model", str(tiny_dir), "--out", str(tmp_path / "e.st")]
    assert main([*base, "--choose"]) == 2
    assert "--sweep-k" in capsys.readouterr().err
    assert main([*base, "--choose", "--sweep-k", "1"]) == 2
    assert "no test split" in capsys.readouterr().err
    assert not (tmp_path / "e.st").exists()


def test_committed_results_json_and_steering_file_agree():
    """The K and alpha the results JSON reports as chosen are the ones in the committed steering file,
    its heads are the top K of the committed locate result, and they were chosen on validation."""
    section = json.loads(RESULTS_JSON.read_text())["locate_and_edit"]["edit"]
    meta = pysteer.load(EDIT_FILE).metadata
    assert (meta["k"], meta["alpha"]) == (section["chosen"]["k"], section["chosen"]["alpha"])
    assert (section["k"], section["alpha"]) == (meta["k"], meta["alpha"])
    located = locate_mod.LocateResult.load(LOCATED_FILE)
    assert [tuple(h) for h in meta["heads"]] == located.top(meta["k"])
    test = {(f["relation"], f["subject"]) for f in located.metadata["test_facts"]}
    seen = {(f["relation"], f["subject"]) for f in located.metadata["facts"]}
    assert test and not test & seen  # locate never saw a test fact
    assert section["test"]["n_facts"] == len(test)


def _fact_keys(rows) -> list[tuple[str, str]]:
    return [(f["relation"], f["subject"]) for f in rows]


def test_committed_results_cover_the_shipped_paraphrase_set():
    """The committed locate result was computed on the shipped facts as they are now: its development
    and test facts together are exactly the shipped set, split as ``split_test_facts`` splits it."""
    located = locate_mod.LocateResult.load(LOCATED_FILE)
    facts = locate_mod.load_paraphrases()
    dev, test = selection.split_test_facts(facts, 0.3, seed=0)
    assert _fact_keys(located.metadata["facts"]) == [(f.relation, f.subject) for f in dev]
    assert _fact_keys(located.metadata["test_facts"]) == [(f.relation, f.subject) for f in test]


def test_committed_lf_steering_comparison_agrees_with_the_head_edit_results():
    """LF-Steering is reported on the locate result's test facts, next to the head edit's chosen K and
    alpha and the same unsteered test figures."""
    lf = json.loads(LF_JSON.read_text())
    comparison, output = lf["comparison_test"], lf["lf_steer_output"]
    edit = json.loads(RESULTS_JSON.read_text())["locate_and_edit"]["edit"]
    located = locate_mod.LocateResult.load(LOCATED_FILE)
    assert _fact_keys(output["test_facts"]) == _fact_keys(located.metadata["test_facts"])
    assert comparison["n_facts"] == edit["test"]["n_facts"] == len(output["test_facts"])
    config = comparison["head_edit"]["config"]
    assert (config["k"], config["alpha"]) == (edit["chosen"]["k"], edit["chosen"]["alpha"])
    before = edit["test"]["bootstrap"]["before"]["consistency"]["value"]
    assert comparison["before"]["consistency"]["value"] == pytest.approx(before, abs=1e-4)
    assert output["test"]["before"]["consistency"] == pytest.approx(before)
    assert comparison["lf_steering"]["config"]["alpha"] == output["chosen"]["alpha"]
