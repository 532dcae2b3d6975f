"""repeng and steering-vectors objects converted by pysteer.compat compute what the libraries computed.

The libraries' own outputs on the embedded SmolLM2 were recorded by ``bench/peers/compat_parity.py``
(repeng 0.4.0, steering-vectors 0.12.2, transformers 4.57.6, in their own virtualenv) into
``tests/data/compat/``; here the same steering runs through pysteer.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import pysteer
from pysteer.compat import llamacpp, repeng, steering_vectors
from pysteer.default_model import load_default_model

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "compat"


@pytest.fixture(scope="module")
def recorded():
    with safe_open(str(DATA / "peers.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["peers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


@pytest.fixture(scope="module")
def smollm2():
    return load_default_model(progress=False)


def _run(model, ids, vocab: int):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1, :vocab]
        out = model.generate(
            input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
    return logits, out[0, ids.shape[1] :]


def _check(model, ids, spec_or_ivs, tensors, name, vocab):
    with pysteer.steer(model, spec_or_ivs):
        logits, tokens = _run(model, ids, vocab)
    diff = float((logits - tensors[f"{name}.logits"]).abs().max())
    assert diff < 2e-4, (
        name,
        diff,
    )  # measured <= 4.8e-5 (two transformers releases; the steering moves them 5-8)
    assert tokens.tolist() == tensors[f"{name}.tokens"].tolist(), name
    return diff


def test_unsteered_reference_matches(recorded, smollm2):
    tensors, meta = recorded
    model, _ = smollm2
    ids = tensors["prompt_ids"][None]
    logits, tokens = _run(model, ids, int(meta["vocab_entries"]))
    assert float((logits - tensors["unsteered.logits"]).abs().max()) < 2e-4
    assert tokens.tolist() == tensors["unsteered.tokens"].tolist()


def test_repeng_control_vector_and_its_gguf_export(recorded, smollm2):
    tensors, meta = recorded
    model, _ = smollm2
    ids, vocab = tensors["prompt_ids"][None], int(meta["vocab_entries"])
    directions = {k: tensors[f"repeng.direction.{k}"].numpy() for k in (6, 12)}
    cv = SimpleNamespace(
        model_type="llama", directions=directions
    )  # repeng's ControlVector, by its attributes
    _check(model, ids, repeng.to_interventions(cv, coeff=1.5), tensors, "repeng", vocab)
    # repeng's own export_gguf file, read as llama.cpp reads it, steers the same
    from_file, meta_file = llamacpp.read_control_vector(DATA / "repeng.gguf")
    assert sorted(from_file) == [6, 12] and meta_file["controlvector.model_hint"] == "llama"
    _check(model, ids, llamacpp.to_interventions(from_file, scale=1.5), tensors, "repeng", vocab)


@pytest.mark.parametrize(
    ("name", "layer", "layer_type"), [("sv_block", 4, "decoder_block"), ("sv_mlp", 9, "mlp")]
)
def test_steering_vectors_apply(recorded, smollm2, name, layer, layer_type):
    tensors, meta = recorded
    model, _ = smollm2
    sv = SimpleNamespace(layer_activations={layer: tensors[f"{name}.activation"]}, layer_type=layer_type)
    spec = steering_vectors.to_spec(sv, multiplier=2.0)
    _check(model, tensors["prompt_ids"][None], spec, tensors, name, int(meta["vocab_entries"]))


def test_conversions_refuse_what_they_cannot_express():
    with pytest.raises(TypeError, match="ControlVector"):
        repeng.to_interventions(object())
    with pytest.raises(ValueError, match="layer_type"):
        steering_vectors.to_spec(
            SimpleNamespace(layer_activations={1: torch.zeros(4)}, layer_type="input_layernorm")
        )
