"""Sampling on the fast path: N samples per prompt from one prefill, log-probabilities, taps and the
abstain gate."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import pysteer
from pysteer.fast import FastGenerator, generate
from pysteer.interventions import HeadBias, VectorAdd
from pysteer.models import geometry
from pysteer.models.tiny import tiny_model

NEW = 6
FAST = dict(compile=False, progress=False)
COMPILED = dict(compile="default", compile_backend="aot_eager", progress=False)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _model(arch="llama", layers=3):
    model = tiny_model(arch, num_hidden_layers=layers)
    model.generation_config.eos_token_id = None  # random tiny models may emit EOS early
    model.config.eos_token_id = None
    return model


def _hf_greedy(model, prompt, n=NEW):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def _steering(geo, sign=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        HeadBias(0, head=[0, 1], vector=sign * 2 * torch.randn(geo.head_dim, generator=g)),
        VectorAdd("layers.1.resid", sign * 3 * torch.randn(geo.d_model, generator=g)),
    ]


class _ForwardLog:
    """(batch, tokens) of every forward of the model (prefill: tokens > 1)."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self._hook = model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: self.calls.append(tuple(args[0].shape))
        )

    def remove(self):
        self._hook.remove()


class _LinearProbe:
    """An abstain probe: sigmoid of a fixed direction on one site's last-prompt state."""

    def __init__(self, sites, weight):
        self.sites, self.weight, self.seen = sites, weight, None

    def __call__(self, hidden):
        self.seen = [h.clone() for h in hidden]
        return torch.sigmoid(torch.cat(hidden, -1) @ self.weight)


# -- 1. samples --------------------------------------------------------------------------------
def test_each_prompt_is_prefilled_once_for_its_samples():
    model = _model()
    prompts = _prompts([5, 3, 7])
    log = _ForwardLog(model)
    out = generate(model, prompts, max_new_tokens=NEW, do_sample=True, num_return_sequences=5, seed=0, **FAST)
    log.remove()
    prefills = [c for c in log.calls if c[1] > 1]
    assert prefills == [(4, 7)], "one prefill of the 3 prompts (batch bucket 4), not one per sample"
    assert {c for c in log.calls if c[1] == 1} == {(16, 1)}, "decode steps run the 15 samples (bucket 16)"
    assert len(out.tokens) == 15 and all(len(t) == NEW for t in out.tokens)
    assert len(out.groups()) == 3 and all(len(g) == 5 for g in out.groups())


def test_samples_continue_their_own_prompt_from_the_shared_cache():
    # top_k=1 sampling is greedy: every sample of a prompt must be that prompt's greedy continuation,
    # which holds only if each row got its own prompt's keys and values.
    model = _model()
    prompts = _prompts([5, 3, 7], seed=1)
    out = generate(
        model, prompts, max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=3, seed=0, **FAST
    )
    for prompt, group in zip(prompts, out.groups()):
        assert group == [_hf_greedy(model, prompt)] * 3


def _hf_transition_scores(model, prompt, tokens, temperature, top_k, top_p):
    """HF's own warpers on teacher-forced logits, then ``compute_transition_scores(normalize_logits=True)``."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1 : -1]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = tuple(warpers(seq[:, : len(prompt) + i], logits[i : i + 1]) for i in range(len(tokens)))
    return model.compute_transition_scores(seq, scores, normalize_logits=True)[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_equal_hf_transition_scores_of_the_sampled_tokens(temperature, top_k, top_p):
    model = _model()
    prompts = _prompts([4, 6], seed=2)
    out = generate(
        model,
        prompts,
        max_new_tokens=NEW,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=3,
        seed=5,
        **FAST,
    )
    for row, (tokens, logprobs) in enumerate(zip(out.tokens, out.logprobs)):
        expected = _hf_transition_scores(model, prompts[row // 3], tokens, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
        assert torch.isfinite(expected).all()


def test_greedy_logprobs_are_the_raw_log_softmax():
    model = _model()
    prompt = _prompts([5], seed=3)[0]
    out = generate(model, [prompt], max_new_tokens=NEW, **FAST)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.tokens[0]])).logits[0, len(prompt) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(out.tokens[0])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), expected, atol=1e-4, rtol=0)


def test_samples_follow_per_request_steering_and_a_handle():
    model = _model()
    geo = geometry(model)
    prompts = _prompts([5, 4, 6], seed=4)
    configs = [_steering(geo, 1.0), None, _steering(geo, -1.0, seed=2)]
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=2, seed=0, **FAST)
    got = generate(model, prompts, steering=configs, **kw).groups()
    for prompt, cfg, group in zip(prompts, configs, got):
        if cfg is None:
            assert group == [_hf_greedy(model, prompt)] * 2
        else:
            with pysteer.steer(model, cfg, mode="dynamic"):
                assert group == [_hf_greedy(model, prompt)] * 2
    with pysteer.steer(model, {"a": configs[0], "b": configs[2]}, mode="dynamic") as h:
        h.rows(["b", None, "a"])
        got = generate(model, prompts, steering=h, **kw).groups()
    with pysteer.steer(model, configs[2], mode="dynamic"):
        assert got[0] == [_hf_greedy(model, prompts[0])] * 2
    assert got[1] == [_hf_greedy(model, prompts[1])] * 2


def test_seeded_samples_reproduce_and_differ_within_a_prompt():
    model = _model()
    prompts = _prompts([4, 5], seed=5)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=4, **FAST)
    a = generate(model, prompts, seed=11, **kw).tokens
    assert a == generate(model, prompts, seed=11, **kw).tokens
    assert a != generate(model, prompts, seed=12, **kw).tokens
    assert len(set(map(tuple, a[:4]))) > 1, "the samples of one prompt must differ"


def test_new_samples_temperature_and_seed_never_recompile():
    model = _model()
    prompts = _prompts([5, 5], seed=6)
    gen = FastGenerator(model, compile="default", compile_backend="aot_eager", progress=False)
    dynamo.reset()
    counters.clear()
    gen.generate(prompts, max_new_tokens=NEW, do_sample=True, num_return_sequences=4, seed=0, taps="all")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for n_samples, temperature, seed in [(3, 0.5, 1), (4, 1.3, 2), (3, 1.0, 3)]:  # 6 or 8 rows: bucket 8
        out = gen.generate(
            prompts,
            max_new_tokens=NEW,
            do_sample=True,
            temperature=temperature,
            num_return_sequences=n_samples,
            seed=seed,
            taps="all",
        )
        assert (
            len(out.tokens) == 2 * n_samples
            and out.taps["second_last_generated"]["layers.2.resid"].shape[0] == 2 * n_samples
        )
        assert counters["stats"]["unique_graphs"] == graphs, f"N={n_samples}, T={temperature} recompiled"


def test_bad_sampling_arguments_raise_before_anything_runs():
    model = _model()
    prompts = _prompts([4])
    with pytest.raises(ValueError, match="num_return_sequences must be"):
        generate(model, prompts, do_sample=True, num_return_sequences=0, **FAST)
    with pytest.raises(ValueError, match="needs do_sample=True"):
        generate(model, prompts, num_return_sequences=2, **FAST)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        generate(model, prompts * 20, do_sample=True, num_return_sequences=10, **FAST)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        generate(model, prompts, taps=["layers.9.resid"], **FAST)
    with pytest.raises(TypeError, match="sites"):
        generate(model, prompts, abstain=lambda h: h[0][:, 0], **FAST)
    with pytest.raises(ValueError, match="threshold must be in"):
        generate(
            model, prompts, abstain=_LinearProbe(["layers.0.resid"], torch.zeros(64)), threshold=2, **FAST
        )


# -- 2. taps -----------------------------------------------------------------------------------
def _teacher_forced_states(model, prompt, tokens, layers):
    """Hidden states of a plain HF forward on prompt + tokens: (last prompt token, second-last token)."""
    with torch.no_grad():
        hs = model(torch.tensor([prompt + tokens]), output_hidden_states=True).hidden_states
    last = len(prompt) + len(tokens) - 2
    return [(hs[i + 1][0, len(prompt) - 1], hs[i + 1][0, last]) for i in layers]


@pytest.mark.parametrize("mode", [FAST, COMPILED], ids=["eager", "compiled"])
def test_taps_equal_a_teacher_forced_forward_on_ragged_rows(mode):
    model = _model()
    prompts = _prompts([5, 3, 7], seed=7)
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, num_return_sequences=3, seed=3, **mode)
    free = generate(model, prompts, **kw).tokens
    stop = free[0][2]  # rows end at different steps, some never
    out = generate(model, prompts, stop=[stop], taps="all", **kw)
    lengths = {len(t) for t in out.tokens}
    assert len(lengths) > 1 and min(lengths) <= 3, "the test needs ragged rows"
    layers = range(geometry(model).n_layers - 1)  # HF's last hidden state is after the final norm
    for row, tokens in enumerate(out.tokens):
        for i, (last_prompt, second_last) in zip(
            layers, _teacher_forced_states(model, prompts[row // 3], tokens, layers)
        ):
            name = f"layers.{i}.resid"
            torch.testing.assert_close(out.taps["last_prompt"][name][row], last_prompt, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                out.taps["second_last_generated"][name][row], second_last, atol=1e-5, rtol=0
            )


def test_a_single_generated_token_taps_the_last_prompt_token():
    model = _model()
    prompts = _prompts([4, 6], seed=8)
    out = generate(model, prompts, max_new_tokens=1, taps=["layers.1.resid"], **FAST)
    taps = out.taps
    assert torch.equal(taps["second_last_generated"]["layers.1.resid"], taps["last_prompt"]["layers.1.resid"])


def test_taps_see_steering_and_leave_tokens_unchanged():
    # The tap sits downstream of the steered sites, so the taps and the reference hidden states both
    # carry the steering whatever the transformers line records for a steered layer itself.
    model = _model(layers=4)
    geo = geometry(model)
    prompts = _prompts([5, 4], seed=9)
    cfg = _steering(geo)
    plain = generate(model, prompts, steering=[cfg, cfg], max_new_tokens=NEW, **FAST)
    tapped = generate(
        model, prompts, steering=[cfg, cfg], max_new_tokens=NEW, taps=["layers.2.resid"], **FAST
    )
    assert tapped.tokens == plain.tokens
    assert tapped.tokens != generate(model, prompts, max_new_tokens=NEW, **FAST).tokens, (
        "steering must change tokens"
    )
    with pysteer.steer(model, cfg, mode="dynamic"):
        ref = _teacher_forced_states(model, prompts[0], tapped.tokens[0], [2])[0]
    torch.testing.assert_close(
        tapped.taps["second_last_generated"]["layers.2.resid"][0], ref[1], atol=1e-5, rtol=0
    )


# -- 3. the abstain gate -----------------------------------------------------------------------
def _gate_probe(model, prompts, site="layers.1.resid"):
    """A probe whose threshold (the median score) makes about half of the prompts abstain."""
    w = torch.randn(geometry(model).d_model, generator=torch.Generator().manual_seed(0)) * 0.3
    probe = _LinearProbe([site], w)
    out = generate(model, prompts, max_new_tokens=1, taps=[site], **FAST)
    scores = torch.sigmoid(out.taps["last_prompt"][site] @ w)
    return probe, float(scores.median())


def test_gated_rows_produce_nothing_and_the_others_equal_ungated_generation():
    model = _model()
    prompts = _prompts([5, 3, 7, 4, 6], seed=10)
    probe, threshold = _gate_probe(model, prompts)
    ungated = generate(model, prompts, max_new_tokens=NEW, **FAST)
    log = _ForwardLog(model)
    gated = generate(model, prompts, max_new_tokens=NEW, abstain=probe, threshold=threshold, **FAST)
    log.remove()
    scores = torch.tensor(gated.abstain_scores)
    assert gated.abstained == (scores > threshold).tolist()
    assert 0 < sum(gated.abstained) < len(prompts)
    for i, skipped in enumerate(gated.abstained):
        assert gated.tokens[i] == ([] if skipped else ungated.tokens[i])
    kept = len(prompts) - sum(gated.abstained)
    assert {c[0] for c in log.calls if c[1] == 1} == {1 << (kept - 1).bit_length()}, (
        "decode runs the kept rows only"
    )


def test_the_gate_reads_the_prefill_last_prompt_state_and_steers_nothing():
    model = _model()
    geo = geometry(model)
    prompts = _prompts([5, 3, 6], seed=11)
    cfg = [_steering(geo), None, _steering(geo, -1.0, seed=1)]
    probe, threshold = _gate_probe(model, prompts)
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=2, seed=0, **FAST)
    ungated = generate(model, prompts, steering=cfg, taps=probe.sites, **kw)
    gated = generate(model, prompts, steering=cfg, abstain=probe, threshold=threshold, **kw)
    torch.testing.assert_close(
        probe.seen[0], ungated.taps["last_prompt"][probe.sites[0]][::2], atol=0, rtol=0
    )
    for row, skipped in enumerate(gated.abstained):
        assert gated.tokens[row] == ([] if skipped else ungated.tokens[row])


def test_when_every_prompt_abstains_nothing_is_decoded():
    model = _model()
    prompts = _prompts([5, 3], seed=12)
    probe = _LinearProbe(["layers.0.resid"], torch.zeros(geometry(model).d_model))  # scores 0.5
    log = _ForwardLog(model)
    out = generate(model, prompts, max_new_tokens=NEW, abstain=probe, threshold=0.25, **FAST)
    log.remove()
    assert out.abstained == [True, True] and out.tokens == [[], []]
    assert all(c[1] > 1 for c in log.calls), "no decode step ran"


def test_a_probe_returning_the_wrong_shape_is_refused():
    model = _model()
    bad = _LinearProbe(["layers.0.resid"], torch.zeros(geometry(model).d_model, 2))
    with pytest.raises(ValueError, match="one score per prompt"):
        generate(model, _prompts([4, 4]), max_new_tokens=2, abstain=bad, **FAST)
