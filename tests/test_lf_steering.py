"""LF-Steering: layer probes, latent location by effect size, ``add_if_active`` steering (tiny models,
a random TopK SAE)."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.models.tiny import tiny_model
from pysteer.recipes import lf_features as lf
from pysteer.recipes import locate as locate_mod
from pysteer.sae import SAE

pytest.importorskip("sklearn", reason="the layer probes need scikit-learn (the 'test' extra)")

D_SAE, TOPK = 48, 3


class IntTokenizer:
    """Texts are space-separated token ids (padding id 0, left padding)."""

    pad_token_id = 0
    eos_token_id = 2
    chat_template = None
    padding_side = "left"

    def __call__(self, texts, return_tensors=None, padding=False):
        ids = [[int(t) for t in s.split()] for s in texts]
        S = max(map(len, ids))
        input_ids = torch.tensor([[0] * (S - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in ids])
        return _Batch(input_ids=input_ids, attention_mask=mask)


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def _random_sae(d_in: int, seed: int = 0, hook: str | None = None) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, D_SAE, generator=g) / d_in**0.5
    W_dec = torch.randn(D_SAE, d_in, generator=g) / D_SAE**0.5
    meta = {"hook_name": hook} if hook else None
    return SAE(W_enc, torch.zeros(D_SAE), W_dec, torch.zeros(d_in), activation="topk", k=TOPK, metadata=meta)


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer tiny llama, 48 random prompts, pairs (i, i+1) labelled at random (both labels)."""
    model = tiny_model("llama", num_hidden_layers=3)
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(str(int(t)) for t in torch.randint(3, 128, (6,), generator=g)) for _ in range(48)]
    pairs = torch.tensor([(i, i + 1) for i in range(0, 48, 2)])
    labels = torch.arange(24) % 2
    ds = locate_mod.PairDataset(prompts, pairs, labels, torch.arange(24))
    return model, ds


@pytest.fixture(scope="module")
def located(tiny):
    model, ds = tiny
    sae = _random_sae(pysteer.models.geometry(model).d_model)
    result = lf.lf_steering(model, IntTokenizer(), ds, sae=sae, n_features=6, min_frequency=0.0)
    return result, sae


def test_probes_pick_the_layer_that_carries_the_label():
    g = torch.Generator().manual_seed(0)
    N, L, d = 80, 4, 12
    X = torch.randn(N, L, d, generator=g)
    label = torch.arange(N) % 2
    X[:, 2, 0] += 3.0 * (2 * label - 1)  # only layer 2 knows the label
    pairs = torch.stack([torch.arange(N), torch.arange(N)], 1)  # each prompt paired with itself
    ds = locate_mod.PairDataset([str(i) for i in range(N)], pairs, label, torch.arange(N))
    acc = lf.probe_layers(X, ds, heldout=list(range(0, N, 5)))
    assert int(torch.argmax(acc)) == 2 and acc[2] > 0.9
    assert acc[[0, 1, 3]].max() < 0.8


def test_effect_size_is_cohens_d_and_selection_keeps_positive_frequent_latents():
    acts = torch.tensor(
        [[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    )  # rows 0-1 consistent, 2-3 inconsistent
    n1, n0 = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    e = lf.feature_effects(acts, n1, n0)
    # latent 0: means 2 vs 0, within-class variances 1 and 0 -> pooled sd sqrt(0.5)
    assert float(e["effect"][0]) == pytest.approx(2 / 0.5**0.5)
    assert float(e["effect"][1]) == 0.0  # constant within classes but no pooled variance: 0, not inf
    assert e["freq1"].tolist() == [1.0, 0.0, 0.5] and e["freq0"].tolist() == [0.0, 1.0, 0.0]
    assert float(e["scale"][0]) == pytest.approx(2.0)  # mean of its active values 1 and 3
    assert lf.select_features(e, 5) == [0, 2]  # latent 1 fires more when inconsistent: never steered
    assert lf.select_features(e, 5, min_frequency=0.75) == [0]


def test_lf_steering_reports_layer_probes_and_located_latents(located, tiny):
    result, _ = located
    model, _ = tiny
    L = pysteer.models.geometry(model).n_layers
    assert result.probe_accuracy.shape == (L,)
    assert result.layer == int(torch.argmax(result.probe_accuracy))
    assert 1 <= len(result.features) <= 6 and (result.effect > 0).all()
    assert result.site == f"layers.{result.layer}.resid"
    assert result.summary()["features"][0]["latent"] == result.features[0]


def test_steering_changes_exactly_the_tokens_where_located_latents_fire(located, tiny):
    result, sae = located
    model, ds = tiny
    enc = IntTokenizer()(ds.prompts[:16])
    with pysteer.trace(model, [result.site]) as plain:
        model(**enc)
    with pysteer.steer(model, result.spec(sae, alpha=3.0)), pysteer.trace(model, [result.site]) as steered:
        model(**enc)
    x, y = plain[result.site], steered[result.site]  # [B, S, d]: the site's output, after the edit
    fires = (sae.encode(x)[..., result.features] > 0).any(-1)
    changed = (x != y).any(-1)
    assert fires.any() and (~fires).any()  # the check below is not vacuous
    assert torch.equal(changed, fires)


def test_lf_steering_refuses_a_missing_or_mismatched_sae(tiny):
    model, ds = tiny
    d = pysteer.models.geometry(model).d_model
    with pytest.raises(ValueError, match="needs an SAE"):
        lf.lf_steering(model, IntTokenizer(), ds, sae=None)
    with pytest.raises(ValueError, match=f"d_in={d + 1}"):
        lf.lf_steering(model, IntTokenizer(), ds, sae=_random_sae(d + 1))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 3\), got 7"):
        lf.lf_steering(model, IntTokenizer(), ds, sae=_random_sae(d), layer=7)
    elsewhere = _random_sae(d, hook="blocks.0.hook_resid_post")
    with pytest.raises(
        ValueError,
        match=r"the SAE is for layers.0.resid, the steered site is layers.2.resid \(given by layer=\)",
    ):
        lf.lf_steering(model, IntTokenizer(), ds, sae=elsewhere, layer=2)


def test_cli_lf_steer_without_an_sae_says_what_to_give(capsys):
    from pysteer.cli import main

    assert main(["lf-steer", "--model", "/nonexistent"]) == 2
    assert "give --sae DIR" in capsys.readouterr().err


def test_relation_only_probe_scores_what_the_relation_alone_predicts():
    facts = [
        locate_mod.ParaphraseFact(rel, f"S{i}", ans, (), ("q1", "q2", "q3"))
        for rel, ans in (("capital", "Paris"), ("currency", "euro"))
        for i in range(6)
    ]
    answers = ["Paris"] * 18 + ["no idea"] * 18  # every capital pair agrees, no currency pair does
    texts = [f"{f.subject} {q}" for f in facts for q in f.prompts]
    pairs = locate_mod.pairs_from_answers(facts, texts, answers)
    heldout = [0, 1, 6, 7]  # two facts of each relation
    assert lf.relation_only_accuracy(facts, pairs, heldout) == 1.0


def test_cli_lf_steer_loads_the_sae_and_reports_single_label_data_clearly(tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    sae_dir = tmp_path / "sae"
    _random_sae(64, hook="blocks.1.hook_resid_post").save(sae_dir)  # the tiny llama of tiny_dir: d_model 64
    argv = ["lf-steer", "--model", str(tiny_dir), "--relations", "capital", "--max-facts", "4"]
    argv += ["--max-new-tokens", "2", "--sae", str(sae_dir)]
    # a random model never names a capital: every pair disagrees, which no probe can learn from
    assert main(argv) == 2
    assert "only one label" in capsys.readouterr().err
