"""FrozenPrefix: training on repeated batches replays the frozen layers below the edit, with the
same losses and gradients as computing them, and computes them whenever replaying could differ."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.models.tiny import tiny_model
from pysteer.prefix_cache import FrozenPrefix
from pysteer.reft import LoReFT

ARCHS = ["llama", "gpt2", "qwen2"]


def _model(arch):
    model = tiny_model(arch, num_hidden_layers=4)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batches(model, n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (2, 9), generator=g) for _ in range(n)]


def _train(model, batches, site, epochs=3, prefix=False):
    """Losses and the last gradients of a LoReFT at ``site`` trained over ``batches`` for ``epochs``."""
    d = model.config.hidden_size
    iv = LoReFT.init(site, d, 2, "f2+l2", seed=0)
    losses = []
    with pysteer.steer(model, [iv], trainable=True) as h:
        params = h.parameters()
        opt = torch.optim.SGD(params, lr=0.5)
        fp = h.frozen_prefix() if prefix else None
        try:
            for _ in range(epochs):
                for ids in batches:
                    opt.zero_grad()
                    logits = model(input_ids=ids).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
                    )
                    loss.backward()
                    losses.append(loss.item())
                    grads = [p.grad.clone() for p in params]
                    opt.step()
        finally:
            stats = dict(fp.stats) if fp else None
            if fp:
                fp.remove()
    return losses, grads, stats


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["layers.2.resid", "layers.2.resid_pre", "layers.3.mlp.out"])
def test_replayed_training_equals_computed_training(arch, site):
    model = _model(arch)
    batches = _batches(model)
    base_losses, base_grads, _ = _train(model, batches, site)
    losses, grads, stats = _train(model, batches, site, prefix=True)
    assert losses == base_losses  # bit-exact: the replayed tensor is the computed one
    for g, b in zip(grads, base_grads):
        assert torch.equal(g, b)
    assert stats == {"hits": 4, "misses": 2, "bypassed": 0}


def test_upto_follows_the_lowest_steered_layer():
    model = _model("llama")
    d = model.config.hidden_size
    for site, upto in [("layers.2.resid", 3), ("layers.2.resid_pre", 2), ("layers.1.attn.out", 1)]:
        with pysteer.steer(model, [LoReFT.init(site, d, 2, "f2+l2", seed=0)], trainable=True) as h:
            fp = h.frozen_prefix()
            assert fp.upto == upto
            fp.remove()
    with pysteer.steer(model, [LoReFT.init("layers.0.resid_pre", d, 2, "f1", seed=0)], trainable=True) as h:
        with pytest.raises(ValueError, match="no frozen layer"):
            h.frozen_prefix()


def test_an_observer_below_the_edit_gets_computed_values():
    model = _model("llama")
    (ids,) = _batches(model, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    with FrozenPrefix(model, upto=3) as fp:
        for _ in range(2):
            model(input_ids=ids)  # stored, then replayed
        with pysteer.trace(model, ["layers.0.resid"]) as cache:
            model(input_ids=ids)
        assert fp.stats == {"hits": 1, "misses": 1, "bypassed": 1}
    torch.testing.assert_close(cache["layers.0.resid"], ref, rtol=0, atol=0)


def test_no_grad_forwards_and_generate_always_compute():
    model = _model("llama")
    (ids,) = _batches(model, 1)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(input_ids=ids, **kw)
    with FrozenPrefix(model, upto=2) as fp:
        model(input_ids=ids)  # a training forward stores the prefix output
        out = model.generate(input_ids=ids, **kw)
        assert fp.stats["hits"] == 0 and fp.stats["bypassed"] >= 5
    assert torch.equal(out, ref)
    assert not any("forward" in vars(layer) for layer in model.model.layers)  # restored


def test_an_in_place_weight_change_invalidates_stored_outputs():
    model = _model("llama")
    (ids,) = _batches(model, 1)
    with FrozenPrefix(model, upto=2) as fp:
        model(input_ids=ids)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
            ref = model(input_ids=ids).logits
        out = model(input_ids=ids).logits
        assert fp.stats["hits"] == 0 and fp.stats["misses"] == 2
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_mask_change_is_a_different_batch():
    model = _model("llama")
    (ids,) = _batches(model, 1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    with FrozenPrefix(model, upto=3) as fp:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = model(input_ids=ids, attention_mask=mask).logits
        assert fp.stats["misses"] == 2 and fp.stats["hits"] == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_entries_beyond_max_bytes_are_evicted_oldest_first():
    model = _model("llama")
    batches = _batches(model, 3)
    one = 2 * 9 * model.config.hidden_size * 4
    with FrozenPrefix(model, upto=2, max_bytes=2 * one) as fp:
        for ids in batches:
            model(input_ids=ids)
        assert len(fp.entries) == 2 and fp.bytes == 2 * one
        model(input_ids=batches[0])  # evicted: computed again
        model(input_ids=batches[2])  # kept: replayed
        assert fp.stats == {"hits": 1, "misses": 4, "bypassed": 0}


def test_bad_input_is_refused_before_anything_is_patched():
    model = _model("llama")
    with pytest.raises(ValueError, match="upto=0"):
        FrozenPrefix(model, upto=0)
    with pytest.raises(ValueError, match="upto=9"):
        FrozenPrefix(model, upto=9)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not frozen.*layers.1.mlp.up_proj|not frozen.*mlp.up_proj"):
        FrozenPrefix(model, upto=2)
    assert not any("forward" in vars(layer) for layer in model.model.layers)


def test_output_hidden_states_is_computed_and_does_not_stop_later_replays():
    """transformers records per-layer outputs by hooks (5.x, left installed) or by wrapping the
    layers' forward (4.57): a recording forward computes the prefix, later forwards replay again."""
    model = _model("llama")
    (ids,) = _batches(model, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    with FrozenPrefix(model, upto=3) as fp:
        model(input_ids=ids)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert fp.stats == {"hits": 0, "misses": 1, "bypassed": 1}
        model(input_ids=ids)
        assert fp.stats["hits"] == 1
    for a, b in zip(hs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
