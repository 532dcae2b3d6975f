"""What pysteer promises under bad or unusual input (README "Errors and guarantees").

Bad input raises a clear error before anything is modified; a failed patch leaves the model as it
was; a removed handle is inert; untouched tokens stay bit-exact whatever the dtypes; loaders check
every field and finiteness; the trace writer never deletes a file it did not write; the CLI prints
one line per user error.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pysteer
from pysteer.interventions import HeadBias, HeadScale, VectorAdd, VectorScale
from pysteer.models.tiny import tiny_model
from pysteer.sae import SAE
from pysteer.sae_steering import SAEEdit

D_MODEL = 64  # the tiny models' width
HEAD_DIM = 16


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(model, saved) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


@pytest.fixture
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture
def ids():
    return torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------
# numbers: finite, real, and named in the error
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"alpha: must be finite"):
        VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=bad)
    with pytest.raises(ValueError, match=r"alpha: must be finite"):
        HeadBias(0, head=1, vector=torch.ones(HEAD_DIM), alpha=bad)


@pytest.mark.parametrize("bad", ["2.0", "strong", None, True, [1.0]])
def test_alpha_that_is_not_a_number_is_refused_by_name(bad):
    with pytest.raises(TypeError, match=r"alpha: expected a number"):
        VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=bad)


def test_set_alpha_nan_raises_and_changes_nothing(model, ids):
    with pysteer.steer(
        model, VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=2.0), mode="dynamic"
    ) as h:
        steered = _logits(model, ids)
        with pytest.raises(ValueError, match="alpha"):
            h.set_alpha(float("nan"))
        with pytest.raises(KeyError, match="unknown config"):
            h.set_alpha(3.0, config="nope")
        assert torch.equal(_logits(model, ids), steered)


def test_nan_in_a_vector_is_refused_before_the_model_changes(model, ids):
    base = _logits(model, ids)
    v = torch.ones(D_MODEL)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pysteer.steer(model, VectorAdd("layers.1.resid", v))
    assert _hooks(model) == 0 and torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("positions", [[10**6], [-(10**6)], [[0], [10**6]]])
def test_explicit_positions_outside_the_context_are_refused(model, positions):
    with pytest.raises(ValueError, match="outside the model's"):
        pysteer.steer(model, VectorAdd("layers.1.resid", torch.ones(D_MODEL)), positions=positions)
    assert _hooks(model) == 0
    with pysteer.steer(model, VectorAdd("layers.1.resid", torch.ones(D_MODEL)), mode="dynamic") as h:
        with pytest.raises(ValueError, match="outside the model's"):
            h.set_positions(positions)


# ------------------------------------------------------------------------------------------------
# a property-style sweep over the public API: every bad value raises and leaves the model alone
# ------------------------------------------------------------------------------------------------

_NAN_VEC = torch.full((D_MODEL,), float("nan"))
_NOT_NUMBERS = [float("nan"), float("inf"), "x", [], torch.ones(3), _NAN_VEC]
# For each argument, values that are wrong for it (None is a valid head list and -1 a valid scale).
_BAD = {
    "vector": [*_NOT_NUMBERS, None, -1, 10**9],
    "head": [float("nan"), "x", [], -1, 10**9, [0, 0]],
    "layer": [float("nan"), "x", None, -1, 10**9],
    "scale": [*_NOT_NUMBERS, None],
    "alpha": [*_NOT_NUMBERS, None],
    "positions": [float("nan"), "x", [], -1, [10**9], ["a"], torch.ones(3), [[0], "x"]],
    "mode": ["x", None, -1, "FOLD"],
    "site": ["layers.1.nope", "layers.99.resid", "resid", ""],
}


def _bad_calls(rng: random.Random):
    """(description, bad value, callable) for every argument of the public steering entry point."""
    ones = torch.ones(D_MODEL)
    makers = {
        "HeadBias.vector": ("vector", lambda m, v: pysteer.steer(m, HeadBias(0, head=1, vector=v))),
        "HeadBias.head": (
            "head",
            lambda m, v: pysteer.steer(m, HeadBias(0, head=v, vector=torch.ones(HEAD_DIM))),
        ),
        "HeadBias.layer": (
            "layer",
            lambda m, v: pysteer.steer(m, HeadBias(v, head=0, vector=torch.ones(HEAD_DIM))),
        ),
        "HeadScale.scale": ("scale", lambda m, v: pysteer.steer(m, HeadScale(1, head=0, scale=v))),
        "VectorAdd.vector": ("vector", lambda m, v: pysteer.steer(m, VectorAdd("layers.1.resid", v))),
        "VectorAdd.alpha": (
            "alpha",
            lambda m, v: pysteer.steer(m, VectorAdd("layers.1.resid", ones, alpha=v)),
        ),
        "VectorAdd.site": ("site", lambda m, v: pysteer.steer(m, VectorAdd(v, ones))),
        "VectorScale.scale": ("scale", lambda m, v: pysteer.steer(m, VectorScale("layers.0.mlp.out", v))),
        "positions": (
            "positions",
            lambda m, v: pysteer.steer(m, VectorAdd("layers.1.resid", ones), positions=v),
        ),
        "mode": ("mode", lambda m, v: pysteer.steer(m, VectorAdd("layers.1.resid", ones), mode=v)),
        "second of two": (
            "vector",
            lambda m, v: pysteer.steer(m, [HeadScale(0, head=1, scale=0.5), VectorAdd("layers.1.resid", v)]),
        ),
    }
    for what, (kind, make) in makers.items():
        value = rng.choice(_BAD[kind])
        yield what, value, (lambda m, make=make, value=value: make(m, value))


@pytest.mark.parametrize("seed", range(6))
def test_any_bad_value_raises_a_clear_error_and_leaves_the_model_untouched(seed, ids):
    model = tiny_model("llama", seed=0)
    base, weights = _logits(model, ids), _weights(model)
    rng = random.Random(seed)
    for what, value, call in _bad_calls(rng):
        try:
            call(model)
        except (ValueError, TypeError, KeyError) as err:
            assert str(err), f"{what}={value!r}: an error without a message"
        else:
            pytest.fail(f"{what}={value!r} was accepted")
        assert _hooks(model) == 0, f"{what}: a failed steer left hooks behind"
        assert _same_weights(model, weights), f"{what}: a failed steer changed the weights"
    assert torch.equal(_logits(model, ids), base)


def test_bad_values_on_a_live_handle_raise_and_leave_its_steering_as_it_was(ids):
    model = tiny_model("llama", seed=0)
    h = pysteer.steer(model, {"a": [VectorAdd("layers.1.resid", torch.ones(D_MODEL))]}, mode="dynamic")
    steered = _logits(model, ids)
    rng = random.Random(0)
    calls = [
        ("set_alpha", "alpha", lambda v: h.set_alpha(v)),
        ("update", "vector", lambda v: h.update(VectorAdd("layers.1.resid", v))),
        ("set_positions", "positions", lambda v: h.set_positions(v)),
        ("rows", "mode", lambda v: h.rows([v])),
    ]
    for _ in range(16):
        name, kind, call = rng.choice(calls)
        value = rng.choice(_BAD[kind])
        with pytest.raises((ValueError, TypeError, KeyError)):
            call(value)
        assert torch.equal(_logits(model, ids), steered), f"{name}({value!r}) changed the steering"
    h.remove()


# ------------------------------------------------------------------------------------------------
# handles: a removed handle is inert; a failed patch is rolled back
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fold", "dynamic"])
def test_a_removed_handle_is_inert(model, ids, mode):
    base = _logits(model, ids)
    h = pysteer.steer(
        model, [HeadScale(1, head=2, scale=0.5), HeadBias(0, head=1, vector=torch.ones(HEAD_DIM))], mode=mode
    )
    assert not torch.equal(_logits(model, ids), base)
    h.remove()
    calls = {
        "set_alpha": lambda: h.set_alpha(2.0),
        "update": lambda: h.update([HeadScale(1, head=2, scale=0.1)]),
        "rows": lambda: h.rows(["default"]),
        "set_positions": lambda: h.set_positions("generated"),
        "to_spec": lambda: h.to_spec(),
        "save": lambda: pysteer.save(h, "/tmp/never-written.safetensors"),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="handle was removed"):
            call()
        assert torch.equal(_logits(model, ids), base), f"{name} on a removed handle changed the model"
    with pytest.raises(RuntimeError, match="handle was removed"):
        with h.prompt_length(3):
            pass
    h.remove()  # idempotent
    assert torch.equal(_logits(model, ids), base) and _hooks(model) == 0


def test_a_fold_that_fails_halfway_restores_every_projection(model, ids, monkeypatch):
    from pysteer import folding

    base, weights = _logits(model, ids), _weights(model)
    calls = {"n": 0}
    original = folding.FoldedProjection.recompute

    def fail_on_second(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure while folding")
        original(self)

    monkeypatch.setattr(folding.FoldedProjection, "recompute", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        pysteer.steer(model, [HeadScale(0, head=1, scale=0.5), HeadScale(1, head=2, scale=0.5)], mode="fold")
    monkeypatch.setattr(folding.FoldedProjection, "recompute", original)
    assert _same_weights(model, weights)
    assert torch.equal(_logits(model, ids), base)
    assert not any(p in folding.FOLDED for p in model.modules())


def test_a_dynamic_patch_that_fails_halfway_leaves_no_hook(model, ids, monkeypatch):
    from pysteer import steering

    base = _logits(model, ids)
    calls = {"n": 0}
    original = steering.install_site_hook

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure while hooking")
        return original(*args, **kwargs)

    monkeypatch.setattr(steering, "install_site_hook", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        pysteer.steer(
            model,
            [
                VectorAdd("layers.0.resid", torch.ones(D_MODEL)),
                VectorAdd("layers.1.resid", torch.ones(D_MODEL)),
            ],
            mode="dynamic",
        )
    assert _hooks(model) == 0
    assert torch.equal(_logits(model, ids), base)


def test_a_meta_model_is_refused_before_anything_is_attached():
    with torch.device("meta"):
        model = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="meta device"):
        pysteer.steer(model, HeadScale(0, head=1, scale=0.5))
    assert _hooks(model) == 0


# ------------------------------------------------------------------------------------------------
# PEFT: fold never writes into a LoRA wrapper; dynamic steering runs through it
# ------------------------------------------------------------------------------------------------


def _lora(model, targets):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("arch,proj", [("llama", "o_proj"), ("phi", "dense")])
def test_lora_wrapped_projection_is_never_folded(arch, proj, caplog):
    model = tiny_model(arch, seed=0)
    peft_model = _lora(model, [proj])
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    base, weights = _logits(peft_model, ids), _weights(peft_model)
    steering = [HeadScale(0, head=1, scale=0.5), HeadBias(1, head=0, vector=torch.ones(HEAD_DIM))]
    with pytest.raises(ValueError, match="not a plain Linear"):
        pysteer.steer(peft_model, steering, mode="fold")
    assert _same_weights(peft_model, weights) and _hooks(peft_model) == 0
    with caplog.at_level("WARNING", logger="pysteer"):
        h = pysteer.steer(peft_model, steering)  # auto: falls back to dynamic and says so
    assert h.mode == "dynamic"
    assert any("not folded" in r.message for r in caplog.records)
    steered = _logits(peft_model, ids)
    h.remove()
    assert torch.equal(_logits(peft_model, ids), base)
    # The reference: plain hooks on the wrapped projection's input, computing the same affine rows.
    from pysteer.models.sites import install_site_hook, resolve_site

    def scale_head(x, layer):
        x = x.clone()
        if layer == 0:
            x[..., 1 * HEAD_DIM : 2 * HEAD_DIM] *= 0.5
        else:
            x[..., 0:HEAD_DIM] += 1.0
        return x

    inner = peft_model.get_base_model()
    hooks = [
        install_site_hook(resolve_site(inner, f"layers.{i}.attn.heads"), lambda x, i=i: scale_head(x, i))
        for i in (0, 1)
    ]
    try:
        expected = _logits(peft_model, ids)
    finally:
        for hk in hooks:
            hk.remove()
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, base, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# torch.compile before the steering existed
# ------------------------------------------------------------------------------------------------


def test_a_model_compiled_before_steering_follows_steer_and_remove(ids):
    model = tiny_model("llama", seed=0)
    compiled = torch.compile(model, backend="aot_eager")
    base = _logits(compiled, ids)
    add = VectorAdd("layers.1.resid", 3 * torch.ones(D_MODEL))
    with pysteer.steer(model, add, mode="dynamic"):
        eager = _logits(model, ids)
        assert not torch.allclose(eager, base)
        torch.testing.assert_close(_logits(compiled, ids), eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(compiled, ids), base, rtol=1e-5, atol=1e-5)


def test_generate_of_a_model_compiled_in_place_before_steering_is_steered():
    model = tiny_model("llama", seed=0)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
    add = VectorAdd("layers.1.resid", 4 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2)))
    with pysteer.steer(model, add, mode="dynamic"), torch.no_grad():
        steered_eager = model.generate(ids, **kw)
    assert not torch.equal(steered_eager, plain)
    model.compile(backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), plain)
        with pysteer.steer(model, add, mode="dynamic"):
            assert torch.equal(model.generate(ids, **kw), steered_eager)
        assert torch.equal(model.generate(ids, **kw), plain)


def test_pysteer_generate_steers_a_model_compiled_before():
    def fresh():
        m = tiny_model("llama", seed=0)
        m.generation_config.eos_token_id = None
        m.config.eos_token_id = None
        return m

    add = VectorAdd("layers.1.resid", 4 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2)))
    prompts, kw = [[5, 6, 7], [8, 9]], dict(max_new_tokens=5, progress=False)
    eager = fresh()
    steered = pysteer.generate(eager, prompts, steering=[[add], [add]], compile=False, **kw).tokens
    plain = pysteer.generate(eager, prompts, compile=False, **kw).tokens
    assert steered != plain
    model = fresh()
    model.compile(backend="aot_eager")
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))  # compiled and run before any steering existed
    compiled = dict(compile="default", compile_backend="aot_eager", **kw)
    assert pysteer.generate(model, prompts, steering=[[add], [add]], **compiled).tokens == steered
    assert pysteer.generate(model, prompts, **compiled).tokens == plain
    with pysteer.steer(model, add, mode="dynamic") as h:
        assert pysteer.generate(model, prompts, steering=h, **compiled).tokens == steered


# ------------------------------------------------------------------------------------------------
# pysteer.generate: per-request steering and empty prompts
# ------------------------------------------------------------------------------------------------


def test_flat_list_of_one_intervention_per_prompt_is_refused_as_ambiguous(model):
    a = VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=4.0)
    b = VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=-4.0)
    with pytest.raises(ValueError, match="reads two ways"):
        pysteer.generate(
            model, [[5, 6], [7, 8]], steering=[a, b], max_new_tokens=2, compile=False, progress=False
        )
    per_prompt = pysteer.generate(
        model, [[5, 6], [7, 8]], steering=[[a], [b]], max_new_tokens=2, compile=False, progress=False
    )
    with pysteer.steer(model, a, mode="dynamic"):
        alone = pysteer.generate(model, [[5, 6]], max_new_tokens=2, compile=False, progress=False)
    assert per_prompt.tokens[0] == alone.tokens[0]


def test_rows_repeat_each_entry_for_consecutive_batch_rows(model):
    ids = torch.randint(3, 100, (4, 5), generator=torch.Generator().manual_seed(3))
    cfgs = {
        "a": [VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=3.0)],
        "b": [VectorAdd("layers.1.resid", torch.ones(D_MODEL), alpha=-3.0)],
    }
    with pysteer.steer(model, cfgs, mode="dynamic") as h:
        h.rows(["a", "b"])
        short = _logits(model, ids)
        h.rows(["a", "a", "b", "b"])
        assert torch.equal(short, _logits(model, ids))
        h.rows(["a", "b", "a"])
        with pytest.raises(ValueError, match="3 batch rows but the batch has 4"):
            _logits(model, ids)


@pytest.mark.parametrize("prompts", [[[5, 6], []], [[]], []])
def test_empty_prompts_are_refused(model, prompts):
    with pytest.raises(ValueError, match="empty|no prompts"):
        pysteer.generate(model, prompts, max_new_tokens=2, compile=False, progress=False)


# ------------------------------------------------------------------------------------------------
# dtypes: untouched tokens keep their bits
# ------------------------------------------------------------------------------------------------


def _sae(dtype):
    g = torch.Generator().manual_seed(0)
    m = 96
    return SAE(
        (torch.randn(D_MODEL, m, generator=g) / 8).to(dtype),
        (0.01 * torch.randn(m, generator=g)).to(dtype),
        (torch.randn(m, D_MODEL, generator=g) / 8).to(dtype),
        (0.01 * torch.randn(D_MODEL, generator=g)).to(dtype),
    )


@pytest.mark.parametrize("sae_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_untouched_tokens_are_bit_exact_whatever_the_sae_dtype(model, ids, sae_dtype):
    base = _logits(model, ids)
    sae = _sae(sae_dtype)
    with pysteer.steer(model, SAEEdit("layers.1.resid", sae, {3: ("add", 0.0), 5: ("scale", 1.0)})):
        assert torch.equal(_logits(model, ids), base), "a zero edit must be bit-exact"
    with pysteer.steer(model, SAEEdit("layers.1.resid", sae, {3: ("add", 5.0)}), positions=[4, 5]):
        steered = _logits(model, ids)
    assert torch.equal(steered[:, :4], base[:, :4]), "tokens before the steered positions changed"
    assert not torch.allclose(steered[:, 4:], base[:, 4:])


@pytest.mark.parametrize(
    "model_dtype,vec_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64)]
)
def test_untouched_tokens_are_bit_exact_whatever_the_steering_dtype(model_dtype, vec_dtype, ids):
    model = tiny_model("llama", seed=0, dtype=model_dtype)
    base = _logits(model, ids)
    add = VectorAdd("layers.1.resid", torch.ones(D_MODEL, dtype=vec_dtype), alpha=2.0)
    with pysteer.steer(model, add, positions=[5]):
        steered = _logits(model, ids)
    assert torch.equal(steered[:, :5], base[:, :5])
    assert not torch.equal(steered[:, 5], base[:, 5])


# ------------------------------------------------------------------------------------------------
# loaders: every field and finiteness, named with the file
# ------------------------------------------------------------------------------------------------


def _steering_file(path: Path, doc, tensors=None) -> Path:
    tensors = tensors if tensors is not None else {"default/0/vector": torch.ones(D_MODEL)}
    meta = {"pysteer": doc if isinstance(doc, str) else json.dumps(doc)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _valid_doc():
    return {
        "format": "pysteer.steering/1",
        "configs": {
            "default": [
                {
                    "type": "VectorAdd",
                    "fields": {
                        "site_name": "layers.1.resid",
                        "vector": {"tensor": "default/0/vector"},
                        "alpha": 1.0,
                    },
                }
            ]
        },
        "positions": "all",
        "metadata": {},
    }


def test_a_valid_handmade_steering_file_loads(tmp_path):
    spec = pysteer.load(_steering_file(tmp_path / "ok.safetensors", _valid_doc()))
    assert isinstance(spec.configs["default"][0], VectorAdd)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: {k: v for k, v in d.items() if k != "configs"}, "'configs'"),
        (
            lambda d: {
                **d,
                "configs": {
                    "default": [
                        {"type": "VectorAdd", "fields": {**d["configs"]["default"][0]["fields"], "gain": 2}}
                    ]
                },
            },
            "no field 'gain'",
        ),
        (
            lambda d: {**d, "configs": {"default": [{"type": "Mystery", "fields": {}}]}},
            "unknown intervention type 'Mystery'",
        ),
        (
            lambda d: {
                **d,
                "configs": {
                    "default": [
                        {
                            "type": "VectorAdd",
                            "fields": {**d["configs"]["default"][0]["fields"], "alpha": "big"},
                        }
                    ]
                },
            },
            "alpha",
        ),
        (lambda d: {**d, "configs": {"default": "VectorAdd"}}, "must be a list"),
        (lambda d: {**d, "positions": "sometimes"}, "'positions'"),
        (lambda d: {**d, "metadata": [1]}, "'metadata'"),
        (
            lambda d: {
                **d,
                "configs": {
                    "default": [
                        {
                            "type": "VectorAdd",
                            "fields": {"site_name": "layers.1.resid", "vector": {"tensor": "gone"}},
                        }
                    ]
                },
            },
            "tensor 'gone'",
        ),
    ],
)
def test_malformed_steering_files_name_the_file_and_field(tmp_path, mutate, match):
    path = _steering_file(tmp_path / "bad.safetensors", mutate(_valid_doc()))
    with pytest.raises(ValueError, match=match) as info:
        pysteer.load(path)
    assert str(path) in str(info.value)


def test_non_finite_tensor_in_a_steering_file_is_refused(tmp_path):
    v = torch.ones(D_MODEL)
    v[0] = float("inf")
    path = _steering_file(tmp_path / "inf.safetensors", _valid_doc(), {"default/0/vector": v})
    with pytest.raises(ValueError, match="'default/0/vector' contains NaN or inf"):
        pysteer.load(path)


def test_an_sae_file_holding_nan_is_refused(tmp_path):
    from pysteer.sae import SAEFormatError

    sae = _sae(torch.float32)
    directory = sae.save(tmp_path / "sae")
    weights = directory / "sae_weights.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    tensors["W_dec"][7, 3] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(SAEFormatError, match="W_dec.*NaN"):
        SAE.load(directory)


def test_files_pysteer_writes_are_ordinary_files(tmp_path, model):
    umask = os.umask(0o022)
    try:
        paths = [
            pysteer.save([VectorAdd("layers.1.resid", torch.ones(D_MODEL))], tmp_path / "s.safetensors"),
            _sae(torch.float32).save(tmp_path / "sae") / "sae_weights.safetensors",
        ]
        from pysteer.recipes.locate import LocateResult

        located = LocateResult(
            torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, 16), torch.ones(2, 4), [0], {}
        )
        paths.append(located.save(tmp_path / "located.safetensors"))
    finally:
        os.umask(umask)
    for p in paths:
        assert (p.stat().st_mode & 0o777) == 0o644, f"{p.name}: mode {oct(p.stat().st_mode & 0o777)}"
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


# ------------------------------------------------------------------------------------------------
# the trace writer never deletes or overwrites a file it did not write
# ------------------------------------------------------------------------------------------------


def test_a_directory_of_another_runs_shards_without_manifest_is_refused(tmp_path):
    from pysteer.tracing import TraceConfigError, TraceReader, trace_dataset

    docs = [list(range(3, 3 + n)) for n in (5, 7, 4, 9, 6, 8)]
    first = tmp_path / "first"
    trace_dataset(
        tiny_model("llama"),
        docs,
        ["layers.1.resid"],
        first,
        dtype=torch.float32,
        batch_size=2,
        shard_tokens=8,
    )
    shards = sorted(p for p in first.iterdir() if p.suffix == ".safetensors")
    assert len(shards) >= 3
    other = tmp_path / "other"
    other.mkdir()
    for p in shards:
        (other / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(TraceConfigError, match="no manifest.json"):
        trace_dataset(
            tiny_model("llama"), docs[:2], ["layers.0.resid"], other, dtype=torch.float32, batch_size=2
        )
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    summary = trace_dataset(
        tiny_model("llama"),
        docs[:2],
        ["layers.0.resid"],
        other,
        dtype=torch.float32,
        batch_size=2,
        overwrite=True,
    )
    assert summary.rows == 12
    assert len(TraceReader(other)) == 12


# ------------------------------------------------------------------------------------------------
# CLI: one line per user error, no traceback unless --debug, files checked before the model loads
# ------------------------------------------------------------------------------------------------


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pysteer.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_cli_missing_model_is_one_line(tmp_path):
    _one_line_error(_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi"), "not found")


def test_cli_checks_the_steering_file_before_the_model(tmp_path):
    # The model path does not exist either: the error names the steering file, so it came first.
    proc = _cli(
        "generate",
        "--model",
        str(tmp_path / "nope"),
        "--steer",
        str(tmp_path / "s.safetensors"),
        "--prompt",
        "Hi",
    )
    _one_line_error(proc, "steering file")


def test_cli_empty_prompt_and_bad_alpha_are_one_line(tmp_path):
    _one_line_error(_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", ""), "empty")
    _one_line_error(
        _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi", "--alpha", "nan"), "--alpha"
    )


@pytest.mark.parametrize(
    "content,needle", [(b'{"text": "ok"}\n{broken\n', "not valid JSON"), (b"\xff\xfe\x00bad\n", "not UTF-8")]
)
def test_cli_malformed_trace_data_is_one_line(tmp_path, content, needle):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    _one_line_error(
        _cli(
            "trace",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(data),
            "--sites",
            "layers.0.resid",
            "--out",
            str(tmp_path / "o"),
        ),
        needle,
    )


def test_cli_debug_shows_the_traceback(tmp_path):
    proc = _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda m: "{not json", "not a readable JSON manifest"),
        (
            lambda m: json.dumps({k: v for k, v in json.loads(m).items() if k != "sites"}),
            "missing field 'sites'",
        ),
        (lambda m: json.dumps({**json.loads(m), "world_size": "two"}), "'world_size' must be int"),
    ],
)
def test_a_damaged_trace_manifest_names_the_file_and_field(tmp_path, damage, match):
    from pysteer.tracing import TraceReader, trace_dataset

    out = tmp_path / "t"
    trace_dataset(tiny_model("llama"), [[5, 6, 7]], ["layers.0.resid"], out, dtype=torch.float32)
    manifest = out / "manifest.json"
    manifest.write_text(damage(manifest.read_text()))
    with pytest.raises(ValueError, match=match) as info:
        TraceReader(out)
    assert "manifest.json" in str(info.value)


def test_a_rank_manifest_naming_a_file_outside_the_trace_is_refused(tmp_path):
    from pysteer.tracing import TraceReader, trace_dataset

    out = tmp_path / "t"
    trace_dataset(tiny_model("llama"), [[5, 6, 7]], ["layers.0.resid"], out, dtype=torch.float32)
    from pysteer.tracing.format import rank_manifest_name

    rank = out / rank_manifest_name(0)
    state = json.loads(rank.read_text())
    state["shards"][0]["file"] = "../../elsewhere.safetensors"
    rank.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="not a plain file name"):
        TraceReader(out)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens="5"), "max_new_tokens"),
        (dict(do_sample=True, temperature=float("nan")), "temperature: must be finite"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, top_p=2.0), "top_p"),
        (dict(do_sample=True, top_k=-3), "top_k"),
    ],
)
def test_generation_arguments_are_checked_before_anything_runs(model, kw, match):
    with pytest.raises(ValueError, match=match):
        pysteer.generate(model, [[5, 6]], compile=False, progress=False, **kw)
