"""The shipped paraphrase facts: one format, no duplicates, and no question that names an answer.

The consistency label of a pair compares the first known answer in each continuation; a question
whose subject or wording already names an answer of its relation would let a model that restates
the question ("The official language of the Czech Republic is ...") count as answering it.
"""

from __future__ import annotations

from collections import Counter

from pysteer.recipes import locate as locate_mod

TEMPLATES = {
    "capital": [
        "What is the capital of {s}?",
        "Which city is the capital of {s}?",
        "Name the capital city of {s}.",
        "Tell me the capital of {s}.",
        "The capital of {s} is which city?",
    ],
    "language": [
        "What is the official language of {s}?",
        "Which language is spoken in {s}?",
        "What language do people in {s} speak?",
        "Name the main language of {s}.",
        "In {s}, people mostly speak which language?",
    ],
    "currency": [
        "What is the currency of {s}?",
        "Which currency is used in {s}?",
        "What money do people use in {s}?",
        "Name the official currency of {s}.",
        "In {s}, people pay with which currency?",
    ],
}


def _questions_naming_an_answer(facts) -> list[tuple[str, str, str]]:
    """``(relation, question, answer found)`` for every phrasing that already names a known answer."""
    matcher = locate_mod.AnswerMatcher(facts)
    found = []
    for f in facts:
        for text in (f.subject, *f.prompts):
            answer = matcher.find(f, text)
            if answer is not None:
                found.append((f.relation, text, answer))
    return found


def test_every_fact_uses_its_relations_five_phrasings():
    for f in locate_mod.load_paraphrases():
        assert list(f.prompts) == [t.format(s=f.subject) for t in TEMPLATES[f.relation]], f


def test_facts_are_unique_and_each_relation_has_at_least_90():
    facts = locate_mod.load_paraphrases()
    keys = Counter((f.relation, f.subject) for f in facts)
    assert [k for k, n in keys.items() if n > 1] == []
    per_relation = Counter(f.relation for f in facts)
    assert set(per_relation) == set(TEMPLATES)
    assert min(per_relation.values()) >= 90, per_relation


def test_no_shipped_question_names_an_answer_of_its_relation():
    assert _questions_naming_an_answer(locate_mod.load_paraphrases()) == []


def test_a_subject_that_contains_an_answer_is_caught():
    czech = locate_mod.ParaphraseFact(
        "language",
        "the Czech Republic",
        "Czech",
        (),
        tuple(t.format(s="the Czech Republic") for t in TEMPLATES["language"]),
    )
    found = _questions_naming_an_answer([*locate_mod.load_paraphrases(), czech])
    assert found and {(rel, answer) for rel, _, answer in found} == {("language", "czech")}
