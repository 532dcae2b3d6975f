"""The intervention protocol: a new kind is one class; trainable handles; the scaling kinds and
SAE edits save, load, steer per request and run in pysteer.generate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import pysteer
from pysteer.interventions import KINDS, VectorAdd, intervention_kind
from pysteer.models.sites import parse_site
from pysteer.models.tiny import tiny_model
from pysteer.positions import TokenContext
from pysteer.sae import SAE
from pysteer.sae_steering import SAEEdit
from pysteer.scalars import ActivScalar, DynScalar, SteerVec

D = 64


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _resid_in(model, layer: int, ids):
    """The input of ``layer`` (``resid_pre``) of an unsteered forward, by a plain hook."""
    got = {}
    h = model.model.layers[layer].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach()))
    try:
        _logits(model, ids)
    finally:
        h.remove()
    return got["x"]


# ------------------------------------------------------------------------------------------------
# a kind defined outside pysteer: one class, nothing else edited
# ------------------------------------------------------------------------------------------------


class _ClampApplier:
    def __init__(self, num_rows: int, device):
        self.limit = torch.full((num_rows,), float("inf"), device=device)

    def write_row(self, row: int, iv) -> None:
        self.limit[row] = iv.limit

    def apply(self, y, ctx: TokenContext):
        lim = self.limit[ctx.rows.long()][:, None, None]
        return torch.minimum(torch.maximum(y, -lim.to(y.dtype)), lim.to(y.dtype))


@intervention_kind
@dataclass
class ClampTest:
    """Clamp a site to [-limit, limit] (a toy kind for the protocol test)."""

    site_name: str
    limit: float = 1.0
    trainable: ClassVar[tuple[str, ...]] = ()

    @property
    def site(self):
        return parse_site(self.site_name)

    def applier_key(self):
        return "clamp"

    def make_applier(self, model, resolved, num_rows, device, group):
        return _ClampApplier(num_rows, device)


def _clamped_reference(model, ids, layer, limit):
    h = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: (
            (o[0].clamp(-limit, limit),) + tuple(o[1:]) if isinstance(o, tuple) else o.clamp(-limit, limit)
        )
    )
    try:
        return _logits(model, ids)
    finally:
        h.remove()


def test_a_kind_defined_outside_pysteer_steers_saves_and_runs_per_request(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 7))
    base = _logits(model, ids)
    ref = _clamped_reference(model, ids, 1, 0.05)
    assert not torch.allclose(ref, base, atol=1e-4)
    iv = ClampTest("layers.1.resid", 0.05)
    with pysteer.steer(model, [iv]) as h:
        assert h.mode == "dynamic"
        torch.testing.assert_close(_logits(model, ids), ref)
    # per-request rows: row 0 clamped, row 1 unsteered, in one batch
    with pysteer.steer(model, {"clamp": [iv]}) as h:
        h.rows(["clamp", None])
        out = _logits(model, ids)
    torch.testing.assert_close(out[0], ref[0])
    assert torch.equal(out[1], base[1])
    # saved and loaded by name, no registration beyond the decorator
    path = pysteer.save([iv], tmp_path / "clamp.safetensors")
    (loaded,) = pysteer.load(path).configs["default"]
    assert loaded == iv and KINDS["ClampTest"] is ClampTest
    # pysteer.generate runs it, equal to Hugging Face's generate under the handle
    with pysteer.steer(model, [iv]):
        hf = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    fast = pysteer.generate(model, ids, steering=[iv], max_new_tokens=3, compile=False)
    assert fast.tokens == hf[:, ids.shape[1] :].tolist()
    assert len(model.model.layers[1]._forward_hooks) == 0  # the call's handle was removed


def test_steer_refuses_an_object_that_is_not_an_intervention():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="not an intervention"):
        pysteer.steer(model, [object()])


# ------------------------------------------------------------------------------------------------
# trainable handles
# ------------------------------------------------------------------------------------------------


def test_trainable_handle_gradients_equal_plain_autograd_through_a_hook():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 128, (2, 6))
    v0 = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 0.1
    iv = VectorAdd("layers.1.resid", v0.clone(), alpha=2.0)
    with pysteer.steer(model, [iv], trainable=True, backend="torch") as h:
        (vec,) = h.parameters()
        assert vec is iv.vector and vec.requires_grad and vec.is_leaf
        model(ids).logits.square().mean().backward()
    ref_v = v0.clone().requires_grad_(True)
    hook = model.model.layers[1].register_forward_hook(
        lambda m, a, o: (o[0] + 2.0 * ref_v,) + tuple(o[1:]) if isinstance(o, tuple) else o + 2.0 * ref_v
    )
    try:
        model(ids).logits.square().mean().backward()
    finally:
        hook.remove()
    torch.testing.assert_close(vec.grad, ref_v.grad, rtol=1e-5, atol=1e-7)


def test_parameters_lists_shared_tensors_once_and_needs_trainable():
    model = tiny_model("llama")
    w = torch.zeros(D)
    with pysteer.steer(
        model,
        {"a": [DynScalar("layers.0.attn.out", w, 0.0, 1)], "b": [DynScalar("layers.0.attn.out", w, 0.0, -1)]},
        trainable=True,
    ) as h:
        params = h.parameters()
        assert sum(p is w for p in params) == 1 and len(params) == 3  # w, and each config's bias
    with pysteer.steer(model, [VectorAdd("layers.0.resid", torch.zeros(D))], mode="dynamic") as h:
        with pytest.raises(ValueError, match="trainable=True"):
            h.parameters()
    with pytest.raises(ValueError, match="trainable"):
        pysteer.steer(model, [VectorAdd("layers.0.resid", torch.zeros(D))], mode="fold", trainable=True)


# ------------------------------------------------------------------------------------------------
# the scaling kinds
# ------------------------------------------------------------------------------------------------


def test_dyn_scalar_matches_its_formula_and_is_identity_at_zero():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    base = _logits(model, ids)
    with pysteer.steer(model, [DynScalar("layers.1.resid_pre", torch.zeros(D), 0.0)]):
        assert torch.equal(_logits(model, ids), base)
    w = torch.randn(D, generator=torch.Generator().manual_seed(1))
    x = _resid_in(model, 1, ids)
    scale = 1 - (x / x.norm(dim=-1, keepdim=True) @ w + 0.3)  # beta = -1
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a: (a[0] * scale[..., None],) + tuple(a[1:])
    )
    try:
        ref = _logits(model, ids)
    finally:
        hook.remove()
    with pysteer.steer(model, [DynScalar("layers.1.resid_pre", w, 0.3, beta=-1)]):
        torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_activ_scalar_touches_only_its_window_counted_from_the_prompt_end():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: row 1's prompt is 5 tokens
    alpha = torch.tensor([0.5, -0.25])  # offsets -2, -1
    site = "layers.1.resid_pre"
    with pysteer.steer(model, [ActivScalar(site, alpha)]):
        out = _logits(model, ids, mask)
    factor = torch.ones(2, 7)
    factor[:, -2:] = 1 + alpha  # the window is the last two real tokens of each row
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a: (a[0] * factor[..., None],) + tuple(a[1:])
    )
    try:
        ref = _logits(model, ids, mask)
    finally:
        hook.remove()
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 2:], ref[1, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ActivScalar("layers.0.attn.heads", torch.randn(3, 4) * 0.3, beta=-1),
        lambda: SteerVec("layers.1.mlp.out", torch.randn(2, D) * 0.1),
        lambda: DynScalar("layers.0.attn.out", torch.randn(D), 0.2),
    ],
    ids=["activ_scalar", "steer_vec", "dyn_scalar"],
)
def test_scaling_kinds_save_load_and_steer_per_request(make, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 6))
    iv = make()
    base = _logits(model, ids)
    with pysteer.steer(model, [iv]):
        alone = _logits(model, ids)
    assert not torch.allclose(alone, base, atol=1e-4)
    spec = pysteer.load(pysteer.save({"on": [iv]}, tmp_path / "s.safetensors"))
    (loaded,) = spec.configs["on"]
    assert type(loaded) is type(iv)
    with pysteer.steer(model, spec) as h:
        h.rows(["on", None, "on"])
        mixed = _logits(model, ids)
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], rtol=1e-5, atol=1e-6)


def test_scaling_kinds_refuse_bad_shapes_before_patching():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"alpha must be \[P\] or \[P, 4\]"):
        pysteer.steer(model, [ActivScalar("layers.0.attn.heads", torch.zeros(3, 5))])
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        pysteer.steer(model, [DynScalar("layers.0.attn.out", torch.zeros(63))])
    with pytest.raises(ValueError, match="beta"):
        SteerVec("layers.0.resid", torch.zeros(2, D), beta=2)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


# ------------------------------------------------------------------------------------------------
# SAE edits save and load
# ------------------------------------------------------------------------------------------------


def _sae(seed=0, m=96):
    g = torch.Generator().manual_seed(seed)
    return SAE(
        torch.randn(D, m, generator=g) / 8,
        torch.zeros(m),
        torch.randn(m, D, generator=g) / 8,
        torch.zeros(D),
        activation="topk",
        k=8,
    )


def test_sae_edits_save_once_per_sae_and_reload_to_the_same_steering(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    sae = _sae()
    a = SAEEdit("layers.1.resid", sae, {3: ("add", 2.0), 9: ("add_if_active", 1.5)})
    b = SAEEdit("layers.1.resid", sae, {3: ("set", 0.0)})
    with pysteer.steer(model, {"a": [a], "b": [b]}) as h:
        h.rows(["a", "b"])
        before = _logits(model, ids)
    path = pysteer.save({"a": [a], "b": [b]}, tmp_path / "sae.safetensors")
    spec = pysteer.load(path)
    la, lb = spec.configs["a"][0], spec.configs["b"][0]
    assert la.sae is lb.sae  # stored once, loaded once
    assert la.edits == {3: ("add", 2.0), 9: ("add_if_active", 1.5)}
    assert torch.equal(la.sae.W_dec, sae.W_dec) and la.sae.k == 8
    with pysteer.steer(model, spec) as h:
        h.rows(["a", "b"])
        assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("fast", [False, True], ids=["hf-generate", "fast-path"])
def test_cli_generate_runs_a_file_of_scaling_kinds(tiny_dir, tmp_path, capsys, fast):
    from pysteer.cli import main

    path = pysteer.save(
        {
            "on": [
                ActivScalar("layers.1.attn.out", torch.tensor([0.5, -0.5])),
                DynScalar("layers.0.resid", torch.ones(D), 0.1),
            ]
        },
        tmp_path / "kinds.safetensors",
    )
    argv = [
        "generate",
        "--model",
        str(tiny_dir),
        "--steer",
        str(path),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "3",
    ]
    assert main(argv + ([] if fast else ["--no-compile"])) == 0
    out = capsys.readouterr()
    assert "steering: SteeringHandle(dynamic" in out.err and out.out.strip()
