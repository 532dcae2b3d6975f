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
