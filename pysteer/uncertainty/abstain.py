"""Abstention fine-tuning from semantic entropy (Tjandra et al., "Fine-Tuning Large Language Models to
Appropriately Abstain with Semantic Entropy", 2024, arXiv 2410.17234), and its evaluation against
inference-time gates.

The paper's recipe, label-free:

1. for each training question, the model's *standard response* (the paper samples at T = 0.1; here
   greedy decoding, its T -> 0 limit) and M = 10 answers sampled at T = 1.0;
2. the answers' *discrete* semantic entropy (cluster frequencies, the paper's eq. 6), clustered by
   bidirectional entailment;
3. targets: a question with ``SE(q) > tau`` gets the abstention phrase ``"I don't know the answer."``,
   one with ``SE(q) <= tau`` its own standard response;
4. supervised fine-tuning, cross-entropy on the target tokens only (the paper: LoRA r = 8 on the
   query and value projections);
5. tau is chosen among 9 equally spaced thresholds from 0.25 to 2.25, one model trained per
   threshold, by the lowest accuracy-engagement distance on the in-distribution validation split;
   inference is greedy.

The accuracy-engagement distance (the paper's section 4): a model that answers ``C`` questions
correctly and ``I`` incorrectly out of ``D`` (abstaining on the rest) is the point ``(I, C)``; the ideal
model is ``(0, D)``; ``AED = sqrt((I^2 + (D - C)^2) / (2 D^2))``, in [0, 1], lower is better (0 answers
everything correctly, 1 answers everything wrongly, abstaining on everything is ``1/sqrt(2)``). The
paper's text says it is "maximised" when every answer is correct; its formula and its worked example
(0.30 for 70 % accuracy at full engagement, 0.71 for 10 answers of 2500) give the reading above.

Besides LoRA, pysteer's cheaper variant trains a LoReFT edit (:mod:`pysteer.reft`) through a trainable
steering handle: it acts only at the last prompt token, the position where semantic-entropy probes read
the model's uncertainty before it answers (the token before generation; on SmolLM2 the committed
``pysteer uncertainty`` run found the best probe layers at 17-22 of 30), so it adds nothing to decoding
and trains above frozen layers that a ``FrozenPrefix`` replays. The two gates need no training of the
model: the SE gate samples N answers at inference (costly), the SEP gate is a linear probe on the
prefill's last-prompt states inside ``pysteer.generate(abstain=...)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..recipes._common import (
    LoraEdit,
    TrainableEdit,
    freeze,
    model_device,
    save_png,
    training_backend,
    unfreeze,
)
from .entailment import Entailment, normalise_answer
from .entropy import discrete_semantic_entropy
from .evaluation import is_correct
from .probes import LinearProbe, best_layer_range, best_split, binarize, fit_range_probe, layer_aurocs
from .questions import SPLITS, Question
from .sampling import answer_prompt, residual_sites, stop_token_ids

ABSTENTION = "I don't know the answer."
# the paper's grid: 9 equally spaced SE thresholds from 0.25 to 2.25
PAPER_THRESHOLDS = tuple(round(0.25 * k, 2) for k in range(1, 10))
# probe-score thresholds tried for the SEP gate
GATE_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
METHODS = ("base", "se_gated", "sep_gated", "lora", "steering")
# phrases that count as abstaining (normalised answer contains one)
_ABSTAIN_MARKERS = ("i dont know", "i do not know")


# ------------------------------------------------------------------------------------------------
# targets and metrics
# ------------------------------------------------------------------------------------------------


def check_threshold(threshold: float, n_samples: int | None = None) -> float:
    """A semantic-entropy threshold: finite, at least 0 and, with ``n_samples`` N, at most the largest
    discrete SE of N answers, ``log N`` (a larger one abstains on nothing)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"SE threshold must be a finite number, got {threshold!r}")
    if threshold < 0:
        raise ValueError(f"SE threshold {threshold} is out of range: semantic entropy is never negative")
    if n_samples is not None and threshold > math.log(n_samples) + 1e-12:
        raise ValueError(
            f"SE threshold {threshold} is out of range: with {n_samples} samples the discrete SE is at most "
            f"log({n_samples}) = {math.log(n_samples):.3f}"
        )
    return float(threshold)


def abstention_targets(
    answers: Sequence[str], entropies: Sequence[float], threshold: float, abstention: str = ABSTENTION
) -> list[str]:
    """The paper's label-free targets: ``abstention`` where ``SE > threshold``, else the model's own answer.

    Raises:
        ValueError: empty or unequal inputs, a negative or non-finite threshold or entropy.
    """
    answers, entropies = list(answers), [float(e) for e in entropies]
    if not answers or len(answers) != len(entropies):
        raise ValueError(f"abstention_targets: {len(answers)} answers and {len(entropies)} entropies")
    threshold = check_threshold(threshold)
    if any(not math.isfinite(e) or e < 0 for e in entropies):
        raise ValueError("abstention_targets: entropies must be finite and non-negative")
    return [abstention if e > threshold else a for a, e in zip(answers, entropies)]


def is_abstention(answer: str) -> bool:
    """An empty answer (a gate skipped it) or one saying "I don't know"."""
    text = normalise_answer(answer)
    return not text or any(m in text for m in _ABSTAIN_MARKERS)


def accuracy_engagement(correct: Sequence[bool], abstained: Sequence[bool]) -> dict[str, Any]:
    """Accuracy on answered questions, abstention rate and the accuracy-engagement distance.

    Args:
        correct: per question, whether the answer is right (ignored where abstained).
        abstained: per question, whether the model abstained.

    Returns:
        ``n`` (``D``), ``answered``, ``correct`` (``C``), ``incorrect`` (``I``), ``accuracy_answered``
        (``C / (C + I)``, None when nothing was answered), ``abstention_rate`` and ``aed``
        (``sqrt((I^2 + (D - C)^2) / (2 D^2))``, see the module docstring).
    """
    if len(correct) != len(abstained):
        raise ValueError(
            f"accuracy_engagement: {len(correct)} correctness labels, {len(abstained)} abstentions"
        )
    D = len(correct)
    if D == 0:
        raise ValueError("accuracy_engagement: no questions (empty split)")
    C = sum(1 for c, a in zip(correct, abstained) if c and not a)
    incorrect = sum(1 for c, a in zip(correct, abstained) if not c and not a)
    answered = C + incorrect
    return {
        "n": D,
        "answered": answered,
        "correct": C,
        "incorrect": incorrect,
        "accuracy_answered": C / answered if answered else None,
        "abstention_rate": 1 - answered / D,
        "aed": math.sqrt((incorrect**2 + (D - C) ** 2) / (2 * D**2)),
    }


def grade(questions: Sequence[Question], answers: Sequence[str], gated: Sequence[bool] | None = None) -> dict:
    """:func:`accuracy_engagement` of ``answers`` (graded with the uncertainty module's containment
    match); ``gated`` marks questions a gate abstained on."""
    gated = list(gated) if gated is not None else [False] * len(answers)
    abstained = [g or is_abstention(a) for a, g in zip(answers, gated)]
    correct = [is_correct(a, q.answers) for a, q in zip(answers, questions)]
    return accuracy_engagement(correct, abstained)


# ------------------------------------------------------------------------------------------------
# configuration and the model's own answers
# ------------------------------------------------------------------------------------------------


@dataclass
class AbstainConfig:
    """Everything that fixes an :func:`abstain_study` run.

    Attributes:
        n_samples, temperature: sampled answers per question for SE (the paper: 10 at T = 1.0).
        max_new_tokens: longest answer.
        strict: strict bidirectional entailment.
        thresholds: SE thresholds tried (the paper's grid by default).
        gate_thresholds: probe-score thresholds tried for the SEP gate.
        methods: which of ``METHODS`` to run (LoRA is skipped, with a note, when peft is missing).
        steps, lr, batch_size: fine-tuning per threshold (Adam on the target tokens' cross-entropy).
        lora_lr, lora_r, lora_alpha, lora_modules: LoRA (the paper: r 8 on q_proj and v_proj).
        reft_layers: LoReFT layers (None: the middle and two-thirds depth), ``reft_rank`` its rank.
        min_layers: narrowest concatenated layer range of the SEP probe.
        gen_batch_size: questions per ``pysteer.generate`` call (times ``n_samples`` rows when sampling).
        chat: the tokenizer's chat template for the answering prompt.
        seed: sampling and initialisation seed.
    """

    n_samples: int = 10
    temperature: float = 1.0
    max_new_tokens: int = 16
    strict: bool = False
    thresholds: tuple[float, ...] = PAPER_THRESHOLDS
    gate_thresholds: tuple[float, ...] = GATE_THRESHOLDS
    methods: tuple[str, ...] = METHODS
    steps: int = 30
    lr: float = 2e-3
    batch_size: int = 8
    lora_lr: float = 5e-4
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_modules: tuple[str, ...] = ("q_proj", "v_proj")
    reft_layers: tuple[int, ...] | None = None
    reft_rank: int = 4
    min_layers: int = 5
    gen_batch_size: int = 8
    chat: bool = True
    seed: int = 0
    backend: str | None = None

    def check(self) -> None:
        """Raise on a bad setting before anything runs."""
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"abstain: unknown methods {unknown}; use {', '.join(METHODS)}")
        for name in ("n_samples", "max_new_tokens", "steps", "batch_size", "gen_batch_size", "reft_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"abstain: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples < 2:
            raise ValueError("abstain: n_samples must be >= 2 (semantic entropy of one answer is always 0)")
        if not self.thresholds:
            raise ValueError("abstain: no SE thresholds to try")
        for t in self.thresholds:
            check_threshold(t, self.n_samples)
        if not self.gate_thresholds or not all(0 <= t <= 1 for t in self.gate_thresholds):
            raise ValueError(
                f"abstain: gate thresholds must be probe scores in [0, 1], got {self.gate_thresholds}"
            )


@dataclass
class Generated:
    """One ``pysteer.generate`` pass over questions: answers, their token ids, cost.

    Attributes:
        answers: ``[Q]`` (greedy) or ``[Q][n]`` (sampled) answer texts.
        tokens: the generated ids per output row, stop token included.
        seconds: wall time of the generate calls.
        forward_tokens: tokens the model ran on: each prompt once (samples share its prefill) plus
            every generated token.
        tbg: ``[Q, L, d]`` last-prompt states of every layer (when tapped).
        abstained: per question, whether the gate skipped it.
    """

    answers: list
    tokens: list[list[int]]
    seconds: float
    forward_tokens: int
    tbg: Tensor | None = None
    abstained: list[bool] = field(default_factory=list)


def prompt_ids(tokenizer: Any, questions: Sequence[Question], chat: bool = True) -> list[list[int]]:
    """Token ids of each question's answering prompt (as :func:`pysteer.uncertainty.sample_answers` encodes it)."""
    return [
        tokenizer(answer_prompt(tokenizer, q.question, chat), add_special_tokens=False)["input_ids"]
        for q in questions
    ]


def _answer_text(tokenizer: Any, tokens: list[int], stops: set[int]) -> str:
    body = tokens[:-1] if tokens and tokens[-1] in stops else tokens
    return tokenizer.decode(body, skip_special_tokens=True).strip()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    config: AbstainConfig,
    *,
    n: int = 1,
    steering=None,
    taps: bool = False,
    abstain=None,
    threshold: float = 0.5,
) -> Generated:
    """Greedy (``n = 1``) or sampled answers through ``pysteer.generate`` (eager: on a CPU the compiled
    decode step takes minutes to build), ``config.gen_batch_size`` prompts per call."""
    from ..fast import generate

    stops = stop_token_ids(tokenizer)
    stop_set = set(stops)
    answers, tokens, tbg, abstained = [], [], [], []
    seconds, forward = 0.0, 0
    sites = residual_sites(model) if taps else None
    for start in range(0, len(prompts), config.gen_batch_size):
        chunk = list(prompts[start : start + config.gen_batch_size])
        t0 = time.perf_counter()
        res = generate(
            model,
            chunk,
            tokenizer=tokenizer,
            steering=steering,
            max_new_tokens=config.max_new_tokens,
            do_sample=n > 1,
            temperature=config.temperature if n > 1 else 1.0,
            top_k=0,
            top_p=1.0,
            stop=stops,
            seed=config.seed + start if n > 1 else None,
            compile=False,
            progress=False,
            num_return_sequences=n,
            taps=sites,
            abstain=abstain,
            threshold=threshold,
        )
        seconds += time.perf_counter() - t0
        forward += sum(len(p) for p in chunk) + sum(len(t) for t in res.tokens)
        texts = [_answer_text(tokenizer, t, stop_set) for t in res.tokens]
        answers += texts if n == 1 else [texts[i : i + n] for i in range(0, len(texts), n)]
        tokens += [list(t) for t in res.tokens]
        abstained += res.abstained[::n]
        if taps:
            tbg.append(torch.stack([res.taps["last_prompt"][s].float() for s in sites], dim=1))
    return Generated(answers, tokens, seconds, forward, torch.cat(tbg) if taps else None, abstained)


@dataclass
class SelfLabels:
    """The model's own answers and semantic entropies for one split.

    Attributes:
        greedy: the standard responses (with last-prompt states of every layer).
        samples: the sampled answers.
        semantic_ids: ``[Q][n]`` cluster ids.
        entropies: ``[Q]`` discrete semantic entropy.
        cluster_seconds: wall time of the entailment clustering.
    """

    greedy: Generated
    samples: Generated
    semantic_ids: list[list[int]]
    entropies: list[float]
    cluster_seconds: float


def self_label(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    entailment: Entailment,
    config: AbstainConfig,
) -> SelfLabels:
    """Standard responses (greedy, tapped at the last prompt token) and discrete SE from
    ``config.n_samples`` sampled answers per question."""
    prompts = prompt_ids(tokenizer, questions, config.chat)
    greedy = generate_answers(model, tokenizer, prompts, config, taps=True)
    samples = generate_answers(model, tokenizer, prompts, config, n=config.n_samples)
    t0 = time.perf_counter()
    ids = [
        entailment.cluster(s, q.question, strict=config.strict) for s, q in zip(samples.answers, questions)
    ]
    seconds = time.perf_counter() - t0
    return SelfLabels(greedy, samples, ids, [discrete_semantic_entropy(i) for i in ids], seconds)


# ------------------------------------------------------------------------------------------------
# fine-tuning on the targets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetExample:
    """A prompt and the target tokens the loss is taken on."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]


def target_examples(
    tokenizer: Any, prompts: Sequence[list[int]], greedy_tokens: Sequence[list[int]], abstain: Sequence[bool]
) -> list[TargetExample]:
    """Token targets: the abstention phrase and EOS where ``abstain``, else the model's own greedy
    tokens as it generated them (its stop token included; EOS added when it ran out of tokens)."""
    eos = tokenizer.eos_token_id
    stops = set(stop_token_ids(tokenizer))
    phrase = tuple(tokenizer(ABSTENTION, add_special_tokens=False)["input_ids"]) + (eos,)
    out = []
    for p, g, a in zip(prompts, greedy_tokens, abstain):
        own = tuple(g) if g and g[-1] in stops else tuple(g) + (eos,)
        out.append(TargetExample(tuple(p), phrase if a else own))
    return out


def _batch(
    examples: Sequence[TargetExample], pad_id: int, device
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 but on target tokens) and the
    prompt lengths."""
    rows = [list(e.prompt) + list(e.target) for e in examples]
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (r, e) in enumerate(zip(rows, examples)):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        labels[b, len(e.prompt) : len(r)] = torch.tensor(e.target)
    return ids.to(device), mask.to(device), labels.to(device), [len(e.prompt) for e in examples]


def target_loss(model: Any, edit: TrainableEdit, examples: Sequence[TargetExample], pad_id: int) -> Tensor:
    """Mean cross-entropy of the target tokens (teacher-forced; the prompt is not scored)."""
    ids, mask, labels, lengths = _batch(examples, pad_id, model_device(model))
    with edit.prompt_context(lengths):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


class _LoraTargets(LoraEdit):
    def prompt_context(self, lengths: Sequence[int]):
        return contextlib.nullcontext()


class PromptEndReft(TrainableEdit):
    """LoReFT (one per layer at ``layers.L.resid``) at the last prompt token only, trained through a
    trainable steering handle (``handle.parameters()``); ``close`` removes it bit-exactly."""

    name = "steering"

    def __init__(self, model: Any, layers: Sequence[int], rank: int, seed: int, backend: str | None = None):
        from ..models.specs import geometry
        from ..reft import LoReFT
        from ..steering import steer

        d, dev = geometry(model).d_model, model_device(model)
        self.interventions = [
            LoReFT.init(f"layers.{L}.resid", d, rank, "l1", seed=seed + L, device=dev) for L in layers
        ]
        self.handle = steer(model, self.interventions, trainable=True, backend=training_backend(backend, dev))
        self.params = self.handle.parameters()

    def parameters(self) -> list[Tensor]:
        return self.params

    def prompt_context(self, lengths: Sequence[int]):
        """Training forwards hold prompt + target: the first ``lengths`` tokens are the prompt."""
        return self.handle.prompt_length(list(lengths))

    def frozen_prefix(self):
        return self.handle.frozen_prefix()

    def close(self) -> None:
        self.handle.remove()


def default_reft_layers(n_layers: int) -> tuple[int, ...]:
    """The middle and two-thirds depth (15 and 20 of SmolLM2's 30), around the layers where the committed
    ``pysteer uncertainty`` run's last-prompt-token SE probe read SE best (17-22)."""
    return tuple(sorted({n_layers // 2, (2 * n_layers) // 3}))


def fit_targets(
    model: Any,
    edit: TrainableEdit,
    examples: Sequence[TargetExample],
    pad_id: int,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Adam on :func:`target_loss`; batches drawn once and revisited in a fresh order every epoch (so a
    LoReFT edit replays the frozen layers below it). Returns the loss per step."""
    if not examples:
        raise ValueError("fit_targets: no training examples (empty split)")
    opt = torch.optim.Adam(edit.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    batches = [[examples[i] for i in perm[s : s + batch_size]] for s in range(0, len(perm), batch_size)]
    prefix = edit.frozen_prefix()
    order: list[int] = []
    losses = []
    try:
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            opt.zero_grad()
            loss = target_loss(model, edit, batches[order.pop(0)], pad_id)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if prefix is not None:
            prefix.remove()
    return losses


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def _cost(gen: Sequence[Generated], n: int) -> dict[str, float]:
    return {
        "seconds_per_question": sum(g.seconds for g in gen) / n,
        "forward_tokens_per_question": sum(g.forward_tokens for g in gen) / n,
    }


def _best(rows: list[dict], key: str = "aed") -> dict:
    """The lowest-AED row (ties: the first, i.e. the lowest threshold)."""
    return min(rows, key=lambda r: r["validation"][key])


def choose_gate(
    method: str,
    scores: Sequence[float],
    grid: Sequence[float],
    ceiling: float,
    questions: Sequence[Question],
    answers: Sequence[str],
) -> tuple[dict, list[dict]]:
    """The gate threshold with the lowest validation AED (a question is gated when its score exceeds
    the threshold). ``ceiling`` is the largest score possible (``log N`` for SE, 1 for a probe), tried
    after the grid: there the gate abstains on nothing, so a gate that only hurts can choose to answer
    everything rather than the least harmful grid point. Returns the chosen row and every row."""
    rows = [
        {"method": method, "threshold": t, "validation": grade(questions, answers, [s > t for s in scores])}
        for t in (*grid, ceiling)
    ]
    return _best(rows), rows


def _fit_sep(labels: dict[str, SelfLabels], sites: list[str], min_layers: int) -> tuple[LinearProbe, dict]:
    """The SE probe on train's last-prompt states (SE binarised at the best split of the training SEs,
    as the reference notebook), layer range by validation AUROC."""
    tr, va = labels["train"], labels["validation"]
    split = best_split(tr.entropies)
    y_tr, y_va = binarize(tr.entropies, split), binarize(va.entropies, split)
    if len(set(y_tr)) < 2:
        raise ValueError(
            f"SEP gate: every training question falls on one side of the SE split {split:.3f}; "
            "use more training questions"
        )
    L = tr.greedy.tbg.shape[1]
    width = min(min_layers, L)
    if len(set(y_va)) == 2:
        layers = best_layer_range(layer_aurocs(tr.greedy.tbg, y_tr, va.greedy.tbg, y_va), width)
    else:
        layers = (0, L)
    probe = fit_range_probe(tr.greedy.tbg, y_tr, layers, sites, "high_semantic_entropy")
    return probe, {
        "se_split": split,
        "layer_range": list(layers),
        "high_se_fraction_train": sum(y_tr) / len(y_tr),
    }


def abstain_study(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    entailment: Entailment,
    config: AbstainConfig,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Self-label every split, fit the gates and the fine-tunes on train, choose every threshold on
    validation (AED), and score every method once on test (see the module docstring).

    Returns:
        A JSON-serialisable dict: ``test`` (per method: metrics and cost per question), ``selection``
        (validation rows), ``chosen``, ``targets`` (abstention share of the training targets per
        threshold), ``losses`` and ``config``.
    """
    config.check()
    split = {s: [q for q in questions if q.split == s] for s in SPLITS}
    empty = [s for s, qs in split.items() if not qs]
    if empty:
        raise ValueError(f"abstain: the questions need all three splits; none in {', '.join(empty)}")
    methods = list(config.methods)
    notes: list[str] = []
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            notes.append("peft is not installed: LoRA skipped (pip install 'pysteer[lora]')")
            methods.remove("lora")
    sites = residual_sites(model)
    labels = {}
    for s, qs in split.items():
        labels[s] = self_label(model, tokenizer, qs, entailment, config)
        log(
            f"{s}: {len(qs)} questions, greedy {labels[s].greedy.seconds:.0f} s, "
            f"{config.n_samples} samples {labels[s].samples.seconds:.0f} s, "
            f"mean SE {sum(labels[s].entropies) / len(qs):.3f}"
        )
    val_q, test_q = split["validation"], split["test"]
    base_val = labels["validation"].greedy.answers
    thresholds = list(config.thresholds)
    out: dict[str, Any] = {"test": {}, "selection": [], "chosen": {}, "losses": {}, "notes": notes}
    out["targets"] = {
        str(t): sum(e > t for e in labels["train"].entropies) / len(split["train"]) for t in thresholds
    }
    prompts = {s: prompt_ids(tokenizer, qs, config.chat) for s, qs in split.items()}

    if "base" in methods:
        gen = generate_answers(model, tokenizer, prompts["test"], config)
        out["test"]["base"] = {**grade(test_q, gen.answers), **_cost([gen], len(test_q))}
        out["chosen"]["base"] = {}

    if "se_gated" in methods:
        best, rows = choose_gate(
            "se_gated",
            labels["validation"].entropies,
            thresholds,
            math.log(config.n_samples),
            val_q,
            base_val,
        )
        out["selection"] += rows
        te = labels["test"]
        gate = [e > best["threshold"] for e in te.entropies]
        cost = _cost([te.greedy, te.samples], len(test_q))
        cost["seconds_per_question"] += te.cluster_seconds / len(test_q)
        out["test"]["se_gated"] = {**grade(test_q, te.greedy.answers, gate), **cost}
        out["chosen"]["se_gated"] = {"threshold": best["threshold"]}

    if (
        "sep_gated" in methods
        and len(set(binarize(labels["train"].entropies, best_split(labels["train"].entropies)))) < 2
    ):
        notes.append("SEP gate skipped: every training question falls on one side of the SE split")
        methods.remove("sep_gated")
    if "sep_gated" in methods:
        probe, info = _fit_sep(labels, sites, config.min_layers)
        va = labels["validation"].greedy.tbg
        scores = probe([va[:, sites.index(s)] for s in probe.sites]).tolist()
        best, rows = choose_gate("sep_gated", scores, config.gate_thresholds, 1.0, val_q, base_val)
        out["selection"] += rows
        gen = generate_answers(
            model, tokenizer, prompts["test"], config, abstain=probe, threshold=best["threshold"]
        )
        out["test"]["sep_gated"] = {**grade(test_q, gen.answers, gen.abstained), **_cost([gen], len(test_q))}
        out["chosen"]["sep_gated"] = {"threshold": best["threshold"], **info}

    train = labels["train"]
    n_layers = len(sites)
    reft_layers = config.reft_layers or default_reft_layers(n_layers)
    if any(not 1 <= L < n_layers for L in reft_layers):
        raise ValueError(f"abstain: reft_layers {list(reft_layers)} must lie in [1, {n_layers - 1}]")
    makers = {
        "lora": (
            config.lora_lr,
            lambda: _LoraTargets(
                model, config.lora_r, config.lora_alpha, None, config.seed, target_modules=config.lora_modules
            ),
        ),
        "steering": (
            config.lr,
            lambda: PromptEndReft(model, reft_layers, config.reft_rank, config.seed, config.backend),
        ),
    }
    saved = freeze(model)
    try:
        for method in ("lora", "steering"):
            if method not in methods:
                continue
            lr, make = makers[method]
            result = _fine_tune(
                model, tokenizer, method, make, train, prompts, val_q, test_q, thresholds, lr, config, log
            )
            out["selection"] += result["selection"]
            out["test"][method] = result["test"]
            out["chosen"][method] = result["chosen"]
            out["losses"][method] = result["losses"]
    finally:
        unfreeze(saved)
    out["config"] = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "reft_layers": list(reft_layers),
        "abstention": ABSTENTION,
        "standard_response": "greedy (the paper: T = 0.1)",
        "semantic_entropy": "discrete (cluster frequencies), the paper's eq. 6",
        "sizes": {s: len(qs) for s, qs in split.items()},
    }
    out["self_labels"] = {
        s: {
            "entropies": lab.entropies,
            "greedy": lab.greedy.answers,
            "seconds": {
                "greedy": lab.greedy.seconds,
                "sampling": lab.samples.seconds,
                "clustering": lab.cluster_seconds,
            },
        }
        for s, lab in labels.items()
    }
    return out


def _fine_tune(
    model, tokenizer, method, make, train, prompts, val_q, test_q, thresholds, lr, config, log
) -> dict:
    """One model per distinct training partition of the threshold grid (thresholds that split the
    training questions identically train the same model); the lowest validation AED is kept and scored
    on test."""
    pad_id = _pad_id(tokenizer)
    by_partition: dict[tuple[bool, ...], list[float]] = {}
    for t in thresholds:
        by_partition.setdefault(tuple(e > t for e in train.entropies), []).append(t)
    selection, best = [], None
    for partition, ts in by_partition.items():
        examples = target_examples(tokenizer, prompts["train"], train.greedy.tokens, partition)
        edit = make()
        try:
            losses = fit_targets(
                model,
                edit,
                examples,
                pad_id,
                lr=lr,
                steps=config.steps,
                batch_size=config.batch_size,
                seed=config.seed,
            )
            with torch.no_grad():
                gen = generate_answers(
                    model, tokenizer, prompts["validation"], config, steering=_steering(edit)
                )
            val = grade(val_q, gen.answers)
            row = {"method": method, "threshold": ts[0], "same_targets_for": ts, "validation": val}
            row["loss_first_last"] = [losses[0], losses[-1]]
            selection.append(row)
            log(
                f"{method} tau {ts[0]}: abstain targets {sum(partition)}/{len(partition)}, loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f}, val AED {val['aed']:.3f}, abstain {val['abstention_rate']:.2f}"
            )
            if best is None or val["aed"] < best[0]:
                best = (val["aed"], row, edit.snapshot(), losses, edit.n_params())
        finally:
            edit.close()
    _, row, snap, losses, n_params = best
    edit = make()
    try:
        edit.restore(snap)
        with torch.no_grad():
            gen = generate_answers(model, tokenizer, prompts["test"], config, steering=_steering(edit))
    finally:
        edit.close()
    return {
        "selection": selection,
        "test": {**grade(test_q, gen.answers), **_cost([gen], len(test_q)), "trained_params": n_params},
        "chosen": {"threshold": row["threshold"], "same_targets_for": row["same_targets_for"]},
        "losses": losses,
    }


def _steering(edit: TrainableEdit):
    return getattr(edit, "handle", None)


def engagement_png(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """The paper's adaptation plot for the test split: each method as the point (incorrect, correct),
    the ideal model at (0, D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    D = None
    for name, m in result["test"].items():
        D = m["n"]
        ax.scatter([m["incorrect"]], [m["correct"]], s=40, label=f"{name} (AED {m['aed']:.3f})")
    if D is not None:
        ax.scatter([0], [D], marker="*", s=120, color="black", label="ideal")
    ax.set_xlabel("answered incorrectly")
    ax.set_ylabel("answered correctly")
    ax.set_title("Abstention: accuracy vs engagement (test split)", fontsize=10)
    ax.grid(True, linestyle="--", linewidth=0.5)
    ax.legend(fontsize=7)
    return save_png(fig, path)
