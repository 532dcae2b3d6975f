"""Semantic-entropy probes (Kossen et al., 2024): linear probes on hidden states that predict, from a
single forward, whether semantic entropy would be high — or, as the baseline, whether the answer is
wrong.

A :class:`LinearProbe` satisfies the gate protocol: ``probe.sites`` (site names) and
``probe(hidden)`` with one ``[B, d]`` tensor per site, returning ``[B]`` probabilities of the
positive class (high SE, or a wrong answer). Training uses scikit-learn's logistic regression (the
``uncertainty`` extra) on standardised features; the fitted standardisation, weight and bias are
stored, so the probe itself needs only torch, and is saved with safetensors.

Following the reference notebook: SE is binarised at the split that minimises the squared error of
the two sides' means (:func:`best_split`); one probe per layer gives an AUROC-per-layer curve; the
best contiguous layer range (at least ``min_width`` layers, by mean AUROC) is concatenated into one
probe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# the notebook scans 100 candidate splits between ~0 and the largest entropy
N_SPLITS = 100


@dataclass
class LinearProbe:
    """``p = sigmoid(((concat(hidden) - mean) / scale) . weight + bias)``.

    Attributes:
        sites: site names whose states are concatenated, in this order.
        weight, mean, scale: ``[F]`` float32, ``F`` the summed width of the sites.
        bias: scalar.
        target: what a positive means (``"high_semantic_entropy"`` or ``"wrong_answer"``).
    """

    sites: list[str]
    weight: Tensor
    bias: float
    mean: Tensor
    scale: Tensor
    target: str = "high_semantic_entropy"

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("a probe needs at least one site")
        shapes = {tuple(t.shape) for t in (self.weight, self.mean, self.scale)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(
                f"weight, mean and scale must be equal-length vectors, got shapes {sorted(shapes)}"
            )
        if bool((self.scale <= 0).any()):
            raise ValueError("probe scale must be positive")

    @property
    def n_features(self) -> int:
        return int(self.weight.numel())

    def logits(self, hidden: Sequence[Tensor]) -> Tensor:
        """``[B]`` logits from one ``[B, d]`` tensor per site (in ``self.sites`` order)."""
        if len(hidden) != len(self.sites):
            raise ValueError(
                f"the probe reads {len(self.sites)} sites ({', '.join(self.sites)}), got {len(hidden)} tensors"
            )
        x = torch.cat([h.reshape(h.shape[0], -1) for h in hidden], dim=-1)
        if x.shape[-1] != self.n_features:
            raise ValueError(f"the probe reads {self.n_features} features, got {x.shape[-1]}")
        w = self.weight.to(x.device, torch.float32)
        z = (x.float() - self.mean.to(x.device)) / self.scale.to(x.device)
        return z @ w + self.bias

    def __call__(self, hidden: Sequence[Tensor]) -> Tensor:
        """``[B]`` probability of the positive class (high SE / wrong answer)."""
        return torch.sigmoid(self.logits(hidden))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as one safetensors file (tensors + the sites and target as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "weight": self.weight.float().contiguous(),
            "mean": self.mean.float().contiguous(),
            "scale": self.scale.float().contiguous(),
            "bias": torch.tensor([float(self.bias)]),
        }
        save_file(tensors, str(path), metadata={"sites": json.dumps(self.sites), "target": self.target})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        """Read a probe written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "sites" not in meta:
                raise ValueError(f"{path}: not a pysteer probe file (no 'sites' metadata)")
            t = {k: f.get_tensor(k) for k in ("weight", "mean", "scale", "bias")}
        return cls(
            json.loads(meta["sites"]),
            t["weight"],
            float(t["bias"][0]),
            t["mean"],
            t["scale"],
            meta.get("target", ""),
        )


def fit_probe(
    features: Tensor,
    labels: Sequence[int],
    sites: Sequence[str],
    target: str = "high_semantic_entropy",
    C: float = 1.0,
) -> LinearProbe:
    """Fit a logistic-regression probe on ``features [N, F]`` (sites' states concatenated).

    Features are standardised (mean 0, unit variance per feature, from the training set) before
    scikit-learn's ``LogisticRegression`` (L2, inverse strength ``C``); both are folded into the probe.
    """
    from sklearn.linear_model import LogisticRegression

    x = features.double().reshape(features.shape[0], -1)
    y = [int(v) for v in labels]
    if x.shape[0] != len(y):
        raise ValueError(f"{x.shape[0]} feature rows but {len(y)} labels")
    if len(set(y)) != 2:
        raise ValueError(f"a probe needs both classes in its training labels, got {sorted(set(y))}")
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(((x - mean) / scale).numpy(), y)
    weight = torch.from_numpy(clf.coef_[0]).float()
    return LinearProbe(list(sites), weight, float(clf.intercept_[0]), mean.float(), scale.float(), target)


def best_split(entropies: Sequence[float]) -> float:
    """The threshold that best separates low from high SE: among 100 evenly spaced candidates in
    ``(0, max]``, the one minimising the summed squared error of each side around its mean (as in
    the reference notebook; a candidate leaving one side empty scores that side as nothing)."""
    ents = torch.as_tensor(list(entropies), dtype=torch.float64)
    if ents.numel() < 2:
        raise ValueError("best_split needs at least two entropies")
    candidates = torch.linspace(1e-10, float(ents.max()), N_SPLITS, dtype=torch.float64)
    best, best_sse = float(candidates[0]), float("inf")
    for split in candidates.tolist():
        sse = sum(
            float(((side - side.mean()) ** 2).sum())
            for side in (ents[ents < split], ents[ents >= split])
            if side.numel()
        )
        if sse < best_sse:
            best, best_sse = split, sse
    return best


def binarize(entropies: Sequence[float], split: float) -> list[int]:
    """1 where the entropy is at or above ``split`` (high SE), else 0."""
    return [int(e >= split) for e in entropies]


def layer_aurocs(
    train: Tensor, train_labels: Sequence[int], test: Tensor, test_labels: Sequence[int], C: float = 1.0
) -> list[float]:
    """Test AUROC of a probe per layer: ``train [N, L, d]`` and ``test [M, L, d]`` states."""
    from .evaluation import auroc

    out = []
    for layer in range(train.shape[1]):
        probe = fit_probe(train[:, layer], train_labels, [str(layer)], C=C)
        out.append(auroc(test_labels, probe([test[:, layer]]).tolist()))
    return out


def best_layer_range(aurocs: Sequence[float], min_width: int = 5) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous layers (at least ``min_width``) with the highest mean AUROC."""
    n = len(aurocs)
    if not 1 <= min_width <= n:
        raise ValueError(f"min_width={min_width} with {n} layers")
    best, best_mean = (0, min_width), float("-inf")
    for i in range(n):
        for j in range(i + min_width, n + 1):
            m = sum(aurocs[i:j]) / (j - i)
            if m > best_mean:
                best, best_mean = (i, j), m
    return best


def fit_range_probe(
    states: Tensor,
    labels: Sequence[int],
    layers: tuple[int, int],
    sites: Sequence[str],
    target: str,
    C: float = 1.0,
) -> LinearProbe:
    """One probe on the concatenated states of layers ``[start, stop)``: ``states [N, L, d]``."""
    start, stop = layers
    feats = states[:, start:stop].reshape(states.shape[0], -1)
    return fit_probe(feats, labels, list(sites[start:stop]), target=target, C=C)
