"""Model editing for aspect-based sentiment classification (Li et al., "Locate-then-edit" ABSC,
AAAI 2025; ME-ABSC, built on pyreft).

The paper's recipe, on a frozen causal LM:

1. prompt every (sentence, aspect) as "Given the sentence: '{s}', what is the sentiment polarity
   of the aspect term {a} ?" (in the chat template when the tokenizer has one);
2. causal tracing (``causal_trace``, ROME-style, the aspect term as the subject, the gold label word
   as the answer) on a few training examples; the layers whose restored hidden state at the
   aspect's last token brings the answer back most (mean indirect effect) are edited;
3. LoReFT (rank 4) at the aspect's last token on those layers, trained with cross-entropy on the
   label word.

Baselines trained on the same data: the zero-shot model, LoReFT at the last prompt token (pyreft's
default ``"l1"``) on the same layers, and LoRA on every layer's ``o_proj`` (peft, r 4, alpha 8).

Answers are scored by the argmax over the first tokens of the three label words at the first
answer position (the restricted-choice form of exact match: for one-token labels it is what greedy
decoding answers whenever the model answers with a label word at all; unconstrained greedy decoding
of a small chat model often starts "The sentiment ...", which exact match would count wrong). The
metrics are accuracy and macro-F1 over the three labels.

Position of the edit: the suffix after the aspect term (" ?" and the chat template's closing text)
is fixed, so ``aspect_last - prompt_len`` is one constant for every prompt and the edit uses that
negative explicit position (one config). Prompts whose offset differs (a tokenizer merging the
aspect with the suffix) get a config of their own with the same tensors, chosen per request by
``handle.rows``.

Hyper-parameters (learning rate, number of traced layers, steps) are chosen per method on the
validation split (macro-F1, then accuracy); the test split and the other domain's test split are
scored once with the chosen setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.specs import geometry
from ..reft import LoReFT
from ..steering import steer
from ._common import LoraEdit as _LoraEdit
from ._common import TrainableEdit as _Edit
from ._common import (
    chat_text,
    curves_png,
    data_path,
    freeze,
    last_token_logits,
    model_device,
    read_jsonl,
    training_backend,
    unfreeze,
)
from .causal_trace import causal_trace, subject_span

PROMPT = "Given the sentence: '{sentence}', what is the sentiment polarity of the aspect term {aspect} ?"
ANSWER = "The sentiment polarity of the aspect term {aspect} is"
LABELS = ("positive", "negative", "neutral")
DOMAINS = ("restaurant", "laptop")
SPLITS = ("train", "validation", "test")
METHODS = ("zero_shot", "loreft_aspect", "loreft_last", "lora")


# ------------------------------------------------------------------------------------------------
# data, prompt, labels
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AspectExample:
    """One (sentence, aspect) pair and the aspect's polarity."""

    sentence: str
    aspect: str
    polarity: str
    split: str = "train"
    domain: str = ""


def load_absc(
    domain: str = "restaurant", split: str | None = None, path: str | os.PathLike | None = None
) -> list[AspectExample]:
    """The shipped aspect-sentiment set of ``domain`` (``"restaurant"`` or ``"laptop"``), or a JSON
    lines file with ``sentence``, ``aspect``, ``polarity`` and ``split``; ``split`` filters."""
    if path is None:
        if domain not in DOMAINS:
            raise ValueError(f"absc: domain must be one of {DOMAINS}, got {domain!r}")
        path = data_path(f"absc_{domain}.jsonl")
    out = []
    for n, row in enumerate(read_jsonl(path), start=1):
        if not {"sentence", "aspect", "polarity", "split"} <= set(row):
            raise ValueError(f"{path}:{n}: needs sentence, aspect, polarity and split")
        if row["polarity"] not in LABELS:
            raise ValueError(f"{path}:{n}: polarity must be one of {LABELS}, got {row['polarity']!r}")
        if row["aspect"] not in row["sentence"]:
            raise ValueError(f"{path}:{n}: aspect {row['aspect']!r} does not occur in the sentence")
        ex = AspectExample(
            row["sentence"], row["aspect"], row["polarity"], row["split"], row.get("domain", domain)
        )
        if split is None or ex.split == split:
            out.append(ex)
    return out


def absc_prompt(sentence: str, aspect: str) -> str:
    """The paper's question (before any chat template)."""
    return PROMPT.format(sentence=sentence, aspect=aspect)


def _chat(tokenizer, chat: bool) -> bool:
    return bool(chat and getattr(tokenizer, "chat_template", None))


def absc_text(tokenizer, ex: AspectExample, chat: bool = True, answer: bool = True) -> str:
    """The model input of ``ex``: the question, in the chat template when the tokenizer has one,
    then (``answer``) the start of the answer, ``ANSWER``, so the next token is the label word."""
    text = chat_text(tokenizer, absc_prompt(ex.sentence, ex.aspect), chat)
    return text + (ANSWER.format(aspect=ex.aspect) if answer else "")


def label_words(tokenizer, chat: bool = True, answer: bool = True) -> list[str]:
    """The label words as the answer's next token spells them: after a space when they follow
    text (``answer``, or a plain prompt), bare right after a chat template's assistant turn."""
    prefix = "" if _chat(tokenizer, chat) and not answer else " "
    return [prefix + lab for lab in LABELS]


def label_token_ids(tokenizer, chat: bool = True, answer: bool = True) -> list[int]:
    """First token of each label word (they must differ)."""
    ids = []
    for w in label_words(tokenizer, chat, answer):
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"absc: label word {w!r} has no tokens")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"absc: the label words' first tokens collide for this tokenizer: {ids}")
    return ids


@dataclass
class _Encoded:
    ids: list[int]
    offset: int  # position of the aspect's last token, back from the prompt's end (-1 = last token)
    label: int
    span: tuple[int, int] = (0, 0)  # the question's aspect term, as token indices


def _question_span(tokenizer, ex: AspectExample, ids: Sequence[int], chat: bool) -> tuple[int, int]:
    """Token span of the aspect term in the question (not its repetition in the answer's start)."""
    q = list(tokenizer(absc_text(tokenizer, ex, chat, answer=False), add_special_tokens=True)["input_ids"])
    if list(ids[: len(q)]) != q:
        raise ValueError(f"absc: the answer's start changes how the question tokenises for {ex.aspect!r}")
    return subject_span(tokenizer, q, ex.aspect)


def encode_examples(
    tokenizer, examples: Sequence[AspectExample], chat: bool = True, answer: bool = True
) -> list[_Encoded]:
    """Token ids of every prompt (as ``causal_trace`` tokenises it) and the offset of the last token
    of the question's aspect term."""
    out = []
    for ex in examples:
        ids = list(tokenizer(absc_text(tokenizer, ex, chat, answer), add_special_tokens=True)["input_ids"])
        start, end = _question_span(tokenizer, ex, ids, chat)
        out.append(_Encoded(ids, end - 1 - len(ids), LABELS.index(ex.polarity), (start, end)))
    return out


def _batch(encs: Sequence[_Encoded], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    S = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encs), S, dtype=torch.long)
    for i, e in enumerate(encs):  # left padding
        ids[i, S - len(e.ids) :] = torch.tensor(e.ids)
        mask[i, S - len(e.ids) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def _last_logits(model: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
    return last_token_logits(
        model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
    ).float()


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def absc_metrics(gold: Sequence[int], pred: Sequence[int]) -> dict:
    """Accuracy and macro-F1 over the three labels (a label's F1 is 0 when it has no true positive,
    as scikit-learn's ``f1_score(average="macro", labels=[0, 1, 2], zero_division=0)``)."""
    n = len(gold)
    if n == 0 or len(pred) != n:
        raise ValueError("absc_metrics: gold and pred must be non-empty and of equal length")
    f1 = {}
    for k, lab in enumerate(LABELS):
        tp = sum(1 for g, p in zip(gold, pred) if g == k and p == k)
        fp = sum(1 for g, p in zip(gold, pred) if g != k and p == k)
        fn = sum(1 for g, p in zip(gold, pred) if g == k and p != k)
        f1[lab] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    confusion = [
        [sum(1 for g, p in zip(gold, pred) if g == a and p == b) for b in range(3)] for a in range(3)
    ]
    return {
        "accuracy": sum(int(g == p) for g, p in zip(gold, pred)) / n,
        "macro_f1": sum(f1.values()) / len(LABELS),
        "f1": f1,
        "confusion": confusion,  # rows gold, columns predicted, LABELS order
        "predicted": {lab: sum(1 for p in pred if p == k) for k, lab in enumerate(LABELS)},
        "n": n,
    }


# ------------------------------------------------------------------------------------------------
# the trained edits
# ------------------------------------------------------------------------------------------------


class _ReftEdit(_Edit):
    """LoReFT (one per layer, ``layers.L.resid``) at the aspect's last token (``where="aspect"``, an
    explicit negative position per distinct offset) or the last prompt token (``where="last"``)."""

    def __init__(
        self, model, layers: Sequence[int], where: str, rank: int, offsets: Sequence[int], seed: int, backend
    ):
        d = geometry(model).d_model
        dev = model_device(model)
        self.name = f"loreft_{where}"
        self.base = [
            LoReFT.init(f"layers.{L}.resid", d, rank, "l1", seed=seed + L, device=dev) for L in layers
        ]
        if where == "aspect":
            self.configs = {
                f"at{o}": [
                    LoReFT(iv.site_name, iv.rotation, iv.weight, iv.bias, [int(o)]) for iv in self.base
                ]
                for o in sorted(set(offsets))
            }
        elif where == "last":
            self.configs = {"last": list(self.base)}
        else:
            raise ValueError(f"absc: where must be 'aspect' or 'last', got {where!r}")
        self.where = where
        self.handle = steer(model, self.configs, trainable=True, backend=training_backend(backend, dev))
        self.params = self.handle.parameters()

    def parameters(self) -> list[Tensor]:
        return self.params

    def select(self, encs: Sequence[_Encoded]) -> None:
        self.handle.rows([f"at{e.offset}" if self.where == "aspect" else "last" for e in encs])

    def frozen_prefix(self):
        return self.handle.frozen_prefix()

    def interventions(self) -> dict[str, list[LoReFT]]:
        """The trained edit as steering configs (detached copies)."""
        return {
            name: [
                LoReFT(
                    iv.site_name,
                    iv.rotation.detach().clone(),
                    iv.weight.detach().clone(),
                    iv.bias.detach().clone(),
                    iv.positions,
                )
                for iv in ivs
            ]
            for name, ivs in self.configs.items()
        }

    def close(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------------
# evaluation and training
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _predict(
    model, encs: Sequence[_Encoded], label_ids: Tensor, edit: _Edit, pad_id: int, batch_size: int
) -> dict:
    device = model_device(model)
    preds, ces = [], []
    for s in range(0, len(encs), batch_size):
        chunk = encs[s : s + batch_size]
        edit.select(chunk)
        lg = _last_logits(model, *_batch(chunk, pad_id, device))
        y = label_ids[torch.tensor([e.label for e in chunk], device=device)]
        ces.append(torch.nn.functional.cross_entropy(lg, y, reduction="none"))
        preds += lg[:, label_ids].argmax(-1).tolist()
    out = absc_metrics([e.label for e in encs], preds)
    out["ce"] = float(torch.cat(ces).mean())
    return out


def _fit(
    model,
    encs: Sequence[_Encoded],
    label_ids: Tensor,
    edit: _Edit,
    pad_id: int,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    checkpoints: Sequence[int],
    evaluate: Callable[[], dict],
    log: Callable[[str], None],
) -> tuple[list[float], dict[int, tuple[dict, list[Tensor]]]]:
    """Adam on the label word's cross-entropy (full vocabulary, last prompt position). The batches
    are drawn once (shuffled) and visited in a fresh order every epoch, so a LoReFT edit replays the
    frozen layers below it from the second epoch on (``FrozenPrefix``). At each checkpoint step:
    ``evaluate()`` and a snapshot of the parameters."""
    device = model_device(model)
    opt = torch.optim.Adam(edit.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(encs), generator=g).tolist()
    batches = [[encs[i] for i in perm[s : s + batch_size]] for s in range(0, len(perm), batch_size)]
    prefix = edit.frozen_prefix()
    order: list[int] = []
    losses, at = [], {}
    try:
        for step in range(1, steps + 1):
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            chunk = batches[order.pop(0)]
            edit.select(chunk)
            y = label_ids[torch.tensor([e.label for e in chunk], device=device)]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(_last_logits(model, *_batch(chunk, pad_id, device)), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step in checkpoints:
                metrics = evaluate()
                at[step] = (metrics, edit.snapshot())
                log(
                    f"  step {step:4d}  train loss {loss.item():.4f}  val acc {metrics['accuracy']:.3f}  val macro-F1 {metrics['macro_f1']:.3f}"
                )
    finally:
        if prefix is not None:
            prefix.remove()
    return losses, at


# ------------------------------------------------------------------------------------------------
# layer choice by causal tracing
# ------------------------------------------------------------------------------------------------


def trace_layers(
    model: nn.Module,
    tokenizer,
    examples: Sequence[AspectExample],
    *,
    chat: bool = True,
    answer: bool = True,
    samples: int = 3,
    seed: int = 0,
) -> dict:
    """Causal traces (``kind="resid"``) of ``examples`` with the aspect term as the subject and the
    gold label word as the answer.

    Returns:
        ``{"aspect_last": [L], "last": [L]}`` mean indirect effect per layer at the aspect's last token
        and at the last token, ``"ranking"`` (layers by the aspect-token effect, best first; the last
        layer is left out: its state at the aspect token never reaches the answer),
        ``"per_example"`` (clean / corrupted probabilities) and ``"results"`` (the traces).
    """
    if not examples:
        raise ValueError("absc: no examples to trace")
    words = label_words(tokenizer, chat, answer)
    results, aspect_eff, last_eff, per_example = [], [], [], []
    for i, (ex, enc) in enumerate(zip(examples, encode_examples(tokenizer, examples, chat, answer))):
        r = causal_trace(
            model,
            tokenizer,
            absc_text(tokenizer, ex, chat, answer),
            enc.span,
            words[LABELS.index(ex.polarity)],
            kind="resid",
            samples=samples,
            seed=seed + 1000 * i,
        )
        eff = r.indirect_effect
        aspect_eff.append(eff[:, r.subject[1] - 1])
        last_eff.append(eff[:, -1])
        results.append(r)
        per_example.append(
            {
                "aspect": ex.aspect,
                "polarity": ex.polarity,
                "clean_prob": r.clean_prob,
                "corrupted_prob": r.corrupted_prob,
            }
        )
    a = torch.stack(aspect_eff).mean(0)
    b = torch.stack(last_eff).mean(0)
    n = a.shape[0]
    # the last layer's output at the aspect token reaches no later token: an edit there is a no-op
    # for the answer (its restored score is exactly the corrupted one), so it is never picked
    ranking = [int(x) for x in torch.argsort(a[: n - 1], descending=True, stable=True)] if n > 1 else [0]
    return {
        "aspect_last": a.tolist(),
        "last": b.tolist(),
        "ranking": ranking,
        "per_example": per_example,
        "results": results,
    }


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------


@dataclass
class AbscResult:
    """What ``absc_edit`` measured.

    Attributes:
        domain: training domain; ``eval_sets`` the scored test sets (``"restaurant"``, ``"laptop"``).
        trace: per-layer mean indirect effects, the ranking and per-example probabilities.
        selection: one row per (method, lr, n_layers, steps) with its validation metrics.
        chosen: per method, the chosen hyper-parameters.
        test: ``test[method][eval_set]`` metrics (accuracy, macro_f1, f1, confusion, ce, n).
        n_params: trained parameters per method.
        history: training losses of the chosen runs.
        interventions: the chosen LoReFT edit at the aspect token (steering configs).
        config: everything else that fixed the run.
    """

    domain: str
    eval_sets: list[str]
    trace: dict
    selection: list[dict]
    chosen: dict
    test: dict
    n_params: dict
    history: dict = field(default_factory=dict)
    interventions: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """One row per (method, eval set): accuracy, macro-F1 and trained parameters."""
        return [
            {
                "method": m,
                "eval": e,
                "accuracy": self.test[m][e]["accuracy"],
                "macro_f1": self.test[m][e]["macro_f1"],
                "trained_params": self.n_params[m],
            }
            for m in self.test
            for e in self.test[m]
        ]

    def to_json(self) -> dict:
        trace = {k: v for k, v in self.trace.items() if k != "results"}
        return {
            "domain": self.domain,
            "eval_sets": self.eval_sets,
            "table": self.table(),
            "chosen": self.chosen,
            "n_params": self.n_params,
            "test": self.test,
            "selection": self.selection,
            "trace": trace,
            "losses": self.history,
            "loss_first_last": {m: [h[0], h[-1]] for m, h in self.history.items() if h},
            "config": self.config,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """The chosen aspect-token LoReFT edit as a steering file (one config per aspect offset)."""
        from ..io import save

        if not self.interventions:
            raise ValueError("absc: no LoReFT edit was trained")
        return save(
            self.interventions,
            path,
            metadata={"recipe": "absc", "domain": self.domain, "chosen": self.chosen.get("loreft_aspect")},
        )

    def draw(self, path: str | os.PathLike) -> Path:
        """The first traced example's heatmap at ``path`` and the per-layer mean indirect effects
        (aspect's last token, last token) at ``*_layers.png`` beside it."""
        path = Path(path)
        curves_png(
            {"aspect's last token": self.trace["aspect_last"], "last token": self.trace["last"]},
            path.with_name(path.stem + "_layers.png"),
            title=f"ABSC causal trace ({self.domain}, {len(self.trace['per_example'])} examples): mean indirect effect",
            xlabel="layer",
            ylabel="restored p(label) - corrupted",
        )
        return self.trace["results"][0].draw(path)


def absc_edit(
    model: nn.Module,
    tokenizer,
    domain: str = "restaurant",
    *,
    cross_domains: Sequence[str] | None = None,
    data: dict[str, list[AspectExample]] | None = None,
    chat: bool = True,
    answer: bool = True,
    trace_examples: int = 4,
    trace_samples: int = 3,
    n_layers: Sequence[int] = (2, 4),
    lrs: Sequence[float] = (5e-3, 2e-2),
    lora_lrs: Sequence[float] = (1e-3, 5e-3),
    steps: int = 60,
    checkpoints: Sequence[int] | None = None,
    batch_size: int = 8,
    rank: int = 4,
    lora_r: int = 4,
    lora_alpha: float = 8.0,
    methods: Sequence[str] = METHODS,
    ranking: Sequence[int] | None = None,
    eval_batch_size: int = 16,
    seed: int = 0,
    backend: str | None = None,
    png: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> AbscResult:
    """Trace, edit and compare on one domain (see the module docstring).

    Args:
        model, tokenizer: a Hugging Face causal LM (frozen; LoRA is removed again at the end).
        domain: training domain; its train / validation / test splits are used.
        cross_domains: other domains whose test split the trained edits are also scored on
            (default: the other shipped domain).
        data: ``{domain: examples}`` to use instead of the shipped files (every split inside).
        chat, answer: the chat template, and the answer's start (``ANSWER``) after it, so that the
            label word is the next token (without it a small chat model puts ~1e-4 of its
            probability on the label words and the causal trace measures noise).
        trace_examples, trace_samples: training examples traced and noise draws per cell.
        n_layers: numbers of top traced layers tried (validation picks one); the last-token LoReFT
            baseline uses the same layers.
        lrs, lora_lrs: learning rates tried for LoReFT and for LoRA.
        steps, checkpoints: Adam steps per run, and the steps at which validation is scored (the
            best checkpoint is kept; default ``steps // 2`` and ``steps``).
        rank: LoReFT rank; ``lora_r``, ``lora_alpha``: LoRA's.
        methods: which of ``METHODS`` to run (``"lora"`` is skipped when peft is missing).
        ranking: layers best first, to skip the tracing (e.g. a previous result's ``trace["ranking"]``).
        png: where to draw the causal trace (heatmap of one example + per-layer effects).
        log: progress printer (default: silent).
    """
    say = log or (lambda s: None)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"absc: unknown methods {sorted(unknown)}; use {METHODS}")
    if steps < 1 or batch_size < 1 or not n_layers or not lrs:
        raise ValueError("absc: steps and batch_size must be >= 1, n_layers and lrs non-empty")
    checkpoints = sorted(
        {int(c) for c in (checkpoints or (max(1, steps // 2), steps)) if 1 <= int(c) <= steps}
    )
    if cross_domains is None:
        cross_domains = (
            [d for d in DOMAINS if d != domain] if data is None else [d for d in data if d != domain]
        )
    if data is None:
        data = {d: load_absc(d) for d in {domain, *cross_domains}}
    split = {s: [e for e in data[domain] if e.split == s] for s in SPLITS}
    for s, exs in split.items():
        if not exs:
            raise ValueError(f"absc: domain {domain!r} has no {s} examples")
    tests = {domain: split["test"], **{d: [e for e in data[d] if e.split == "test"] for d in cross_domains}}
    methods = list(methods)
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            say("peft is not installed: LoRA baseline skipped")
            methods.remove("lora")
    geo = geometry(model)
    if max(n_layers) > max(1, geo.n_layers - 1):
        raise ValueError(
            f"absc: n_layers up to {max(n_layers)} but the model has {geo.n_layers} layers (the last is never edited)"
        )
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    label_ids = torch.tensor(label_token_ids(tokenizer, chat, answer), device=device)
    enc = {s: encode_examples(tokenizer, exs, chat, answer) for s, exs in split.items()}
    enc_tests = {d: encode_examples(tokenizer, exs, chat, answer) for d, exs in tests.items()}
    offsets = sorted({e.offset for encs in (*enc.values(), *enc_tests.values()) for e in encs})
    say(
        f"aspect's last token back from the prompt end: {offsets} ({'one constant' if len(offsets) == 1 else 'varies'})"
    )

    # 1. which layers: causal tracing on training examples, spread over the labels
    by_label = {lab: [e for e in split["train"] if e.polarity == lab] for lab in LABELS}
    picked = [
        by_label[LABELS[i % 3]][i // 3]
        for i in range(trace_examples)
        if i // 3 < len(by_label[LABELS[i % 3]])
    ]
    if ranking is None:
        say(f"causal tracing {len(picked)} training examples ({trace_samples} noise draws per cell)")
        trace = trace_layers(
            model, tokenizer, picked, chat=chat, answer=answer, samples=trace_samples, seed=seed
        )
        ranking = trace["ranking"]
    else:
        ranking = [int(x) for x in ranking]
        if sorted(ranking[: max(n_layers)]) != sorted(set(ranking[: max(n_layers)])) or not all(
            0 <= x < geo.n_layers for x in ranking
        ):
            raise ValueError(
                f"absc: ranking must list distinct layers of the model's {geo.n_layers}, got {ranking}"
            )
        trace = {"ranking": ranking, "given": True}
    say(f"layers by mean indirect effect at the aspect's last token: {ranking[: max(n_layers)]}")

    selection: list[dict] = []
    chosen: dict = {}
    test: dict = {}
    n_params: dict = {}
    history: dict = {}
    interventions: dict = {}
    saved = freeze(model)
    try:
        zero = _Edit()
        if "zero_shot" in methods:
            val = _predict(model, enc["validation"], label_ids, zero, pad_id, eval_batch_size)
            selection.append({"method": "zero_shot", "validation": _short(val)})
            chosen["zero_shot"] = {}
            test["zero_shot"] = {
                d: _predict(model, e, label_ids, zero, pad_id, eval_batch_size) for d, e in enc_tests.items()
            }
            n_params["zero_shot"] = 0
            say(
                f"zero-shot: test acc {test['zero_shot'][domain]['accuracy']:.3f}, macro-F1 {test['zero_shot'][domain]['macro_f1']:.3f}"
            )

        def run(method: str, grid: list[dict], make: Callable[[dict], _Edit]) -> None:
            best = None
            for hp in grid:
                say(f"{method} {hp}")
                edit = make(hp)
                try:
                    losses, at = _fit(
                        model,
                        enc["train"],
                        label_ids,
                        edit,
                        pad_id,
                        lr=hp["lr"],
                        steps=steps,
                        batch_size=batch_size,
                        seed=seed,
                        checkpoints=checkpoints,
                        evaluate=lambda edit=edit: _predict(
                            model, enc["validation"], label_ids, edit, pad_id, eval_batch_size
                        ),
                        log=say,
                    )
                    for step, (val, snap) in at.items():
                        row = {"method": method, **hp, "steps": step, "validation": _short(val)}
                        selection.append(row)
                        key = (val["macro_f1"], val["accuracy"], -step)
                        if best is None or key > best[0]:
                            best = (key, dict(hp, steps=step), snap, losses[:step])
                finally:
                    edit.close()
            _, hp, snap, losses = best
            edit = make(hp)
            try:
                edit.restore(snap)
                test[method] = {
                    d: _predict(model, e, label_ids, edit, pad_id, eval_batch_size)
                    for d, e in enc_tests.items()
                }
                n_params[method] = edit.n_params()
                chosen[method] = hp
                history[method] = losses
                if isinstance(edit, _ReftEdit) and method == "loreft_aspect":
                    interventions.update(edit.interventions())
            finally:
                edit.close()
            say(
                f"{method}: chose {hp}; test acc {test[method][domain]['accuracy']:.3f}, macro-F1 {test[method][domain]['macro_f1']:.3f}"
            )

        reft_grid = [
            {"lr": float(lr), "n_layers": int(k), "layers": sorted(ranking[:k])}
            for k in n_layers
            for lr in lrs
        ]
        for where in ("aspect", "last"):
            method = f"loreft_{where}"
            if method in methods:
                run(
                    method,
                    reft_grid,
                    lambda hp, where=where: _ReftEdit(
                        model, hp["layers"], where, rank, offsets, seed, backend
                    ),
                )
        if "lora" in methods:
            lora_grid = [
                {"lr": float(lr), "r": lora_r, "alpha": lora_alpha, "layers": "all"} for lr in lora_lrs
            ]
            run("lora", lora_grid, lambda hp: _LoraEdit(model, lora_r, lora_alpha, None, seed))
    finally:
        unfreeze(saved)
    result = AbscResult(
        domain=domain,
        eval_sets=list(tests),
        trace=trace,
        selection=selection,
        chosen=chosen,
        test=test,
        n_params=n_params,
        history=history,
        interventions=interventions,
        config={
            "prompt": PROMPT,
            "chat_template": _chat(tokenizer, chat),
            "answer_start": ANSWER if answer else None,
            "labels": list(LABELS),
            "label_token_ids": label_ids.tolist(),
            "scoring": "argmax over the label words' first tokens at the first answer position",
            "aspect_offsets": offsets,
            "trace_examples": 0 if trace.get("given") else len(picked),
            "trace_samples": trace_samples,
            "n_layers_grid": list(n_layers),
            "lr_grid": list(lrs),
            "lora_lr_grid": list(lora_lrs),
            "steps": steps,
            "checkpoints": checkpoints,
            "batch_size": batch_size,
            "rank": rank,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "seed": seed,
            "sizes": {s: len(v) for s, v in split.items()} | {f"test:{d}": len(v) for d, v in tests.items()},
        },
    )
    if png is not None and "results" in trace:
        result.draw(png)
    return result


def _short(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ce": m["ce"]}
