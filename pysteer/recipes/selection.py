"""An honest split for the paraphrase-consistency recipes: tune on validation, report on test.

The facts are split three ways, always by fact (the phrasings of one fact are never on two sides):

- a **test** share is set aside before anything runs (``split_test_facts``); nothing is fitted,
  ranked or chosen on it;
- the rest is the development set: the recipe fits its probes / directions on its training facts and
  ranks on its validation facts (``locate_heads``'s held-out facts);
- hyperparameters (``K`` heads and ``alpha``; the LF-Steering ``alpha``) are chosen on validation
  only (``choose_config``), and the chosen configuration is measured once on test.

Test figures come with a bootstrap confidence interval (``bootstrap_consistency``). The resampled unit
is the **fact**: the ten pairs of one fact share a subject and are not independent, so resampling
pairs would understate the spread. The unsteered and steered answers are resampled together (the
same facts in every draw), which gives the interval of the paired difference as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch
from torch import Tensor

from .locate import AnswerMatcher, ParaphraseFact, _answer_keys, _fold

BOOTSTRAP_RESAMPLES = 2000


def split_test_facts(
    facts: Sequence[ParaphraseFact], test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[ParaphraseFact], list[ParaphraseFact]]:
    """Set a seeded share of every relation's facts aside as the test split.

    Stratified by relation so that every relation is in both parts (SmolLM2's consistency differs a
    lot between capitals and currencies; an unstratified draw could leave test without one).

    Returns:
        ``(development, test)`` facts, each in the input order.

    Raises:
        ValueError: ``test_fraction`` outside ``(0, 1)``, or a relation with fewer than two facts.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    test: set[int] = set()
    for rel in dict.fromkeys(f.relation for f in facts):
        idx = [i for i, f in enumerate(facts) if f.relation == rel]
        if len(idx) < 2:
            raise ValueError(f"relation {rel!r} has {len(idx)} fact(s); a split needs at least two")
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        perm = torch.randperm(len(idx), generator=g).tolist()
        test.update(idx[i] for i in perm[:n_test])
    dev = [f for i, f in enumerate(facts) if i not in test]
    return dev, [f for i, f in enumerate(facts) if i in test]


def fact_counts(facts: Sequence[ParaphraseFact], answers: Sequence[str]) -> Tensor:
    """Per fact: agreeing pairs, pairs, correct answers, prompts (``[F, 4]`` float64).

    The same matching as ``consistency_metrics`` (so summing the columns reproduces its figures).
    """
    keys = _answer_keys(facts, answers, AnswerMatcher(facts))
    rows = []
    for f, ks in zip(facts, keys):
        agree = sum(a is not None and a == b for a, b in combinations(ks, 2))
        n_pairs = len(ks) * (len(ks) - 1) // 2
        correct = sum(k == _fold(f.answer) for k in ks)
        rows.append((agree, n_pairs, correct, len(ks)))
    return torch.tensor(rows, dtype=torch.float64)


def bootstrap_consistency(
    facts: Sequence[ParaphraseFact],
    before: Sequence[str],
    after: Sequence[str],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap intervals of consistency and accuracy, unsteered vs steered, by fact.

    Args:
        facts: the test facts.
        before, after: the unsteered and steered answers, in ``fact_texts`` order.
        n_resamples: bootstrap draws; each draws ``len(facts)`` facts with replacement.
        level: the interval's coverage.

    Returns:
        ``{"before": {...}, "after": {...}, "change": {...}, "n_resamples", "level", "resampled"}`` where
        each part has ``consistency`` and ``accuracy`` as ``{"value", "ci": [lo, hi]}``; ``change`` is
        after minus before on the same resampled facts.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    cb, ca = fact_counts(facts, before), fact_counts(facts, after)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(facts), (n_resamples, len(facts)), generator=g)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def rates(c: Tensor) -> tuple[Tensor, Tensor]:
        s = c[idx].sum(1)  # [B, 4]
        return s[:, 0] / s[:, 1], s[:, 2] / s[:, 3]

    def point(c: Tensor) -> tuple[float, float]:
        s = c.sum(0)
        return float(s[0] / s[1]), float(s[2] / s[3])

    def summary(values: tuple[float, float], draws: tuple[Tensor, Tensor]) -> dict:
        return {
            name: {"value": v, "ci": torch.quantile(d, q).tolist()}
            for name, v, d in zip(("consistency", "accuracy"), values, draws)
        }

    (pb, pa), (db, da) = (point(cb), point(ca)), (rates(cb), rates(ca))
    return {
        "before": summary(pb, db),
        "after": summary(pa, da),
        "change": summary((pa[0] - pb[0], pa[1] - pb[1]), (da[0] - db[0], da[1] - db[1])),
        "n_resamples": n_resamples,
        "level": level,
        "resampled": f"facts, with replacement ({len(facts)} per draw), before and after together",
    }


def choose_config(rows: Sequence[dict], before: dict) -> dict:
    """The configuration to report: highest validation consistency among those that keep validation
    accuracy at least at the unsteered level; ties go to higher accuracy, then to the earlier row.

    Consistency alone would reward answering every phrasing with the same wrong answer, so a
    configuration that costs accuracy is not eligible. When none keeps accuracy, the best consistency
    overall is returned with ``"keeps_accuracy": False``.

    Args:
        rows: one dict per configuration with at least ``consistency`` and ``accuracy``.
        before: the unsteered model's validation metrics.
    """
    if not rows:
        raise ValueError("choose_config: no configurations to choose from")
    eligible = [r for r in rows if r["accuracy"] >= before["accuracy"]]
    pool = eligible or list(rows)
    best = max(pool, key=lambda r: (r["consistency"], r["accuracy"]))
    return {**best, "keeps_accuracy": bool(eligible)}


def validate_then_test(
    answer: Callable[[Sequence[ParaphraseFact], object], list[str]],
    make_spec: Callable[[dict], object],
    configs: Sequence[dict],
    validation: Sequence[ParaphraseFact],
    test: Sequence[ParaphraseFact],
    before: dict,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Sweep ``configs`` on the validation facts, choose one (``choose_config``), measure it once on test.

    Args:
        answer: ``answer(facts, spec)`` -> the model's answers to every phrasing (``spec=None``: unsteered).
        make_spec: a configuration dict (e.g. ``{"k": 4, "alpha": 5.0}``) -> its steering.
        configs: the grid.
        validation, test: the fact splits.
        before: the unsteered metrics on ``validation``.

    Returns:
        ``{"sweep": [config + validation metrics], "chosen": {...}, "test": {"n_facts", "before",
        "after", "bootstrap"}}``.
    """
    from .locate import consistency_metrics

    rows = []
    for config in configs:
        m = consistency_metrics(validation, answer(validation, make_spec(config)))
        rows.append({**config, **m})
        log(
            f"{' '.join(f'{k}={v:g}' for k, v in config.items())}: validation consistency "
            f"{m['consistency']:.3f}  accuracy {m['accuracy']:.3f}  answered {m['answered']:.3f}"
        )
    chosen = choose_config(rows, before)
    picked = {k: chosen[k] for k in configs[0]}
    log(f"chosen on validation: {picked}; measuring on {len(test)} test facts")
    spec = make_spec(picked)
    base, steered = answer(test, None), answer(test, spec)
    boot = bootstrap_consistency(test, base, steered, n_resamples=n_resamples, seed=seed)
    for part in ("before", "after", "change"):
        c, a = boot[part]["consistency"], boot[part]["accuracy"]
        log(
            f"test {part:<6s} consistency {c['value']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  "
            f"accuracy {a['value']:+.3f} [{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}]"
        )
    return {
        "sweep": rows,
        "chosen": {
            **picked,
            "keeps_accuracy": chosen["keeps_accuracy"],
            "rule": "highest validation consistency among configurations keeping validation accuracy >= unsteered",
        },
        "test": {
            "n_facts": len(test),
            "before": consistency_metrics(test, base),
            "after": consistency_metrics(test, steered),
            "bootstrap": boot,
        },
    }
