"""Test configuration.

Triton's interpreter must be switched on before any ``@triton.jit`` function is decorated, so it is
set here, before pysteer (or its kernels) can be imported. On a CUDA machine set
``PYSTEER_TEST_TRITON_INTERPRET=0`` to test the compiled kernels instead.
"""

import json
import os

import torch

_default = "0" if torch.cuda.is_available() else "1"
if os.environ.get("PYSTEER_TEST_TRITON_INTERPRET", _default) == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(scope="session")
def real_tokenizer():
    """The embedded model's tokenizer (from the on-disk cache when it is built)."""
    from pysteer.default_model import (
        DefaultModelUnavailable,
        cache_status,
        load_default_model,
        prepare_tokenizer,
    )

    cached, directory, _ = cache_status()
    try:
        if cached:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            prepare_tokenizer(tok)
            return tok
        return load_default_model(progress=False)[1]
    except DefaultModelUnavailable as err:
        pytest.skip(f"the embedded model's tokenizer is unavailable: {err}")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, real_tokenizer):
    """A tiny llama with the real tokenizer's vocabulary, saved like a Hugging Face model directory."""
    from pysteer.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(real_tokenizer))
    model.save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


def write_questions(path, per_split=(8, 4, 4)):
    """A question file for the uncertainty and abstain commands: per split, ``n`` questions whose
    last one is unanswerable."""
    rows = []
    for split, n in zip(("train", "validation", "test"), per_split):
        for k in range(n):
            answers = [] if k == n - 1 else [f"answer {k}"]
            rows.append(
                {
                    "id": f"{split}-{k}",
                    "question": f"Question {k} of {split}?",
                    "answers": answers,
                    "split": split,
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
