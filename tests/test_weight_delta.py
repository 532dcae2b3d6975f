"""WeightDelta: the linear-site vocabulary, ``y = x W + s (x U) V`` through the low-rank op,
accumulation and SVD compression, exact folding with bit-exact unfolding, save/load and per-request rows."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.models.sites import resolve_site
from pysteer.models.tiny import tiny_model
from pysteer.weight_delta import WeightDelta, accumulate

LINEARS = [
    ("mlp.gate_proj", 64, 96),
    ("mlp.up_proj", 64, 96),
    ("mlp.down_proj", 96, 64),
    ("attn.o_proj", 64, 64),
]


def _delta(
    linear: str, k: int, n: int, rank: int = 3, seed: int = 0, layer: int = 1, scale: float = 0.5
) -> WeightDelta:
    g = torch.Generator().manual_seed(seed)
    return WeightDelta(
        f"layers.{layer}.{linear}",
        torch.randn(k, rank, generator=g) * 0.3,
        torch.randn(rank, n, generator=g) * 0.3,
        scale,
    )


def _module(model, module_site: str):
    layer, name = module_site.split(".", 2)[1:]
    path = {
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
        "attn.o_proj": "self_attn.o_proj",
    }
    return model.model.layers[int(layer)].get_submodule(path[name])


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _reference(model, ids, wd: WeightDelta):
    """The formula by a plain forward hook on the linear."""
    U, V = wd.U, wd.V * wd.scale
    hook = _module(model, wd.module_site).register_forward_hook(lambda m, a, o: o + (a[0] @ U) @ V)
    try:
        return _logits(model, ids)
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("linear", "k", "n"), LINEARS)
def test_linear_sites_resolve_to_the_named_module_with_its_widths(model, linear, k, n):
    inp = resolve_site(model, f"layers.1.{linear}.in")
    out = resolve_site(model, f"layers.1.{linear}.out")
    assert inp.module is out.module is _module(model, f"layers.1.{linear}")
    assert (inp.pre, inp.width, out.pre, out.width) == (True, k, False, n)


def test_a_linear_the_architecture_fuses_is_refused_by_name():
    with pytest.raises(ValueError, match="fused projection, mlp.gate_up_proj"):
        pysteer.steer(tiny_model("phi3"), _delta("mlp.gate_proj", 64, 96))


def test_an_unknown_module_site_is_refused_with_the_known_linears():
    with pytest.raises(ValueError, match="mlp.gate_proj, mlp.up_proj, mlp.down_proj, attn.o_proj"):
        WeightDelta("layers.1.mlp.fc1", torch.zeros(64, 1), torch.zeros(1, 96))


@pytest.mark.parametrize(("linear", "k", "n"), LINEARS)
def test_dynamic_delta_is_the_formula_on_each_linear(model, ids, linear, k, n):
    wd = _delta(linear, k, n)
    with pysteer.steer(model, wd, mode="dynamic", backend="torch"):
        out = _logits(model, ids)
    torch.testing.assert_close(out, _reference(model, ids, wd), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _logits(model, ids), atol=1e-3)


@pytest.mark.parametrize(("linear", "k", "n"), LINEARS)
def test_fold_matches_the_dynamic_op_and_remove_restores_the_weight_bits(model, ids, linear, k, n):
    wd = _delta(linear, k, n)
    weight = _module(model, wd.module_site).weight
    before_w, before = weight.detach().clone(), _logits(model, ids)
    with pysteer.steer(model, wd, mode="dynamic", backend="torch"):
        dynamic = _logits(model, ids)
    with pysteer.steer(model, wd) as handle:
        assert handle.mode == "fold"
        folded = _logits(model, ids)
    torch.testing.assert_close(folded, dynamic, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, before_w)
    assert torch.equal(_logits(model, ids), before)


def test_fold_adds_the_delta_on_gpt2_conv1d_layout():
    gpt2 = tiny_model("gpt2")
    ids = torch.randint(3, 128, (1, 6))
    wd = _delta("mlp.down_proj", gpt2.transformer.h[1].mlp.c_proj.weight.shape[0], 64)
    with pysteer.steer(gpt2, wd, mode="dynamic", backend="torch"):
        dynamic = _logits(gpt2, ids)
    with pysteer.steer(gpt2, wd):
        folded = _logits(gpt2, ids)
    torch.testing.assert_close(folded, dynamic, rtol=1e-5, atol=1e-5)


def test_accumulate_is_decay_times_old_plus_lr_times_new():
    a, b = _delta("mlp.down_proj", 96, 64, seed=1), _delta("mlp.down_proj", 96, 64, seed=2, scale=2.0)
    acc = accumulate(accumulate(None, a, lr=0.7), b, decay=0.9, lr=0.3)
    torch.testing.assert_close(acc.dense(), 0.9 * 0.7 * a.dense() + 0.3 * b.dense(), rtol=1e-5, atol=1e-6)
    assert acc.rank == a.rank + b.rank


def test_accumulate_refuses_deltas_on_different_linears():
    with pytest.raises(ValueError, match="different linears"):
        accumulate(_delta("mlp.down_proj", 96, 64), _delta("mlp.down_proj", 96, 64, layer=0))


def test_compress_is_the_truncated_svd_of_the_dense_delta():
    acc = None
    for seed in range(5):
        acc = accumulate(acc, _delta("mlp.down_proj", 96, 64, seed=seed), decay=0.95)
    dense = acc.dense().double()
    u, s, vh = torch.linalg.svd(dense)
    for rank in (1, 4, acc.rank):
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        small = acc.compress(rank)
        assert small.rank == rank
        torch.testing.assert_close(small.dense().double(), best, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rank must be an int in"):
        acc.compress(acc.rank + 1)


def test_from_dense_keeps_the_delta_at_full_rank():
    dense = _delta("attn.o_proj", 64, 64, rank=5).dense()
    torch.testing.assert_close(
        WeightDelta.from_dense("layers.0.attn.o_proj", dense).dense(), dense, rtol=0, atol=1e-5
    )


def test_two_deltas_on_one_linear_add_up(model, ids):
    a, b = _delta("mlp.down_proj", 96, 64, seed=1), _delta("mlp.down_proj", 96, 64, rank=2, seed=2)
    with pysteer.steer(model, [a, b], mode="dynamic", backend="torch"):
        both = _logits(model, ids)
    with pysteer.steer(model, accumulate(a, b), mode="dynamic", backend="torch"):
        summed = _logits(model, ids)
    torch.testing.assert_close(both, summed, rtol=1e-5, atol=1e-5)


def test_save_and_load_give_the_same_outputs(model, ids, tmp_path):
    wd = _delta("mlp.up_proj", 64, 96)
    with pysteer.steer(model, wd, mode="dynamic", backend="torch") as handle:
        expect = _logits(model, ids)
        pysteer.save(handle, tmp_path / "edit.safetensors")
    spec = pysteer.load(tmp_path / "edit.safetensors")
    (loaded,) = spec.configs["default"]
    assert isinstance(loaded, WeightDelta) and loaded.scale == wd.scale
    with pysteer.steer(model, spec, mode="dynamic", backend="torch"):
        torch.testing.assert_close(_logits(model, ids), expect, rtol=0, atol=0)


def test_an_edited_and_an_unedited_row_in_one_batch_equal_each_alone(model, ids):
    a, b = _delta("mlp.down_proj", 96, 64, seed=1), _delta("mlp.gate_proj", 64, 96, seed=2)
    alone = {}
    for name, ivs in (("a", [a]), ("b", [b])):
        with pysteer.steer(model, ivs, mode="dynamic", backend="torch"):
            alone[name] = _logits(model, ids[:1])
    plain = _logits(model, ids[:1])
    with pysteer.steer(model, {"a": [a], "b": [b]}, backend="torch") as handle:
        handle.rows(["a", None, "b"])
        batch = _logits(model, ids[:1].expand(3, -1))
    assert torch.equal(batch[1], plain[0])  # row 0 of the tables: bit-exact
    torch.testing.assert_close(batch[0], alone["a"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch[2], alone["b"][0], rtol=1e-6, atol=1e-6)


def test_a_delta_of_the_wrong_shape_is_refused_before_the_model_changes(model, ids):
    before = _logits(model, ids)
    for mode in ("dynamic", "auto"):
        with pytest.raises(ValueError, match=r"U must be \[96, r\] and V \[r, 64\]"):
            pysteer.steer(model, _delta("mlp.down_proj", 64, 64), mode=mode)
    with pytest.raises(ValueError, match="one rank"):
        WeightDelta("layers.0.mlp.down_proj", torch.zeros(96, 2), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="NaN"):
        WeightDelta("layers.0.mlp.down_proj", torch.full((96, 1), float("nan")), torch.zeros(1, 64))
    assert not model.model.layers[1].mlp.down_proj._forward_hooks
    assert torch.equal(_logits(model, ids), before)


def test_a_trainable_delta_gets_gradients_through_the_op(model, ids):
    wd = _delta("mlp.down_proj", 96, 64)
    with pysteer.steer(model, wd, trainable=True, backend="torch") as handle:
        params = handle.parameters()
        model(input_ids=ids).logits.square().mean().backward()
    grads = [p.grad for p in params]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fast_generate_with_per_request_deltas_matches_hugging_face_generate(model, ids):
    a, b = (
        _delta("mlp.down_proj", 96, 64, seed=1, scale=3.0),
        _delta("attn.o_proj", 64, 64, seed=2, scale=3.0),
    )
    prompts = ids[:1].expand(3, -1)
    with pysteer.steer(model, {"a": [a], "b": [b]}) as handle:
        handle.rows(["a", None, "b"])
        gen = model.generate(input_ids=prompts, max_new_tokens=4, do_sample=False)
    fast = pysteer.generate(
        model, prompts, steering=[[a], None, [b]], max_new_tokens=4, compile=False, progress=False
    )
    hf = [
        row[: row.index(2) + 1] if 2 in row else row for row in gen[:, prompts.shape[1] :].tolist()
    ]  # up to EOS
    assert fast.tokens == hf
    assert hf[0] != hf[1] or hf[2] != hf[1]  # the deltas change what is generated


def test_compiled_fast_generate_with_deltas_equals_hf_and_changing_them_never_recompiles(model, ids):
    """The delta hook inside the compiled decode step: the tokens equal Hugging Face generate with
    the same deltas, and swapping a request's deltas (new factors, same rank) or its rows is a table
    write, not a recompile."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from pysteer.fast import FastGenerator

    a = _delta("mlp.down_proj", 96, 64, seed=1, scale=3.0)
    b = _delta("attn.o_proj", 64, 64, seed=2, scale=3.0)
    a2 = _delta("mlp.down_proj", 96, 64, seed=5, scale=-3.0)
    prompts = ids[:1].expand(3, -1)

    def hf():  # Hugging Face generate under the same handle and rows
        out = model.generate(input_ids=prompts, max_new_tokens=4, do_sample=False)
        return [
            r[: r.index(2) + 1] if 2 in r else r for r in out[:, prompts.shape[1] :].tolist()
        ]  # up to EOS

    handle = pysteer.steer(model, {"a": [a], "b": [b]}, mode="dynamic")
    try:
        gen = FastGenerator(model, compile="default", compile_backend="aot_eager", progress=False)
        dynamo.reset()
        counters.clear()
        handle.rows(["a", None, "b"])
        first = gen.generate(prompts, steering=handle, max_new_tokens=4).tokens
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        assert first == hf()
        assert first[0] != first[1] or first[2] != first[1]  # the deltas change what is generated

        handle.update([a2], "a")
        handle.rows(["b", "a", None])
        second = gen.generate(prompts, steering=handle, max_new_tokens=4).tokens
        assert counters["stats"]["unique_graphs"] == graphs, "changing the deltas recompiled"
        assert second == hf()
        assert second != first
    finally:
        handle.remove()
