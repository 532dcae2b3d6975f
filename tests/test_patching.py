"""Activation patching: Patch and Noise as intervention kinds, batched over cells through per-request rows."""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.models.tiny import tiny_model
from pysteer.patching import Noise, Patch

D = 64


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _run(model, ids, mask=None, capture_layers=()):
    """Logits and the output of each layer in ``capture_layers`` (``[B, S, D]``), by plain hooks."""
    got = {}
    hooks = [
        _layers(model)[i].register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())
        )
        for i in capture_layers
    ]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits, got
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_replaces_the_site_at_its_positions_like_a_manual_hook(arch):
    model = tiny_model(arch)
    clean = torch.randint(3, 100, (1, 6))
    other = torch.randint(3, 100, (1, 6))
    _, cap = _run(model, clean, capture_layers=[1])
    value = cap[1][0, 2]

    def replace(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        h = h.clone()
        h[:, 2] = value
        return (h, *o[1:]) if isinstance(o, tuple) else h

    hook = _layers(model)[1].register_forward_hook(replace)
    try:
        ref, _ = _run(model, other)
    finally:
        hook.remove()
    with pysteer.steer(model, [Patch("layers.1.resid", value, positions=[2])]):
        out, _ = _run(model, other)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_patching_every_position_restores_the_clean_run():
    model = tiny_model("llama")
    clean, other = torch.randint(3, 100, (1, 5)), torch.randint(3, 100, (1, 5))
    ref, cap = _run(model, clean, capture_layers=[0])
    with pysteer.steer(model, [Patch("layers.0.resid", cap[0][0], positions=list(range(5)))]):
        out, _ = _run(model, other)
    # layer 1 reads only the (now clean) residual stream
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_noise_is_seeded_and_zero_noise_is_the_identity():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 6))
    base, _ = _run(model, ids)
    with pysteer.steer(model, [Noise("embed", 0.0, positions=[0, 1])]):
        assert torch.equal(_run(model, ids)[0], base)
    with pysteer.steer(model, [Noise("embed", 0.5, positions=[0, 1], seed=3)]):
        a, _ = _run(model, ids)
        b, _ = _run(model, ids)
    assert torch.equal(a, b) and not torch.allclose(a, base, atol=1e-4)


def test_a_batch_of_causal_tracing_cells_equals_each_cell_alone():
    """Corrupt the first two tokens, restore one (layer, position) per batch row: one forward."""
    model = tiny_model("llama")
    S = 6
    prompt = torch.randint(3, 100, (1, S))
    _, clean = _run(model, prompt, capture_layers=[0, 1])
    noise = Noise("embed", 0.3, positions=[0, 1], seed=0)
    cells = [(layer, pos) for layer in (0, 1) for pos in (0, 1, 3, 5)]
    configs = {
        f"L{layer}P{pos}": [noise, Patch(f"layers.{layer}.resid", clean[layer][0, pos], [pos])]
        for layer, pos in cells
    }
    configs["corrupted"] = [noise]
    names = list(configs)
    with pysteer.steer(model, configs) as h:
        h.rows(names)
        batched, _ = _run(model, prompt.expand(len(names), S))
    for i, name in enumerate(names):
        with pysteer.steer(model, configs[name]):
            alone, _ = _run(model, prompt)
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[-1], atol=1e-4)


def test_patch_and_noise_save_load_and_refuse_bad_input(tmp_path):
    model = tiny_model("llama")
    p = Patch("layers.1.attn.heads", torch.randn(2, D), positions=[-1, 0])
    n = Noise("embed", 0.1, positions=[1], seed=7)
    spec = pysteer.load(pysteer.save([p, n], tmp_path / "patch.safetensors"))
    lp, ln = spec.configs["default"]
    assert (
        torch.equal(lp.value, p.value)
        and lp.positions == [-1, 0]
        and (ln.std, ln.positions, ln.seed) == (0.1, [1], 7)
    )
    with pytest.raises(ValueError, match=r"values must be \[64\] or \[2, 64\]"):
        pysteer.steer(model, [Patch("layers.1.resid", torch.zeros(2, 63), positions=[0, 1])])
    with pytest.raises(ValueError, match="repeated position"):
        Patch("layers.1.resid", torch.zeros(D), positions=[1, 1])
    with pytest.raises(ValueError, match="std"):
        Noise("embed", -1.0)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_a_trace_feeds_patch_directly():
    model = tiny_model("llama")
    clean, other = torch.randint(3, 100, (1, 6)), torch.randint(3, 100, (1, 6))
    with pysteer.trace(model, ["layers.0.attn.heads"]) as cache:
        _run(model, clean)
    value = cache["layers.0.attn.heads"][0, 4]  # [H, D] at position 4
    with pysteer.steer(model, [Patch("layers.0.attn.heads", value.reshape(-1), positions=[4])]):
        patched, _ = _run(model, other)
    with pysteer.steer(model, [Patch("layers.0.attn.heads", value.reshape(1, -1), positions=[4])]):
        again, _ = _run(model, other)
    assert torch.equal(patched, again)
    plain, _ = _run(model, other)
    assert not torch.allclose(patched[0, 4:], plain[0, 4:], atol=1e-5)
    torch.testing.assert_close(patched[0, :4], plain[0, :4])  # earlier positions never see it


def test_patch_under_torch_compile_and_in_pysteer_generate():
    import torch._dynamo as dynamo

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 6))
    _, cap = _run(model, torch.randint(3, 100, (1, 6)), capture_layers=[0])
    patch = Patch("layers.0.resid", cap[0][0, 2], positions=[2])
    with pysteer.steer(model, {"p": [patch]}) as h:
        h.rows(["p", None])
        eager, _ = _run(model, ids)
        hf = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        dynamo.reset()
        model.forward = torch.compile(model.forward, backend="aot_eager")
        try:
            compiled, _ = _run(model, ids)
        finally:
            del model.forward
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    fast = pysteer.generate(model, ids, steering=[[patch], None], max_new_tokens=3, compile=False)
    assert fast.tokens == [r[: r.index(2) + 1] if 2 in r else r for r in hf[:, 6:].tolist()]
