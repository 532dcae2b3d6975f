"""Semantic entropy and its baselines (Farquhar et al., Nature 2024; Kuhn et al., ICLR 2023).

The definitions follow the reference code (jlko/semantic_uncertainty):

- answers are grouped by greedy bidirectional entailment (:func:`semantic_clusters`);
- a sequence's log-likelihood is the *mean* of its token log-probabilities (length normalised);
- semantic entropy is the "rao" estimator over clusters: each cluster's log-probability is the
  ``logsumexp`` of its members' log-likelihoods, normalised over all samples, and
  ``SE = -sum_c p_c log p_c`` (:func:`semantic_entropy`);
- discrete semantic entropy uses cluster frequencies only (:func:`discrete_semantic_entropy`);
- naive predictive entropy is ``-mean_i log p(s_i)`` over the samples (:func:`naive_entropy`).

Every score is "higher = more uncertain", so all of them feed the same AUROC and rejection curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# NLI labels, as the MNLI heads and the reference code number them
CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2

# implication(i, j) -> label of "answer i entails answer j"; a batch: one anchor against many
BatchImplication = Callable[[list[tuple[int, int]]], list[int]]


def equivalent(forward: int, backward: int, strict: bool) -> bool:
    """Whether two answers mean the same, given the NLI labels of both directions.

    Strict: both directions are entailment. Non-strict (the reference default): neither direction
    is a contradiction and not both are neutral.
    """
    for label in (forward, backward):
        if label not in (CONTRADICTION, NEUTRAL, ENTAILMENT):
            raise ValueError(
                f"entailment label {label!r} is not 0 (contradiction), 1 (neutral) or 2 (entailment)"
            )
    if strict:
        return forward == ENTAILMENT and backward == ENTAILMENT
    return CONTRADICTION not in (forward, backward) and (forward, backward) != (NEUTRAL, NEUTRAL)


def semantic_clusters(n: int, implications: BatchImplication, strict: bool = False) -> list[int]:
    """Greedy bidirectional-entailment clustering of ``n`` answers into semantic ids ``0..K-1``.

    Answer ``i`` without an id opens cluster ``next_id``; every later answer ``j > i`` equivalent
    to it takes that id. As in the reference, a later answer already placed in an earlier cluster
    is moved when it is also equivalent to the new anchor. The pairs of one anchor are asked in
    one batch (``implications`` receives ``(i, j)`` and ``(j, i)`` for every ``j > i``), so a
    batched judge sees one call per cluster.

    Args:
        n: number of answers.
        implications: maps a list of ordered index pairs ``(a, b)`` to the NLI labels of
            "answer a entails answer b" (0 contradiction, 1 neutral, 2 entailment).
        strict: require entailment both ways.

    Returns:
        ``n`` semantic ids, numbered in order of first appearance.
    """
    if n < 1:
        raise ValueError("semantic_clusters needs at least one answer")
    ids = [-1] * n
    next_id = 0
    for i in range(n):
        if ids[i] != -1:
            continue
        ids[i] = next_id
        later = list(range(i + 1, n))
        if later:
            pairs = [(i, j) for j in later] + [(j, i) for j in later]
            labels = implications(pairs)
            if len(labels) != len(pairs):
                raise ValueError(f"the entailment model returned {len(labels)} labels for {len(pairs)} pairs")
            for k, j in enumerate(later):
                if equivalent(labels[k], labels[k + len(later)], strict):
                    ids[j] = next_id
        next_id += 1
    return ids


def sequence_log_likelihood(token_logprobs: Tensor | Sequence[float]) -> float:
    """Length-normalised log-likelihood of one answer: the mean of its token log-probabilities."""
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64)
    if lp.numel() == 0:
        raise ValueError("an answer has no token log-probabilities (empty answer)")
    return float(lp.mean())


def cluster_log_probs(semantic_ids: Sequence[int], log_likelihoods: Sequence[float]) -> Tensor:
    """Log-probability of each cluster: ``logsumexp`` of its members minus ``logsumexp`` of all.

    Returns:
        ``[K]`` float64, cluster ``k`` at index ``k`` (ids must be ``0..K-1``).
    """
    ids = torch.as_tensor(list(semantic_ids), dtype=torch.long)
    ll = torch.as_tensor(list(log_likelihoods), dtype=torch.float64)
    if ids.shape != ll.shape:
        raise ValueError(f"{ids.numel()} semantic ids but {ll.numel()} log-likelihoods")
    k = int(ids.max()) + 1
    if sorted(set(ids.tolist())) != list(range(k)):
        raise ValueError(f"semantic ids must be 0..K-1 without gaps, got {sorted(set(ids.tolist()))}")
    total = torch.logsumexp(ll, 0)
    return torch.stack([torch.logsumexp(ll[ids == c], 0) - total for c in range(k)])


def semantic_entropy(semantic_ids: Sequence[int], log_likelihoods: Sequence[float]) -> float:
    """Semantic entropy ("rao" estimator): ``-sum_c p_c log p_c`` over the clusters' normalised
    probabilities (:func:`cluster_log_probs`), from length-normalised log-likelihoods."""
    lp = cluster_log_probs(semantic_ids, log_likelihoods)
    return float(-(lp.exp() * lp).sum())


def discrete_semantic_entropy(semantic_ids: Sequence[int]) -> float:
    """Entropy of the cluster frequencies (no likelihoods): ``-sum_c f_c log f_c``."""
    ids = torch.as_tensor(list(semantic_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("discrete_semantic_entropy needs at least one semantic id")
    p = torch.bincount(ids).to(torch.float64) / ids.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def naive_entropy(log_likelihoods: Sequence[float]) -> float:
    """Naive predictive entropy: Monte-Carlo ``-mean_i log p(s_i)`` over the sampled answers."""
    ll = list(log_likelihoods)
    if not ll:
        raise ValueError("naive_entropy needs at least one log-likelihood")
    return -math.fsum(ll) / len(ll)


def answer_uncertainty(log_likelihood: float) -> float:
    """The log-likelihood baseline as an uncertainty: minus the most likely answer's
    length-normalised log-likelihood."""
    return -float(log_likelihood)


def p_false(log_p_true: float) -> float:
    """The p(true) baseline as an uncertainty: ``1 - p(true)`` from its log-probability."""
    return 1.0 - math.exp(log_p_true)
