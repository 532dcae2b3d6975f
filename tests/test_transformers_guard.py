"""Guard: what pysteer's hooks read from transformers' forward calls is still there.

transformers renames forward arguments between releases (5.24 renamed ``past_key_values`` to
``cache`` and stopped passing ``cache_position`` to the base model), and a hook that misreads them
steers the wrong tokens without an error. These tests run ``generate()`` on every supported
architecture and check, at every forward call, what ``pysteer.models.forward_args`` reads: the
input, the padding mask and the number of tokens already in the KV cache. When a release changes
them, a test here fails with a message naming the release, the model class and the arguments the
call received; the fix belongs in ``pysteer/models/forward_args.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from pysteer.models import forward_args
from pysteer.models.specs import get_spec, get_submodule
from pysteer.models.tiny import TINY_TYPES, tiny_model

PROMPT_LEN = 5
NEW_TOKENS = 4


def _release() -> str:
    return f"transformers {forward_args.transformers_version()}"


def _record_reads(module: torch.nn.Module, calls: list[dict]):
    def hook(mod, args, kwargs):
        inputs = forward_args.input_tensor(args, kwargs)
        mask = forward_args.attention_mask_2d(args, kwargs)
        try:
            past = forward_args.past_length(mod, args, kwargs, inputs.shape[1] if inputs is not None else 0)
            past = int(past)
        except forward_args.ForwardArgumentsError as err:
            past = err
        calls.append(
            {
                "seq": None if inputs is None else inputs.shape[1],
                "mask_len": None if mask is None else mask.shape[-1],
                "past": past,
                "args": sorted(kwargs) + [f"<positional {i}>" for i in range(len(args))],
            }
        )

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _check_generate_calls(calls: list[dict], where: str, batch_mask: bool) -> None:
    assert len(calls) == NEW_TOKENS, (
        f"{_release()}: {where} ran {len(calls)} forwards for {NEW_TOKENS} new tokens"
    )
    for step, call in enumerate(calls):
        expected_past = 0 if step == 0 else PROMPT_LEN + step - 1
        expected_seq = PROMPT_LEN if step == 0 else 1
        context = (
            f"{_release()} changed what {where} receives during generate(): at forward {step} pysteer "
            f"read {call}; expected {expected_seq} input tokens after {expected_past} cached ones. "
            "Update pysteer/models/forward_args.py for this release."
        )
        assert call["seq"] == expected_seq, context
        assert call["past"] == expected_past, context
        if batch_mask:
            assert call["mask_len"] == expected_past + expected_seq, context


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_hooks_read_inputs_mask_and_cache_length_inside_generate(arch):
    """The two modules pysteer hooks: the decoder stack (steering positions) and the model itself
    (tracing runs)."""
    model = tiny_model(arch, seed=0)
    spec = get_spec(model)
    stack = get_submodule(model, spec.layers.rsplit(".", 1)[0])
    stack_calls: list[dict] = []
    root_calls: list[dict] = []
    handles = [_record_reads(stack, stack_calls), _record_reads(model, root_calls)]
    try:
        ids = torch.randint(3, 100, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 0] = 0  # a left-padded row
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        for h in handles:
            h.remove()
    _check_generate_calls(root_calls, f"{type(model).__name__}.forward", batch_mask=True)
    _check_generate_calls(stack_calls, f"{type(stack).__name__}.forward", batch_mask=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_static_cache_length_is_read_inside_generate(arch):
    """A static cache counts its tokens in a tensor; pysteer must read it without a host sync."""
    model = tiny_model(arch, seed=0)
    calls: list[dict] = []
    handle = _record_reads(model, calls)
    try:
        ids = torch.randint(3, 100, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
    finally:
        handle.remove()
    _check_generate_calls(calls, f"{type(model).__name__}.forward (static cache)", batch_mask=False)


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_forward_takes_a_known_cache_keyword(arch):
    """The fast path passes its static cache under the keyword the forward takes."""
    model = tiny_model(arch, seed=0)
    params = inspect.signature(model.forward).parameters
    keyword = forward_args.cache_keyword(model)
    assert keyword in params
    for name in ("input_ids", "attention_mask", "inputs_embeds", "position_ids"):
        assert name in params, (
            f"{_release()}: {type(model).__name__}.forward no longer takes {name!r} (it takes {list(params)}); "
            "pysteer's hooks and fast path read and pass it by that name"
        )


def test_a_hidden_past_raises_instead_of_guessing_zero():
    """A call whose mask says tokens are cached but that carries no cache pysteer recognises."""
    model = tiny_model("llama", seed=0)
    ids = torch.ones(1, 1, dtype=torch.long)
    mask = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(forward_args.ForwardArgumentsError, match=r"transformers \S+ may pass the cache"):
        forward_args.past_length(model, (), {"input_ids": ids, "attention_mask": mask, "kv": object()}, 1)


def test_cache_is_found_by_type_whatever_the_argument_is_called():
    from transformers import DynamicCache

    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (1, 4))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, **{forward_args.cache_keyword(model): cache}, use_cache=True)
    step = {"input_ids": ids[:, :1], "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    for name in ("cache", "past_key_values", "some_future_name"):
        assert int(forward_args.past_length(model, (), {**step, name: cache}, 1)) == 4
    assert forward_args.past_length(model, (), {"input_ids": ids}, 4) == 0
