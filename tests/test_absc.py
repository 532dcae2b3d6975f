"""Aspect-based sentiment by model editing: the shipped data, the prompt, the metrics, a tiny-model
run of ``absc_edit`` end to end and the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from pysteer.models.tiny import tiny_model
from pysteer.recipes import absc as absc_mod
from pysteer.recipes.absc import LABELS, PROMPT, absc_edit, absc_metrics, absc_prompt, load_absc

SIZES = {"train": 120, "validation": 42, "test": 60}


@pytest.mark.parametrize("domain", ["restaurant", "laptop"])
def test_data_files_have_balanced_splits_and_sentences_with_several_aspects(domain):
    rows = load_absc(domain)
    assert Counter(r.split for r in rows) == SIZES
    for split in SIZES:
        pol = Counter(r.polarity for r in rows if r.split == split)
        assert set(pol) == set(LABELS) and max(pol.values()) - min(pol.values()) <= 1, (split, pol)
    by_sentence: dict[str, list] = {}
    for r in rows:
        assert r.domain == domain and r.aspect in r.sentence
        by_sentence.setdefault(r.sentence, []).append(r)
    several = [
        exs
        for exs in by_sentence.values()
        if len({e.aspect for e in exs}) >= 2 and len({e.polarity for e in exs}) >= 2
    ]
    assert len(several) >= 0.9 * len(by_sentence)
    # a sentence (and its aspects) stays in one split
    assert all(len({e.split for e in exs}) == 1 for exs in by_sentence.values())


def test_splits_share_no_sentence_across_domains_or_splits():
    rows = load_absc("restaurant") + load_absc("laptop")
    where = {}
    for r in rows:
        assert where.setdefault(r.sentence, (r.domain, r.split)) == (r.domain, r.split)


def test_prompt_is_the_papers_and_goes_in_the_chat_template(real_tokenizer):
    assert absc_prompt("The pasta was superb, but the service was slow.", "service") == (
        "Given the sentence: 'The pasta was superb, but the service was slow.', what is the sentiment "
        "polarity of the aspect term service ?"
    )
    assert PROMPT.count("{") == 2
    ex = absc_mod.AspectExample("The screen was great, but the fan was awful.", "fan", "negative")
    text = absc_mod.absc_text(real_tokenizer, ex)
    assert absc_prompt(ex.sentence, ex.aspect) in text and text != absc_prompt(ex.sentence, ex.aspect)
    # the answer's start follows the question, so the label word is the next token
    assert (
        text
        == absc_mod.absc_text(real_tokenizer, ex, answer=False)
        + "The sentiment polarity of the aspect term fan is"
    )
    assert absc_mod.absc_text(real_tokenizer, ex, chat=False, answer=False) == absc_prompt(
        ex.sentence, ex.aspect
    )
    # one-token label words: after a space when they follow text, bare right after the assistant turn
    ids = absc_mod.label_token_ids(real_tokenizer)
    assert [real_tokenizer.decode([i]) for i in ids] == [" " + w for w in LABELS]
    assert [
        real_tokenizer.decode([i]) for i in absc_mod.label_token_ids(real_tokenizer, answer=False)
    ] == list(LABELS)
    # without the answer's start, the aspect's last token sits at one fixed offset from the prompt's end
    rows = load_absc("laptop") + load_absc("restaurant")
    assert len({e.offset for e in absc_mod.encode_examples(real_tokenizer, rows, answer=False)}) == 1
    # with it, the edit stays on the question's aspect term, not on its repetition in the answer
    for row, e in zip(rows[:40], absc_mod.encode_examples(real_tokenizer, rows[:40])):
        assert e.offset == e.span[1] - 1 - len(e.ids)
        assert row.aspect.endswith(real_tokenizer.decode(e.ids[e.offset]).strip())
        assert real_tokenizer.decode(e.ids[e.span[1] :]).startswith(" ?")


def test_metrics_match_a_hand_count():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    m = absc_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1 positive 1/2, negative 4/5, neutral 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert absc_metrics([0, 1], [2, 2])["macro_f1"] == 0.0


def _small(domain: str, n: dict[str, int]):
    rows = load_absc(domain)
    return [e for s, k in n.items() for e in [r for r in rows if r.split == s][:k]]


def test_absc_edit_end_to_end_on_a_tiny_model(real_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=len(real_tokenizer))
    ids = torch.tensor([real_tokenizer("Given the sentence")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = {"train": 12, "validation": 6, "test": 6}
    data = {"restaurant": _small("restaurant", n), "laptop": _small("laptop", {"test": 6})}
    r = absc_edit(
        model,
        real_tokenizer,
        "restaurant",
        data=data,
        trace_examples=2,
        trace_samples=1,
        n_layers=(1, 2),
        lrs=(0.3,),
        lora_lrs=(0.05,),
        steps=12,
        checkpoints=(6, 12),
        batch_size=4,
        png=tmp_path / "trace.png",
    )
    assert set(r.test) == {"zero_shot", "loreft_aspect", "loreft_last", "lora"}
    assert r.eval_sets == ["restaurant", "laptop"]
    for per_set in r.test.values():
        assert set(per_set) == {"restaurant", "laptop"}
        for m in per_set.values():
            assert m["n"] == 6 and 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    # tiny llama: 3 layers, d 64; LoReFT rank 4 per layer = 2*4*64 + 4; LoRA r 4 on every o_proj
    k = r.chosen["loreft_aspect"]["n_layers"]
    assert r.n_params == {
        "zero_shot": 0,
        "loreft_aspect": k * 516,
        "loreft_last": r.chosen["loreft_last"]["n_layers"] * 516,
        "lora": 3 * 4 * (64 + 64),
    }
    assert len(r.trace["aspect_last"]) == 3 and sorted(r.trace["ranking"]) == [0, 1]  # never the last layer
    assert r.chosen["loreft_aspect"]["layers"] == sorted(r.trace["ranking"][:k])
    assert {row["method"] for row in r.selection} == set(r.test)
    assert (
        len([row for row in r.selection if row["method"] == "loreft_aspect"]) == 2 * 2
    )  # 2 layer counts x 2 checkpoints
    for method in ("loreft_aspect", "loreft_last", "lora"):
        losses = r.history[method]
        assert len(losses) == r.chosen[method]["steps"]
    assert r.history["loreft_last"][-1] < r.history["loreft_last"][0]  # training lowers the loss
    assert (tmp_path / "trace.png").is_file() and (tmp_path / "trace_layers.png").is_file()
    # the aspect-token edit is saved with one config per offset of the aspect from the prompt's end
    # (an explicit negative position each; the answer's start repeats the aspect, so offsets vary),
    # and the model is left as it was
    assert sorted(r.interventions) == sorted(f"at{o}" for o in r.config["aspect_offsets"])
    for name, ivs in r.interventions.items():
        assert ivs[0].positions == [int(name[2:])]
    import pysteer

    spec = pysteer.load(r.save(tmp_path / "absc.safetensors"))
    for name in r.interventions:
        assert [iv.site_name for iv in spec.configs[name]] == [
            f"layers.{L}.resid" for L in r.chosen["loreft_aspect"]["layers"]
        ]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert all(p.requires_grad for p in model.parameters())  # freezing was undone
    json.dumps(r.to_json())


@pytest.mark.parametrize(("where", "drop"), [("aspect", 0.01), ("last", 0.5)])
def test_training_lowers_the_loss(real_tokenizer, where, drop):
    """Measured 10.919 -> 10.892 at the aspect token (a random tiny model's attention passes little
    of one token's edit on to the last) and 10.95 -> 10.00 at the last token."""
    model = tiny_model("llama", vocab_size=len(real_tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    encs = absc_mod.encode_examples(real_tokenizer, _small("laptop", {"train": 8}))
    label_ids = torch.tensor(absc_mod.label_token_ids(real_tokenizer))
    edit = absc_mod._ReftEdit(model, [0], where, 4, [e.offset for e in encs], 0, None)
    try:
        losses, _ = absc_mod._fit(
            model,
            encs,
            label_ids,
            edit,
            absc_mod._pad_id(real_tokenizer),
            lr=0.3,
            steps=15,
            batch_size=8,
            seed=0,
            checkpoints=(),
            evaluate=dict,
            log=print,
        )
    finally:
        edit.close()
    assert losses[-1] < losses[0] - drop


def test_training_replays_the_frozen_layers_with_the_same_losses(real_tokenizer):
    """Fixed batches in a fresh order per epoch: from the second epoch on the layers below the edit
    are replayed (FrozenPrefix), and the losses are those of computing them."""
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=len(real_tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    encs = absc_mod.encode_examples(real_tokenizer, _small("laptop", {"train": 8}))
    label_ids = torch.tensor(absc_mod.label_token_ids(real_tokenizer))
    runs = {}
    for replay in (False, True):
        edit = absc_mod._ReftEdit(model, [1], "aspect", 4, [e.offset for e in encs], 0, None)
        made = []
        original = edit.frozen_prefix
        edit.frozen_prefix = (
            (lambda made=made, original=original: made.append(original()) or made[-1])
            if replay
            else (lambda: None)
        )
        try:
            runs[replay], _ = absc_mod._fit(
                model,
                encs,
                label_ids,
                edit,
                absc_mod._pad_id(real_tokenizer),
                lr=0.3,
                steps=6,
                batch_size=4,
                seed=0,
                checkpoints=(),
                evaluate=dict,
                log=print,
            )
        finally:
            edit.close()
    assert runs[True] == runs[False]
    assert made[0].upto == 2 and made[0].stats == {"hits": 4, "misses": 2, "bypassed": 0}


def test_cli_absc_smoke(tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    js = tmp_path / "absc.json"
    rc = main(
        [
            "absc",
            "--model",
            str(tiny_dir),
            "--max-examples",
            "6",
            "--trace-examples",
            "1",
            "--trace-samples",
            "1",
            "--n-layers",
            "1",
            "--lrs",
            "0.1",
            "--lora-lrs",
            "0.01",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "absc.safetensors"),
            "--png",
            str(tmp_path / "trace.png"),
            "--json-out",
            str(js),
        ]
    )
    assert rc == 0
    out = json.loads(js.read_text())
    assert {row["method"] for row in out["table"]} == {"zero_shot", "loreft_aspect", "loreft_last", "lora"}
    assert {row["eval"] for row in out["table"]} == {"restaurant", "laptop"}
    assert (tmp_path / "absc.safetensors").is_file() and (tmp_path / "trace.png").is_file()
    assert "macro-F1" in capsys.readouterr().out
