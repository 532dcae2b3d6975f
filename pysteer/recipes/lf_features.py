"""LF-Steering: steer sparse-autoencoder features tied to semantic consistency, only where they fire
(Yang et al., 2025, arXiv 2501.11036).

The data and labels are those of ``locate_heads``: the model answers paraphrases of a fact greedily and
a pair of phrasings is labelled 1 when the two answers agree. Each prompt is a sample weighted by its
pair counts, read at ``layers.{i}.resid`` for the last prompt token.

1. **Layer.** A logistic-regression probe per layer (scikit-learn, standardised inputs, balanced
   classes) is fitted on the training facts; the layer with the best balanced accuracy on the
   validation facts is chosen (ties: the earlier layer).
2. **Features.** The SAE at that layer encodes the training prompts. Every latent gets its activation
   frequency in each class and a standardised mean difference (Cohen's d with the pooled
   within-class standard deviation) of its activations between consistent and inconsistent samples.
   Latents are ranked by d: unlike a raw frequency or mean difference, d is comparable across latents
   whose activations have very different scales, and it counts how *much* a latent fires as well as
   how often. Only latents with ``d > 0`` (more active when the answers agree) that fire on at least
   ``min_frequency`` of the consistent samples are kept, since ``add_if_active`` can only act where a
   latent fires.
3. **Steering.** ``add_if_active``: ``f_j += alpha * scale_j`` wherever latent ``j`` is active, with
   ``scale_j`` its mean activation when active on the training prompts (so ``alpha`` is in units of
   each latent's own typical size), through the error-preserving SAE edit (what the SAE does not
   reconstruct is kept; tokens where no located latent fires are left bit-exactly alone).

``alpha`` is chosen on the validation facts and reported on a test split (``pysteer lf-steer``), the
same split as ``pysteer locate`` / ``pysteer edit`` for the same facts, fraction and seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.specs import geometry, get_spec
from ..sae import SAE
from ..sae_steering import SAEEdit
from ..steering import SteeringSpec
from .locate import (
    PairDataset,
    ParaphraseFact,
    _fact_index,
    _pair_counts,
    consistency_metrics,
    fact_texts,
    load_paraphrases,
    pairs_from_answers,
    run_prompts,
    split_groups,
)

SITE = "resid"


def _require_sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import balanced_accuracy_score
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the LF-Steering layer probes use scikit-learn: pip install 'pysteer[probes]'"
        ) from err
    return LogisticRegression, balanced_accuracy_score


# ------------------------------------------------------------------------------------------------
# 1. the layer: one probe per layer
# ------------------------------------------------------------------------------------------------


def _weighted_samples(X: Tensor, n1: Tensor, n0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts as samples: one with label 1 weighted by its agreeing pairs, one with label 0 weighted by
    its disagreeing pairs (a prompt in both kinds of pair appears twice)."""
    pos, neg = n1 > 0, n0 > 0
    x = torch.cat([X[pos], X[neg]])
    y = torch.cat([torch.ones(int(pos.sum())), torch.zeros(int(neg.sum()))])
    return x, y, torch.cat([n1[pos], n0[neg]])


def probe_layers(
    features: Tensor, dataset: PairDataset, heldout: Sequence[int], *, C: float = 1.0, seed: int = 0
) -> Tensor:
    """Balanced validation accuracy of a logistic-regression probe per layer.

    Args:
        features: ``[N, L, d]`` site activations at the last prompt token, one row per prompt.
        dataset: the pairs and labels over those ``N`` prompts.
        heldout: the validation groups (facts); probes are fitted on the others.
        C: inverse L2 strength of the probes (scikit-learn's ``C``; inputs are standardised).

    Returns:
        ``[L]`` balanced accuracy on the validation samples (weighted by pair counts).
    """
    LogisticRegression, balanced_accuracy_score = _require_sklearn()
    val_mask = torch.isin(dataset.groups, torch.tensor(list(heldout), dtype=torch.long))
    n1_tr, n0_tr = _pair_counts(dataset, ~val_mask)
    n1_va, n0_va = _pair_counts(dataset, val_mask)
    _need_both_labels(("training", n1_tr, n0_tr), ("validation", n1_va, n0_va))
    acc = []
    for layer in range(features.shape[1]):
        X = features[:, layer].double()
        x_tr, y_tr, w_tr = _weighted_samples(X, n1_tr, n0_tr)
        x_va, y_va, w_va = _weighted_samples(X, n1_va, n0_va)
        mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
        probe = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
        probe.fit(((x_tr - mean) / std).numpy(), y_tr.numpy(), sample_weight=w_tr.numpy())
        pred = probe.predict(((x_va - mean) / std).numpy())
        acc.append(balanced_accuracy_score(y_va.numpy(), pred, sample_weight=w_va.numpy()))
    return torch.tensor(acc, dtype=torch.float32)


def _need_both_labels(*parts: tuple[str, Tensor, Tensor]) -> None:
    for name, n1, n0 in parts:
        if n1.sum() == 0 or n0.sum() == 0:
            raise ValueError(
                f"the {name} pairs have only one label ({int(n1.sum())} agreeing, {int(n0.sum())} "
                "disagreeing); use more facts or another seed"
            )


# ------------------------------------------------------------------------------------------------
# 2. the features: a standardised effect size per latent
# ------------------------------------------------------------------------------------------------


def feature_effects(acts: Tensor, n1: Tensor, n0: Tensor) -> dict[str, Tensor]:
    """Per latent: activation frequency and mean in each class, and Cohen's d between the classes.

    Args:
        acts: ``[N, d_sae]`` SAE activations of the prompts.
        n1, n0: ``[N]`` sample weights of label 1 (consistent) / label 0.

    Returns:
        ``{"freq1", "freq0", "mean1", "mean0", "effect", "scale"}``, each ``[d_sae]`` float64;
        ``effect = (mean1 - mean0) / pooled_std`` (0 where a latent never varies), ``scale`` is the
        mean activation where the latent is active (0 where it never is).
    """
    a = acts.double()
    active = (a > 0).double()
    out = {}
    var = []
    for c, w in (("1", n1.double()), ("0", n0.double())):
        total = w.sum()
        if total <= 0:
            raise ValueError("feature_effects: need samples of both labels")
        mean = (a * w[:, None]).sum(0) / total
        out["freq" + c] = (active * w[:, None]).sum(0) / total
        out["mean" + c] = mean
        var.append(((a - mean) ** 2 * w[:, None]).sum(0) / total)
    pooled = ((var[0] + var[1]) / 2).sqrt()
    diff = out["mean1"] - out["mean0"]
    out["effect"] = torch.where(pooled > 1e-12, diff / pooled.clamp_min(1e-12), torch.zeros_like(diff))
    w_all = (n1 + n0).double()
    fired = (active * w_all[:, None]).sum(0)
    out["scale"] = torch.where(fired > 0, (a * w_all[:, None]).sum(0) / fired.clamp_min(1e-12), 0.0)
    return out


def select_features(effects: dict[str, Tensor], n_features: int, min_frequency: float = 0.05) -> list[int]:
    """The ``n_features`` latents with the largest positive effect among those active on at least
    ``min_frequency`` of the consistent samples (fewer when fewer qualify)."""
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    eligible = (effects["effect"] > 0) & (effects["freq1"] >= min_frequency)
    ranked = torch.argsort(torch.where(eligible, effects["effect"], -math.inf), descending=True)
    return [int(j) for j in ranked[:n_features] if eligible[j]]


# ------------------------------------------------------------------------------------------------
# the result and the recipe
# ------------------------------------------------------------------------------------------------


@dataclass
class LFSteeringResult:
    """What ``lf_steering`` found.

    Attributes:
        layer: the layer the probes chose (the SAE's site is ``layers.{layer}.resid``).
        probe_accuracy: ``[L]`` balanced validation accuracy of each layer's probe.
        features: the located latents, best first.
        effect, freq1, freq0, scale: ``[F]`` Cohen's d, frequency among consistent / inconsistent
            samples, and mean active value of each located latent (training facts).
        heldout_groups: the validation facts (indices into the facts given).
        metadata: JSON-able description (facts, counts, the unsteered baseline).
    """

    layer: int
    probe_accuracy: Tensor
    features: list[int]
    effect: Tensor
    freq1: Tensor
    freq0: Tensor
    scale: Tensor
    heldout_groups: list[int]
    metadata: dict = field(default_factory=dict)

    @property
    def site(self) -> str:
        return f"layers.{self.layer}.{SITE}"

    def edit(self, sae: SAE, alpha: float) -> SAEEdit:
        """``add_if_active`` of ``alpha * scale_j`` on every located latent ``j``."""
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        edits = {f: ("add_if_active", float(alpha * s)) for f, s in zip(self.features, self.scale.tolist())}
        return SAEEdit(self.site, sae, edits)

    def spec(self, sae: SAE, alpha: float, positions: str = "all") -> SteeringSpec:
        """The steering as a ``SteeringSpec`` (save it with ``pysteer.save``; the SAE travels in the file)."""
        meta = {
            "recipe": "lf_steering",
            "method": "add_if_active on SAE latents ranked by Cohen's d (consistent vs inconsistent)",
            "site": self.site,
            "alpha": float(alpha),
            "features": self.features,
            "effect": [round(float(e), 4) for e in self.effect],
        }
        return SteeringSpec({"default": [self.edit(sae, alpha)]}, positions, meta)

    def summary(self) -> dict:
        """JSON-able figures: the chosen layer, the per-layer probe accuracy and the located latents."""
        return {
            "layer": self.layer,
            "site": self.site,
            "probe_accuracy": [round(float(a), 4) for a in self.probe_accuracy],
            "features": [
                {
                    "latent": f,
                    "effect_d": round(float(e), 4),
                    "freq_consistent": round(float(p1), 4),
                    "freq_inconsistent": round(float(p0), 4),
                    "scale": round(float(s), 4),
                }
                for f, e, p1, p0, s in zip(self.features, self.effect, self.freq1, self.freq0, self.scale)
            ],
            **self.metadata,
        }


def lf_steering(
    model: nn.Module,
    tokenizer,
    dataset: Sequence[ParaphraseFact] | PairDataset | None = None,
    *,
    sae: SAE | None,
    layer: int | None = None,
    n_features: int = 8,
    min_frequency: float = 0.05,
    chat: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    validation_fraction: float = 0.3,
    seed: int = 0,
    probe_C: float = 1.0,
) -> LFSteeringResult:
    """Pick a layer by probes, locate consistency latents of ``sae`` there, and return the steering.

    Args:
        model, tokenizer: a Hugging Face causal LM (eval mode) and its tokenizer.
        dataset: facts with phrasings (default: the shipped paraphrases; pass the development facts
            when a test split is kept apart), or a ``PairDataset`` with given labels.
        sae: the SAE at ``layers.{layer}.resid`` of the chosen layer (``pysteer.SAE.load``).
        layer: skip the choice and use this layer (the probes still run and are reported).
        n_features, min_frequency: see ``select_features``.
        chat, max_new_tokens, batch_size: as in ``locate_heads``.
        validation_fraction, seed: the facts held out to choose the layer (``locate_heads``'s split).
        probe_C: inverse L2 strength of the layer probes.

    Raises:
        ValueError: no SAE, an SAE of the wrong width, or an SAE recorded for another site than the
            chosen one (the message names both), single-label data, no latent qualifying.
    """
    if sae is None:
        raise ValueError(
            "lf_steering needs an SAE at the probed layer's residual stream (sae=pysteer.SAE.load(...)); "
            "probe_consistency_layers (or `pysteer lf-steer --probe-only`) tells which layer"
        )
    geo = geometry(model, get_spec(model))
    if sae.d_in != geo.d_model:
        raise ValueError(
            f"lf_steering: the SAE has d_in={sae.d_in}, the model's residual stream is {geo.d_model}"
        )
    if layer is not None and not 0 <= layer < geo.n_layers:
        raise ValueError(f"lf_steering: layer must be in [0, {geo.n_layers}), got {layer}")
    facts, answers, feats, pairs = _read_dataset(model, tokenizer, dataset, chat, max_new_tokens, batch_size)
    heldout = split_groups(pairs.groups, validation_fraction, seed)
    accuracy = probe_layers(feats, pairs, heldout, C=probe_C, seed=seed)
    chosen = int(torch.argmax(accuracy)) if layer is None else layer  # argmax: the first of equals
    site = f"layers.{chosen}.{SITE}"
    if sae.site is not None and sae.site != site:
        raise ValueError(
            f"lf_steering: the SAE is for {sae.site}, the steered site is {site} "
            f"({'given by layer=' if layer is not None else 'chosen by the probes'}); give an SAE trained there"
        )
    train_mask = ~torch.isin(pairs.groups, torch.tensor(heldout))
    n1, n0 = _pair_counts(pairs, train_mask)
    with torch.no_grad():
        acts = sae.encode(feats[:, chosen].to(sae.dtype)).float()
    effects = feature_effects(acts, n1, n0)
    located = select_features(effects, n_features, min_frequency)
    if not located:
        raise ValueError(
            f"no latent of the SAE at {site} is more active on consistent samples and fires on "
            f">= {min_frequency:g} of them; lower min_frequency or use another SAE"
        )
    idx = torch.tensor(located)
    meta = {
        "probe": {"C": probe_C, "validation": "balanced accuracy on the validation facts", "seed": seed},
        "statistic": "Cohen's d (pooled within-class std) of latent activations, consistent vs inconsistent",
        "min_frequency": min_frequency,
        "train_pairs": {"agree": int(pairs.labels[train_mask].sum()), "total": int(train_mask.sum())},
        "validation_pairs": {
            "agree": int(pairs.labels[~train_mask].sum()),
            "total": int((~train_mask).sum()),
        },
    }
    if facts is not None:
        held = set(heldout)
        held_facts = [f for i, f in enumerate(facts) if i in held]
        held_answers = [a for (i, _), a in zip(_fact_index(facts), answers) if i in held]
        meta.update(
            relation_only_accuracy=relation_only_accuracy(facts, pairs, heldout, C=probe_C, seed=seed),
            facts=[{"relation": f.relation, "subject": f.subject} for f in facts],
            chat=chat,
            max_new_tokens=max_new_tokens,
            baseline={"validation": consistency_metrics(held_facts, held_answers)},
        )
    return LFSteeringResult(
        chosen,
        accuracy,
        located,
        effects["effect"][idx].float(),
        effects["freq1"][idx].float(),
        effects["freq0"][idx].float(),
        effects["scale"][idx].float(),
        heldout,
        meta,
    )


def probe_consistency_layers(
    model: nn.Module,
    tokenizer,
    dataset: Sequence[ParaphraseFact] | PairDataset | None = None,
    *,
    chat: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    validation_fraction: float = 0.3,
    seed: int = 0,
    probe_C: float = 1.0,
) -> dict:
    """Step 1 alone: which layer's residual stream predicts consistency best (where to train the SAE).

    Returns:
        ``{"layer", "site", "probe_accuracy": [L]}`` (the arguments as in ``lf_steering``).
    """
    facts, _, feats, pairs = _read_dataset(model, tokenizer, dataset, chat, max_new_tokens, batch_size)
    heldout = split_groups(pairs.groups, validation_fraction, seed)
    accuracy = probe_layers(feats, pairs, heldout, C=probe_C, seed=seed)
    layer = int(torch.argmax(accuracy))
    out = {"layer": layer, "site": f"layers.{layer}.{SITE}", "probe_accuracy": accuracy.tolist()}
    if facts is not None:
        out["relation_only_accuracy"] = relation_only_accuracy(facts, pairs, heldout, C=probe_C, seed=seed)
    return out


def relation_only_accuracy(
    facts: Sequence[ParaphraseFact],
    pairs: PairDataset,
    heldout: Sequence[int],
    *,
    C: float = 1.0,
    seed: int = 0,
) -> float:
    """Balanced validation accuracy of the same probe given only each prompt's relation (one-hot).

    A layer probe that does no better than this has learned which relation a question asks about
    (SmolLM2 agrees with itself far more on capitals than on currencies), not consistency itself.
    """
    relations = sorted({f.relation for f in facts})
    onehot = torch.tensor([[float(f.relation == r) for r in relations] for f in facts for _ in f.prompts])
    return float(probe_layers(onehot[:, None, :], pairs, heldout, C=C, seed=seed)[0])


def _read_dataset(model, tokenizer, dataset, chat, max_new_tokens, batch_size):
    """``(facts, answers, features [N, L, d], pairs)``: the model answers the facts (or, for a
    ``PairDataset``, one forward per prompt) while the residual stream is traced."""
    if isinstance(dataset, PairDataset):
        _, feats = run_prompts(
            model, tokenizer, dataset.prompts, max_new_tokens=0, batch_size=batch_size, site=SITE
        )
        return None, None, feats, dataset
    facts = list(dataset) if dataset is not None else load_paraphrases()
    if not facts or not all(isinstance(f, ParaphraseFact) for f in facts):
        raise TypeError("dataset must be a PairDataset or a non-empty list of ParaphraseFact")
    texts, _ = fact_texts(tokenizer, facts, chat)
    answers, feats = run_prompts(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, site=SITE
    )
    return facts, answers, feats, pairs_from_answers(facts, texts, answers)
