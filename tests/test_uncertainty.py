"""Semantic entropy, its baselines and the entailment models (hand-computed values, tiny models)."""

import math

import pytest
import torch

from pysteer.uncertainty.entailment import (
    ExactMatchEntailment,
    JudgeEntailment,
    NLIEntailment,
    nli_label_order,
    normalise_answer,
    parse_judgement,
)
from pysteer.uncertainty.entropy import (
    cluster_log_probs,
    discrete_semantic_entropy,
    equivalent,
    naive_entropy,
    p_false,
    semantic_clusters,
    semantic_entropy,
    sequence_log_likelihood,
)


def table(labels):
    """An implication function reading a dict {(i, j): label}."""
    return lambda pairs: [labels[p] for p in pairs]


def test_equivalence_strict_and_non_strict():
    assert equivalent(2, 2, strict=True) and equivalent(2, 2, strict=False)
    assert not equivalent(2, 1, strict=True) and equivalent(2, 1, strict=False)
    assert not equivalent(1, 1, strict=False)  # both neutral
    assert not equivalent(2, 0, strict=False)  # one contradiction
    with pytest.raises(ValueError, match="entailment label 3"):
        equivalent(3, 2, strict=False)


def test_strict_clustering_needs_entailment_both_ways():
    labels = {(0, 1): 2, (1, 0): 1, (0, 2): 1, (2, 0): 1, (1, 2): 2, (2, 1): 2}
    assert semantic_clusters(3, table(labels), strict=False) == [0, 0, 1]
    assert semantic_clusters(3, table(labels), strict=True) == [0, 1, 1]


def test_clustering_moves_a_later_answer_to_a_later_anchor_as_the_reference_does():
    labels = {(0, 1): 0, (1, 0): 0, (0, 2): 2, (2, 0): 2, (1, 2): 2, (2, 1): 2}
    assert semantic_clusters(3, table(labels)) == [0, 1, 1]


def test_semantic_entropy_hand_computed():
    ll = [math.log(0.5), math.log(0.3), math.log(0.2)]
    # clusters {0, 1} and {2}: p = (0.8, 0.2); SE = -(0.8 ln 0.8 + 0.2 ln 0.2)
    assert semantic_entropy([0, 0, 1], ll) == pytest.approx(0.5004024235381879, abs=1e-12)
    assert cluster_log_probs([0, 0, 1], ll).exp().tolist() == pytest.approx([0.8, 0.2])
    # unnormalised likelihoods are normalised over the samples: scaling them all changes nothing
    assert semantic_entropy([0, 0, 1], [x - 3.0 for x in ll]) == pytest.approx(0.5004024235381879, abs=1e-12)
    assert semantic_entropy([0, 0, 0], ll) == pytest.approx(0.0, abs=1e-12)


def test_discrete_and_naive_entropy_hand_computed():
    # frequencies (2/3, 1/3): -(2/3 ln 2/3 + 1/3 ln 1/3)
    assert discrete_semantic_entropy([0, 0, 1]) == pytest.approx(0.6365141682948128, abs=1e-12)
    assert discrete_semantic_entropy([0, 1, 2, 3]) == pytest.approx(math.log(4))
    # -(ln 0.5 + ln 0.3 + ln 0.2) / 3 = -ln(0.03) / 3
    assert naive_entropy([math.log(0.5), math.log(0.3), math.log(0.2)]) == pytest.approx(
        1.1688526324, abs=1e-9
    )


def test_length_normalised_log_likelihood_and_p_false():
    assert sequence_log_likelihood([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert p_false(math.log(0.25)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty answer"):
        sequence_log_likelihood([])


def test_cluster_ids_must_be_contiguous():
    with pytest.raises(ValueError, match="without gaps"):
        semantic_entropy([0, 2], [-1.0, -1.0])
    with pytest.raises(ValueError, match="2 semantic ids but 3"):
        semantic_entropy([0, 1], [-1.0, -1.0, -1.0])


def test_exact_match_clusters_and_caches_every_pair():
    ent = ExactMatchEntailment()
    answers = ["Paris", "paris.", "London", "The Paris"]
    assert ent.cluster(answers) == [0, 0, 1, 0]
    # anchor 0 asks 6 pairs of which ("Paris", "The Paris") and ("The Paris", "Paris") are distinct
    # keys, anchor 2 asks (London, The Paris) both ways: 8 distinct pairs, no repeats
    assert (ent.calls, ent.hits) == (8, 0)
    assert ent.cluster(answers) == [0, 0, 1, 0]
    assert (ent.calls, ent.hits) == (8, 8)
    assert ent.check([("Paris", "Paris"), ("Paris", "Paris")]) == [2, 2]
    assert (ent.calls, ent.hits) == (9, 9)


def test_normalise_answer_drops_case_punctuation_and_articles():
    assert normalise_answer("  The Eiffel  Tower! ") == "eiffel tower"
    # numbers keep their value: a zero fraction goes, a decimal point between digits stays
    assert normalise_answer("approximately 100.0 degrees.") == "approximately 100 degrees"
    assert normalise_answer("Pi is 3.14.") == "pi is 3.14"
    assert normalise_answer("U.S. 1,000") == "us 1000"


def test_judge_reply_parsing_follows_the_reference():
    assert parse_judgement("Entailment.") == 2
    assert parse_judgement("neutral") == 1
    assert parse_judgement("Contradiction") == 0
    assert parse_judgement("I am not sure") == 1
    assert parse_judgement("x" * 30 + "entailment") == 1  # only the first 30 characters count


def test_nli_label_order_reads_names():
    assert nli_label_order({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}) == [0, 1, 2]
    assert nli_label_order({0: "entailment", 1: "neutral", 2: "contradiction"}) == [2, 1, 0]
    assert nli_label_order({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}) == [0, 1, 2]
    with pytest.raises(ValueError, match="3 labels"):
        nli_label_order({0: "yes", 1: "no"})
    with pytest.raises(ValueError, match="'positive'"):
        nli_label_order({0: "positive", 1: "neutral", 2: "entailment"})


def _tiny_deberta_dir(tmp_path, id2label):
    """A random 2-layer DeBERTa-v2 NLI classifier with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] paris london the capital is of france what city".split()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    cfg = DebertaV2Config(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        pad_token_id=0,
    )
    model = DebertaV2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)  # safetensors
    tok.save_pretrained(tmp_path)
    return tmp_path, model, tok


def test_nli_entailment_is_the_classifier_argmax_through_its_label_names(tmp_path):
    id2label = {0: "ENTAILMENT", 1: "CONTRADICTION", 2: "NEUTRAL"}
    path, model, tok = _tiny_deberta_dir(tmp_path, id2label)
    ent = NLIEntailment(str(path), batch_size=3)
    pairs = [("paris", "london"), ("london", "paris"), ("the capital", "paris"), ("paris", "paris")]
    got = ent.check(pairs, question="what city")
    enc = tok(
        [f"what city {a}" for a, _ in pairs],
        [f"what city {b}" for _, b in pairs],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        idx = model(**enc).logits.argmax(-1).tolist()
    ours = {"ENTAILMENT": 2, "NEUTRAL": 1, "CONTRADICTION": 0}
    assert got == [ours[id2label[i]] for i in idx]
    assert ent.calls == 4


@pytest.mark.parametrize(("label", "expected"), [(2, [0, 0, 0]), (0, [0, 1, 2])])
def test_nli_entailment_drives_the_clustering(tmp_path, label, expected):
    path, _, _ = _tiny_deberta_dir(tmp_path, {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    ent = NLIEntailment(str(path))
    with torch.no_grad():  # make the head always answer `label`
        ent.model.classifier.weight.zero_()
        ent.model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 3) * 10.0)
    assert ent.cluster(["paris", "london", "france"], question="what city") == expected


def test_judge_runs_batched_and_caches(real_tokenizer, monkeypatch):
    from pysteer.models.tiny import tiny_model
    from pysteer.uncertainty import sampling

    model = tiny_model("llama", vocab_size=len(real_tokenizer)).eval()
    batches = []
    real = sampling._generate

    def counting(model, tokenizer, prompts, *args):
        batches.append(len(prompts))
        return real(model, tokenizer, prompts, *args)

    monkeypatch.setattr(sampling, "_generate", counting)
    judge = JudgeEntailment(model, real_tokenizer, batch_size=4, max_new_tokens=3)
    ids = judge.cluster(["Paris", "London", "Rome"], question="Capital of France?")
    assert len(ids) == 3 and ids[0] == 0
    assert judge.calls == len(judge.cache) == sum(batches)
    assert max(batches) <= 4 and batches[0] == 4  # anchor 0: 4 pairs in one generate call
    before = list(batches)
    judge.cluster(["Paris", "London", "Rome"], question="Capital of France?")
    assert batches == before  # everything came from the cache
    assert "Capital of France?" in judge.prompt("Paris", "Rome", "Capital of France?")


def test_auroc_and_rejection_curve_hand_computed():
    from pysteer.uncertainty.evaluation import area_under_rejection, auroc, rejection_curve

    pytest.importorskip("sklearn")
    # wrong answers score 0.9 and 0.4, right ones 0.1 and 0.5: 3 of the 4 (wrong, right) pairs ordered
    assert auroc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == pytest.approx(0.75)
    correct = [True, False, True, True]
    score = [0.1, 0.9, 0.2, 0.3]
    assert rejection_curve(correct, score, coverages=(0.25, 0.5, 1.0)) == [1.0, 1.0, 0.75]
    assert area_under_rejection(correct, score) == pytest.approx((1.0 * 8 + 0.75 * 2) / 10)
    with pytest.raises(ValueError, match="both right and wrong"):
        auroc([1, 1], [0.1, 0.2])


def test_correctness_is_whole_word_containment_and_unanswerable_is_never_correct():
    from pysteer.uncertainty.evaluation import is_correct

    assert is_correct("The capital of France is Paris.", ["Paris"])
    assert is_correct("Vincent van Gogh", ["Monet", "van Gogh"])
    assert not is_correct("Parisian", ["Paris"])
    assert is_correct("The boiling point of water at sea level is approximately 100.0", ["100"])
    assert not is_correct("about 100.5 degrees", ["100"]) and not is_correct("3.14", ["14"])
    assert not is_correct("Nobody knows.", [])


def test_shipped_questions_have_three_splits_and_unanswerable_rows(tmp_path):
    from pysteer.uncertainty.questions import SPLITS, load_questions

    qs = load_questions()
    assert len({q.id for q in qs}) == len(qs) >= 200
    for split in SPLITS:
        part = load_questions(split=split)
        assert part and any(not q.answerable for q in part) and any(q.answerable for q in part)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q?", "answers": [], "split": "dev"}\n')
    with pytest.raises(ValueError, match="split 'dev'"):
        load_questions(bad)


@pytest.fixture(scope="module")
def tiny_llama(real_tokenizer):
    from pysteer.models.tiny import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(real_tokenizer)).eval(), real_tokenizer


def test_greedy_logprobs_equal_a_full_forward_of_prompt_and_answer(tiny_llama):
    from pysteer.uncertainty import sampling

    model, tok = tiny_llama
    questions = ["What is the capital of France?", "Who wrote Hamlet?"]
    got = sampling.sample_answers(model, tok, questions, n=1, temperature=0, max_new_tokens=5)
    stops = sampling.stop_token_ids(tok)
    for b, q in enumerate(questions):
        prompt = tok(sampling.answer_prompt(tok, q), add_special_tokens=False)["input_ids"]
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        gen = out[0, len(prompt) :].tolist()
        with torch.no_grad():
            logits = model(out[:, : len(prompt) + len(gen)]).logits[0]
        n = len(got.token_logprobs[b][0])
        ref = [torch.log_softmax(logits[len(prompt) - 1 + k], -1)[gen[k]].item() for k in range(n)]
        assert got.token_logprobs[b][0].tolist() == pytest.approx(ref, abs=1e-4)
    assert got.hidden_tbg is None and got.sites == []


def test_hidden_states_are_taken_at_the_last_prompt_token_and_second_last_generated(tiny_llama):
    from pysteer.tracing import trace
    from pysteer.uncertainty import sampling

    model, tok = tiny_llama
    got = sampling.sample_answers(
        model, tok, ["Name a colour."], n=3, temperature=1.0, max_new_tokens=4, hidden=True
    )
    assert got.hidden_tbg.shape == (1, 3, 2, 64) and got.hidden_slt.shape == (1, 3, 2, 64)
    assert got.sites == ["layers.0.resid", "layers.1.resid"]
    assert len(got.texts[0]) == len(got.token_logprobs[0]) == 3
    prompt = tok(sampling.answer_prompt(tok, "Name a colour."), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(), trace(model, "layers.1.resid", positions="last") as cache:
        model(**prompt)
    for s in range(3):
        torch.testing.assert_close(
            got.hidden_tbg[0, s, 1], cache["layers.1.resid"][0, 0], rtol=1e-4, atol=1e-5
        )


def test_sample_answers_rejects_bad_arguments_before_running(tiny_llama):
    from pysteer.uncertainty.sampling import sample_answers

    model, tok = tiny_llama
    with pytest.raises(ValueError, match="greedy decoding"):
        sample_answers(model, tok, ["q?"], n=3, temperature=0)
    with pytest.raises(ValueError, match="at least one question"):
        sample_answers(model, tok, [])


def test_p_true_is_the_log_probability_of_A(tiny_llama):
    from pysteer.uncertainty.baselines import p_true, p_true_prompt
    from pysteer.uncertainty.sampling import continuation_logprobs

    model, tok = tiny_llama
    got = p_true(model, tok, ["Capital of France?"], ["Paris"], [["Paris", "Lyon"]])
    prompt = p_true_prompt("Capital of France?", "Paris", ["Paris", "Lyon"])
    assert prompt.endswith(
        "Possible answer: Paris\nIs the possible answer:\nA) True\nB) False\nThe possible answer is:"
    )
    ids = tok(prompt + " A", return_tensors="pt", add_special_tokens=False)["input_ids"]
    n_a = len(tok(" A", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -n_a - 1 : -1], -1)
    ref = lp.gather(-1, ids[0, -n_a:, None]).sum().item()
    assert got[0] == pytest.approx(ref, abs=1e-4)
    assert continuation_logprobs(model, tok, [prompt], " A")[0] == pytest.approx(ref, abs=1e-4)


def test_fast_path_samples_match_the_hugging_face_path_and_a_teacher_forced_forward(tiny_llama, monkeypatch):
    """``sample_answers`` samples through ``pysteer.generate``: greedy answers are Hugging Face's, and
    every sampled answer's log-probabilities and TBG / SLT states are those of one teacher-forced
    forward of prompt + answer (temperature 1: the model's own distribution)."""
    from pysteer.uncertainty import sampling

    model, tok = tiny_llama
    questions = ["Name a colour.", "Who wrote Hamlet?", "What is two plus two?"]
    stops = sampling.stop_token_ids(tok)
    prompts = [sampling.answer_prompt(tok, q) for q in questions]
    greedy = sampling.sample_answers(model, tok, questions, n=1, temperature=0, max_new_tokens=6)
    _, hf_generated, _ = sampling._generate(model, tok, prompts, 1, 0.0, 6, stops)
    assert [t[0] for t in greedy.texts] == [sampling._answer_text(tok, g, stops) for g in hf_generated]

    n, seen = 4, []
    real = sampling._generate_fast

    def recording(*args):
        out = real(*args)
        seen.extend(out[0])
        return out

    monkeypatch.setattr(sampling, "_generate_fast", recording)
    got = sampling.sample_answers(model, tok, questions, n=n, temperature=1.0, max_new_tokens=5, hidden=True)
    generated = list(seen)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ref_lp, ref_tbg, ref_slt = sampling._teacher_forced(
        model, [p for p in prompt_ids for _ in range(n)], generated, got.sites
    )
    for r, g in enumerate(generated):
        q, s = divmod(r, n)
        assert got.texts[q][s] == sampling._answer_text(tok, g, stops)
        expected = sampling._answer_logprobs(ref_lp[r], g, stops)
        torch.testing.assert_close(got.token_logprobs[q][s], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.hidden_tbg[q, s], ref_tbg[r], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.hidden_slt[q, s], ref_slt[r], rtol=1e-4, atol=1e-5)


def test_sampled_answers_reproduce_under_torch_manual_seed(tiny_llama):
    from pysteer.uncertainty import sampling

    model, tok = tiny_llama
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(sampling.sample_answers(model, tok, ["Name a colour."], n=3, max_new_tokens=4).texts)
    assert runs[0] == runs[1]
