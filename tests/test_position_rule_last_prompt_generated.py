"""The position rule ``"last_prompt+generated"`` (ITI's): the last prompt token and every generated token.

A head zeroed by ``HeadScale(scale=0)`` marks the tokens a rule selects: a recorder on the output
projection's input (registered after pysteer's prepended hook, so it sees the steered tensor) notes
which tokens of each forward have that head exactly zero.
"""

from __future__ import annotations

import pytest
import torch

import pysteer
from pysteer.fast import generate
from pysteer.interventions import HeadBias, HeadScale
from pysteer.models import geometry, get_spec
from pysteer.models.specs import get_submodule
from pysteer.models.tiny import tiny_model
from pysteer.positions import PositionTable

RULE = "last_prompt+generated"
NEW = 4
MARKED_HEAD = 1


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def model():
    return _no_eos(tiny_model("llama"))


def _left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, S - n :] = torch.randint(3, 128, (n,), generator=g)
        mask[i, S - n :] = 1
    return ids, mask


class _MarkedTokens:
    """Per forward, ``[B, S]`` bool: the tokens whose marked head reached the projection as zeros."""

    def __init__(self, model):
        geo = geometry(model)
        proj = get_submodule(get_submodule(model, get_spec(model).layers)[0], get_spec(model).attn_out_proj)
        self.heads, self.forwards = geo.n_heads, []
        self.handle = proj.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        x = args[0]
        B, S, _ = x.shape
        self.forwards.append(x.reshape(B, S, self.heads, -1)[:, :, MARKED_HEAD].eq(0).all(-1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_table_selects_the_last_prompt_token_and_every_later_one():
    pos = torch.arange(6).expand(2, 6)
    prompt_len = torch.tensor([3, 5])
    got = PositionTable(RULE, torch.device("cpu")).selects(pos, prompt_len)
    assert got.tolist() == [[False, False, True, True, True, True], [False] * 4 + [True, True]]


def test_hf_generate_marks_the_last_prompt_token_then_each_decode_token(model):
    ids, mask = _left_padded([5, 2, 4])
    B, S = ids.shape
    with pysteer.steer(model, [HeadScale(0, head=MARKED_HEAD, scale=0.0)], positions=RULE, mode="dynamic"):
        with _MarkedTokens(model) as rec, torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
            )
    prefill, *decode = rec.forwards
    expected = torch.zeros(B, S, dtype=torch.bool)
    expected[:, -1] = True  # left padding: every row's last prompt token is the last column
    assert torch.equal(prefill, expected)
    assert len(decode) == NEW - 1
    assert all(step.shape == (B, 1) and bool(step.all()) for step in decode)


def test_fast_path_marks_the_last_prompt_token_then_each_decode_token(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    handle = pysteer.steer(model, [HeadScale(0, head=MARKED_HEAD, scale=0.0)], positions=RULE, mode="dynamic")
    try:
        with _MarkedTokens(model) as rec:
            generate(model, prompts, steering=handle, max_new_tokens=NEW, compile=False, progress=False)
    finally:
        handle.remove()
    prefill, *decode = rec.forwards
    n = len(prompts)  # rows past n fill the batch bucket with copies of a request; they are discarded
    expected = torch.zeros(n, prefill.shape[1], dtype=torch.bool)
    expected[:, -1] = True  # prompts are right-aligned in the slot
    assert torch.equal(prefill[:n], expected)
    assert decode and all(bool(step[:n].all()) for step in decode)


def _greedy(model, ids, mask):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits)


def test_rule_equals_last_prompt_and_generated_as_two_handles(model):
    geo = geometry(model)
    bias = [
        HeadBias(
            0, head=[0, 2], vector=4 * torch.randn(geo.head_dim, generator=torch.Generator().manual_seed(1))
        )
    ]
    ids, mask = _left_padded([6, 3, 5], seed=2)
    with pysteer.steer(model, bias, positions=RULE, mode="dynamic"):
        tokens, logits = _greedy(model, ids, mask)
    with pysteer.steer(model, bias, positions="last_prompt", mode="dynamic"):
        with pysteer.steer(model, bias, positions="generated", mode="dynamic"):
            two_tokens, two_logits = _greedy(model, ids, mask)
    assert torch.equal(tokens, two_tokens)
    assert torch.equal(logits, two_logits)
    with pysteer.steer(model, bias, positions="generated", mode="dynamic"):
        _, generated_only = _greedy(model, ids, mask)
    assert not torch.equal(logits, generated_only), "the last prompt token's edit must show"


@pytest.mark.parametrize("compile_mode", [False, "aot_eager"])
def test_fast_path_tokens_equal_hf_generate_under_the_rule(model, compile_mode):
    geo = geometry(model)
    bias = [
        HeadBias(1, head=3, vector=5 * torch.randn(geo.head_dim, generator=torch.Generator().manual_seed(3)))
    ]
    prompts = [[7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19]]
    kw = (
        {"compile": False}
        if compile_mode is False
        else {"compile": "default", "compile_backend": compile_mode}
    )
    with pysteer.steer(model, bias, positions=RULE, mode="dynamic") as handle:
        got = generate(model, prompts, steering=handle, max_new_tokens=NEW, progress=False, **kw).tokens
        expected = [
            _greedy(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))[0][0].tolist()
            for p in prompts
        ]
    assert got == expected
