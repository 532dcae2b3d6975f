"""The semantic-entropy experiment end to end: answer, sample, cluster, score, evaluate, probe.

For each question: the most likely (greedy) answer with its hidden states at the token before
generation (TBG) and the second-last token (SLT) of every layer; ``n`` sampled answers clustered by
an entailment model; semantic entropy, discrete SE, naive entropy, the log-likelihood and p(true)
baselines. Then: the AUROC of every score for predicting a wrong answer and its rejection curve on
the test split; semantic-entropy probes and accuracy probes per layer and position (fitted on train,
the layer range chosen on validation, scored on test).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..recipes._common import save_png
from . import entropy as E
from .baselines import p_true
from .entailment import Entailment
from .evaluation import COVERAGES, area_under_rejection, auroc, is_correct, rejection_curve
from .probes import LinearProbe, best_layer_range, best_split, binarize, fit_range_probe, layer_aurocs
from .questions import Question
from .sampling import sample_answers

SCORES = ("semantic_entropy", "discrete_semantic_entropy", "naive_entropy", "neg_log_likelihood", "p_false")
POSITIONS = ("tbg", "slt")


@dataclass
class ExperimentConfig:
    """What :func:`run_experiment` samples and how it clusters.

    Attributes:
        n_samples: sampled answers per question (the paper: 10).
        temperature: sampling temperature (the paper: 1.0).
        max_new_tokens: longest answer.
        strict: strict bidirectional entailment.
        batch_size: questions per generate call.
        min_layers: narrowest concatenated layer range (the notebook: 5).
        chat: use the tokenizer's chat template for the answering prompt.
    """

    n_samples: int = 10
    temperature: float = 1.0
    max_new_tokens: int = 16
    strict: bool = False
    batch_size: int = 8
    min_layers: int = 5
    chat: bool = True


def score_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    entailment: Entailment,
    config: ExperimentConfig,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Answers, correctness, uncertainty scores and hidden states for every question.

    Returns:
        A dict with ``answers`` (per question: greedy answer, samples, semantic ids, correctness),
        ``scores`` (name -> per-question list, higher = more uncertain), ``correct``, ``hidden``
        (``{"tbg"|"slt": Tensor [Q, L, d]}``), ``sites`` and ``seconds`` per stage.
    """
    texts = [q.question for q in questions]
    seconds = {}
    t0 = time.perf_counter()
    greedy = sample_answers(
        model,
        tokenizer,
        texts,
        n=1,
        temperature=0.0,
        max_new_tokens=config.max_new_tokens,
        hidden=True,
        batch_size=config.batch_size,
        chat=config.chat,
    )
    seconds["greedy_and_states"] = time.perf_counter() - t0
    log(f"greedy answers and hidden states: {seconds['greedy_and_states']:.0f} s")
    t0 = time.perf_counter()
    samples = sample_answers(
        model,
        tokenizer,
        texts,
        n=config.n_samples,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        chat=config.chat,
    )
    seconds["sampling"] = time.perf_counter() - t0
    log(f"{config.n_samples} samples per question: {seconds['sampling']:.0f} s")
    t0 = time.perf_counter()
    ids = [entailment.cluster(s, q, strict=config.strict) for s, q in zip(samples.texts, texts)]
    seconds["entailment"] = time.perf_counter() - t0
    log(
        f"clustering: {seconds['entailment']:.0f} s ({entailment.calls} entailment calls, {entailment.hits} cached)"
    )
    t0 = time.perf_counter()
    most_likely = [g[0] for g in greedy.texts]
    log_p_true = p_true(model, tokenizer, texts, most_likely, samples.texts, batch_size=config.batch_size)
    seconds["p_true"] = time.perf_counter() - t0
    lls = samples.log_likelihoods()
    scores = {
        "semantic_entropy": [E.semantic_entropy(i, ll) for i, ll in zip(ids, lls)],
        "discrete_semantic_entropy": [E.discrete_semantic_entropy(i) for i in ids],
        "naive_entropy": [E.naive_entropy(ll) for ll in lls],
        "neg_log_likelihood": [E.answer_uncertainty(ll[0]) for ll in greedy.log_likelihoods()],
        "p_false": [E.p_false(lp) for lp in log_p_true],
    }
    correct = [is_correct(a, q.answers) for a, q in zip(most_likely, questions)]
    answers = [
        {
            "id": q.id,
            "question": q.question,
            "split": q.split,
            "references": list(q.answers),
            "answer": a,
            "correct": c,
            "samples": s,
            "semantic_ids": i,
        }
        for q, a, c, s, i in zip(questions, most_likely, correct, samples.texts, ids)
    ]
    hidden = {"tbg": greedy.hidden_tbg[:, 0], "slt": greedy.hidden_slt[:, 0]}
    return {
        "answers": answers,
        "scores": scores,
        "correct": correct,
        "hidden": hidden,
        "sites": greedy.sites,
        "seconds": seconds,
    }


def evaluate_scores(correct: Sequence[bool], scores: dict[str, Sequence[float]]) -> dict[str, Any]:
    """AUROC for predicting a wrong answer, the rejection curve and its area, per score."""
    wrong = [not c for c in correct]
    out: dict[str, Any] = {
        "n": len(correct),
        "accuracy": sum(correct) / len(correct),
        "coverages": list(COVERAGES),
    }
    for name, s in scores.items():
        out[name] = {
            "auroc": auroc(wrong, s) if _both_classes(wrong) else None,
            "rejection_accuracy": rejection_curve(correct, s),
            "aurac": area_under_rejection(correct, s),
        }
    return out


def _rows(questions: Sequence[Question], split: str) -> list[int]:
    return [i for i, q in enumerate(questions) if q.split == split]


def probe_study(
    questions: Sequence[Question],
    scored: dict[str, Any],
    min_layers: int = 5,
    probe_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Semantic-entropy probes and accuracy probes on the greedy answer's states.

    SE is binarised at the best split of the training SEs. Per position and layer a probe is fitted
    on train and scored on validation and test; the contiguous range with the best mean validation
    AUROC (at least ``min_layers`` layers) is concatenated into one probe, fitted on train and scored
    on test for its own target and for predicting wrong answers. Accuracy probes predict a wrong
    answer (so both kinds say "abstain" with a high output, the gate protocol's reading).
    """
    train, val, test = (_rows(questions, s) for s in ("train", "validation", "test"))
    se = scored["scores"]["semantic_entropy"]
    split = best_split([se[i] for i in train])
    high_se = binarize(se, split)
    wrong = [int(not c) for c in scored["correct"]]
    targets = {"sep": ("high_semantic_entropy", high_se), "accuracy_probe": ("wrong_answer", wrong)}
    out: dict[str, Any] = {
        "se_split": split,
        "high_se_fraction_train": sum(high_se[i] for i in train) / len(train),
    }
    for kind, (target, labels) in targets.items():
        for pos in POSITIONS:
            states = scored["hidden"][pos]
            probe, r = _probe_position(
                states, labels, wrong, (train, val, test), scored["sites"], target, min_layers
            )
            if probe_dir is not None:
                Path(probe_dir).mkdir(parents=True, exist_ok=True)
                r["file"] = str(probe.save(Path(probe_dir) / f"{kind}_{pos}.safetensors"))
            out[f"{kind}_{pos}"] = r
    return out


def _probe_position(
    states: Tensor,
    labels: Sequence[int],
    wrong: Sequence[int],
    splits: tuple[list[int], list[int], list[int]],
    sites: Sequence[str],
    target: str,
    min_layers: int,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Per-layer AUROCs (validation, test), the best validation range, and its concatenated probe
    scored on test, for one position's states ``[Q, L, d]``. An evaluation split holding one class
    only gets ``None`` AUROCs (and, for validation, the range of all layers)."""
    train, val, test = splits

    def pick(rows: list[int]) -> tuple[Tensor, list[int]]:
        return states[rows], [labels[i] for i in rows]

    def per_layer(rows: list[int]) -> list[float] | None:
        return layer_aurocs(*pick(train), *pick(rows)) if _both_classes(pick(rows)[1]) else None

    per_val, per_test = per_layer(val), per_layer(test)
    layers = best_layer_range(per_val, min_layers) if per_val else (0, states.shape[1])
    probe = fit_range_probe(states[train], [labels[i] for i in train], layers, sites, target)
    p = probe([states[test][:, layer] for layer in range(*layers)]).tolist()
    own, wrong_test = [labels[i] for i in test], [wrong[i] for i in test]
    return probe, {
        "target": target,
        "layer_auroc_validation": per_val,
        "layer_auroc_test": per_test,
        "layer_range": list(layers),
        "range_auroc_test_own_target": auroc(own, p) if _both_classes(own) else None,
        "range_auroc_test_wrong_answer": auroc(wrong_test, p) if _both_classes(wrong_test) else None,
        "range_test_scores": p,
    }


def _both_classes(labels: Sequence[int]) -> bool:
    return 0 < sum(labels) < len(labels)


def lines_png(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
) -> Path:
    """Named ``(x, y)`` curves and optional horizontal reference lines as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, label=name, color="grey" if "chance" in name else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, linestyle="--", linewidth=0.5)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def run_experiment(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    entailment: Entailment,
    config: ExperimentConfig,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Score every question, evaluate on the test split (and on all questions), fit the probes,
    and, with ``out_dir``, write ``probe_layers.png``, ``rejection.png`` and the probe files.

    Returns:
        A JSON-serialisable dict of every figure.
    """
    missing = [s for s in ("train", "validation", "test") if not _rows(questions, s)]
    if missing:
        raise ValueError(f"the questions need all three splits; none in {', '.join(missing)}")
    scored = score_questions(model, tokenizer, questions, entailment, config, log)
    test = _rows(questions, "test")
    pick = lambda xs: [xs[i] for i in test]
    result: dict[str, Any] = {
        "config": vars(config),
        "n_questions": len(questions),
        "n_unanswerable": sum(not q.answerable for q in questions),
        "seconds": scored["seconds"],
        "entailment": {
            "kind": type(entailment).__name__,
            "calls": entailment.calls,
            "cached": entailment.hits,
        },
        "evaluation_test": evaluate_scores(
            pick(scored["correct"]), {k: pick(v) for k, v in scored["scores"].items()}
        ),
        "evaluation_all": evaluate_scores(scored["correct"], scored["scores"]),
        "accuracy_answerable": _answerable_accuracy(questions, scored["correct"]),
    }
    t0 = time.perf_counter()
    result["probes"] = probe_study(
        questions, scored, config.min_layers, None if out_dir is None else Path(out_dir) / "probes"
    )
    result["seconds"]["probes"] = time.perf_counter() - t0
    log(f"probes: {result['seconds']['probes']:.0f} s")
    result["answers"] = scored["answers"]
    if out_dir is not None:
        result["png"] = _plots(result, Path(out_dir))
    return result


def _answerable_accuracy(questions: Sequence[Question], correct: Sequence[bool]) -> dict[str, float]:
    out = {}
    for split in ("train", "validation", "test", None):
        rows = [c for q, c in zip(questions, correct) if q.answerable and (split is None or q.split == split)]
        out[split or "all"] = sum(rows) / len(rows) if rows else float("nan")
    return out


def _plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    probes = result["probes"]
    curves = {}
    for kind, label in (("sep", "SEP"), ("accuracy_probe", "accuracy probe")):
        for pos in POSITIONS:
            ys = probes[f"{kind}_{pos}"]["layer_auroc_test"]
            if ys is None:
                continue
            curves[f"{label} {pos.upper()} (own target)"] = (range(len(ys)), ys)
    ev = result["evaluation_test"]
    hlines = {"chance": 0.5}
    if ev["semantic_entropy"]["auroc"] is not None:
        hlines["semantic entropy (sampled), wrong answers"] = ev["semantic_entropy"]["auroc"]
    a = lines_png(
        curves,
        out_dir / "probe_layers.png",
        title="Probe AUROC per layer (test split)",
        xlabel="layer",
        ylabel="AUROC",
        hlines=hlines,
    )
    rej = {name: (ev["coverages"], ev[name]["rejection_accuracy"]) for name in SCORES}
    b = lines_png(
        rej,
        out_dir / "rejection.png",
        title="Accuracy vs coverage (test split)",
        xlabel="fraction answered",
        ylabel="accuracy of answered",
    )
    return [str(a), str(b)]
