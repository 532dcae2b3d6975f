"""ITI head directions in honest_llama's forms, run by pysteer, equal honest_llama's own hook math.

The reference is honest_llama's code (likenneth/honest_llama, commit 2c6b217) copied into this file:
``utils.get_interventions_dict`` builds the interventions dict, ``legacy/llama_validate_2fold.py:
lt_modulated_vector_add`` applies it on ``head_out`` (the identity in front of ``o_proj``, so here a
forward pre-hook on the output projection), ``interveners.ITI_Intervener`` is the pyvene version, and
``validation/edit_weight.py`` (before 2024-08-24) bakes ``F.linear(displacement, W_o)`` into
``o_proj.bias``. The only changes: ``einops.rearrange`` is written as the ``reshape`` it is, and device
moves (``.to(device.index)``, ``.cuda().half()``) are left out so the reference runs in fp32 on the CPU.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pysteer
from pysteer.compat import iti
from pysteer.models import geometry, get_spec
from pysteer.models.specs import get_submodule
from pysteer.models.tiny import tiny_model

NEW = 6
ALPHA = 15.0
TOP_HEADS = [(0, 1), (1, 3), (1, 0), (0, 2)]
ARCHS = ["llama", "qwen2", "gpt2"]


# -- honest_llama's code (reference) ----------------------------------------------------------------


def layer_head_to_flattened_idx(layer, head, num_heads):
    return layer * num_heads + head


def get_interventions_dict(top_heads, probes, tuning_activations, num_heads, use_center_of_mass, use_random_dir, com_directions):  # fmt: skip
    """honest_llama ``utils.get_interventions_dict`` (center-of-mass branch exercised here)."""
    interventions = {}
    for layer, head in top_heads:  # noqa: B007 - as honest_llama wrote it
        interventions[f"model.layers.{layer}.self_attn.head_out"] = []

    for layer, head in top_heads:
        if use_center_of_mass:
            direction = com_directions[layer_head_to_flattened_idx(layer, head, num_heads)]
        elif use_random_dir:
            direction = np.random.normal(size=(128,))
        else:
            direction = probes[layer_head_to_flattened_idx(layer, head, num_heads)].coef_
        direction = direction / np.linalg.norm(direction)
        activations = tuning_activations[:, layer, head, :]  # batch x 128
        proj_vals = activations @ direction.T
        proj_val_std = np.std(proj_vals)
        interventions[f"model.layers.{layer}.self_attn.head_out"].append(
            (head, direction.squeeze(), proj_val_std)
        )
    for layer, head in top_heads:  # noqa: B007 - as honest_llama wrote it
        interventions[f"model.layers.{layer}.self_attn.head_out"] = sorted(interventions[f"model.layers.{layer}.self_attn.head_out"], key=lambda x: x[0])  # fmt: skip
    return interventions


def make_lt_modulated_vector_add(interventions, num_heads, alpha):
    """honest_llama ``legacy/llama_validate_2fold.py: lt_modulated_vector_add`` (a closure there too)."""

    def lt_modulated_vector_add(head_output, layer_name, start_edit_location="lt"):
        b, s, _ = head_output.shape
        head_output = head_output.reshape(b, s, num_heads, -1)  # rearrange 'b s (h d) -> b s h d'
        for head, direction, proj_val_std in interventions[layer_name]:
            direction_to_add = torch.tensor(direction)
            if start_edit_location == "lt":
                head_output[:, -1, head, :] += alpha * proj_val_std * direction_to_add
            else:
                head_output[:, start_edit_location:, head, :] += alpha * proj_val_std * direction_to_add
        head_output = head_output.reshape(b, s, -1)  # rearrange 'b s h d -> b s (h d)'
        return head_output

    return lt_modulated_vector_add


class ITI_Intervener:
    """honest_llama ``interveners.ITI_Intervener`` (pyvene version), without ``.cuda().half()``."""

    def __init__(self, direction, multiplier):
        if not isinstance(direction, torch.Tensor):
            direction = torch.tensor(direction)
        self.direction = direction
        self.multiplier = multiplier

    def __call__(self, b, s):
        action = self.direction.to(b.device)
        b[0, -1] = b[0, -1] + action * self.multiplier
        return b


def pyvene_displacements(interventions, num_heads, head_dim):
    """The per-layer ``direction`` of ``validation/validate_2fold.py``: each head's slice ``dir * std``."""
    out = {}
    for name, entries in interventions.items():
        layer = int(name.split(".")[2])
        direction = torch.zeros(head_dim * num_heads)
        for head, head_dir, std in entries:
            direction[head * head_dim : (head + 1) * head_dim] = (
                torch.tensor(head_dir, dtype=torch.float32) * std
            )
        out[f"model.layers[{layer}].self_attn.o_proj.input"] = direction
    return out


def baked_biases(model, interventions, num_heads, alpha):
    """``validation/edit_weight.py`` (2023 form): ``o_proj.bias = F.linear(displacement, W_o)``."""
    spec = get_spec(model)
    layers = get_submodule(model, spec.layers)
    out = {}
    for head_out_name, list_int_vec in interventions.items():
        layer_no = int(head_out_name.split(".")[2])
        proj = get_submodule(layers[layer_no], spec.attn_out_proj)
        displacement = np.zeros((int(num_heads), proj_in_features(proj) // num_heads))
        for head_no, head_vec, std in list_int_vec:
            displacement[head_no] = alpha * std * head_vec
        displacement = torch.tensor(displacement.reshape(-1), dtype=torch.float32)  # 'h d -> (h d)'
        if spec.proj_layout == "linear":
            out[layer_no] = F.linear(displacement, proj.weight)
        else:  # GPT-2's Conv1D keeps W as [in, out] and already has a bias
            out[layer_no] = proj.bias.detach() + displacement @ proj.weight
    return out


def proj_in_features(proj):
    return proj.weight.shape[1] if isinstance(proj, torch.nn.Linear) else proj.weight.shape[0]


# -- helpers --------------------------------------------------------------------------------------------


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


def honest_interventions(model, seed=0, top_heads=TOP_HEADS, scale=1.0):
    """An interventions dict as honest_llama builds it: center-of-mass directions and the std of
    tuning activations ``[N, L, H, D]`` (random here) projected on them."""
    geo = geometry(model)
    rng = np.random.default_rng(seed)
    com = rng.normal(size=(geo.n_layers * geo.n_heads, geo.head_dim))
    tuning = scale * rng.normal(size=(40, geo.n_layers, geo.n_heads, geo.head_dim))
    heads = [(np.int64(layer), np.int64(head)) for layer, head in top_heads]  # as flattened_idx_to_layer_head
    return get_interventions_dict(heads, None, tuning, geo.n_heads, True, False, com)


def _projections(model):
    spec = get_spec(model)
    return [get_submodule(layer, spec.attn_out_proj) for layer in get_submodule(model, spec.layers)]


def reference_hooks(model, interventions, alpha, start_edit_location="lt"):
    """honest_llama's hook on every listed layer's ``head_out`` (= the projection's input)."""
    fn = make_lt_modulated_vector_add(interventions, geometry(model).n_heads, alpha)
    projections = _projections(model)
    handles = []
    for name in interventions:
        layer = int(name.split(".")[2])

        def pre_hook(module, args, name=name):
            return (fn(args[0], name, start_edit_location=start_edit_location), *args[1:])

        handles.append(projections[layer].register_forward_pre_hook(pre_hook))
    return handles


def pyvene_hooks(model, displacements, alpha):
    projections = _projections(model)
    handles = []
    for name, direction in displacements.items():
        intervener = ITI_Intervener(direction, alpha)
        layer = int(name.split("[")[1].split("]")[0])
        handles.append(
            projections[layer].register_forward_pre_hook(lambda m, a, f=intervener: (f(a[0], None), *a[1:]))
        )
    return handles


def greedy(model, ids, n=NEW):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits)


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _remove(handles):
    for h in handles:
        h.remove()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return _no_eos(tiny_model(request.param))


def _prompt(seed=0, n=7):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _assert_same_run(model, ids, reference, steered):
    (ref_tokens, ref_logits), (tokens, logits) = reference, steered
    assert tokens == ref_tokens
    diff = float((logits - ref_logits).abs().max())
    assert diff <= 1e-5, diff
    plain_tokens, plain_logits = greedy(model, ids)
    assert float((plain_logits - ref_logits).abs().max()) > 1e-2, "the steering must move the logits"
    return diff


# -- parity --------------------------------------------------------------------------------------------


def test_lt_generate_equals_honest_llama_hooks(model):
    interventions = honest_interventions(model)
    ids = _prompt()
    handles = reference_hooks(model, interventions, ALPHA)
    try:
        reference = greedy(model, ids)
    finally:
        _remove(handles)
    with pysteer.steer(model, iti.to_spec(interventions, alpha=ALPHA)) as h:
        assert h.positions == "last_prompt+generated"
        steered = greedy(model, ids)
    _assert_same_run(model, ids, reference, steered)


def test_every_position_forward_equals_honest_llama_hooks(model):
    interventions = honest_interventions(model, seed=1)
    ids = _prompt(1, n=9)
    handles = reference_hooks(model, interventions, ALPHA, start_edit_location=0)
    try:
        reference = full_logits(model, ids)
    finally:
        _remove(handles)
    with pysteer.steer(model, iti.to_spec(interventions, alpha=ALPHA, start_edit_location=0), mode="dynamic"):
        steered = full_logits(model, ids)
    assert float((steered - reference).abs().max()) <= 1e-5
    assert float((full_logits(model, ids) - reference).abs().max()) > 1e-2


def test_fold_equals_honest_llama_baked_bias(model):
    interventions = honest_interventions(model, seed=2)
    ids = _prompt(2)
    spec = get_spec(model)
    projections = _projections(model)
    originals = {i: (p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone()) for i, p in enumerate(projections)}  # fmt: skip
    biases = baked_biases(model, interventions, geometry(model).n_heads, ALPHA)
    for layer, bias in biases.items():  # what edit_weight.py saves, loaded back
        projections[layer].bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        reference = greedy(model, ids)
    finally:
        for i, p in enumerate(projections):
            p.bias = (
                None if originals[i][1] is None else torch.nn.Parameter(originals[i][1], requires_grad=False)
            )
    with pysteer.steer(
        model, iti.to_spec(interventions, alpha=ALPHA, start_edit_location=0), mode="fold"
    ) as h:
        assert h.mode == "fold"
        for layer, bias in biases.items():
            assert torch.allclose(projections[layer].bias, bias, atol=1e-6, rtol=0), spec.attn_out_proj
        steered = greedy(model, ids)
    _assert_same_run(model, ids, reference, steered)
    for i, p in enumerate(projections):  # removed: the original weights, bit for bit
        assert torch.equal(p.weight, originals[i][0])
        assert (p.bias is None) if originals[i][1] is None else torch.equal(p.bias, originals[i][1])


def test_pyvene_displacement_equals_iti_intervener(model):
    geo = geometry(model)
    displacements = pyvene_displacements(honest_interventions(model, seed=3), geo.n_heads, geo.head_dim)
    ids = _prompt(3)
    handles = pyvene_hooks(model, displacements, ALPHA)
    try:
        reference = greedy(model, ids)
    finally:
        _remove(handles)
    with pysteer.steer(model, iti.to_spec(displacements, alpha=ALPHA)):
        steered = greedy(model, ids)
    _assert_same_run(model, ids, reference, steered)


def test_saved_dict_loads_without_unpickling_code(model, tmp_path):
    interventions = honest_interventions(model, seed=4)
    path = tmp_path / "iti.pt"
    torch.save(interventions, path)  # numpy arrays, numpy scalars and ints, as the dict holds them
    ids = _prompt(4)
    with pysteer.steer(model, iti.to_spec(interventions, alpha=ALPHA)):
        in_memory = greedy(model, ids)
    with iti.steer(model, path, alpha=ALPHA):
        from_file = greedy(model, ids)
    assert from_file[0] == in_memory[0]
    assert torch.equal(from_file[1], in_memory[1])


def test_fast_path_tokens_equal_honest_llama_hooks():
    model = _no_eos(tiny_model("llama"))
    interventions = honest_interventions(model, seed=5)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    handles = reference_hooks(model, interventions, ALPHA)
    try:
        expected = [greedy(model, torch.tensor([p]))[0] for p in prompts]  # batch 1: no padding for "lt"
    finally:
        _remove(handles)
    with iti.steer(model, interventions, alpha=ALPHA, mode="dynamic") as h:
        got = pysteer.generate(model, prompts, steering=h, max_new_tokens=NEW, compile=False, progress=False)
    assert got.tokens == expected


def _reference_run(model, ids, interventions, alpha):
    handles = reference_hooks(model, interventions, alpha)
    try:
        return greedy(model, ids)
    finally:
        _remove(handles)


@pytest.mark.slow
def test_smollm2_lt_generate_equals_honest_llama_hooks():
    """honest_llama adds the float64 ``alpha * std * direction`` into the float32 activation (one
    rounding); pysteer's table holds it in float32 (two roundings). Over SmolLM2's 30 layers that
    one-ulp difference moves the logits by 2.5e-5 (measured), as much as honest_llama's own code moves
    when its directions are float32 instead of float64. So: bit-identical to their hook given the
    same float32 vector, and within twice their own float32-vs-float64 spread of the float64 run."""
    from pysteer.default_model import load_model

    model, tok = load_model("default")
    interventions = honest_interventions(
        model, seed=6, top_heads=[(12, 3), (12, 7), (18, 0), (25, 8)], scale=0.5
    )
    ids = tok("What happens if you crack your knuckles a lot?", return_tensors="pt").input_ids
    reference = _reference_run(model, ids, interventions, ALPHA)
    as_float32 = {
        name: [(head, direction.astype(np.float32), np.float32(std)) for head, direction, std in entries]
        for name, entries in interventions.items()
    }
    spread = float((_reference_run(model, ids, as_float32, ALPHA)[1] - reference[1]).abs().max())
    added_in_float32 = {
        name: [(head, (ALPHA * std * direction).astype(np.float32), 1.0) for head, direction, std in entries]
        for name, entries in interventions.items()
    }
    same_vector = _reference_run(model, ids, added_in_float32, 1.0)
    with iti.steer(model, interventions, alpha=ALPHA):
        tokens, logits = greedy(model, ids)
    assert tokens == reference[0] == same_vector[0]
    assert torch.equal(logits, same_vector[1])
    assert float((logits - reference[1]).abs().max()) <= 2 * max(spread, 1e-6)
    plain = greedy(model, ids)
    assert float((plain[1] - reference[1]).abs().max()) > 1.0, "the steering must move the logits"


# -- bad input -------------------------------------------------------------------------------------------


def _untouched(model, before):
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooks, "the model was patched"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(before)


def _bad_inputs(model):
    geo = geometry(model)
    good = honest_interventions(model)
    key = next(iter(good))
    wrong_width = {key: [(0, np.ones(geo.head_dim + 1), 1.0)]}
    far_head = {key: [(geo.n_heads, np.ones(geo.head_dim), 1.0)]}
    far_layer = {f"model.layers.{geo.n_layers}.self_attn.head_out": [(0, np.ones(geo.head_dim), 1.0)]}
    return [
        (wrong_width, "d_head"),
        (far_head, f"head {geo.n_heads} out of range"),
        (far_layer, f"layer {geo.n_layers} out of range"),
        ({"model.layers.0.mlp": [(0, np.ones(geo.head_dim), 1.0)]}, "unknown layer key format"),
        ({key: [(0, np.ones(geo.head_dim), 0.0, 1.0)]}, "(head, direction, proj_val_std)"),
        ({key: [(0, np.ones(geo.head_dim), float("nan"))]}, "proj_val_std"),
        ({key: [(0, np.ones(geo.head_dim), 1.0), (0, np.ones(geo.head_dim), 2.0)]}, "head listed twice"),
        ({key: []}, "got an empty list"),
        (
            {"model.layers[0].self_attn.o_proj.input": torch.ones(geo.n_heads * geo.head_dim + 2)},
            "displacement",
        ),
    ]


def test_bad_input_is_named_before_the_model_is_touched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in _bad_inputs(model):
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
            iti.steer(model, bad, alpha=ALPHA)
        _untouched(model, before)


def test_start_edit_location_pysteer_cannot_run_exactly_is_refused(model):
    with pytest.raises(ValueError, match="start_edit_location 5"):
        iti.to_spec(honest_interventions(model), start_edit_location=5)


def test_fold_of_the_lt_rule_is_refused_naming_the_baked_form(model):
    with pytest.raises(ValueError, match="start_edit_location=0"):
        iti.steer(model, honest_interventions(model), mode="fold")
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_file_that_needs_code_to_unpickle_is_refused(tmp_path):
    path = tmp_path / "probes.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model.layers.0.self_attn.head_out": [(0, _Opaque(), 1.0)]}, f, protocol=2)
    with pytest.raises(ValueError, match="without unpickling code"):
        iti.read(path)


class _Opaque:
    pass
