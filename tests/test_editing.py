"""The editing set, the teacher-forced metrics and the FT-L baseline (tiny llama, real tokenizer)."""

from __future__ import annotations

import pytest
import torch

from pysteer.models.tiny import tiny_model
from pysteer.recipes.editing import FTL, EditEvaluator, load_edits, teacher_forced, token_accuracy

MODULES = ["layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def model(real_tokenizer):
    return tiny_model("llama", vocab_size=len(real_tokenizer))


def test_shipped_set_has_disjoint_subject_splits_and_the_record_shape():
    train, evals = load_edits("train"), load_edits("eval")
    assert len(evals) == 100 and len(train) >= 40
    assert not {r.subject for r in train} & {r.subject for r in evals}
    for r in train + evals:
        assert len(r.paraphrases) >= 2 and len(r.locality) >= 2
        assert r.target_new != r.target_true
    assert (
        {r.relation for r in evals} == {r.relation for r in train} == {"capital", "language", "city_country"}
    )


def test_a_bad_record_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text('{"split": "eval", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"edits.jsonl:1: not an edit record"):
        load_edits(path=path)


def _single_accuracy(model, tok, prompt, target):
    """Accuracy from one unpadded forward, counted token by token."""
    p, t = tok(prompt).input_ids, tok(target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0]
    return sum(int(logits[len(p) - 1 + j].argmax()) == t[j] for j in range(len(t))) / len(t)


def test_batched_token_accuracy_equals_one_forward_per_pair(model, real_tokenizer):
    prompts = ["The capital of France is", "Berlin", "A spider has eight legs and"]
    targets = [" Paris", " is a city in Germany", " a web"]
    got = token_accuracy(model, real_tokenizer, prompts, targets)
    expect = torch.tensor([_single_accuracy(model, real_tokenizer, p, t) for p, t in zip(prompts, targets)])
    torch.testing.assert_close(got, expect)


def test_the_models_own_greedy_continuation_scores_one(model, real_tokenizer):
    prompt = "The capital of France is"
    ids = real_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    greedy = gen[0, ids.shape[1] :]
    batch = teacher_forced(real_tokenizer, [prompt], [real_tokenizer.decode(greedy)])
    if not torch.equal(batch.labels[batch.predict_at], greedy):
        pytest.skip("the greedy tokens do not re-tokenise to themselves")
    assert token_accuracy(model, real_tokenizer, [prompt], [real_tokenizer.decode(greedy)]).item() == 1.0


def test_ftl_makes_the_edit_stick_changes_only_its_weights_and_restores_bits(model, real_tokenizer):
    records = load_edits("eval")[:2]
    evaluator = EditEvaluator(model, real_tokenizer, records)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert evaluator.score(model, 2).locality == 1.0
    ftl = FTL(model, real_tokenizer, MODULES, lr=1e-2, max_steps=30)
    for r in records:
        ftl.edit(r)
    scores = evaluator.score(model, 2)
    assert scores.reliability == 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    ftl.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_scores_refuse_more_edits_than_records(model, real_tokenizer):
    evaluator = EditEvaluator(model, real_tokenizer, load_edits("eval")[:1])
    with pytest.raises(ValueError, match="n_edits must be in"):
        evaluator.score(model, 2)
