"""The managed fast path: static cache + compiled decode step, steering updated in place."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import pysteer
from pysteer.fast import FastGenerator, generate
from pysteer.interventions import HeadBias, HeadScale, VectorAdd
from pysteer.models import geometry
from pysteer.models.tiny import tiny_model

NEW = 6
ARCHS = ["llama", "qwen2", "gpt2"]


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n=NEW):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def _steering(geo, sign=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        HeadBias(0, head=[0, 1], vector=sign * 2 * torch.randn(geo.head_dim, generator=g)),
        HeadScale(1, head=2, scale=0.5),
        VectorAdd("layers.1.resid", sign * 3 * torch.randn(geo.d_model, generator=g)),
    ]


def _no_eos(model):
    # random tiny models may emit EOS early; the comparison wants full-length outputs
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return _no_eos(tiny_model(request.param))


@pytest.mark.parametrize("compile_mode", [False, "aot_eager"])
def test_greedy_tokens_equal_hf_generate_unsteered_and_steered(model, compile_mode):
    prompts = _prompts([7, 3, 5])  # different lengths: left padding inside the fast path
    kw = (
        {"compile": False}
        if compile_mode is False
        else {"compile": "default", "compile_backend": compile_mode}
    )
    got = generate(model, prompts, max_new_tokens=NEW, progress=False, **kw).tokens
    assert got == [_hf_greedy(model, p) for p in prompts]
    geo = geometry(model)
    with pysteer.steer(model, _steering(geo), positions="generated", mode="dynamic") as h:
        got = generate(model, prompts, steering=h, max_new_tokens=NEW, progress=False, **kw).tokens
        expected = [_hf_greedy(model, p) for p in prompts]
    assert got == expected
    assert expected != [_hf_greedy(model, p) for p in prompts], "steering must change the tokens"


def test_per_request_configs_equal_each_request_alone(model):
    geo = geometry(model)
    prompts = _prompts([5, 6, 4], seed=1)
    configs = [_steering(geo, 1.0), None, _steering(geo, -1.0, seed=2)]
    got = generate(model, prompts, steering=configs, max_new_tokens=NEW, compile=False, progress=False).tokens
    for prompt, cfg, toks in zip(prompts, configs, got):
        if cfg is None:
            assert toks == _hf_greedy(model, prompt)
        else:
            with pysteer.steer(model, cfg, mode="dynamic"):
                assert toks == _hf_greedy(model, prompt)


def test_model_is_unchanged_after_a_steered_call():
    model = _no_eos(tiny_model("llama"))
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        base = model(ids).logits
    generate(model, ids, steering=_steering(geometry(model)), max_new_tokens=3, compile=False, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_changes_between_calls_never_recompile_and_outputs_follow():
    model = _no_eos(tiny_model("llama"))
    geo = geometry(model)
    prompts = _prompts([6, 6])
    handle = pysteer.steer(
        model, {"a": _steering(geo, 1.0), "b": _steering(geo, -1.0, seed=3)}, mode="dynamic"
    )
    handle.rows(["a", "b"])
    gen = FastGenerator(model, compile="default", compile_backend="aot_eager", progress=False)
    changes = [
        ("strength", lambda: handle.set_alpha(3.0, "a")),
        ("direction", lambda: handle.update(_steering(geo, -2.0, seed=4), "a")),
        ("positions", lambda: handle.set_positions("generated")),
        ("per-request configs", lambda: handle.rows(["b", None])),
        ("explicit positions", lambda: handle.set_positions([0, 2, -1])),
    ]
    dynamo.reset()
    counters.clear()
    gen.generate(prompts, steering=handle, max_new_tokens=NEW)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    previous = None
    for what, change in changes:
        change()
        got = gen.generate(prompts, steering=handle, max_new_tokens=NEW).tokens
        assert counters["stats"]["unique_graphs"] == graphs, f"changing {what} recompiled"
        expected = [_hf_greedy_rows(model, handle, prompts)][0]
        assert got == expected, f"after changing {what} the output does not follow"
        assert got != previous or what == "explicit positions"
        previous = got
    handle.remove()


def _hf_greedy_rows(model, handle, prompts):
    out = model.generate(
        torch.tensor(prompts), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    return [row[len(prompts[0]) :] for row in out.tolist()]


def test_sampling_with_a_seed_is_reproducible():
    model = _no_eos(tiny_model("llama"))
    prompts = _prompts([4, 4])
    kw = dict(
        max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, compile=False, progress=False
    )
    a = generate(model, prompts, seed=123, **kw).tokens
    b = generate(model, prompts, seed=123, **kw).tokens
    c = generate(model, prompts, seed=7, **kw).tokens
    assert a == b
    assert a != c
    greedy = generate(model, prompts, max_new_tokens=8, compile=False, progress=False).tokens
    assert a != greedy


def test_stream_yields_the_same_tokens_as_generate():
    model = _no_eos(tiny_model("qwen2"))
    prompts = _prompts([5, 3])
    full = generate(model, prompts, max_new_tokens=NEW, compile=False, progress=False).tokens
    steps = list(generate(model, prompts, max_new_tokens=NEW, compile=False, progress=False, stream=True))
    assert [list(col) for col in zip(*steps)] == full


def test_stop_token_ends_a_request():
    model = _no_eos(tiny_model("llama"))
    prompt = _prompts([5])[0]
    free = generate(model, [prompt], max_new_tokens=NEW, compile=False, progress=False).tokens[0]
    stop = free[2]
    got = generate(model, [prompt], max_new_tokens=NEW, stop=stop, compile=False, progress=False).tokens[0]
    assert got == free[: free.index(stop) + 1]


def test_bad_arguments_raise_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="compile"):
        FastGenerator(model, compile="fastest")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[5, 6]], max_new_tokens=0, compile=False)
    with pytest.raises(ValueError, match="per-request configs for 2 prompts"):
        generate(model, [[5, 6], [7, 8]], steering=[None, None, None], compile=False)
    with pytest.raises(ValueError, match="text inputs need a tokenizer"):
        generate(model, ["hello"], compile=False)


def test_ignore_eos_generates_every_token():
    model = tiny_model("llama")
    prompt = _prompts([5])[0]
    free = generate(
        model, [prompt], max_new_tokens=NEW, compile=False, progress=False, ignore_eos=True
    ).tokens[0]
    assert len(free) == NEW
    model.generation_config.eos_token_id = free[1]  # make the second token an EOS
    cut = generate(model, [prompt], max_new_tokens=NEW, compile=False, progress=False).tokens[0]
    assert cut == free[:2]
    again = generate(
        model, [prompt], max_new_tokens=NEW, compile=False, progress=False, ignore_eos=True
    ).tokens[0]
    assert again == free


def test_later_steps_follow_in_place_changes_and_new_hooks_are_seen_next_call():
    # Steps after the first of a call skip Dynamo's full guard check; in-place changes made while
    # streaming must still reach the graph, and steering attached between calls must recompile.
    prompts = _prompts([5, 5], seed=2)

    def run(compile_mode):
        model = _no_eos(tiny_model("llama"))
        geo = geometry(model)
        gen = FastGenerator(model, compile=compile_mode, compile_backend="aot_eager", progress=False)
        plain = gen.generate(prompts, max_new_tokens=NEW).tokens
        handle = pysteer.steer(model, _steering(geo, 1.0), mode="dynamic")  # attached, not passed
        attached = gen.generate(prompts, max_new_tokens=NEW).tokens
        streamed = []
        for i, toks in enumerate(gen.stream(prompts, steering=handle, max_new_tokens=NEW)):
            streamed.append(toks)
            if i == 2:
                handle.set_alpha(-4.0)  # takes effect from the next decode step
        handle.remove()
        return plain, attached, [list(col) for col in zip(*streamed)]

    eager, compiled = run(False), run("default")
    assert compiled == eager
    plain, attached, streamed = compiled
    assert attached != plain
    assert [row[:3] for row in streamed] == [row[:3] for row in attached]
    assert streamed != attached


@pytest.mark.parametrize(
    "arch,window", [("mistral", 4), ("mistral", None), ("gemma2", 3), ("gemma3_text", 5), ("qwen2", None)]
)
def test_sliding_window_models_equal_hf_and_compile_once(arch, window):
    # Sliding-window cache layers count tokens in a Python int that Dynamo specialises on; the fast
    # path keeps full-length layers and lets the model's sliding mask drop old tokens.
    overrides = {} if window is None else {"sliding_window": window}
    model = _no_eos(tiny_model(arch, **overrides))
    prompts = _prompts([7, 4], seed=5)
    gen = FastGenerator(model, compile="default", compile_backend="aot_eager", progress=False)
    dynamo.reset()
    counters.clear()
    got = gen.generate(prompts, max_new_tokens=NEW + 2).tokens
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled between steps"
    assert got == [_hf_greedy(model, p, NEW + 2) for p in prompts]


def test_generators_of_identical_models_never_share_graphs():
    # Each slot compiles on its own code object: the later steps of a call skip the full guard
    # check, which must never pick a graph compiled for another model or another hook set.
    prompts = _prompts([5, 5], seed=4)
    plain, steered = _no_eos(tiny_model("llama")), _no_eos(tiny_model("llama"))
    geo = geometry(steered)
    handle = pysteer.steer(steered, _steering(geo, 1.0), mode="dynamic")
    gens = [
        FastGenerator(m, compile="default", compile_backend="aot_eager", progress=False)
        for m in (plain, steered)
    ]
    got = [g.generate(prompts, max_new_tokens=NEW).tokens for g in gens]
    again = [g.generate(prompts, max_new_tokens=NEW).tokens for g in gens]
    want = [
        FastGenerator(m, compile=False).generate(prompts, max_new_tokens=NEW).tokens for m in (plain, steered)
    ]
    assert got == again == want
    assert want[0] != want[1]
    handle.remove()  # a new hook set: a fresh graph, and the unsteered tokens again
    assert gens[1].generate(prompts, max_new_tokens=NEW).tokens == want[0]
