"""Entailment models that decide whether two answers mean the same, with a per-pair cache.

Three kinds share one interface, :class:`Entailment`:

- :class:`NLIEntailment`: any Hugging Face sequence-classification NLI model by path. The semantic
  entropy paper used ``microsoft/deberta-v2-xlarge-mnli`` (pass that name or a local copy of it).
- :class:`JudgeEntailment`: a causal LM prompted as a judge (the reference code's prompt), batched
  through Hugging Face ``generate`` (greedy); the embedded SmolLM2 model by default.
- :class:`ExactMatchEntailment`: normalised exact match, enough for one- or two-word answers.

``check(pairs, question)`` returns one NLI label per ordered pair ``(a, b)`` ("a entails b"):
0 contradiction, 1 neutral, 2 entailment. Every label is cached per (question, a, b); ``calls``
counts pairs sent to the model and ``hits`` pairs answered from the cache.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch

from .entropy import CONTRADICTION, ENTAILMENT, NEUTRAL, semantic_clusters

Pair = tuple[str, str]


class Entailment:
    """Base class: the per-pair cache and the clustering; subclasses implement :meth:`_predict`."""

    # whether a label depends on the question (the cache key includes it when it does)
    uses_question = True

    def __init__(self) -> None:
        self.cache: dict[tuple[str | None, str, str], int] = {}
        self.calls = 0
        self.hits = 0

    def _predict(self, pairs: list[Pair], question: str | None) -> list[int]:
        raise NotImplementedError

    def _key(self, pair: Pair, question: str | None) -> tuple[str | None, str, str]:
        return (question if self.uses_question else None, pair[0], pair[1])

    def check(self, pairs: Sequence[Pair], question: str | None = None) -> list[int]:
        """NLI label of "a entails b" for every pair; uncached pairs go to the model in one batch."""
        keys = [self._key(p, question) for p in pairs]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.hits += len(keys) - len(missing)
        if missing:
            labels = self._predict([(k[1], k[2]) for k in missing], question)
            if len(labels) != len(missing):
                raise RuntimeError(
                    f"{type(self).__name__} returned {len(labels)} labels for {len(missing)} pairs"
                )
            self.calls += len(missing)
            self.cache.update(zip(missing, (int(x) for x in labels)))
        return [self.cache[k] for k in keys]

    def cluster(self, answers: Sequence[str], question: str | None = None, strict: bool = False) -> list[int]:
        """Semantic ids of ``answers`` by greedy bidirectional entailment (see
        :func:`pysteer.uncertainty.entropy.semantic_clusters`)."""
        answers = list(answers)

        def implications(index_pairs: list[tuple[int, int]]) -> list[int]:
            return self.check([(answers[a], answers[b]) for a, b in index_pairs], question)

        return semantic_clusters(len(answers), implications, strict=strict)


_DECIMAL = "\u2396"  # stands in for a decimal point while punctuation is stripped (not in string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD answer normalisation),
    except that numbers keep their value: a decimal point between digits stays and a zero fraction
    goes ("100.0" is "100", "3.14" stays "3.14"; plain SQuAD would make them "1000" and "314")."""
    text = text.lower()
    text = re.sub(r"(?<=\d)\.0+(?!\d)", "", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", _DECIMAL, text)
    text = "".join(ch for ch in text if ch not in set(string.punctuation)).replace(_DECIMAL, ".")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class ExactMatchEntailment(Entailment):
    """Entailment when the normalised answers are equal, contradiction otherwise."""

    uses_question = False

    def _predict(self, pairs: list[Pair], question: str | None) -> list[int]:
        return [ENTAILMENT if normalise_answer(a) == normalise_answer(b) else CONTRADICTION for a, b in pairs]


def nli_label_order(id2label: dict[int, str]) -> list[int]:
    """Map a classifier's output index to our label (0 contradiction, 1 neutral, 2 entailment).

    Names are read from ``config.id2label``; a three-way head with generic names (``LABEL_0``...)
    is taken in the MNLI order, which is ours.
    """
    names = {int(i): str(n).lower() for i, n in id2label.items()}
    if len(names) != 3:
        raise ValueError(
            f"an NLI model needs 3 labels (contradiction, neutral, entailment), this one has {names}"
        )
    order = []
    for i in range(3):
        n = names[i]
        if n.startswith("contra"):
            order.append(CONTRADICTION)
        elif n.startswith("neutral"):
            order.append(NEUTRAL)
        elif n.startswith("entail"):
            order.append(ENTAILMENT)
        elif re.fullmatch(r"label_\d", n):
            order.append(i)
        else:
            raise ValueError(f"NLI label {names[i]!r} is not contradiction, neutral or entailment")
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"NLI labels {names} do not name each of contradiction, neutral, entailment once")
    return order


class NLIEntailment(Entailment):
    """A sequence-classification NLI model: ``argmax`` over its three labels of ``(a, b)``.

    Args:
        path: a local model directory or a Hugging Face name (the paper:
            ``microsoft/deberta-v2-xlarge-mnli``).
        condition_on_question: prefix each answer with the question, as the reference does for
            DeBERTa (``f"{question} {answer}"``).
        batch_size: pairs per forward.
        device: where the model runs.
        model, tokenizer: already loaded objects to use instead of reading ``path``.
    """

    def __init__(
        self,
        path: str,
        *,
        condition_on_question: bool = True,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path) if tokenizer is None else tokenizer
        self.model = AutoModelForSequenceClassification.from_pretrained(path) if model is None else model
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.order = torch.tensor(nli_label_order(self.model.config.id2label))
        self.uses_question = condition_on_question
        self.batch_size = batch_size

    @torch.no_grad()
    def _predict(self, pairs: list[Pair], question: str | None) -> list[int]:
        if self.uses_question and question:
            pairs = [(f"{question} {a}", f"{question} {b}") for a, b in pairs]
        labels: list[int] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            enc = self.tokenizer(
                [a for a, _ in chunk],
                [b for _, b in chunk],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            logits = self.model(**enc).logits
            labels += self.order[logits.argmax(-1).cpu()].tolist()
        return labels


JUDGE_PROMPT = (
    'We are evaluating answers to the question "{question}"\n'
    "Here are two possible answers:\n"
    "Possible Answer 1: {a}\nPossible Answer 2: {b}\n"
    "Does Possible Answer 1 semantically entail Possible Answer 2? "
    "Respond only with entailment, contradiction, or neutral.\n"
    "Response:"
)


def parse_judgement(response: str) -> int:
    """The reference's reading of a judge's reply: the first of entailment / neutral / contradiction
    found in its first 30 characters (in that order of precedence), neutral when none is."""
    head = response.lower()[:30]
    if "entailment" in head:
        return ENTAILMENT
    if "neutral" in head:
        return NEUTRAL
    if "contradiction" in head:
        return CONTRADICTION
    return NEUTRAL


class JudgeEntailment(Entailment):
    """A causal LM asked, for each ordered pair, whether answer 1 entails answer 2 (greedy).

    Args:
        model, tokenizer: any Hugging Face causal LM; ``None`` loads the embedded SmolLM2 model.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: length of the judge's reply (only its first 30 characters are read).
        chat: wrap the prompt in the tokenizer's chat template when it has one.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        batch_size: int = 32,
        max_new_tokens: int = 6,
        chat: bool = True,
    ) -> None:
        super().__init__()
        if model is None:
            from ..default_model import load_model

            model, tokenizer = load_model("default", progress=False)
        if tokenizer is None:
            raise ValueError("JudgeEntailment: a model was given without its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.chat = batch_size, max_new_tokens, chat
        self.unparsed = 0

    def prompt(self, a: str, b: str, question: str | None) -> str:
        from ..recipes._common import chat_text

        text = JUDGE_PROMPT.format(question=question or "", a=a, b=b)
        return chat_text(self.tokenizer, text, self.chat)

    def _predict(self, pairs: list[Pair], question: str | None) -> list[int]:
        from .sampling import greedy_texts

        prompts = [self.prompt(a, b, question) for a, b in pairs]
        labels = []
        for start in range(0, len(prompts), self.batch_size):
            replies = greedy_texts(
                self.model, self.tokenizer, prompts[start : start + self.batch_size], self.max_new_tokens
            )
            for reply in replies:
                head = reply.lower()[:30]
                self.unparsed += not any(w in head for w in ("entailment", "neutral", "contradiction"))
                labels.append(parse_judgement(reply))
        return labels


def make_entailment(spec: str, model: Any = None, tokenizer: Any = None) -> Entailment:
    """An entailment model from a command-line spec: ``exact``, ``judge`` (the given or embedded
    model), ``judge:PATH`` (another causal LM) or ``nli:PATH`` (an NLI classifier)."""
    if spec == "exact":
        return ExactMatchEntailment()
    if spec == "judge":
        return JudgeEntailment(model, tokenizer)
    if spec.startswith("judge:"):
        from ..default_model import load_model

        return JudgeEntailment(*load_model(spec[len("judge:") :], progress=False))
    if spec.startswith("nli:"):
        return NLIEntailment(spec[len("nli:") :])
    raise ValueError(f"entailment {spec!r}: expected 'exact', 'judge', 'judge:PATH' or 'nli:PATH'")
