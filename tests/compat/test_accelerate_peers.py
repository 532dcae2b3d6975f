"""``pysteer.compat.accelerate`` runs repeng's and steering-vectors' own calls with their results.

Runs in the peer virtualenv that has the libraries (repeng 0.4.0, steering-vectors 0.12.2,
transformers 4.57.6): ``bench/peers/run_compat_suites.sh``. Each test runs the same user code
twice, on the library's own path and accelerated, on tiny random llama / gpt2 / qwen2 models built
from configs and saved with the embedded model's tokenizer (offline), and on SmolLM2.
"""

from __future__ import annotations

import warnings

import pytest
import torch

repeng = pytest.importorskip(
    "repeng", reason="repeng is installed only in the peer virtualenv (bench/peers/run_compat_suites.sh)"
)
steering_vectors = pytest.importorskip(
    "steering_vectors", reason="steering-vectors is installed only in the peer virtualenv"
)

from repeng.control import ControlModule, model_layer_list  # noqa: E402
from steering_vectors import SteeringVector, ablation_operator  # noqa: E402

import pysteer  # noqa: E402
from pysteer.compat import AccelerationFallback, accelerate  # noqa: E402

ARCHS = ("llama", "gpt2", "qwen2")
LAYER_TYPES = ("decoder_block", "mlp", "self_attn")
TOL = 1e-5  # fp32; measured 0.0 on every case (the same adds in the same order)
NEW = 6
PROMPTS = ("The cat sat on the", "A")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, real_tokenizer):
    """Per architecture: a tiny random model saved with the real tokenizer, loaded back from disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pysteer.models.tiny import tiny_model

    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        torch.manual_seed(0)
        tiny_model(arch, vocab_size=len(real_tokenizer)).save_pretrained(path)
        real_tokenizer.save_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        out[arch] = (model, tok)
    return out


def _direction(d: int, seed: int, norm: float = 4.0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@torch.no_grad()
def _outputs(model, tok):
    """Batch-1 forward logits, and left-padded batch-2 greedy tokens with each step's logits."""
    one = tok(PROMPTS[0], return_tensors="pt")
    logits = model(**one).logits
    batch = tok(list(PROMPTS), return_tensors="pt", padding=True)
    gen = model.generate(
        **batch,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return logits, gen.sequences, torch.stack(gen.logits)


def _assert_same(lib, acc):
    assert torch.equal(lib[1], acc[1]), "greedy tokens differ"
    assert float((lib[0] - acc[0]).abs().max()) <= TOL
    assert float((lib[2] - acc[2]).abs().max()) <= TOL


def _wrap_attention_type(control_model):
    """repeng 0.4.0's ``ControlModule`` lacks the ``attention_type`` transformers 4.57's Qwen2 reads
    from each layer, so the library alone fails there; the reference run copies it over."""
    for layer in model_layer_list(control_model):
        if isinstance(layer, ControlModule) and hasattr(layer.block, "attention_type"):
            layer.attention_type = layer.block.attention_type


def _control_vector(model, layers, seed: int = 1):
    d = model.config.hidden_size
    return repeng.ControlVector(model.config.model_type, {k: _direction(d, seed + k).numpy() for k in layers})


@pytest.mark.parametrize("arch", ARCHS)
def test_repeng_set_control_matches_library(tiny, arch):
    model, tok = tiny[arch]
    control_model = repeng.ControlModel(model, [0, 1])
    _wrap_attention_type(control_model)
    vector = _control_vector(model, [0, 1])
    try:
        control_model.set_control(vector, 1.5)
        lib = _outputs(control_model, tok)
        control_model.reset()
        with accelerate("repeng"):
            control_model.set_control(vector, 1.5)
            assert not any(isinstance(m, ControlModule) for m in model_layer_list(control_model))
            assert pysteer.runtime(model).active  # steered by pysteer's hooks, not the wrappers
            acc = _outputs(control_model, tok)
            control_model.reset()
    finally:
        control_model.unwrap()
    _assert_same(lib, acc)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_steering_vectors_apply_matches_library(tiny, arch, layer_type):
    model, tok = tiny[arch]
    d = model.config.hidden_size
    vector = SteeringVector({0: _direction(d, 3), -1: _direction(d, 4)}, layer_type=layer_type)
    with vector.apply(model, multiplier=2.0):
        lib = _outputs(model, tok)
    with accelerate(steering_vectors):
        with vector.apply(model, multiplier=2.0):
            assert pysteer.runtime(model).active
            acc = _outputs(model, tok)
    _assert_same(lib, acc)


def test_steering_vectors_patch_and_remove_matches_library(tiny):
    model, tok = tiny["llama"]
    vector = SteeringVector({1: _direction(model.config.hidden_size, 5)})
    handle = vector.patch_activations(model, multiplier=-3.0)
    lib = _outputs(model, tok)
    handle.remove()
    plain = _outputs(model, tok)
    with accelerate("steering-vectors"):
        handle = vector.patch_activations(model, multiplier=-3.0)
        assert isinstance(handle, steering_vectors.SteeringPatchHandle)
        acc = _outputs(model, tok)
        handle.remove()
        parked = _outputs(model, tok)  # the hooks stay at the identity, ready for the next call
    _assert_same(lib, acc)
    assert all(torch.equal(a, b) for a, b in zip(plain, parked))


def _compile_counter(model):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(model, backend=counter, dynamic=False), counter


@torch.no_grad()
def test_repeng_strength_change_is_an_in_place_write_no_recompile(tiny):
    model, tok = tiny["llama"]
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    control_model = repeng.ControlModel(model, [0, 1])
    vector = _control_vector(model, [0, 1])
    try:
        with accelerate("repeng") as acc:
            control_model.set_control(vector, 1.0)
            handle = acc.accelerator.live[control_model].handle
            tables = {s: (M.data_ptr(), A.data_ptr()) for s, (M, A) in handle.tables.items()}
            compiled, counter = _compile_counter(model)
            compiled(input_ids=ids)  # pysteer's prompt-length state is set on the first call
            first = compiled(input_ids=ids).logits
            frames = counter.frame_count
            control_model.set_control(vector, -4.0)
            second = compiled(input_ids=ids).logits
            assert counter.frame_count == frames  # no recompile after the strength change
            assert acc.accelerator.live[control_model].handle is handle
            assert tables == {s: (M.data_ptr(), A.data_ptr()) for s, (M, A) in handle.tables.items()}
            eager = model(input_ids=ids).logits
            control_model.reset()
    finally:
        control_model.unwrap()
        torch._dynamo.reset()
    assert not torch.allclose(first, second)
    assert float((second - eager).abs().max()) <= 1e-4  # inductor-free backend: the eager graph


@torch.no_grad()
def test_steering_vectors_new_multiplier_reuses_the_parked_hooks_no_recompile(tiny):
    model, tok = tiny["llama"]
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    vector = SteeringVector({0: _direction(model.config.hidden_size, 6)})
    try:
        with accelerate("steering_vectors") as acc:
            compiled, counter = _compile_counter(model)
            with vector.apply(model, multiplier=1.0):
                compiled(input_ids=ids)  # pysteer's prompt-length state is set on the first call
                first = compiled(input_ids=ids).logits
            frames = counter.frame_count
            handles = list(acc.accelerator.pool._handles)
            with vector.apply(model, multiplier=5.0):
                second = compiled(input_ids=ids).logits
            assert counter.frame_count == frames
            assert acc.accelerator.pool._handles == handles  # the same pysteer handle, rewritten
        with vector.apply(model, multiplier=5.0):
            library = model(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(first, second)
    assert float((second - library).abs().max()) <= 1e-4


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AccelerationFallback)]


def test_uncovered_steering_vectors_calls_run_the_library_path_with_one_warning(tiny):
    model, tok = tiny["gpt2"]
    d = model.config.hidden_size
    vector = SteeringVector({1: _direction(d, 7)})
    layernorm_vector = SteeringVector({1: _direction(d, 9)}, layer_type="input_layernorm")
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    # (apply() in 0.12.2 always passes min_token_index=0, so token_indices goes through patch_activations)
    calls = [
        (vector, dict(operator=ablation_operator())),
        (vector, dict(token_indices=[0, 2])),
        (vector, dict(min_token_index=2)),
        (layernorm_vector, {}),
    ]

    @torch.no_grad()
    def run(sv, kwargs):
        handle = sv.patch_activations(model, multiplier=2.0, **kwargs)
        try:
            return model(input_ids=ids).logits
        finally:
            handle.remove()

    expected = [run(sv, kwargs) for sv, kwargs in calls]
    with accelerate("steering_vectors"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for (sv, kwargs), want in zip(calls * 2, expected * 2):
            assert torch.equal(run(sv, kwargs), want)
    messages = _fallback_warnings(record)
    assert len(messages) == 3  # once per reason (operator; token selection; layer type), each call ran twice
    assert "ablation_operator" in messages[0] and "token_indices" in messages[1]
    assert "layer_type 'input_layernorm' has no pysteer site" in messages[2]


def test_uncovered_repeng_normalize_runs_the_library_path(tiny):
    model, tok = tiny["llama"]
    control_model = repeng.ControlModel(model, [1])
    vector = _control_vector(model, [1])
    try:
        control_model.set_control(vector, 2.0, normalize=True)
        lib = _outputs(control_model, tok)
        with accelerate("repeng"), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            control_model.set_control(vector, 2.0)
            control_model.set_control(vector, 2.0, normalize=True)
            acc = _outputs(control_model, tok)
            control_model.set_control(vector, 2.0)  # back on pysteer's path
            assert pysteer.runtime(model).active
            assert not any(isinstance(m, ControlModule) for m in model_layer_list(control_model))
    finally:
        control_model.unwrap()
    assert any("normalize=True" in m for m in _fallback_warnings(record))
    assert all(torch.equal(a, b) for a, b in zip(lib, acc))


def test_ending_acceleration_hands_live_steering_back_to_the_library(tiny):
    model, tok = tiny["qwen2"]
    vector = SteeringVector({0: _direction(model.config.hidden_size, 8)}, layer_type="mlp")
    with vector.apply(model, multiplier=3.0):
        lib = _outputs(model, tok)
    plain = _outputs(model, tok)
    acc = accelerate("steering_vectors")
    with vector.apply(model, multiplier=3.0):
        acc.remove()  # the library's own hooks take over inside the block
        assert not pysteer.runtime(model).active
        after = _outputs(model, tok)
    _assert_same(lib, after)
    assert all(torch.equal(a, b) for a, b in zip(plain, _outputs(model, tok)))
    assert steering_vectors.SteeringVector.patch_activations.__module__ == "steering_vectors.steering_vector"


@pytest.mark.slow
def test_smollm2_parity_both_libraries():
    from pysteer.default_model import load_default_model

    model, tok = load_default_model(progress=False)
    tok.padding_side = "left"
    d = model.config.hidden_size
    control_model = repeng.ControlModel(model, [6, 12])
    vector = _control_vector(model, [6, 12], seed=11)
    try:
        control_model.set_control(vector, 1.5)
        lib = _outputs(control_model, tok)
        control_model.reset()
        with accelerate("repeng"):
            control_model.set_control(vector, 1.5)
            acc = _outputs(control_model, tok)
            control_model.reset()
    finally:
        control_model.unwrap()
    _assert_same(lib, acc)
    sv = SteeringVector({4: _direction(d, 12, 12.0), 9: _direction(d, 13, 12.0)}, layer_type="decoder_block")
    with sv.apply(model, multiplier=2.0):
        lib = _outputs(model, tok)
    with accelerate("steering_vectors"), sv.apply(model, multiplier=2.0):
        acc = _outputs(model, tok)
    _assert_same(lib, acc)


def test_paused_acceleration_runs_the_library_path_and_keeps_pysteer_steering(tiny):
    from torch.utils.hooks import RemovableHandle

    llama, gpt2 = tiny["llama"][0], tiny["gpt2"][0]
    vector = SteeringVector({0: _direction(64, 10)})
    with accelerate("steering_vectors") as acc:
        accelerated = vector.patch_activations(llama)
        with acc.paused():
            own = vector.patch_activations(gpt2)
        assert all(isinstance(h, RemovableHandle) for h in own.model_hooks)  # the library's own hooks
        assert pysteer.runtime(llama).active and not pysteer.runtime(gpt2).active
        own.remove()
        accelerated.remove()
