"""Sequential model editing: the shipped editing set, the metrics of the editing papers' code, and the
FT-L baseline.

The set (``data/edits.jsonl``, written by ``bench/dafnet_data.py``) is in the shape of ZsRE /
CounterFact: each record corrects one fact of the embedded model (a prompt it answers with
``target_true``) to ``target_new``, with paraphrases of the prompt and unrelated locality prompts.
Subjects are split into disjoint ``train`` (meta-training an editor) and ``eval`` parts.

Metrics are teacher-forced token accuracies, as in MEND / DAFNet's code: the prompt followed by the
target is run once, and a target token counts when the logits one position earlier put their argmax
on it.

- reliability: accuracy of ``target_new`` after the edit prompt;
- generality: the same after each paraphrase;
- locality: on each locality prompt followed by its stored answer, the share of answer positions
  whose argmax equals the unedited model's argmax there.

FT-L fine-tunes the chosen weights (e.g. the last MLPs' down projections) on each edit in turn, the
weights carrying over from one edit to the next; ``FTL.restore`` puts the original bits back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._common import data_path, model_device, read_jsonl

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class EditRecord:
    """One fact to correct (see the module docstring)."""

    split: str
    relation: str
    subject: str
    prompt: str
    target_true: str
    target_new: str
    paraphrases: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]  # (prompt, the unedited model's greedy answer)


def _record(row: dict, where: str) -> EditRecord:
    try:
        rec = EditRecord(
            split=row["split"],
            relation=row["relation"],
            subject=row["subject"],
            prompt=row["prompt"],
            target_true=row["target_true"],
            target_new=row["target_new"],
            paraphrases=tuple(row["paraphrases"]),
            locality=tuple((loc["prompt"], loc["answer"]) for loc in row["locality"]),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: not an edit record ({type(err).__name__}: {err})") from None
    if rec.split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {rec.split!r}")
    if not rec.prompt or not rec.target_new.strip() or not rec.paraphrases or not rec.locality:
        raise ValueError(f"{where}: prompt, target_new, paraphrases and locality must be non-empty")
    return rec


def load_edits(split: str | None = None, path=None) -> list[EditRecord]:
    """The shipped editing set (or ``path``'s), all records or one split's, in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"load_edits: split must be one of {SPLITS} or None, got {split!r}")
    path = path or data_path("edits.jsonl")
    records = [_record(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), start=1)]
    return [r for r in records if split is None or r.split == split]


@dataclass
class TeacherForced:
    """A right-padded batch of ``prompt + target`` with where each target token is predicted.

    Attributes:
        input_ids, attention_mask: ``[B, L]``.
        predict_at: ``[B, L]`` bool: the positions whose logits predict a target token.
        labels: ``[B, L]`` the target token predicted at each such position (pad elsewhere).
    """

    input_ids: Tensor
    attention_mask: Tensor
    predict_at: Tensor
    labels: Tensor


def teacher_forced(tok, prompts: Sequence[str], targets: Sequence[str], device=None) -> TeacherForced:
    """Tokenise ``prompt + target`` pairs (the target's tokens as they follow the prompt)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(
            f"teacher_forced: {len(prompts)} prompts for {len(targets)} targets (need one each, at least one)"
        )
    rows, spans = [], []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = tok(p).input_ids
        t_ids = tok(t, add_special_tokens=False).input_ids
        if not p_ids or not t_ids:
            raise ValueError(f"teacher_forced: empty prompt or target tokens for {p!r} + {t!r}")
        rows.append(p_ids + t_ids)
        spans.append((len(p_ids), len(t_ids)))
    L = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    predict_at = torch.zeros(len(rows), L, dtype=torch.bool)
    labels = torch.full((len(rows), L), pad, dtype=torch.long)
    for i, (r, (n_p, n_t)) in enumerate(zip(rows, spans, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        predict_at[i, n_p - 1 : n_p - 1 + n_t] = True
        labels[i, n_p - 1 : n_p - 1 + n_t] = torch.tensor(r[n_p:])
    return TeacherForced(ids.to(device), mask.to(device), predict_at.to(device), labels.to(device))


def target_logits(model: nn.Module, batch: TeacherForced) -> Tensor:
    """``[B, L, V]`` logits of the batch (gradients flow when enabled)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def target_nll(model: nn.Module, batch: TeacherForced) -> Tensor:
    """Mean negative log-likelihood of the target tokens (per token, over the batch)."""
    logits = target_logits(model, batch)
    return nn.functional.cross_entropy(logits[batch.predict_at].float(), batch.labels[batch.predict_at])


def _per_sample_mean(hits: Tensor, predict_at: Tensor) -> Tensor:
    return (hits & predict_at).sum(1).float() / predict_at.sum(1).float()


@torch.no_grad()
def token_accuracy(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16
) -> Tensor:
    """``[n]`` teacher-forced accuracy of each target after its prompt (share of its tokens that are the argmax)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        b = teacher_forced(tok, prompts[i : i + batch_size], targets[i : i + batch_size], model_device(model))
        hits = target_logits(model, b).argmax(-1) == b.labels
        out.append(_per_sample_mean(hits, b.predict_at).cpu())
    return torch.cat(out)


@torch.no_grad()
def answer_argmax(
    model: nn.Module, tok, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> list[Tensor]:
    """The argmax token at each answer position of ``prompt + answer`` (the locality reference)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        b = teacher_forced(tok, prompts[i : i + batch_size], answers[i : i + batch_size], model_device(model))
        top = target_logits(model, b).argmax(-1)
        out += [top[j][b.predict_at[j]].cpu() for j in range(top.shape[0])]
    return out


@dataclass(frozen=True)
class EditScores:
    """Mean reliability, generality and locality over the edits made so far (each in [0, 1])."""

    n_edits: int
    reliability: float
    generality: float
    locality: float

    def as_dict(self) -> dict:
        return {
            "n_edits": self.n_edits,
            "reliability": self.reliability,
            "generality": self.generality,
            "locality": self.locality,
        }


class EditEvaluator:
    """Scores an edited model on a list of records; the locality reference (the unedited model's
    argmax on every locality prompt) is taken once, at construction, from the unedited model."""

    def __init__(self, model: nn.Module, tok, records: Sequence[EditRecord], batch_size: int = 16):
        self.tok = tok
        self.batch_size = batch_size
        self.records = list(records)
        loc = [pair for r in self.records for pair in r.locality]
        self._loc_prompts = [p for p, _ in loc]
        self._loc_answers = [a for _, a in loc]
        self._loc_reference = answer_argmax(model, tok, self._loc_prompts, self._loc_answers, batch_size)
        self._loc_owner = [i for i, r in enumerate(self.records) for _ in r.locality]

    def score(self, model: nn.Module, n_edits: int) -> EditScores:
        """Scores over the first ``n_edits`` records (those edited so far)."""
        if not 1 <= n_edits <= len(self.records):
            raise ValueError(f"score: n_edits must be in [1, {len(self.records)}], got {n_edits}")
        recs = self.records[:n_edits]
        rel = token_accuracy(
            model, self.tok, [r.prompt for r in recs], [r.target_new for r in recs], self.batch_size
        )
        para = [(p, r.target_new) for r in recs for p in r.paraphrases]
        gen = token_accuracy(model, self.tok, [p for p, _ in para], [t for _, t in para], self.batch_size)
        k = sum(1 for owner in self._loc_owner if owner < n_edits)
        now = answer_argmax(model, self.tok, self._loc_prompts[:k], self._loc_answers[:k], self.batch_size)
        loc = torch.stack(
            [(a == b).float().mean() for a, b in zip(now, self._loc_reference[:k], strict=True)]
        )
        return EditScores(n_edits, rel.mean().item(), gen.mean().item(), loc.mean().item())


def linear_weights(model: nn.Module, module_sites: Sequence[str]) -> list[nn.Parameter]:
    """The weights of the named linears (``"layers.{i}.{linear}"``, as ``WeightDelta`` names them)."""
    from ..models.sites import resolve_site
    from ..weight_delta import parse_module_site

    out = []
    for name in module_sites:
        layer, linear = parse_module_site(name)
        out.append(resolve_site(model, f"layers.{layer}.{linear}.out").module.weight)
    return out


class FTL:
    """FT-L: fine-tune the named linears' weights on each edit in turn (weights carry over).

    Each edit takes Adam steps on the target's NLL after the edit prompt until every target token is
    the argmax or ``max_steps`` is reached. ``restore()`` copies the original weights back (bit-exact).
    """

    def __init__(
        self, model: nn.Module, tok, module_sites: Sequence[str], lr: float = 1e-3, max_steps: int = 20
    ):
        if lr <= 0 or max_steps < 1:
            raise ValueError(f"FTL: lr must be > 0 and max_steps >= 1, got lr={lr}, max_steps={max_steps}")
        self.model, self.tok, self.lr, self.max_steps = model, tok, lr, max_steps
        self.weights = linear_weights(model, module_sites)
        self._originals = [w.detach().clone() for w in self.weights]

    def edit(self, record: EditRecord) -> int:
        """Apply one edit; returns the steps taken."""
        batch = teacher_forced(self.tok, [record.prompt], [record.target_new], model_device(self.model))
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(self.weights, lr=self.lr)
        try:
            for step in range(self.max_steps):
                logits = target_logits(self.model, batch)
                sel = logits[batch.predict_at]
                if bool((sel.argmax(-1) == batch.labels[batch.predict_at]).all()):
                    return step
                loss = nn.functional.cross_entropy(sel.float(), batch.labels[batch.predict_at])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return self.max_steps
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
                p.grad = None

    def restore(self) -> None:
        """Put the original weights back."""
        with torch.no_grad():
            for w, orig in zip(self.weights, self._originals, strict=True):
                w.copy_(orig)
