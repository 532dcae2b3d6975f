"""``pysteer.compat.accelerate("pyvene" | "pyreft")`` runs pyvene's own ``IntervenableModel`` calls
with pyvene's results.

Runs in the pyvene virtualenv (pyvene 0.1.8, pyreft 0.1.0, transformers 4.57.6):
``bench/peers/run_compat_suites.sh`` with ``PEER_PY=/work/peers-pyvene-venv/bin/python``. Each test
runs the same user code twice, on pyvene's own path and accelerated, on tiny random llama / gpt2 /
qwen2 models built from configs and on SmolLM2, with a left-padded batch of two.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pv = pytest.importorskip(
    "pyvene", reason="pyvene is installed only in its peer virtualenv (bench/peers/run_compat_suites.sh)"
)
pyreft = pytest.importorskip("pyreft", reason="pyreft is installed only in pyvene's peer virtualenv")

import pysteer.steering  # noqa: E402
from pysteer.compat import AccelerationFallback, accelerate  # noqa: E402
from pysteer.models.tiny import tiny_model  # noqa: E402

ARCHS = ("llama", "gpt2", "qwen2")
TOL = 1e-5  # fp32
VOCAB = 300
NEW = 5
LOCATIONS = {"sources->base": (None, [[[6], [6]], [[3, 6], [2, 6]], [[0], [5]]])}  # 3 interventions


@pytest.fixture(scope="module")
def tiny():
    return {arch: tiny_model(arch, vocab_size=VOCAB).eval() for arch in ARCHS}


def _base(seq: int = 7, pad: int = 2):
    """A tokenizer's output (``BatchEncoding``, not a dict) of two rows, row 1 left-padded."""
    from transformers import BatchEncoding

    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def _vector(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _constant_interventions(model) -> pv.IntervenableModel:
    d = model.config.hidden_size
    return pv.IntervenableModel(
        [
            {
                "layer": 0,
                "component": "block_output",
                "intervention": pv.AdditionIntervention(source_representation=_vector(d, 1), embed_dim=d),
            },
            {
                "layer": 1,
                "component": "attention_output",
                "intervention": pv.SubtractionIntervention(source_representation=_vector(d, 2), embed_dim=d),
            },
            {"layer": 1, "component": "mlp_output", "intervention": pv.ZeroIntervention(embed_dim=d)},
        ],  # fmt: skip
        model,
    )


def _reft_model(model, seed: int = 0):
    d = model.config.hidden_size
    torch.manual_seed(seed)
    config = pyreft.ReftConfig(
        representations=[
            {
                "layer": layer,
                "component": component,
                "low_rank_dimension": rank,
                "intervention": pyreft.LoreftIntervention(
                    embed_dim=d, low_rank_dimension=rank, dtype=torch.float32
                ),
            }
            for layer, component, rank in ((1, "block_output", 4), (0, "attention_value_output", 2))
        ]  # fmt: skip
    )
    reft = pyreft.get_reft_model(model, config, set_device=False)
    with torch.no_grad():
        for iv in reft.interventions.values():
            iv.learned_source.bias.normal_()  # a nonzero edit from the start
    return reft


class _Counter:
    """Counts the pysteer handles made while active (proof the accelerated call ran through pysteer)."""

    def __init__(self, monkeypatch):
        self.n = 0
        steer = pysteer.steering.steer

        def counting(*args, **kwargs):
            self.n += 1
            return steer(*args, **kwargs)

        monkeypatch.setattr(pysteer.steering, "steer", counting)


def _generate(intervenable, base, **kwargs):
    out = intervenable.generate(
        base,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )[1]
    return out.sequences, torch.stack(out.logits)


def _assert_same_generation(own, accelerated):
    assert torch.equal(own[0], accelerated[0]), "greedy tokens differ"
    assert float((own[1] - accelerated[1]).abs().max()) <= TOL


def _accelerated(library: str, fn):
    """``fn()`` accelerated, failing on any fallback warning."""
    with accelerate(library), warnings.catch_warnings():
        warnings.simplefilter("error", AccelerationFallback)
        return fn()


@pytest.mark.parametrize("arch", ARCHS)
def test_constant_interventions_forward_matches_pyvene(tiny, arch, monkeypatch):
    intervenable = _constant_interventions(tiny[arch])
    base = _base()
    with torch.no_grad():
        own = intervenable(base, unit_locations=LOCATIONS)[1].logits
        counter = _Counter(monkeypatch)
        accelerated = _accelerated("pyvene", lambda: intervenable(base, unit_locations=LOCATIONS)[1].logits)
    assert counter.n == 3  # one pysteer handle per intervention
    assert float((own - accelerated).abs().max()) <= TOL
    plain = tiny[arch](**base).logits
    assert float((own - plain).abs().max()) > 1e-3  # the interventions changed the output


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "how",
    [
        dict(unit_locations=LOCATIONS, intervene_on_prompt=True),
        dict(),  # pyvene's default: every generated token (position 0 of each decode step)
        dict(unit_locations=None, intervene_on_prompt=True),  # every token of every forward
    ],
    ids=["prompt-positions", "generated", "everywhere"],
)
def test_constant_interventions_generate_matches_pyvene(tiny, arch, how, monkeypatch):
    intervenable = _constant_interventions(tiny[arch])
    base = _base()
    own = _generate(intervenable, base, **how)
    counter = _Counter(monkeypatch)
    accelerated = _accelerated("pyvene", lambda: _generate(intervenable, base, **how))
    assert counter.n == 3
    _assert_same_generation(own, accelerated)


def test_fixed_source_interchange_block_input_and_query_output_match_pyvene(tiny):
    model = tiny["llama"]
    d = model.config.hidden_size
    source = _vector(d, 4)
    vanilla = pv.VanillaIntervention(source_representation=source, embed_dim=d)
    vanilla.set_interchange_dim(d // 2)  # only the first half of the channels is replaced
    intervenable = pv.IntervenableModel(
        [
            {
                "layer": 1,
                "component": "block_input",
                "intervention": pv.AdditionIntervention(source_representation=source, embed_dim=d),
            },
            {"layer": 0, "component": "attention_value_output", "intervention": vanilla},
            {"layer": 1, "component": "query_output", "intervention": pv.ZeroIntervention(embed_dim=d)},
        ],  # fmt: skip
        model,
    )
    base = _base()
    locations = {"sources->base": (None, [[[4], [5]], [[6], [6]], [[2], [3]]])}
    with torch.no_grad():
        own = intervenable(base, unit_locations=locations)[1].logits
        accelerated = _accelerated("pyvene", lambda: intervenable(base, unit_locations=locations)[1].logits)
    assert float((own - accelerated).abs().max()) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_pyreft_loreft_forward_and_generate_match_pyreft(tiny, arch, monkeypatch):
    reft = _reft_model(tiny[arch])
    base = _base()
    locations = {"sources->base": (None, [[[6], [6]], [[3, 6], [3, 6]]])}
    with torch.no_grad():
        own = reft(base, unit_locations=locations)[1].logits
    own_gen = _generate(reft, base, unit_locations=locations, intervene_on_prompt=True)
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        accelerated = _accelerated("pyreft", lambda: reft(base, unit_locations=locations)[1].logits)
    accelerated_gen = _accelerated(
        "pyreft", lambda: _generate(reft, base, unit_locations=locations, intervene_on_prompt=True)
    )
    assert counter.n == 4
    assert float((own - accelerated).abs().max()) <= TOL
    _assert_same_generation(own_gen, accelerated_gen)


def test_uncovered_calls_run_pyvene_with_one_warning_and_pyvene_results(tiny):
    model = tiny["llama"]
    d = model.config.hidden_size
    intervenable = pv.IntervenableModel(
        [{"layer": 1, "component": "block_output", "intervention": pv.VanillaIntervention(embed_dim=d)}],
        model,
    )
    base, source = _base(), _base(pad=0)
    locations = {"sources->base": ([[[6], [6]]], [[[6], [6]]])}
    with torch.no_grad():
        own = intervenable(base, [source], unit_locations=locations)[1].logits
        with accelerate("pyvene"):
            with pytest.warns(AccelerationFallback, match="sources"):
                first = intervenable(base, [source], unit_locations=locations)[1].logits
            with warnings.catch_warnings():
                warnings.simplefilter("error", AccelerationFallback)  # the same reason warns once
                second = intervenable(base, [source], unit_locations=locations)[1].logits
    assert torch.equal(own, first) and torch.equal(own, second)


def test_a_padding_location_and_an_unmapped_component_fall_back(tiny):
    model = tiny["gpt2"]
    d = model.config.hidden_size
    add = dict(source_representation=_vector(d, 5), embed_dim=d)
    intervenable = pv.IntervenableModel(
        [{"layer": 0, "component": "mlp_input", "intervention": pv.AdditionIntervention(**add)}], model
    )
    base = _base()
    padded = {"sources->base": (None, [[[0], [0]]])}  # row 1's position 0 is padding
    with torch.no_grad():
        own = intervenable(base, unit_locations={"base": 6})[1].logits
        with (
            accelerate("pyvene"),
            pytest.warns(AccelerationFallback, match="'mlp_input' has no pysteer site"),
        ):
            accelerated = intervenable(base, unit_locations={"base": 6})[1].logits
        intervenable = pv.IntervenableModel(
            [{"layer": 0, "component": "block_output", "intervention": pv.AdditionIntervention(**add)}], model
        )
        own_padded = intervenable(base, unit_locations=padded)[1].logits
        with accelerate("pyvene"), pytest.warns(AccelerationFallback, match="row 1 is a padding token"):
            accelerated_padded = intervenable(base, unit_locations=padded)[1].logits
    assert torch.equal(own, accelerated) and torch.equal(own_padded, accelerated_padded)


def test_a_bare_base_model_falls_back():
    import transformers

    model = transformers.GPT2Model(tiny_model("gpt2", vocab_size=VOCAB).config).eval()
    d = model.config.hidden_size
    add = pv.AdditionIntervention(source_representation=_vector(d, 7), embed_dim=d)
    intervenable = pv.IntervenableModel(
        [{"layer": 0, "component": "block_output", "intervention": add}], model
    )
    base = _base()
    with torch.no_grad():
        own = intervenable(base, unit_locations={"base": 6})[1].last_hidden_state
        with accelerate("pyvene"), pytest.warns(AccelerationFallback, match="GPT2Model has no"):
            accelerated = intervenable(base, unit_locations={"base": 6})[1].last_hidden_state
    assert torch.equal(own, accelerated)


def test_training_forward_runs_pyvene_and_keeps_gradients(tiny):
    reft = _reft_model(tiny["qwen2"])
    base = _base()
    locations = {"sources->base": (None, [[[6], [6]], [[6], [6]]])}
    with accelerate("pyreft"), pytest.warns(AccelerationFallback, match="gradients"):
        loss = reft(base, unit_locations=locations)[1].logits.square().mean()
    loss.backward()
    grads = [p.grad for p in reft.interventions.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_removing_the_acceleration_restores_pyvene_functions():
    forward, generate = pv.IntervenableModel.forward, pv.IntervenableModel.generate
    with accelerate("pyreft") as acc:
        assert pv.IntervenableModel.forward is not forward
        with pytest.raises(ValueError, match="already accelerated"):
            accelerate("pyvene")  # pyreft's model is pyvene's: one acceleration covers both
    assert acc.removed
    assert pv.IntervenableModel.forward is forward and pv.IntervenableModel.generate is generate


def _smollm2_base():
    from pysteer.default_model import load_default_model

    model, tok = load_default_model(progress=False)
    tok.padding_side = "left"
    base = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    return model, base, {"base": base["input_ids"].shape[1] - 1}


@pytest.mark.slow
def test_smollm2_parity_addition():
    model, base, last = _smollm2_base()
    d = model.config.hidden_size
    intervenable = pv.IntervenableModel(
        [
            {
                "layer": 6,
                "component": "block_output",
                "intervention": pv.AdditionIntervention(
                    source_representation=_vector(d, 6) * 2.0, embed_dim=d
                ),
            }
        ],  # fmt: skip
        model,
    )
    how = dict(unit_locations=last, intervene_on_prompt=True)
    own = _generate(intervenable, base, **how)
    accelerated = _accelerated("pyvene", lambda: _generate(intervenable, base, **how))
    _assert_same_generation(own, accelerated)


@pytest.mark.slow
def test_smollm2_parity_loreft_within_fp32_rounding():
    """pyreft computes ``h + (W h + b - h P) Pᵀ``, pysteer's op ``h + (h (W - Pᵀ)ᵀ + b) P``: the same
    edit rounded differently. Through SmolLM2's 30 layers that reaches 2-5e-5 in the logits (measured),
    over the 1e-5 the additions meet; both paths are as far from a float64 run of pyreft."""
    import copy

    model, base, last = _smollm2_base()
    reft = _reft_model(model, seed=7)
    how = dict(unit_locations=last, intervene_on_prompt=True)
    own = _generate(reft, base, **how)
    accelerated = _accelerated("pyreft", lambda: _generate(reft, base, **how))
    assert torch.equal(own[0], accelerated[0]), "greedy tokens differ"
    with torch.no_grad():
        own_logits = reft(base, unit_locations=last)[1].logits.double()
        accelerated_logits = _accelerated(
            "pyreft", lambda: reft(base, unit_locations=last)[1].logits
        ).double()
        reft64 = copy.deepcopy(reft)
        reft64.model.double()
        reft64.interventions.double()
        exact = reft64(base, unit_locations=last)[1].logits
    own_error = float((own_logits - exact).abs().max())
    assert float((accelerated_logits - exact).abs().max()) <= 2 * own_error + 1e-6
    assert float((accelerated_logits - own_logits).abs().max()) <= 0.1 * own_error
