"""Scoring uncertainty measures: correctness of answers, AUROC for predicting wrong answers, and the
accuracy-vs-coverage (rejection) curve.

scikit-learn (the ``uncertainty`` extra) computes the AUROC; the rest is plain Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .entailment import normalise_answer

# coverage levels of the rejection curve: answer the most confident 10 %, 20 %, ..., 100 %
COVERAGES = tuple(round(0.1 * k, 1) for k in range(1, 11))


def is_correct(answer: str, references: Sequence[str]) -> bool:
    """Whether a normalised reference answer occurs as whole words in the normalised answer.

    Containment, not equality, because a model's brief answer is often a short sentence
    ("The capital is Paris."). A question without references is unanswerable: never correct.
    """
    text = f" {normalise_answer(answer)} "
    return any(
        (ref := normalise_answer(r)) and re.search(rf"(?<![\w.]){re.escape(ref)}(?![\w.])", text)
        for r in references
    )


def auroc(is_wrong: Sequence[bool], score: Sequence[float]) -> float:
    """Area under the ROC curve of ``score`` (higher = more uncertain) for predicting a wrong answer.

    Raises:
        ValueError: when every answer is right or every answer is wrong (the AUROC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    labels = [int(bool(w)) for w in is_wrong]
    if len(labels) != len(score):
        raise ValueError(f"{len(labels)} labels but {len(score)} scores")
    if len(set(labels)) < 2:
        raise ValueError("AUROC needs both right and wrong answers; all answers have the same label")
    return float(roc_auc_score(labels, list(score)))


def rejection_curve(
    correct: Sequence[bool], score: Sequence[float], coverages: Sequence[float] = COVERAGES
) -> list[float]:
    """Accuracy on the answers kept when only the ``coverage`` fraction with the lowest uncertainty
    is answered (ties broken by order); one accuracy per coverage."""
    if len(correct) != len(score):
        raise ValueError(f"{len(correct)} labels but {len(score)} scores")
    if not correct:
        raise ValueError("rejection_curve needs at least one answer")
    order = sorted(range(len(score)), key=lambda i: score[i])
    out = []
    for c in coverages:
        if not 0 < c <= 1:
            raise ValueError(f"coverage {c} is not in (0, 1]")
        kept = order[: max(1, round(c * len(order)))]
        out.append(sum(bool(correct[i]) for i in kept) / len(kept))
    return out


def area_under_rejection(correct: Sequence[bool], score: Sequence[float]) -> float:
    """Mean accuracy over the coverages 10 %, 20 %, ..., 100 % (higher is better; the accuracy of
    answering everything when the score carries no information)."""
    curve = rejection_curve(correct, score)
    return sum(curve) / len(curve)
