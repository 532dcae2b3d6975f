"""Semantic-entropy probes: the fitted probe equals scikit-learn, saves with safetensors, and the
binarisation / layer-range rules of the reference notebook."""

import pytest
import torch

from pysteer.uncertainty.probes import (
    LinearProbe,
    best_layer_range,
    best_split,
    binarize,
    fit_probe,
    fit_range_probe,
    layer_aurocs,
)

sklearn = pytest.importorskip("sklearn")


def separable(n=80, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.arange(1, d + 1)
    y = (x[:, 0] + 0.5 * x[:, 2] > 0).long()
    return x, y


def test_probe_equals_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = separable()
    probe = fit_probe(x, y.tolist(), ["layers.3.resid"])
    scaler = StandardScaler().fit(x.double().numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x.double().numpy()), y.numpy())
    ref = clf.predict_proba(scaler.transform(x.double().numpy()))[:, 1]
    torch.testing.assert_close(probe([x]).double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)


def test_probe_reads_one_tensor_per_site_in_order():
    x, y = separable(d=6)
    probe = fit_probe(x, y.tolist(), ["layers.0.resid", "layers.1.resid"])
    both = probe([x[:, :3], x[:, 3:]])
    torch.testing.assert_close(both, torch.sigmoid(probe.logits([x[:, :3], x[:, 3:]])))
    with pytest.raises(ValueError, match="reads 2 sites"):
        probe([x])
    with pytest.raises(ValueError, match="reads 6 features, got 5"):
        probe([x[:, :3], x[:, 3:5]])


def test_probe_round_trips_through_safetensors(tmp_path):
    x, y = separable()
    probe = fit_probe(x, y.tolist(), ["layers.2.resid"], target="wrong_answer")
    path = probe.save(tmp_path / "probe.safetensors")
    back = LinearProbe.load(path)
    assert back.sites == ["layers.2.resid"] and back.target == "wrong_answer"
    assert torch.equal(back([x]), probe([x]))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a pysteer probe"):
        LinearProbe.load(tmp_path / "other.safetensors")


def test_best_split_separates_the_zero_entropy_group():
    ents = [0.0, 0.0, 0.0, 1.0, 1.0, 1.1]
    split = best_split(ents)
    assert 0.0 < split <= 1.0
    assert binarize(ents, split) == [0, 0, 0, 1, 1, 1]


def test_best_split_minimises_squared_error_of_the_two_means():
    ents = [0.1, 0.2, 0.3, 2.0, 2.1, 2.2, 2.3]
    split = best_split(ents)
    assert 0.3 < split <= 2.0


def test_best_layer_range_is_the_highest_mean_contiguous_run():
    assert best_layer_range([0.5, 0.9, 0.9, 0.6], min_width=2) == (1, 3)
    assert best_layer_range([0.5, 0.9, 0.9, 0.6], min_width=4) == (0, 4)
    with pytest.raises(ValueError, match="min_width=5"):
        best_layer_range([0.5, 0.6], min_width=5)


def test_layer_sweep_finds_the_informative_layer_and_the_range_probe_concatenates():
    g = torch.Generator().manual_seed(1)
    n, d = 120, 5
    y = torch.randint(0, 2, (n,), generator=g)
    states = torch.randn(n, 3, d, generator=g)
    states[:, 1, 0] += 3.0 * (2 * y - 1)  # only layer 1 carries the label
    aucs = layer_aurocs(states[:80], y[:80].tolist(), states[80:], y[80:].tolist())
    assert aucs[1] > 0.95 and abs(aucs[0] - 0.5) < 0.25
    sites = [f"layers.{i}.resid" for i in range(3)]
    probe = fit_range_probe(states, y.tolist(), (1, 3), sites, target="high_semantic_entropy")
    assert probe.sites == sites[1:] and probe.n_features == 2 * d
    assert probe([states[:, 1], states[:, 2]]).shape == (n,)


def test_probe_study_survives_an_evaluation_split_with_one_class(tmp_path):
    from pysteer.uncertainty.experiment import probe_study
    from pysteer.uncertainty.questions import Question

    g = torch.Generator().manual_seed(2)
    splits = ["train"] * 20 + ["validation"] * 4 + ["test"] * 6
    questions = [Question(f"q{i}", "?", ("a",), s) for i, s in enumerate(splits)]
    se = [0.0, 2.0] * 10 + [2.0] * 4 + [0.0, 2.0] * 3  # validation: high SE only
    correct = [i % 2 == 0 for i in range(30)]
    hidden = torch.randn(30, 3, 4, generator=g)
    hidden[:, 2, 0] += 4 * torch.tensor(se)
    scored = {
        "scores": {"semantic_entropy": se},
        "correct": correct,
        "hidden": {"tbg": hidden, "slt": hidden},
        "sites": [f"layers.{i}.resid" for i in range(3)],
    }
    out = probe_study(questions, scored, min_layers=1, probe_dir=tmp_path)
    sep = out["sep_tbg"]
    assert sep["layer_auroc_validation"] is None and sep["layer_range"] == [0, 3]
    assert sep["layer_auroc_test"][2] > 0.9 and sep["range_auroc_test_own_target"] is not None
    assert out["accuracy_probe_slt"]["layer_auroc_validation"] is not None
