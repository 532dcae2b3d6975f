"""``output_hidden_states`` reports a steered layer's output as the next layer receives it, on every
transformers line: 4.57 records hidden states inside each layer's forward, before its forward hooks
(where a ``resid`` site is steered), and would report the unsteered output; 5.x records after them.
Run in both lanes (CI runs this file under transformers 4.57 too)."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.interventions import HeadBias, VectorAdd
from pysteer.models import geometry, get_spec
from pysteer.models.specs import get_submodule
from pysteer.models.tiny import tiny_model

ARCHS = ["llama", "qwen2", "gemma2", "gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    overrides = {} if request.param == "gpt2" else {"num_hidden_layers": 3}
    return tiny_model(request.param, **overrides)


def _steering(model):
    geo = geometry(model)
    g = torch.Generator().manual_seed(1)
    return [
        VectorAdd("layers.0.resid", torch.randn(geo.d_model, generator=g), alpha=3.0),
        HeadBias(1, head=0, vector=torch.randn(geo.head_dim, generator=g)),
        VectorAdd("layers.1.resid", torch.randn(geo.d_model, generator=g), alpha=-2.0),
    ]


def _layer_inputs(model, ids):
    """``hidden_states`` of one forward, and what each layer after the first received."""
    layers = get_submodule(model, get_spec(model).layers)
    received = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: received.__setitem__(
                i, args[0] if args else kwargs["hidden_states"]
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
        if i > 0
    ]
    try:
        with torch.no_grad():
            reported = model(ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return reported, received


def test_reported_hidden_states_are_what_the_next_layer_receives(model):
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states
    with pysteer.steer(model, _steering(model), mode="dynamic"):
        reported, received = _layer_inputs(model, ids)
    for i, x in received.items():  # hidden_states[i] is layer i-1's output, layer i's input
        assert torch.equal(reported[i], x), f"hidden_states[{i}]"
    assert not torch.equal(reported[1], plain[1]), "the steered layer 0 must show its steering"
    with torch.no_grad():
        after = model(ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, p) for a, p in zip(after, plain)), "remove() restores the report"


def test_config_flag_reports_the_steered_state_too(model):
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    model.config.output_hidden_states = True
    try:
        with pysteer.steer(model, _steering(model)[:1], mode="dynamic"), torch.no_grad():
            reported = model(ids).hidden_states
            received = _layer_inputs(model, ids)[1]
    finally:
        model.config.output_hidden_states = False
    assert torch.equal(reported[1], received[1])


def test_generate_reports_the_steered_state_at_every_step(model):
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(4))
    layers = get_submodule(model, get_spec(model).layers)
    received = []
    hook = layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: received.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    try:
        with (
            pysteer.steer(model, _steering(model)[:1], positions="generated", mode="dynamic"),
            torch.no_grad(),
        ):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                output_hidden_states=True,
                return_dict_in_generate=True,
            )
    finally:
        hook.remove()
    assert len(out.hidden_states) == len(received) == 3
    for step, x in zip(out.hidden_states, received):
        assert torch.equal(step[1], x)
