"""The question set shipped for uncertainty experiments: short factual questions with reference
answers, plus unanswerable ones, split into train / validation / test.

``data/questions.jsonl`` rows: ``{"id", "question", "answers": [aliases], "split"}``; an
unanswerable question has ``"answers": []`` (its answer is never counted correct, as in the
semantic-entropy reference).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    split: str

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


def default_questions_path() -> Path:
    return Path(str(resources.files("pysteer.uncertainty").joinpath("data", "questions.jsonl")))


def load_questions(path: str | os.PathLike | None = None, split: str | None = None) -> list[Question]:
    """Read a question file (the shipped one by default), optionally one split.

    Raises:
        ValueError: a row misses a field, names an unknown split, or repeats an id.
    """
    from ..recipes._common import read_jsonl

    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = default_questions_path() if path is None else Path(path)
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), start=1):
        missing = [k for k in ("id", "question", "answers", "split") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        if row["split"] not in SPLITS:
            raise ValueError(f"{path}:{n}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        if row["id"] in seen:
            raise ValueError(f"{path}:{n}: id {row['id']!r} repeats")
        seen.add(row["id"])
        q = Question(str(row["id"]), str(row["question"]), tuple(map(str, row["answers"])), row["split"])
        if split is None or q.split == split:
            out.append(q)
    return out
