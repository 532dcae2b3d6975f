"""Locate heads tied to semantic consistency and inject biases there (Yang et al.; the ITI estimator).

The model answers paraphrased questions. A pair of paraphrases ``(p, q)`` of one fact gets the label
``c = 1`` when the two greedy answers agree and ``c = 0`` otherwise. For every head we take its output
at ``attn.heads`` for the last prompt token and fit a logistic-regression probe predicting ``c``;
heads are ranked by held-out probe accuracy, and for the top ``K`` heads the ITI edit
``alpha * sigma * unit(mean(z | c=1) - mean(z | c=0))`` is saved as ``HeadBias`` steering.

Probe features. A pair has two prompts; each contributes its own head output as a sample with the
pair's label (a prompt in several pairs is one sample weighted by its pair counts, which is the same
loss as repeating it). So the probe and the direction live in the head's own ``[D]`` space, the
space the bias is injected into at inference time, where only one prompt is seen.

Accuracy is *balanced* held-out accuracy (mean of the two classes' recalls): SmolLM2-135M agrees
on most capital pairs and few currency pairs, so plain accuracy would reward predicting the
majority class. The held-out split is by fact: no fact has prompts on both sides.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import read_safetensors_doc, write_safetensors
from ..interventions import HeadBias
from ..models.specs import geometry, get_spec
from ..steering import SteeringSpec
from ..tracing import trace
from ._common import chat_text, data_path, heatmap_png, model_device, read_jsonl

LOCATE_FORMAT = "pysteer.locate/1"

# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParaphraseFact:
    """One fact asked in several phrasings.

    Attributes:
        relation: e.g. ``"capital"``; answers are matched against the answers of the same relation.
        subject: e.g. ``"France"``.
        answer: the canonical answer, e.g. ``"Paris"``.
        aliases: other accepted answers (spellings, co-official languages ...).
        prompts: the phrasings (two or more).
    """

    relation: str
    subject: str
    answer: str
    aliases: tuple[str, ...]
    prompts: tuple[str, ...]

    @property
    def accepted(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


def load_paraphrases(
    path: str | os.PathLike | None = None, relations: Sequence[str] | None = None
) -> list[ParaphraseFact]:
    """Load the paraphrase dataset (default: the shipped ``paraphrases.jsonl``: capitals, languages,
    currencies: 94, 91 and 95 countries, five phrasings each).

    Raises:
        ValueError: a line lacks a field or has fewer than two phrasings.
    """
    path = Path(path) if path is not None else data_path("paraphrases.jsonl")
    facts = []
    for n, row in enumerate(read_jsonl(path), start=1):
        missing = {"relation", "subject", "answer", "prompts"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {sorted(missing)}")
        if len(row["prompts"]) < 2:
            raise ValueError(f"{path}:{n}: a fact needs at least two phrasings, got {len(row['prompts'])}")
        if relations is not None and row["relation"] not in relations:
            continue
        facts.append(
            ParaphraseFact(
                row["relation"],
                row["subject"],
                row["answer"],
                tuple(row.get("aliases", ())),
                tuple(row["prompts"]),
            )
        )
    if not facts:
        raise ValueError(f"{path}: no facts" + (f" with relations {list(relations)}" if relations else ""))
    return facts


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if not unicodedata.combining(ch)).lower()


class AnswerMatcher:
    """Finds which known answer a generated text gives (string match, word boundaries, accents folded).

    The vocabulary of a relation is every accepted answer of every fact of that relation; the first
    vocabulary item in the text (longest first at the same place) is the answer.
    """

    def __init__(self, facts: Sequence[ParaphraseFact]):
        vocab: dict[str, set[str]] = {}
        for f in facts:
            vocab.setdefault(f.relation, set()).update(_fold(a) for a in f.accepted)
        self.patterns = {
            rel: re.compile(
                r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")s?\b"
            )
            for rel, words in vocab.items()
        }

    def find(self, fact: ParaphraseFact, text: str) -> str | None:
        m = self.patterns[fact.relation].search(_fold(text))
        return m.group(1) if m else None

    def key(self, fact: ParaphraseFact, text: str) -> str | None:
        """Answer key: the canonical answer when the text gives any accepted answer, else what it gives."""
        found = self.find(fact, text)
        if found is None:
            return None
        return _fold(fact.answer) if found in {_fold(a) for a in fact.accepted} else found


@dataclass
class PairDataset:
    """Prompts, pairs of paraphrases and the agreement label of each pair.

    Attributes:
        prompts: ``N`` model inputs (already chat-formatted where wanted).
        pairs: ``[P, 2]`` long, indices into ``prompts``.
        labels: ``[P]`` long, 1 = the pair's answers agree.
        groups: ``[P]`` long; pairs of one group (fact) stay on one side of the held-out split.
    """

    prompts: list[str]
    pairs: Tensor
    labels: Tensor
    groups: Tensor

    def __post_init__(self):
        self.pairs = torch.as_tensor(self.pairs, dtype=torch.long)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        self.groups = torch.as_tensor(self.groups, dtype=torch.long)
        P = self.pairs.shape[0]
        if self.pairs.dim() != 2 or self.pairs.shape[1] != 2:
            raise ValueError(f"PairDataset: pairs must be [P, 2], got {tuple(self.pairs.shape)}")
        if self.labels.shape != (P,) or self.groups.shape != (P,):
            raise ValueError(f"PairDataset: labels and groups must be [{P}]")
        if P and (self.pairs.min() < 0 or self.pairs.max() >= len(self.prompts)):
            raise ValueError("PairDataset: a pair indexes outside prompts")
        if not set(self.labels.unique().tolist()) <= {0, 1}:
            raise ValueError("PairDataset: labels must be 0 or 1")


# ------------------------------------------------------------------------------------------------
# running the model: greedy answers and head outputs at the last prompt token, in one pass
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_prompts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    capture: bool = True,
    site: str = "attn.heads",
) -> tuple[list[str], Tensor | None]:
    """Greedy answers and every layer's ``site`` (default: every head's output) at the last prompt token.

    The site is read at ``layers.{i}.{site}`` by :func:`pysteer.trace` during the prefill forward
    of ``generate`` (``prefill_only=True``, ``positions="last"``), so capturing costs no extra forward.

    Returns:
        ``(answers, features)``: decoded continuations (empty strings when ``max_new_tokens == 0``)
        and ``[N, L, ...]`` float32 features on the CPU (``[N, L, H, D]`` for ``attn.heads``,
        ``[N, L, d_model]`` for ``resid``; None when ``capture=False``).
    """
    device = model_device(model)
    sites = [f"layers.{layer}.{site}" for layer in range(geometry(model, get_spec(model)).n_layers)]
    tracing = nullcontext()
    if capture:
        tracing = trace(model, sites, positions="last", device="cpu", prefill_only=True)
    answers: list[str] = []
    feats: list[Tensor] = []
    with tracing as heads:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(
                device
            )
            if capture:
                heads.clear()
            if max_new_tokens > 0:
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                answers.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
            else:
                model(**batch)
                answers.extend("" for _ in range(batch["input_ids"].shape[0]))
            if capture:
                feats.append(torch.stack([heads[s][:, 0] for s in sites], dim=1).float())  # [b, L, ...]
    return answers, (torch.cat(feats) if capture else None)


def fact_texts(
    tokenizer, facts: Sequence[ParaphraseFact], chat: bool = True
) -> tuple[list[str], list[tuple[int, int]]]:
    """Model inputs for every phrasing, and ``(fact index, phrasing index)`` of each."""
    texts, where = [], []
    for i, f in enumerate(facts):
        for j, p in enumerate(f.prompts):
            texts.append(chat_text(tokenizer, p, chat))
            where.append((i, j))
    return texts, where


def consistency_metrics(facts: Sequence[ParaphraseFact], answers: Sequence[str]) -> dict:
    """Consistency (fraction of paraphrase pairs with matching answers) and task accuracy.

    ``answers`` are in ``fact_texts`` order. A pair matches when both answers name the same known
    answer (any accepted alias counts as the canonical one); an answer naming none never matches.

    Returns:
        ``{"consistency", "accuracy", "answered", "n_pairs", "n_prompts", "per_relation": {...}}``.
    """
    matcher = AnswerMatcher(facts)
    keys = _answer_keys(facts, answers, matcher)
    agree, correct, answered = [], [], []
    per_rel: dict[str, dict[str, list[float]]] = {}
    for f, ks in zip(facts, keys):
        r = per_rel.setdefault(f.relation, {"agree": [], "correct": []})
        for a, b in combinations(ks, 2):
            ok = float(a is not None and a == b)
            agree.append(ok)
            r["agree"].append(ok)
        for k in ks:
            ok = float(k == _fold(f.answer))
            correct.append(ok)
            r["correct"].append(ok)
            answered.append(float(k is not None))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {
        "consistency": mean(agree),
        "accuracy": mean(correct),
        "answered": mean(answered),
        "n_pairs": len(agree),
        "n_prompts": len(correct),
        "per_relation": {
            k: {"consistency": mean(v["agree"]), "accuracy": mean(v["correct"])} for k, v in per_rel.items()
        },
    }


def _answer_keys(facts, answers, matcher) -> list[list[str | None]]:
    n = sum(len(f.prompts) for f in facts)
    if len(answers) != n:
        raise ValueError(f"expected {n} answers (one per phrasing), got {len(answers)}")
    keys, k = [], 0
    for f in facts:
        keys.append([matcher.key(f, answers[k + j]) for j in range(len(f.prompts))])
        k += len(f.prompts)
    return keys


def pairs_from_answers(
    facts: Sequence[ParaphraseFact], texts: list[str], answers: Sequence[str]
) -> PairDataset:
    """Every pair of phrasings of a fact, labelled 1 when their answers match (see ``consistency_metrics``)."""
    keys = _answer_keys(facts, answers, AnswerMatcher(facts))
    pairs, labels, groups, k = [], [], [], 0
    for g, (f, ks) in enumerate(zip(facts, keys)):
        for a, b in combinations(range(len(f.prompts)), 2):
            pairs.append((k + a, k + b))
            labels.append(int(ks[a] is not None and ks[a] == ks[b]))
            groups.append(g)
        k += len(f.prompts)
    return PairDataset(texts, torch.tensor(pairs), torch.tensor(labels), torch.tensor(groups))


# ------------------------------------------------------------------------------------------------
# probes and directions
# ------------------------------------------------------------------------------------------------


def _pair_counts(ds: PairDataset, pair_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt: how many selected pairs with label 1 / label 0 it belongs to (``[N]`` float)."""
    N = len(ds.prompts)
    n1 = torch.zeros(N)
    n0 = torch.zeros(N)
    sel = ds.pairs[pair_mask]
    lab = ds.labels[pair_mask].float()
    for col in (0, 1):
        n1.index_add_(0, sel[:, col], lab)
        n0.index_add_(0, sel[:, col], 1 - lab)
    return n1, n0


def fit_probes(
    X: Tensor,
    n1: Tensor,
    n0: Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit one logistic-regression probe per head, all heads at once.

    Args:
        X: ``[N, K, D]`` features (K heads).
        n1, n0: ``[N]`` sample weights of label 1 / label 0 (pair counts; a prompt can have both).
        steps, lr: full-batch Adam steps and learning rate.
        weight_decay: L2 penalty on the (standardised) weights.

    Returns:
        ``(W [K, D], b [K], mean [K, D], std [K, D])``; the probe's logit is
        ``((x - mean) / std) @ W + b``.
    """
    g = torch.Generator().manual_seed(seed)
    w = (n1 + n0)[:, None, None]
    total = w.sum().clamp_min(1e-12)
    mean = (X * w).sum(0) / total
    std = (((X - mean) ** 2 * w).sum(0) / total).sqrt().clamp_min(1e-6)
    Z = (X - mean) / std
    # class-balanced: both classes carry half the loss, whatever their counts
    c1 = 0.5 / n1.sum().clamp_min(1e-12)
    c0 = 0.5 / n0.sum().clamp_min(1e-12)
    K, D = X.shape[1], X.shape[2]
    W = (torch.randn(K, D, generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(K, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    f = torch.nn.functional
    for _ in range(steps):
        opt.zero_grad()
        logit = torch.einsum("nkd,kd->nk", Z, W) + b
        loss_1 = f.softplus(-logit)  # -log sigmoid(logit)
        loss_0 = f.softplus(logit)
        loss = ((c1 * n1)[:, None] * loss_1 + (c0 * n0)[:, None] * loss_0).sum(0)  # [K]
        loss = loss + weight_decay * (W**2).sum(-1)
        loss.sum().backward()  # heads are independent: the sum's gradient is each head's own
        opt.step()
    return W.detach(), b.detach(), mean, std


def probe_scores(
    X: Tensor, n1: Tensor, n0: Tensor, W: Tensor, b: Tensor, mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    """Balanced accuracy ``[K]`` and class-balanced log-loss ``[K]`` of the probes on weighted samples."""
    logit = torch.einsum("nkd,kd->nk", (X - mean) / std, W) + b
    pred = (logit > 0).float()
    s1, s0 = n1.sum().clamp_min(1e-12), n0.sum().clamp_min(1e-12)
    recall1 = (n1[:, None] * pred).sum(0) / s1
    recall0 = (n0[:, None] * (1 - pred)).sum(0) / s0
    f = torch.nn.functional
    loss = (
        0.5 * (n1[:, None] * f.softplus(-logit)).sum(0) / s1
        + 0.5 * (n0[:, None] * f.softplus(logit)).sum(0) / s0
    )
    return 0.5 * (recall1 + recall0), loss


def mean_difference_weighted(X: Tensor, n1: Tensor, n0: Tensor) -> tuple[Tensor, Tensor]:
    """ITI estimator on weighted samples: ``diff = mean(x|c=1) - mean(x|c=0)`` ``[K, D]`` and
    ``sigma [K]``, the standard deviation of all samples projected on the unit direction."""
    s1, s0 = n1.sum(), n0.sum()
    if s1 <= 0 or s0 <= 0:
        raise ValueError("need pairs of both labels (agreeing and disagreeing) to estimate a direction")
    mu1 = (X * n1[:, None, None]).sum(0) / s1
    mu0 = (X * n0[:, None, None]).sum(0) / s0
    diff = mu1 - mu0
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = (X * unit).sum(-1)  # [N, K]
    w = n1 + n0
    m = (proj * w[:, None]).sum(0) / w.sum()
    var = ((proj - m) ** 2 * w[:, None]).sum(0) / (w.sum() - 1).clamp_min(1.0)
    return diff, var.sqrt()


# ------------------------------------------------------------------------------------------------
# the result of locating
# ------------------------------------------------------------------------------------------------


@dataclass
class LocateResult:
    """What ``locate_heads`` found.

    Attributes:
        accuracy: ``[L, H]`` balanced held-out probe accuracy per head.
        heldout_loss: ``[L, H]`` class-balanced held-out log-loss (breaks accuracy ties).
        diff: ``[L, H, D]`` mean(z | c=1) - mean(z | c=0) on the training pairs.
        sigma: ``[L, H]`` std of the training samples along each head's unit direction (ITI's sigma).
        heldout_groups: indices of the groups (facts) kept out of probe training and directions.
        metadata: JSON-able description (dataset, counts, baseline metrics).
    """

    accuracy: Tensor
    heldout_loss: Tensor
    diff: Tensor
    sigma: Tensor
    heldout_groups: list[int]
    metadata: dict = field(default_factory=dict)

    def ranking(self) -> list[tuple[int, int]]:
        """Heads ``(layer, head)`` best first: held-out accuracy, then lower held-out loss."""
        L, H = self.accuracy.shape
        order = sorted(
            range(L * H),
            key=lambda i: (-float(self.accuracy.flatten()[i]), float(self.heldout_loss.flatten()[i])),
        )
        return [(i // H, i % H) for i in order]

    def top(self, k: int) -> list[tuple[int, int]]:
        L, H = self.accuracy.shape
        if not 1 <= k <= L * H:
            raise ValueError(f"k must be in 1..{L * H}, got {k}")
        return self.ranking()[:k]

    def unit(self, layer: int, head: int) -> Tensor:
        d = self.diff[layer, head]
        return d / d.norm().clamp_min(1e-12)

    def head_biases(self, k: int, alpha: float) -> list[HeadBias]:
        """ITI ``HeadBias`` interventions ``alpha * sigma * unit`` on the top ``k`` heads, one per layer."""
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.top(k):
            by_layer.setdefault(layer, []).append(head)
        out = []
        for layer in sorted(by_layer):
            heads = sorted(by_layer[layer])
            out.append(
                HeadBias(
                    layer,
                    head=heads,
                    direction=self.diff[layer, heads].clone(),
                    alpha=float(alpha),
                    sigma=self.sigma[layer, heads].clone(),
                )
            )
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as safetensors (tensors) + JSON metadata (no pickle)."""
        doc = {"format": LOCATE_FORMAT, "heldout_groups": self.heldout_groups, "metadata": self.metadata}
        tensors = {
            "accuracy": self.accuracy.contiguous(),
            "heldout_loss": self.heldout_loss.contiguous(),
            "diff": self.diff.contiguous(),
            "sigma": self.sigma.contiguous(),
        }
        return write_safetensors(tensors, path, metadata={"pysteer.locate": json.dumps(doc)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> LocateResult:
        path = Path(path)
        t, doc = read_safetensors_doc(path, "pysteer.locate", "file written by locate_heads")
        if not isinstance(doc, dict) or doc.get("format") != LOCATE_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else doc
            raise ValueError(f"{path}: unsupported format {found!r}, expected {LOCATE_FORMAT}")
        for key in ("heldout_groups", "metadata"):
            if key not in doc:
                raise ValueError(f"{path}: the pysteer.locate metadata has no field {key!r}")
        for key in ("accuracy", "heldout_loss", "diff", "sigma"):
            if key not in t:
                raise ValueError(f"{path}: missing tensor {key!r}")
            if t[key].is_floating_point() and not torch.isfinite(t[key]).all():
                raise ValueError(f"{path}: tensor {key!r} contains NaN or inf")
        return cls(
            t["accuracy"],
            t["heldout_loss"],
            t["diff"],
            t["sigma"],
            list(doc["heldout_groups"]),
            doc["metadata"],
        )


def split_groups(groups: Tensor, test_fraction: float, seed: int) -> list[int]:
    """A seeded random held-out subset of the group ids (at least one, never all)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = groups.unique().tolist()
    if len(ids) < 2:
        raise ValueError("need at least two groups (facts) to hold some out")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ids), generator=g).tolist()
    n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
    return sorted(ids[i] for i in perm[:n_test])


def locate_from_features(
    features: Tensor,
    dataset: PairDataset,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    probe_steps: int = 300,
    probe_lr: float = 0.05,
    weight_decay: float = 1e-3,
) -> LocateResult:
    """Probe every head on precomputed features.

    Args:
        features: ``[N, L, H, D]`` head outputs at the last prompt token, one row per prompt.
        dataset: the pairs, labels and groups over those ``N`` prompts.

    Returns:
        A ``LocateResult``; directions and sigmas use the training pairs only.
    """
    if features.dim() != 4 or features.shape[0] != len(dataset.prompts):
        raise ValueError(f"features must be [N={len(dataset.prompts)}, L, H, D], got {tuple(features.shape)}")
    N, L, H, D = features.shape
    heldout = split_groups(dataset.groups, test_fraction, seed)
    test_mask = torch.isin(dataset.groups, torch.tensor(heldout))
    n1_tr, n0_tr = _pair_counts(dataset, ~test_mask)
    n1_te, n0_te = _pair_counts(dataset, test_mask)
    for name, a, b in (("training", n1_tr, n0_tr), ("held-out", n1_te, n0_te)):
        if a.sum() == 0 or b.sum() == 0:
            raise ValueError(
                f"the {name} pairs have only one label ({int(a.sum())} agreeing, {int(b.sum())} disagreeing); "
                "use more facts or another seed"
            )
    X = features.reshape(N, L * H, D).float()
    tr = (n1_tr + n0_tr) > 0
    te = (n1_te + n0_te) > 0
    W, b, mean, std = fit_probes(
        X[tr], n1_tr[tr], n0_tr[tr], steps=probe_steps, lr=probe_lr, weight_decay=weight_decay, seed=seed
    )
    acc, loss = probe_scores(X[te], n1_te[te], n0_te[te], W, b, mean, std)
    diff, sigma = mean_difference_weighted(X[tr], n1_tr[tr], n0_tr[tr])
    meta = {
        "n_prompts": N,
        "n_pairs": int(dataset.pairs.shape[0]),
        "train_pairs": {"agree": int(dataset.labels[~test_mask].sum()), "total": int((~test_mask).sum())},
        "heldout_pairs": {"agree": int(dataset.labels[test_mask].sum()), "total": int(test_mask.sum())},
        "probe": {"steps": probe_steps, "lr": probe_lr, "weight_decay": weight_decay, "seed": seed},
        "accuracy": "balanced held-out accuracy (mean of per-class recalls), split by group",
    }
    return LocateResult(
        acc.reshape(L, H), loss.reshape(L, H), diff.reshape(L, H, D), sigma.reshape(L, H), heldout, meta
    )


def locate_heads(
    model: nn.Module,
    tokenizer,
    dataset: Sequence[ParaphraseFact] | PairDataset | None = None,
    *,
    chat: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    test_fraction: float = 0.3,
    seed: int = 0,
    probe_steps: int = 300,
    probe_lr: float = 0.05,
    weight_decay: float = 1e-3,
    png: str | os.PathLike | None = None,
) -> LocateResult:
    """Rank attention heads by how well their output predicts answer consistency across paraphrases.

    Args:
        model, tokenizer: a Hugging Face causal LM (eval mode) and its tokenizer.
        dataset: facts with phrasings (default: the shipped paraphrase set): the model answers every
            phrasing greedily and pairs are labelled by agreement; or a ``PairDataset`` whose labels
            are given (then one forward per prompt, no generation).
        chat: wrap fact phrasings in the tokenizer's chat template.
        max_new_tokens: answer length (SmolLM2-135M restates the question first; 12 tokens reach the
            answer in the prompts we checked).
        batch_size: prompts per forward.
        test_fraction: fraction of facts held out as validation: probe accuracy ranks heads there, and
            ``pysteer edit --choose`` picks K and alpha there (a test split is set aside before this
            function runs, see ``pysteer.recipes.selection``).
        seed: split and probe initialisation seed.
        probe_steps, probe_lr, weight_decay: probe training.
        png: where to draw the layers x heads accuracy heatmap (top heads outlined).

    Returns:
        ``LocateResult`` with ``accuracy [L, H]``, directions ``diff [L, H, D]`` and ``sigma [L, H]``;
        for fact data, ``metadata["baseline"]`` holds consistency and accuracy of the unsteered model
        on all facts and on the held-out facts.
    """
    if dataset is None:
        dataset = load_paraphrases()
    if isinstance(dataset, PairDataset):
        _, feats = run_prompts(model, tokenizer, dataset.prompts, max_new_tokens=0, batch_size=batch_size)
        result = locate_from_features(
            feats,
            dataset,
            test_fraction=test_fraction,
            seed=seed,
            probe_steps=probe_steps,
            probe_lr=probe_lr,
            weight_decay=weight_decay,
        )
    else:
        facts = list(dataset)
        if not facts or not all(isinstance(f, ParaphraseFact) for f in facts):
            raise TypeError(
                "locate_heads: dataset must be a PairDataset or a non-empty list of ParaphraseFact"
            )
        texts, _ = fact_texts(tokenizer, facts, chat)
        answers, feats = run_prompts(
            model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        pairs = pairs_from_answers(facts, texts, answers)
        result = locate_from_features(
            feats,
            pairs,
            test_fraction=test_fraction,
            seed=seed,
            probe_steps=probe_steps,
            probe_lr=probe_lr,
            weight_decay=weight_decay,
        )
        held = set(result.heldout_groups)
        held_facts = [f for i, f in enumerate(facts) if i in held]
        held_answers = [a for (i, _), a in zip(_fact_index(facts), answers) if i in held]
        result.metadata.update(
            {
                "facts": [{"relation": f.relation, "subject": f.subject} for f in facts],
                "chat": chat,
                "max_new_tokens": max_new_tokens,
                "baseline": {
                    "all": consistency_metrics(facts, answers),
                    "heldout": consistency_metrics(held_facts, held_answers),
                },
            }
        )
    if png is not None:
        draw_accuracy(result, png)
    return result


def _fact_index(facts: Sequence[ParaphraseFact]) -> list[tuple[int, int]]:
    return [(i, j) for i, f in enumerate(facts) for j in range(len(f.prompts))]


def draw_accuracy(result: LocateResult, path: str | os.PathLike, k: int = 8) -> Path:
    """Heatmap of held-out probe accuracy, layers x heads, the top ``k`` heads outlined."""
    L, H = result.accuracy.shape
    return heatmap_png(
        result.accuracy,
        path,
        title=f"consistency probe: balanced held-out accuracy\n(top {min(k, L * H)} heads outlined)",
        xlabel="head",
        ylabel="layer",
        xticklabels=[str(h) for h in range(H)],
        yticklabels=[str(layer) for layer in range(L)],
        marks=result.top(min(k, L * H)),
    )


# ------------------------------------------------------------------------------------------------
# the edit
# ------------------------------------------------------------------------------------------------


def edit_spec(located: LocateResult, k: int = 8, alpha: float = 5.0, positions: str = "all") -> SteeringSpec:
    """The consistency edit as a ``SteeringSpec``: ITI biases on the top ``k`` heads.

    ``positions="all"`` steers prompt and generated tokens (ITI's choice; it also lets
    ``pysteer.steer`` fold the biases into ``o_proj``), ``"generated"`` only the answer's tokens.
    """
    if positions not in ("all", "generated"):
        raise ValueError(f"positions must be 'all' or 'generated', got {positions!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    heads = located.top(k)
    meta = {
        "recipe": "consistency_edit",
        "method": "ITI mean-difference biases on heads ranked by held-out consistency-probe accuracy",
        "k": k,
        "alpha": alpha,
        "heads": [list(h) for h in heads],
        "probe_accuracy": [float(located.accuracy[h]) for h in heads],
    }
    return SteeringSpec({"default": located.head_biases(k, alpha)}, positions, meta)


def consistency_edit(
    located: LocateResult,
    path: str | os.PathLike,
    *,
    k: int = 8,
    alpha: float = 5.0,
    positions: str = "all",
    metadata: dict | None = None,
) -> Path:
    """Save the consistency edit (top-``k`` ITI head biases) as a steering file.

    Load it with ``pysteer.load`` and apply with ``pysteer.steer`` or ``pysteer generate --steer``.
    """
    from ..io import save

    return save(edit_spec(located, k, alpha, positions), path, metadata=metadata)


def evaluate_consistency(
    model: nn.Module,
    tokenizer,
    facts: Sequence[ParaphraseFact],
    steering: SteeringSpec | str | os.PathLike | None = None,
    *,
    chat: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
) -> dict:
    """Consistency and task accuracy of the model on ``facts``, steered by ``steering`` if given."""
    answers = answer_facts(
        model, tokenizer, facts, steering, chat=chat, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return consistency_metrics(facts, answers)


def answer_facts(
    model: nn.Module,
    tokenizer,
    facts: Sequence[ParaphraseFact],
    steering: SteeringSpec | str | os.PathLike | None = None,
    *,
    chat: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to every phrasing of ``facts`` (``fact_texts`` order), steered by ``steering`` if given."""
    from .. import io
    from .. import steering as steering_mod

    texts, _ = fact_texts(tokenizer, facts, chat)
    handle = None
    if steering is not None:
        spec = steering if isinstance(steering, SteeringSpec) else io.load(steering)
        handle = steering_mod.steer(model, spec)
    try:
        answers, _ = run_prompts(
            model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, capture=False
        )
    finally:
        if handle is not None:
            handle.remove()
    return answers


def heldout_facts(located: LocateResult, facts: Sequence[ParaphraseFact]) -> list[ParaphraseFact]:
    """The facts ``locate_heads`` held out (checked against the subjects it recorded)."""
    recorded = located.metadata.get("facts")
    if recorded is not None:
        if len(recorded) != len(facts) or any(
            r["subject"] != f.subject or r["relation"] != f.relation for r, f in zip(recorded, facts)
        ):
            raise ValueError("these facts are not the ones locate_heads ran on (different subjects or order)")
    return [facts[i] for i in located.heldout_groups]


def recorded_facts(located: LocateResult, dataset: Sequence[ParaphraseFact]) -> list[ParaphraseFact]:
    """The facts ``locate_heads`` ran on, in its order, looked up by (relation, subject) in ``dataset``."""
    recorded = located.metadata.get("facts")
    if recorded is None:
        raise ValueError("this LocateResult was computed from a PairDataset; it records no facts")
    return _lookup_facts(recorded, dataset)


def reserved_test_facts(located: LocateResult, dataset: Sequence[ParaphraseFact]) -> list[ParaphraseFact]:
    """The test facts set aside before ``locate_heads`` ran (``metadata["test_facts"]``), from ``dataset``.

    Raises:
        ValueError: the result records no test split, or ``dataset`` lacks one of its facts.
    """
    recorded = located.metadata.get("test_facts")
    if not recorded:
        raise ValueError(
            "this LocateResult records no test split (run `pysteer locate` with --test-split > 0)"
        )
    return _lookup_facts(recorded, dataset)


def _lookup_facts(recorded: Sequence[dict], dataset: Sequence[ParaphraseFact]) -> list[ParaphraseFact]:
    lookup = {(f.relation, f.subject): f for f in dataset}
    missing = [r for r in recorded if (r["relation"], r["subject"]) not in lookup]
    if missing:
        raise ValueError(f"the dataset lacks {len(missing)} recorded fact(s), e.g. {missing[0]}")
    return [lookup[(r["relation"], r["subject"])] for r in recorded]
