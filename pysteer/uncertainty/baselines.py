"""The p(true) baseline (Kadavath et al., 2022), as the semantic-entropy reference computes it: the
model sees the question, its brainstormed (sampled) answers and its most likely answer, and is asked
whether that answer is true; the score is the log-probability of " A" (True)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def p_true_prompt(question: str, most_likely: str, brainstormed: Sequence[str], few_shot: str = "") -> str:
    """The reference's p(true) prompt (no hint variant); ``few_shot`` is prepended when given."""
    prompt = few_shot + "\n" if few_shot else ""
    prompt += "Question: " + question + "\nBrainstormed Answers: "
    for answer in [*brainstormed, most_likely]:
        prompt += answer.strip() + "\n"
    prompt += "Possible answer: " + most_likely + "\n"
    prompt += "Is the possible answer:\nA) True\nB) False\nThe possible answer is:"
    return prompt


def p_true_example(question: str, most_likely: str, brainstormed: Sequence[str], correct: bool) -> str:
    """One few-shot example for the p(true) prompt: the prompt followed by the right letter."""
    return p_true_prompt(question, most_likely, brainstormed) + (" A" if correct else " B")


def p_true(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    most_likely: Sequence[str],
    brainstormed: Sequence[Sequence[str]],
    few_shot: str = "",
    batch_size: int = 8,
) -> list[float]:
    """``log p(" A")`` per question (higher = the model believes its answer): one teacher-forced
    forward per batch of prompts."""
    from .sampling import continuation_logprobs

    if not len(questions) == len(most_likely) == len(brainstormed):
        raise ValueError(
            f"{len(questions)} questions, {len(most_likely)} answers, {len(brainstormed)} answer lists: must match"
        )
    prompts = [p_true_prompt(q, a, b, few_shot) for q, a, b in zip(questions, most_likely, brainstormed)]
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        out += continuation_logprobs(model, tokenizer, prompts[start : start + batch_size], " A")
    return out
