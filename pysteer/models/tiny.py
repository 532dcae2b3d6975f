"""Tiny random-initialised causal LMs of every supported architecture (tests, benches, examples)."""

from __future__ import annotations

import torch

TINY_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)


def tiny_config(model_type: str, **overrides):
    """A small config (2 layers, d_model 64, 4 heads, GQA with 2 KV heads where supported, vocab 128)."""
    import transformers as T

    vocab = overrides.pop("vocab_size", 128)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        **common,
    )
    if model_type in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[model_type]
        cfg = cls(**llama_like)
    elif model_type == "qwen3":
        cfg = T.Qwen3Config(head_dim=24, **llama_like)  # head_dim * heads != hidden: o_proj is 96 -> 64
    elif model_type == "gemma":
        cfg = T.GemmaConfig(head_dim=16, **llama_like)
    elif model_type == "gemma2":
        cfg = T.Gemma2Config(head_dim=16, sliding_window=8, **llama_like)
    elif model_type == "gemma3_text":
        cfg = T.Gemma3TextConfig(head_dim=16, sliding_window=8, **llama_like)
    elif model_type == "phi3":
        cfg = T.Phi3Config(**llama_like)
    elif model_type == "phi":
        cfg = T.PhiConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=256,
            partial_rotary_factor=0.5,
            **common,
        )
    elif model_type == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    elif model_type == "gpt_neox":
        cfg = T.GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=256,
            **common,
        )
    elif model_type == "opt":
        cfg = T.OPTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=96,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **common,
        )
    else:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_TYPES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    types = getattr(cfg, "layer_types", None)
    if types and len(types) != cfg.num_hidden_layers:  # a layer-count override: repeat the pattern
        cfg.layer_types = [types[i % len(types)] for i in range(cfg.num_hidden_layers)]
    return cfg


def tiny_model(model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-initialised ``*ForCausalLM`` in eval mode with eager attention (deterministic on CPU)."""
    import transformers as T

    cfg = tiny_config(model_type, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (
        T.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
        if dtype != torch.float32
        else T.AutoModelForCausalLM.from_config(cfg)
    )
    # Random-init biases are often zero; give every bias a value so bias-folding is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()
