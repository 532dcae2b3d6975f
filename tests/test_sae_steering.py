"""SAE feature edits through pysteer.steer: identity, orthonormal-SAE equivalence, rows, composition."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.interventions import VectorAdd, VectorScale
from pysteer.models.tiny import tiny_model
from pysteer.sae import SAE
from pysteer.sae_steering import SAEEdit

D = 64


def _random_sae(m=96, activation="relu", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D, m, generator=g) / D**0.5
    W_dec = torch.randn(m, D, generator=g) / D**0.5
    return SAE(
        W_enc,
        0.01 * torch.randn(m, generator=g),
        W_dec,
        0.01 * torch.randn(D, generator=g),
        activation=activation,
        **kw,
    )


def _orthonormal_tied_sae():
    """W_dec = Q (orthonormal rows), W_enc = Q^T, no biases: f = relu(Q x), x_hat = Q^T f."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    return SAE(q.clone(), torch.zeros(D), q.T.clone(), torch.zeros(D), activation="relu")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_all_zero_edit_is_bit_exact_identity(activation):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    base = _logits(model, ids)
    sae = _random_sae(activation=activation, k=8 if activation == "topk" else None)
    edit = SAEEdit("layers.1.resid", sae, {3: ("add", 0.0), 7: ("scale", 1.0), 11: ("add_if_active", 0.0)})
    with pysteer.steer(model, [edit]):
        assert torch.equal(_logits(model, ids), base)


def test_add_to_a_latent_of_an_orthonormal_tied_sae_equals_adding_its_decoder_row():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    sae = _orthonormal_tied_sae()
    j, s = 5, 2.5
    with pysteer.steer(model, [SAEEdit("layers.1.resid", sae, {j: ("add", s)})]):
        edited = _logits(model, ids)
    with pysteer.steer(model, [VectorAdd("layers.1.resid", s * sae.W_dec[j])], mode="dynamic"):
        added = _logits(model, ids)
    torch.testing.assert_close(edited, added, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, _logits(model, ids), atol=1e-3)


def test_sae_edit_matches_manual_error_preserving_math():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 5))
    sae = _random_sae()
    S, kinds = [2, 9, 40], {2: ("set", 3.0), 9: ("ablate", 0.0), 40: ("scale", 2.0)}
    site = "layers.0.mlp.out"
    from pysteer.models.sites import install_site_hook, resolve_site

    def manual(x):
        f = sae.encode(x)
        f2 = f.clone()
        f2[..., 2] = 3.0
        f2[..., 9] = 0.0
        f2[..., 40] = 2.0 * f[..., 40]
        return x + (f2 - f)[..., S] @ sae.W_dec[S]

    hook = install_site_hook(resolve_site(model, site), manual)
    expected = _logits(model, ids)
    hook.remove()
    with pysteer.steer(model, [SAEEdit(site, sae, kinds)]):
        torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_sae_edits_compose_with_affine_steering_and_per_request_rows():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 6))
    sae = _random_sae()
    site = "layers.1.resid"
    cfg_a = [VectorScale(site, 0.5), SAEEdit(site, sae, {4: ("add", 3.0)})]
    cfg_b = [SAEEdit(site, sae, {6: ("set", -1.0), 4: ("ablate", 0.0)})]
    with pysteer.steer(model, {"a": cfg_a, "b": cfg_b}) as h:
        assert h.mode == "dynamic"
        h.rows(["a", None, "b"])
        batch = _logits(model, ids)
    for i, cfg in enumerate([cfg_a, None, cfg_b]):
        if cfg is None:
            alone = _logits(model, ids[i : i + 1])
        else:
            with pysteer.steer(model, cfg):
                alone = _logits(model, ids[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_bad_sae_edits_raise_before_touching_the_model():
    model = tiny_model("llama")
    sae = _random_sae()
    for bad, match in [
        (SAEEdit("layers.0.attn.heads", sae, {1: ("add", 1.0)}), "unheaded sites"),
        (SAEEdit("layers.0.resid", sae, {1000: ("add", 1.0)}), "outside"),
        (SAEEdit("layers.0.resid", sae, {1: ("boost", 1.0)}), "unknown edit kind"),
        (SAEEdit("layers.0.resid", _random_sae().to(torch.float64), {}), "no edits"),
    ]:
        with pytest.raises(ValueError, match=match):
            pysteer.steer(model, [VectorAdd("layers.1.resid", torch.ones(D)), bad])
        assert not model.model._forward_pre_hooks and not model.model.layers[1]._forward_hooks
