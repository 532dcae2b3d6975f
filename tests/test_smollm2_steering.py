"""End to end on the embedded SmolLM2-135M-Instruct: the demo, the generate CLI, the fast path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pysteer
from pysteer.default_model import load_default_model
from pysteer.interventions import HeadBias, HeadScale

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def smollm2():
    return load_default_model(progress=False)


def _cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "pysteer.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_demo_and_generate_cli_run_offline(tmp_path, smollm2):
    steering = tmp_path / "positive.safetensors"
    demo = _cli("demo", "--no-compile", "--max-new-tokens", "8", "--save-steering", str(steering))
    assert demo.returncode == 0, demo.stderr[-2000:]
    for tag in ("[unsteered]", "[positive +1.5]", "[negative -1.5]", "tokens/s"):
        assert tag in demo.stdout
    assert steering.exists()
    gen = _cli(
        "generate",
        "--steer",
        str(steering),
        "--prompt",
        "Describe the sea.",
        "--no-compile",
        "--max-new-tokens",
        "8",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "=== Describe the sea." in gen.stdout
    assert "steering: SteeringHandle(dynamic" in gen.stderr


def test_fast_path_equals_hf_generate_on_smollm2(smollm2):
    model, tok = smollm2
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in ("What is 2+2?", "Name a colour.")
    ]
    ivs = [HeadBias(layer, head=[0, 4], vector=0.3 * torch.ones(64)) for layer in (3, 9, 15)]
    ivs += [HeadScale(20, head=None, scale=1.3)]

    def hf():
        out = []
        for t in texts:  # one at a time: no padding in the reference
            ids = tok(t, return_tensors="pt")
            o = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(o[0, ids["input_ids"].shape[1] :].tolist())
        return out

    def cut(rows):
        eos = model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        return [r[: next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]

    fast = pysteer.generate(model, texts, tokenizer=tok, max_new_tokens=12, compile=False, progress=False)
    assert fast.tokens == cut(hf())
    with pysteer.steer(model, ivs, mode="dynamic") as h:
        steered = pysteer.generate(
            model, texts, tokenizer=tok, steering=h, max_new_tokens=12, compile=False, progress=False
        )
        expected = cut(hf())
    assert steered.tokens == expected
    assert steered.tokens != fast.tokens
