"""The DAFNet editor: gradient-signal capture, the auxiliary network's causal sequence semantics,
the ablation, checkpoints, meta-training and sequential editing (tiny llama, real tokenizer)."""

from __future__ import annotations

import pytest
import torch

from pysteer.models.tiny import tiny_model
from pysteer.recipes.dafnet import (
    DAFNetConfig,
    DAFNetEditor,
    RunningNorm,
    TrainConfig,
    capture_signals,
    clip_network_grads,
    dafnet_train,
    sequence_length,
    sequential_edit,
)
from pysteer.recipes.editing import load_edits, teacher_forced

SITES = ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "layers.1.attn.o_proj"]


@pytest.fixture(scope="module")
def model(real_tokenizer):
    return tiny_model("llama", vocab_size=len(real_tokenizer))


@pytest.fixture(scope="module")
def records():
    return load_edits("train")[:4]


def _editor(model, inter_attention=True, seed=0):
    torch.manual_seed(seed)
    editor = DAFNetEditor.for_model(
        model, DAFNetConfig(SITES, inter_attention=inter_attention, init_edit_lr=1e-2)
    )
    return editor.eval()


def test_signals_are_the_linears_input_and_output_gradient_at_the_target_positions(
    model, real_tokenizer, records
):
    flags = [p.requires_grad for p in model.parameters()]
    (sig,) = capture_signals(model, real_tokenizer, records[:1], SITES[1:2])
    assert [p.requires_grad for p in model.parameters()] == flags
    b = teacher_forced(real_tokenizer, [records[0].prompt], [records[0].target_new])
    proj = model.model.layers[1].mlp.down_proj
    kept = {}
    hook = proj.register_forward_hook(lambda m, a, o: kept.update(u=a[0], out=o))
    with torch.enable_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        kept["out"].retain_grad()
        loss = torch.nn.functional.cross_entropy(logits[b.predict_at], b.labels[b.predict_at])
        (grad,) = torch.autograd.grad(loss, kept["out"])
    hook.remove()
    assert sig.tokens == int(b.predict_at.sum())
    torch.testing.assert_close(sig.u[0], kept["u"][b.predict_at].detach())
    torch.testing.assert_close(sig.delta[0], grad[b.predict_at], rtol=1e-5, atol=1e-9)


def test_running_norm_keeps_the_exact_mean_and_variance_of_all_rows_seen():
    norm = RunningNorm(5).train()
    chunks = [torch.randn(n, 5) * 3 + 1 for n in (1, 4, 7)]
    for c in chunks:
        norm(c)
    every = torch.cat(chunks)
    torch.testing.assert_close(norm.mean, every.mean(0))
    torch.testing.assert_close(norm.var, every.var(0))


@pytest.mark.parametrize("inter_attention", [True, False])
def test_edits_one_at_a_time_equal_the_same_edits_in_one_causal_pass(
    model, real_tokenizer, records, inter_attention
):
    signals = capture_signals(model, real_tokenizer, records, SITES)
    editor = _editor(model, inter_attention)
    with torch.no_grad():
        editor.reset()
        editor.absorb(signals)
        together = [d.dense() for d in editor.weight_deltas()]
        editor.reset()
        for s in signals:
            editor.absorb([s])
        apart = [d.dense() for d in editor.weight_deltas()]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert a.abs().max() > 0


def test_without_inter_attention_edits_simply_add_up(model, real_tokenizer, records):
    signals = capture_signals(model, real_tokenizer, records[:2], SITES)
    editor = _editor(model, inter_attention=False)
    with torch.no_grad():
        parts = []
        for s in signals:
            editor.reset()
            editor.absorb([s])
            parts.append([d.dense() for d in editor.weight_deltas()])
        editor.reset()
        editor.absorb(signals)
        both = [d.dense() for d in editor.weight_deltas()]
    for i, total in enumerate(both):
        torch.testing.assert_close(total, parts[0][i] + parts[1][i], rtol=1e-4, atol=1e-7)


def test_update_scales_carry_no_gradient_but_the_inter_attention_does(model, real_tokenizer, records):
    """As in the paper's code: the score attention only weighs the edits; the loss trains the rest."""
    signals = capture_signals(model, real_tokenizer, records[:3], SITES)
    editor = _editor(model).train()
    editor.absorb(signals)
    sum(d.dense().square().sum() for d in editor.weight_deltas()).backward()
    layer = editor.nets["96x64"].layers[0]
    score_grads = [p.grad for p in layer.score.parameters()]
    assert all(g is None or not g.any() for g in score_grads)
    assert layer.inter.v.weight.grad.abs().sum() > 0
    assert layer.inter.q.weight.grad.abs().sum() > 0


def test_gradient_clipping_leaves_the_step_sizes_out(model):
    editor = _editor(model)
    for p in editor.nets.parameters():
        p.grad = torch.full_like(p, 1e-3)
    editor.edit_lrs.grad = torch.full_like(editor.edit_lrs, 1e4)
    before = [p.grad.clone() for p in editor.nets.parameters()]
    clip_network_grads(editor, max_norm=100.0)
    for p, g in zip(editor.nets.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(editor.edit_lrs.grad, torch.full_like(editor.edit_lrs, 1e4))


def test_one_network_per_weight_shape_with_a_mode_per_linear(model):
    editor = _editor(model)
    assert sorted(editor.nets) == ["64x64", "96x64"]
    assert editor.modes == [0, 1, 0]


def test_checkpoint_round_trip_gives_the_same_deltas(model, real_tokenizer, records, tmp_path):
    signals = capture_signals(model, real_tokenizer, records[:2], SITES)
    editor = _editor(model, seed=3)
    editor.save(tmp_path / "editor.safetensors")
    loaded = DAFNetEditor.load(tmp_path / "editor.safetensors").eval()
    with torch.no_grad():
        for e in (editor, loaded):
            e.reset()
            e.absorb(signals)
    for a, b in zip(editor.weight_deltas(), loaded.weight_deltas(), strict=True):
        assert torch.equal(a.dense(), b.dense())


def test_a_checkpoint_that_is_not_an_editor_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not DAFNet editor checkpoint|pysteer.dafnet"):
        DAFNetEditor.load(tmp_path / "x.safetensors")


def test_config_refuses_unknown_linears_and_empty_sites():
    with pytest.raises(ValueError, match="module_sites is empty"):
        DAFNetConfig([])
    with pytest.raises(ValueError, match="unknown module site"):
        DAFNetConfig(["layers.0.mlp.fc9"])


def test_curriculum_grows_to_the_longest_sequence():
    import random

    cfg = TrainConfig(max_sequence=100, curriculum_steps=10)
    rng = random.Random(0)
    assert sequence_length(0, cfg, rng) == 1
    lengths = [sequence_length(50, cfg, rng) for _ in range(300)]
    assert max(lengths) <= 100 and max(lengths) >= 90
    assert max(sequence_length(1, cfg, rng) for _ in range(100)) <= round(100**0.1)


def test_meta_training_steps_update_the_networks_and_write_a_checkpoint(model, real_tokenizer, tmp_path):
    cfg = DAFNetConfig(SITES[:2], init_edit_lr=1e-2)
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(0)
    editor = DAFNetEditor.for_model(model, cfg)
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    editor, log = dafnet_train(
        model,
        real_tokenizer,
        load_edits("train")[:6],
        cfg,
        TrainConfig(steps=3, max_sequence=4, curriculum_steps=2),
        editor=editor,
        checkpoint=str(tmp_path / "ckpt.safetensors"),
        progress=False,
    )
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert any(not torch.equal(before[k], v) for k, v in editor.state_dict().items())
    assert (tmp_path / "ckpt.safetensors").is_file()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_sequential_edit_folds_the_deltas_and_remove_restores_the_model(model, real_tokenizer, records):
    editor = _editor(model)
    ids = teacher_forced(real_tokenizer, [records[0].prompt], [records[0].target_new]).input_ids
    with torch.no_grad():
        before = model(ids).logits
    handle = sequential_edit(model, editor, records, real_tokenizer, progress=False)
    assert handle.mode == "fold"
    with torch.no_grad():
        edited = model(ids).logits
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not torch.allclose(edited, before, atol=1e-4)
    with pytest.raises(ValueError, match="no edits"):
        sequential_edit(model, editor, [], real_tokenizer)


def test_cli_edit_seq_trains_applies_scores_and_saves(tiny_dir, tmp_path):
    import json

    import pysteer
    from pysteer.cli import main
    from pysteer.weight_delta import WeightDelta

    editor, out, scores = (
        tmp_path / "editor.safetensors",
        tmp_path / "edits.safetensors",
        tmp_path / "scores.json",
    )
    rc = main(
        [
            "edit-seq",
            "--model",
            str(tiny_dir),
            "--editor",
            str(editor),
            "--train-steps",
            "2",
            "--max-sequence",
            "3",
            "--layers",
            "0",
            "1",
            "-n",
            "3",
            "--out",
            str(out),
            "--json-out",
            str(scores),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    assert editor.is_file()
    saved = pysteer.load(out).configs["default"]
    assert [d.module_site for d in saved] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert all(isinstance(d, WeightDelta) for d in saved)
    assert set(json.loads(scores.read_text())["scores"]) == {
        "n_edits",
        "reliability",
        "generality",
        "locality",
    }
    assert main(["edit-seq", "--model", str(tiny_dir), "--editor", str(editor), "-n", "0"]) == 2
