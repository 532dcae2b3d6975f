"""Causal tracing: batched through per-request rows equals ROME's one-forward-per-cell way."""

from __future__ import annotations

import json

import pytest
import torch

from pysteer.models.tiny import tiny_model
from pysteer.recipes.causal_trace import causal_trace, subject_span


class _Tok:
    """Texts are space-separated token ids."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


PROMPT = "11 12 13 14 15 16 17"


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_rows_equal_one_forward_per_cell(kind, arch):
    model = tiny_model(arch)
    kw = dict(kind=kind, window=2, samples=3, noise=0.5)
    batched = causal_trace(model, _Tok(), PROMPT, "12 13", "40", batch_size=16, **kw)
    no_cache = causal_trace(
        model, _Tok(), PROMPT, "12 13", "40", batch_size=16, prefix_cache=False, skip_unaffected=False, **kw
    )
    per_cell = causal_trace(model, _Tok(), PROMPT, "12 13", "40", per_cell=True, **kw)
    assert batched.scores.shape == (2, 7) and batched.subject == (1, 3)
    torch.testing.assert_close(batched.scores, per_cell.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(no_cache.scores, per_cell.scores, rtol=1e-5, atol=1e-6)
    assert batched.corrupted_prob != pytest.approx(batched.clean_prob, abs=1e-6)


def test_restoring_the_last_state_gives_back_the_clean_probability_and_early_tokens_change_nothing():
    model = tiny_model("llama")
    r = causal_trace(model, _Tok(), PROMPT, "14 15", kind="resid", samples=2, noise=1.0)
    assert r.answer_id == int(r.answer)
    assert float(r.scores[-1, -1]) == pytest.approx(r.clean_prob, rel=1e-5)
    # tokens before the subject are not corrupted: restoring them restores nothing (computed, and skipped)
    full = causal_trace(
        model, _Tok(), PROMPT, "14 15", kind="resid", samples=2, noise=1.0, skip_unaffected=False
    )
    torch.testing.assert_close(full.scores[:, :3], torch.full((2, 3), r.corrupted_prob), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.scores, r.scores, rtol=1e-5, atol=1e-7)
    layer, token = r.best()
    assert token >= 3


def test_subject_span_and_bad_input():
    tok = _Tok()
    assert subject_span(tok, [11, 12, 13, 12, 13], "12 13") == (3, 5)  # the last occurrence
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not occur"):
        causal_trace(model, tok, PROMPT, "99")
    with pytest.raises(ValueError, match="kind"):
        causal_trace(model, tok, PROMPT, "12", kind="heads")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        causal_trace(model, tok, PROMPT, "12", layers=[5])
    with pytest.raises(ValueError, match="span"):
        causal_trace(model, tok, PROMPT, (3, 9))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_cli_causal_trace_writes_a_heatmap_and_scores(tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    png, js = tmp_path / "ct.png", tmp_path / "ct.json"
    rc = main(["causal-trace", "--model", str(tiny_dir), "--prompt", "The Eiffel Tower is in the city of",
               "--subject", "Eiffel Tower", "--samples", "2", "--png", str(png), "--json-out", str(js)])  # fmt: skip
    assert rc == 0 and png.stat().st_size > 0
    doc = json.loads(js.read_text())
    assert len(doc["scores"]) == 2 and len(doc["scores"][0]) == len(doc["tokens"])
    assert "best restore" in capsys.readouterr().out
