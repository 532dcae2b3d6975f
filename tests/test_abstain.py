"""Abstention fine-tuning from semantic entropy: targets, the accuracy-engagement distance, the two
fine-tunes, and ``pysteer abstain`` end to end on a tiny random model."""

import json
import math

import pytest
import torch
from conftest import write_questions

from pysteer.uncertainty.abstain import (
    ABSTENTION,
    AbstainConfig,
    PromptEndReft,
    abstention_targets,
    accuracy_engagement,
    check_threshold,
    choose_gate,
    fit_targets,
    is_abstention,
    target_examples,
    target_loss,
)

pytest.importorskip("sklearn")


# ------------------------------------------------------------------------------------------------
# targets and metrics
# ------------------------------------------------------------------------------------------------


def test_targets_abstain_above_threshold_and_keep_own_answer_at_or_below():
    answers = ["Paris", "Oslo", "Blue", "42"]
    entropies = [0.0, 0.5, 0.5000001, 2.3]
    assert abstention_targets(answers, entropies, 0.5) == ["Paris", "Oslo", ABSTENTION, ABSTENTION]
    assert abstention_targets(answers, entropies, 0.0) == ["Paris", ABSTENTION, ABSTENTION, ABSTENTION]
    assert abstention_targets(answers, entropies, 2.3) == answers


def test_target_tokens_are_the_phrase_or_the_models_own_tokens(real_tokenizer):
    eos = real_tokenizer.eos_token_id
    newline = real_tokenizer("\n", add_special_tokens=False)["input_ids"]
    own_stopped = [11, 12] + newline  # generation ended on its stop token: kept as is
    own_cut = [13, 14]  # ran out of tokens: EOS added
    ex = target_examples(
        real_tokenizer, [[1, 2], [3], [4]], [own_stopped, own_cut, own_cut], [False, False, True]
    )
    assert ex[0].prompt == (1, 2) and ex[0].target == tuple(own_stopped)
    assert ex[1].target == (13, 14, eos)
    phrase = real_tokenizer(ABSTENTION, add_special_tokens=False)["input_ids"]
    assert ex[2].target == (*phrase, eos)


def test_aed_of_the_papers_worked_example():
    # 2500 questions, all answered at 70 %: 0.30; 10 answered at 70 %: 0.71 (the paper's section 4)
    full = accuracy_engagement([True] * 1750 + [False] * 750, [False] * 2500)
    assert full["aed"] == pytest.approx(0.30, abs=1e-12)
    few = accuracy_engagement([True] * 7 + [False] * 3 + [True] * 2490, [False] * 10 + [True] * 2490)
    assert few["aed"] == pytest.approx(math.sqrt((3**2 + 2493**2) / (2 * 2500**2)))
    assert round(few["aed"], 2) == 0.71
    assert few["accuracy_answered"] == pytest.approx(0.7) and few["abstention_rate"] == pytest.approx(0.996)


def test_metrics_when_every_question_is_abstained():
    m = accuracy_engagement([True, False, True], [True, True, True])
    assert m["answered"] == 0 and m["accuracy_answered"] is None
    assert m["abstention_rate"] == 1.0
    assert m["aed"] == pytest.approx(1 / math.sqrt(2))


def test_metrics_when_no_question_is_abstained():
    right = accuracy_engagement([True, True], [False, False])
    assert right["aed"] == 0.0 and right["accuracy_answered"] == 1.0 and right["abstention_rate"] == 0.0
    wrong = accuracy_engagement([False, False], [False, False])
    assert wrong["aed"] == 1.0 and wrong["accuracy_answered"] == 0.0
    mixed = accuracy_engagement([True, False, False, True], [False, False, True, True])
    assert (mixed["correct"], mixed["incorrect"], mixed["answered"]) == (1, 1, 2)
    assert mixed["aed"] == pytest.approx(math.sqrt((1 + 9) / 32))


def _graded(answers_right: list[bool]):
    from pysteer.uncertainty.questions import Question

    qs = [Question(f"q{i}", f"question {i}?", ("paris",), "validation") for i in range(len(answers_right))]
    return qs, ["Paris" if r else "Rome" for r in answers_right]


def test_a_gate_that_only_hurts_chooses_to_answer_everything():
    # the uncertain-looking questions are the ones answered right: every grid point gates a right answer
    qs, answers = _graded([True, True, True, False])
    best, rows = choose_gate("sep_gated", [0.9, 0.8, 0.7, 0.1], (0.25, 0.5, 0.75), 1.0, qs, answers)
    assert best["threshold"] == 1.0 and [r["threshold"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert best["validation"]["abstention_rate"] == 0.0
    assert best["validation"]["aed"] < min(r["validation"]["aed"] for r in rows[:-1])


def test_a_gate_that_helps_chooses_the_grid_threshold_that_gates_the_wrong_answers():
    qs, answers = _graded([True, True, False, False])
    best, _ = choose_gate("se_gated", [0.1, 0.2, 1.9, 2.1], (0.25, 1.0, 2.0), math.log(10), qs, answers)
    assert best["threshold"] == 0.25 and best["validation"]["abstention_rate"] == 0.5


def test_abstention_is_recognised_in_an_answer_or_an_empty_one():
    assert is_abstention(ABSTENTION) and is_abstention("Sorry, I do not know.") and is_abstention("")
    assert not is_abstention("The capital of Norway is Oslo.")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf"), True])
def test_bad_thresholds_are_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        abstention_targets(["a"], [0.1], threshold)


def test_threshold_above_log_n_is_out_of_range():
    check_threshold(math.log(10), 10)
    with pytest.raises(ValueError, match=r"out of range.*log\(3\)"):
        check_threshold(1.5, 3)
    with pytest.raises(ValueError, match="out of range"):
        AbstainConfig(n_samples=3, thresholds=(0.5, 2.25)).check()


def test_empty_split_and_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="empty split"):
        accuracy_engagement([], [])
    with pytest.raises(ValueError, match="abstention_targets"):
        abstention_targets([], [], 0.5)
    with pytest.raises(ValueError, match="2 answers and 1 entropies"):
        abstention_targets(["a", "b"], [0.3], 0.5)


def test_study_without_a_split_is_refused_before_any_work():
    from pysteer.uncertainty.abstain import abstain_study
    from pysteer.uncertainty.questions import Question

    qs = [Question("a", "Q?", ("x",), "train"), Question("b", "Q?", ("x",), "test")]
    with pytest.raises(ValueError, match="none in validation"):
        abstain_study(None, None, qs, None, AbstainConfig())


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"unknown methods \['dpo'\]"):
        AbstainConfig(methods=("base", "dpo")).check()


# ------------------------------------------------------------------------------------------------
# fine-tuning on a tiny model
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(real_tokenizer):
    from pysteer.models.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(real_tokenizer)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _examples(tokenizer):
    prompts = [
        tokenizer(f"Question {k}: what is {k} plus one?", add_special_tokens=False)["input_ids"]
        for k in range(6)
    ]
    greedy = [tokenizer(f" {k + 1}", add_special_tokens=False)["input_ids"] for k in range(6)]
    return target_examples(tokenizer, prompts, greedy, [k % 2 == 0 for k in range(6)])


def test_lora_steps_lower_the_target_loss(tiny, real_tokenizer):
    pytest.importorskip("peft")
    from pysteer.uncertainty.abstain import _LoraTargets

    examples = _examples(real_tokenizer)
    edit = _LoraTargets(tiny, 4, 8.0, None, 0, target_modules=("q_proj", "v_proj"))
    try:
        with torch.no_grad():
            before = target_loss(tiny, edit, examples, 0).item()
        fit_targets(tiny, edit, examples, 0, lr=1e-2, steps=6, batch_size=6, seed=0)
        with torch.no_grad():
            after = target_loss(tiny, edit, examples, 0).item()
    finally:
        edit.close()
    assert after < before - 0.05


def test_steering_steps_lower_the_target_loss(tiny, real_tokenizer):
    examples = _examples(real_tokenizer)
    edit = PromptEndReft(tiny, [1], rank=2, seed=0)
    try:
        with torch.no_grad():
            before = target_loss(tiny, edit, examples, 0).item()
        fit_targets(tiny, edit, examples, 0, lr=5e-2, steps=6, batch_size=3, seed=0)
        with torch.no_grad():
            after = target_loss(tiny, edit, examples, 0).item()
    finally:
        edit.close()
    assert after < before - 0.05


def test_steering_fine_tune_acts_only_through_its_handle(tiny, real_tokenizer):
    ids = torch.tensor([real_tokenizer("What is two plus two? Four.", add_special_tokens=False)["input_ids"]])
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        clean = tiny(input_ids=ids).logits
    edit = PromptEndReft(tiny, [1], rank=2, seed=0)
    fit_targets(tiny, edit, _examples(real_tokenizer), 0, lr=5e-2, steps=3, batch_size=6, seed=0)
    with torch.no_grad(), edit.prompt_context([ids.shape[1] - 2]):
        steered = tiny(input_ids=ids).logits
    assert not torch.equal(steered, clean)
    edit.close()
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, clean)
    assert all(torch.equal(v, weights[k]) for k, v in tiny.state_dict().items())


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


def test_cli_quick_runs_every_method_and_writes_json(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from pysteer.cli import main
    from pysteer.uncertainty import abstain

    # a random model's samples are all different (SE = log 3 everywhere): alternate low and high SE so
    # that targets, the SE gate and the SE probe all see both kinds of question
    calls = iter(range(10_000))
    monkeypatch.setattr(abstain, "discrete_semantic_entropy", lambda ids: [0.2, 1.0][next(calls) % 2])
    out = tmp_path / "abstain.json"
    rc = main(
        ["abstain", "--model", str(tiny_dir), "--questions", str(write_questions(tmp_path / "q.jsonl", (6, 4, 4))),
         "--quick", "--min-layers", "1", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["test"]) == {"base", "se_gated", "sep_gated", "lora", "steering"}
    for m in result["test"].values():
        assert m["n"] == 4 and 0 <= m["aed"] <= 1 and 0 <= m["abstention_rate"] <= 1
        assert m["forward_tokens_per_question"] > 0 and m["seconds_per_question"] > 0
    # the SE gate abstains exactly on the test questions with SE above its chosen threshold
    tau = result["chosen"]["se_gated"]["threshold"]
    gated = sum(e > tau for e in result["self_labels"]["test"]["entropies"])
    assert result["test"]["se_gated"]["abstention_rate"] >= gated / 4
    assert result["quick"] and (tmp_path / "abstain.png").stat().st_size > 0
    assert {r["method"] for r in result["selection"]} == {"se_gated", "sep_gated", "lora", "steering"}


def test_cli_refuses_an_unknown_method_and_an_out_of_range_threshold(tmp_path, capsys):
    from pysteer.cli import main

    assert main(["abstain", "--methods", "base", "magic", "--out", str(tmp_path / "a.json")]) == 1
    assert "unknown methods ['magic']" in capsys.readouterr().err
    assert main(["abstain", "--samples", "3", "--thresholds", "2.0", "--out", str(tmp_path / "a.json")]) == 1
    assert "out of range" in capsys.readouterr().err
