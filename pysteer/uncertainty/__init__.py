"""Uncertainty of a model's answers: semantic entropy, its baselines, entailment models, evaluation,
and semantic-entropy probes.

``pysteer.uncertainty.entropy`` holds the definitions (semantic clustering, semantic entropy,
discrete SE, naive entropy, the log-likelihood and p(true) baselines); ``entailment`` the pluggable
entailment models; ``sampling`` the answers with their log-probabilities and hidden states;
``evaluation`` AUROC and rejection curves; ``probes`` the linear probes on hidden states.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "semantic_clusters": "pysteer.uncertainty.entropy",
    "semantic_entropy": "pysteer.uncertainty.entropy",
    "discrete_semantic_entropy": "pysteer.uncertainty.entropy",
    "naive_entropy": "pysteer.uncertainty.entropy",
    "cluster_log_probs": "pysteer.uncertainty.entropy",
    "sequence_log_likelihood": "pysteer.uncertainty.entropy",
    "Entailment": "pysteer.uncertainty.entailment",
    "ExactMatchEntailment": "pysteer.uncertainty.entailment",
    "NLIEntailment": "pysteer.uncertainty.entailment",
    "JudgeEntailment": "pysteer.uncertainty.entailment",
    "make_entailment": "pysteer.uncertainty.entailment",
    "sample_answers": "pysteer.uncertainty.sampling",
    "AnswerSamples": "pysteer.uncertainty.sampling",
    "p_true": "pysteer.uncertainty.baselines",
    "p_false": "pysteer.uncertainty.entropy",
    "auroc": "pysteer.uncertainty.evaluation",
    "rejection_curve": "pysteer.uncertainty.evaluation",
    "is_correct": "pysteer.uncertainty.evaluation",
    "load_questions": "pysteer.uncertainty.questions",
    "LinearProbe": "pysteer.uncertainty.probes",
}


__getattr__, __dir__ = lazy_exports("pysteer.uncertainty", globals(), _LAZY)


__all__ = list(_LAZY)
