"""Writes ``pysteer/recipes/data/absc_{restaurant,laptop}.jsonl``: the project's small aspect-sentiment
set (sentence, aspect, polarity, split).

Every sentence joins two or three clauses about different aspects with different polarities, so the
answer depends on the aspect asked about. Clauses are hand-written opinion phrases (positive,
negative, neutral = mentioned without an opinion) around each domain's aspect terms. The opinion
phrases are split into disjoint train / validation / test pools (shared by both domains), so a test
sentence never reuses a phrase seen in training, in its own domain or the other. Per domain: 120
train, 42 validation, 60 test examples, equal counts of the three polarities in each split.

Run ``python bench/absc_data.py`` to regenerate (seeded, deterministic).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pysteer" / "recipes" / "data"

# (term, plural)
ASPECTS = {
    "restaurant": [
        ("food", False),
        ("service", False),
        ("pasta", False),
        ("pizza", False),
        ("staff", False),
        ("waiter", False),
        ("wine list", False),
        ("dessert", False),
        ("ambience", False),
        ("prices", True),
        ("portions", True),
        ("decor", False),
        ("sushi", False),
        ("music", False),
        ("menu", False),
        ("coffee", False),
        ("bread", False),
        ("steak", False),
        ("seating", False),
        ("fries", True),
        ("salad", False),
        ("bartender", False),
        ("patio", False),
        ("noodles", True),
        ("soup", False),
        ("cocktails", True),
        ("hostess", False),
        ("tiramisu", False),
    ],
    "laptop": [
        ("battery life", False),
        ("screen", False),
        ("keyboard", False),
        ("trackpad", False),
        ("speakers", True),
        ("price", False),
        ("performance", False),
        ("fan", False),
        ("charger", False),
        ("hinge", False),
        ("display", False),
        ("build quality", False),
        ("webcam", False),
        ("operating system", False),
        ("customer support", False),
        ("ports", True),
        ("graphics card", False),
        ("hard drive", False),
        ("memory", False),
        ("warranty", False),
        ("boot time", False),
        ("software", False),
        ("touchscreen", False),
        ("case", False),
        ("microphone", False),
        ("backlight", False),
        ("cooling", False),
        ("power button", False),
    ],
}

# {A}: "the <term>" (capitalised at a sentence start), {be}: was / were.
PHRASES = {
    "positive": {
        "train": [
            "{A} {be} excellent",
            "{A} {be} superb",
            "I loved {a}",
            "{A} {be} fantastic",
            "{A} {be} a real highlight",
            "{A} {be} wonderful",
            "{A} {be} outstanding",
            "I was delighted with {a}",
            "{A} {be} great",
            "{A} {be} perfect",
            "{A} {be} top notch",
            "{A} really impressed me",
        ],
        "validation": [
            "{A} {be} brilliant",
            "I really enjoyed {a}",
            "{A} {be} amazing",
            "{A} {be} first rate",
            "{A} {be} lovely",
        ],
        "test": [
            "{A} {be} terrific",
            "I was thrilled with {a}",
            "{A} {be} impressive",
            "{A} {be} flawless",
            "{A} exceeded my expectations",
            "{A} {be} a joy",
            "{A} {be} simply marvelous",
        ],
    },
    "negative": {
        "train": [
            "{A} {be} terrible",
            "{A} {be} awful",
            "{A} {be} disappointing",
            "I hated {a}",
            "{A} {be} a letdown",
            "{A} {be} poor",
            "{A} {be} horrible",
            "I was annoyed by {a}",
            "{A} {be} dreadful",
            "{A} {be} unacceptable",
            "{A} {be} a disaster",
            "{A} {be} frustrating",
        ],
        "validation": [
            "{A} {be} lousy",
            "I regret paying for {a}",
            "{A} {be} really bad",
            "{A} {be} subpar",
            "{A} {be} pathetic",
        ],
        "test": [
            "{A} {be} atrocious",
            "I was disappointed by {a}",
            "{A} {be} a waste of money",
            "{A} {be} shoddy",
            "{A} {be} the worst part",
            "{A} {be} miserable",
            "I could not stand {a}",
        ],
    },
    "neutral": {
        "train": [
            "I asked about {a}",
            "I looked at {a}",
            "{A} {be} as described",
            "we talked about {a}",
            "I noticed {a}",
            "{A} {be} the usual kind",
            "my friend asked about {a}",
            "{A} {be} listed on the website",
            "I had read about {a} beforehand",
            "we checked {a}",
            "{A} {be} mentioned in the review I read",
            "I took a photo of {a}",
        ],
        "validation": [
            "I did not pay much attention to {a}",
            "{A} {be} what the listing said",
            "my sister looked at {a}",
            "we discussed {a}",
            "I remember {a}",
        ],
        "test": [
            "I wrote down the details of {a}",
            "{A} {be} shown in the brochure",
            "my colleague mentioned {a}",
            "I glanced at {a}",
            "{A} {be} pointed out to us",
            "we compared notes on {a}",
            "I saw {a} in the photos",
        ],
    },
}

TWO = [
    "{0}, but {1}.",
    "{0}, although {1}.",
    "{0}, while {1}.",
    "{0}; however, {1}.",
    "{0}, yet {1}.",
    "{0}, whereas {1}.",
]
THREE = ["{0}, {1}, but {2}.", "{0} and {1}, although {2}.", "{0}; {1}, yet {2}."]
# split -> (two-aspect sentences per ordered polarity pair, three-aspect sentences)
LAYOUT = {"train": (8, 8), "validation": (3, 2), "test": (4, 4)}
LABELS = ("positive", "negative", "neutral")


def clause(phrase: str, term: str, plural: bool, first: bool) -> str:
    a = f"the {term}"
    text = phrase.format(A=a, a=a, be="were" if plural else "was")
    return text[0].upper() + text[1:] if first else text


def sentence(rng: random.Random, domain: str, split: str, polarities: tuple[str, ...], used: set[str]):
    while True:
        aspects = rng.sample(ASPECTS[domain], len(polarities))
        phrases = [rng.choice(PHRASES[p][split]) for p in polarities]
        template = rng.choice(TWO if len(polarities) == 2 else THREE)
        parts = [clause(ph, t, pl, i == 0) for i, (ph, (t, pl)) in enumerate(zip(phrases, aspects))]
        text = template.format(*parts)
        if text not in used:
            used.add(text)
            return text, [t for t, _ in aspects]


def build(domain: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, used = [], set()
    for split, (per_pair, n_three) in LAYOUT.items():
        groups = [pair for pair in itertools.permutations(LABELS, 2) for _ in range(per_pair)]
        perms = list(itertools.permutations(LABELS, 3))
        groups += [perms[i % len(perms)] for i in range(n_three)]
        rng.shuffle(groups)
        for pols in groups:
            text, terms = sentence(rng, domain, split, pols, used)
            for term, pol in zip(terms, pols):
                rows.append(
                    {"sentence": text, "aspect": term, "polarity": pol, "split": split, "domain": domain}
                )
    return rows


def main() -> None:
    for seed, domain in enumerate(ASPECTS):
        rows = build(domain, seed)
        path = OUT / f"absc_{domain}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
