"""torch.compile: steering causes no graph breaks, and in-place updates do not recompile."""

from __future__ import annotations

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
