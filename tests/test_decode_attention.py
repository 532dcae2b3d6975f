"""Decode-step attention for grouped-query models (pysteer.models.attention)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pysteer.fast import FastGenerator
from pysteer.models.attention import NAME, decode_attention, decode_sdpa
from pysteer.models.tiny import tiny_model


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_decode_sdpa_equals_hf_sdpa(groups, per_head_mask):
    g = torch.Generator().manual_seed(0)
    B, Hkv, L, D = 3, 2, 11, 8
    H = Hkv * groups
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    mask = torch.rand(B, H if per_head_mask else 1, 1, L, generator=g) > 0.3
    mask[..., 0] = True
    module = _Attn(groups)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = decode_sdpa(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (B, 1, H, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a prefill (several query tokens) is handed to Hugging Face's function unchanged
    q4 = torch.randn(B, H, 4, D, generator=g)
    mask4 = torch.ones(B, 1, 4, L, dtype=torch.bool)
    assert torch.equal(
        decode_sdpa(module, q4, k, v, mask4)[0], sdpa_attention_forward(module, q4, k, v, mask4)[0]
    )


def test_decode_attention_switches_only_sdpa_models_and_restores():
    sdpa = tiny_model("llama")
    sdpa.config._attn_implementation = "sdpa"
    with decode_attention(sdpa) as switched:
        assert switched and sdpa.config._attn_implementation == NAME
    assert sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decode_attention(sdpa):
        raise RuntimeError("restored on errors too")
    assert sdpa.config._attn_implementation == "sdpa"
    eager = tiny_model("llama")
    with decode_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3_text"])
@pytest.mark.parametrize("compile_mode", [False, "default"])
def test_fast_path_with_sdpa_gqa_models_equals_hf_generate(arch, compile_mode):
    model = tiny_model(arch)
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 4)]
    gen = FastGenerator(model, compile=compile_mode, compile_backend="aot_eager", progress=False)
    got = gen.generate(prompts, max_new_tokens=6).tokens
    for prompt, tokens in zip(prompts, got):
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert tokens == ref[0, len(prompt) :].tolist()
    assert model.config._attn_implementation == "sdpa"
