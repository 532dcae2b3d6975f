"""torch.compile: steering causes no graph breaks, and in-place updates do not recompile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import pysteer
from pysteer.interventions import HeadBias, HeadScale, VectorAdd
from pysteer.models.tiny import tiny_model

PROMPT = 6
NEW = 5


def _gen(model, ids):
    out = model.generate(
        ids,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, PROMPT:], torch.stack(out.logits, 1)


def _interventions(scale: float, v_head, v_resid):
    return [
        HeadBias(0, head=[1, 2], vector=v_head, alpha=scale),
        HeadScale(1, scale=0.5),
        VectorAdd("layers.1.resid", v_resid),
    ]


def test_steered_forward_has_no_graph_breaks():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, PROMPT))
    cfg = _interventions(1.0, torch.randn(16), torch.randn(64))
    with pysteer.steer(model, {"a": cfg, "b": cfg[:1]}, positions="generated", mode="dynamic") as h:
        h.rows(["a", "b"])
        explanation = dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_static_cache_generate_follows_in_place_updates_without_recompiling():
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(3, 128, (2, PROMPT))
    v_head, v_resid = torch.randn(16), 3 * torch.randn(64)
    handle = pysteer.steer(
        model,
        {"a": _interventions(1.0, v_head, v_resid), "b": _interventions(-1.0, v_head, -v_resid)},
        positions="generated",
        mode="dynamic",
    )
    handle.rows(["a", "b"])
    variants = [
        lambda h: h.set_alpha(4.0, "a"),  # strength
        lambda h: h.update(_interventions(2.0, -v_head, v_resid), "a"),  # direction
        lambda h: h.rows(["b", None]),  # per-request configs
        lambda h: h.set_positions("all"),  # position rule
        lambda h: h.set_positions([0, -1]),  # explicit positions
    ]
    eager = [_gen(model, ids)]
    for change in variants:
        change(handle)
        eager.append(_gen(model, ids))
    # rewind to the first state, compile, and replay the same changes
    handle.rows(["a", "b"])
    handle.update(_interventions(1.0, v_head, v_resid), "a")
    handle.set_positions("generated")
    dynamo.reset()
    counters.clear()
    compiled_forward = torch.compile(model.forward, backend="aot_eager")
    model.forward = compiled_forward
    try:
        got = [_gen(model, ids)]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        for change in variants:
            change(handle)
            got.append(_gen(model, ids))
        assert counters["stats"]["unique_graphs"] == graphs, "an in-place update recompiled"
    finally:
        del model.forward
        handle.remove()
    for (t_e, l_e), (t_c, l_c) in zip(eager, got):
        assert torch.equal(t_e, t_c)
        torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-5)
    # and the changes did change the output
    assert any(not torch.equal(eager[0][0], e[0]) for e in eager[1:])


def _non_affine(kind: str, scale: float):
    """One non-affine intervention per kind, its values scaled (same layout for every scale)."""
    from pysteer.patching import Patch
    from pysteer.reft import LoReFT
    from pysteer.sae import SAE
    from pysteer.sae_steering import SAEEdit
    from pysteer.scalars import ActivScalar, DynScalar

    g = torch.Generator().manual_seed(7)
    if kind == "loreft":
        rot = torch.linalg.qr(torch.randn(64, 2, generator=g))[0].T
        return LoReFT("layers.1.resid", rot, scale * torch.randn(2, 64, generator=g), scale * torch.ones(2))
    if kind == "sae":
        sae = _SAE_FOR_TESTS.setdefault(
            "sae",
            SAE(
                torch.randn(64, 32, generator=g) / 8,
                torch.zeros(32),
                torch.randn(32, 64, generator=g) / 8,
                torch.zeros(64),
            ),
        )  # the same SAE object each time: only the edit's rows change
        return SAEEdit("layers.0.resid", sae, {3: ("add", 0.05 * scale), 5: ("scale", 1.0 + 0.1 * scale)})
    if kind == "activ_scalar":
        return ActivScalar("layers.0.attn.heads", 2.0 * scale * torch.randn(3, 4, generator=g))
    if kind == "dyn_scalar":
        return DynScalar("layers.0.attn.out", scale * torch.randn(64, generator=g), 0.2)
    if kind == "patch":
        other = torch.Generator().manual_seed(100 + int(10 * scale))  # a new direction per scale
        return Patch("layers.0.resid", torch.randn(64, generator=other), positions=(-1,))
    raise ValueError(kind)


_SAE_FOR_TESTS: dict = {}


def _tensors(handle) -> list:
    return [
        t
        for appliers in handle.appliers.values()
        for a in appliers
        for t in vars(a).values()
        if torch.is_tensor(t)
    ]


@pytest.mark.parametrize("kind", ["loreft", "sae", "activ_scalar", "dyn_scalar", "patch"])
def test_updating_a_non_affine_config_with_the_same_layout_writes_in_place_without_recompiling(kind):
    """``update`` with new values of the same layout rewrites the applier's tensors in place: the
    fast path's compiled decode step keeps its graphs and follows the new values (equal to Hugging
    Face generate under the same handle)."""
    from pysteer.fast import FastGenerator

    model = tiny_model("llama")
    model.generation_config.eos_token_id = model.config.eos_token_id = None  # full-length outputs
    ids = torch.randint(3, 128, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    handle = pysteer.steer(
        model, {"a": [_non_affine(kind, 1.0)], "b": [_non_affine(kind, -0.5)]}, mode="dynamic"
    )
    handle.rows(["a", "b"])
    gen = FastGenerator(model, compile="default", compile_backend="aot_eager", progress=False)
    try:
        dynamo.reset()
        counters.clear()
        before = gen.generate(ids, steering=handle, max_new_tokens=NEW).tokens
        graphs = counters["stats"]["unique_graphs"]
        held = _tensors(handle)
        handle.update([_non_affine(kind, 2.0)], "a")
        assert all(a is b for a, b in zip(held, _tensors(handle), strict=True)), "update replaced the tensors"
        after = gen.generate(ids, steering=handle, max_new_tokens=NEW).tokens
        assert counters["stats"]["unique_graphs"] == graphs, f"updating {kind} recompiled"
        assert after == _gen(model, ids)[0].tolist()
        assert after[0] != before[0] and after[1] == before[1]  # the update changed row a, and only it
    finally:
        handle.remove()


def test_updating_a_non_affine_config_to_a_new_layout_rebuilds_and_stays_correct():
    """A different layout (a LoReFT of another rank) cannot be written in place: new tensors, and the
    output equals a fresh handle's."""
    from pysteer.reft import LoReFT

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, PROMPT))
    g = torch.Generator().manual_seed(3)
    rot = torch.linalg.qr(torch.randn(64, 3, generator=g))[0].T
    wider = LoReFT("layers.1.resid", rot, torch.randn(3, 64, generator=g), torch.ones(3))
    with pysteer.steer(model, [_non_affine("loreft", 1.0)], mode="dynamic") as handle:
        U = handle.appliers[next(iter(handle.appliers))][0].U
        handle.update([wider])
        assert handle.appliers[next(iter(handle.appliers))][0].U is not U
        with torch.no_grad():
            got = model(ids).logits
    with pysteer.steer(model, [wider], mode="dynamic"), torch.no_grad():
        want = model(ids).logits
    assert torch.equal(got, want)
