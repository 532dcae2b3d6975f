"""Record what repeng and steering-vectors themselves compute, for pysteer's conversion tests.

Standalone, in the peer virtualenv of ``bench_peer_steering.py`` (the libraries pin
``transformers<5``); it imports nothing from pysteer. On the default SmolLM2 checkpoint (fp32, CPU):

- repeng 0.4.0: a ``ControlVector`` with seeded random directions at layers 6 and 12, applied with
  ``ControlModel.set_control(vector, coeff=1.5)``; the vector is also exported with its own
  ``export_gguf`` (llama.cpp's format) -> ``tests/data/compat/repeng.gguf``;
- steering-vectors 0.12.2: a ``SteeringVector`` at layer 4 (``decoder_block``, norm 12) applied with
  ``apply(model, multiplier=2.0)``, and a second one of ``layer_type="mlp"`` at layer 9.

For each: the last prompt token's logits (first 4096 vocabulary entries) and 8 greedy tokens ->
``tests/data/compat/peers.safetensors`` (directions included), read by ``tests/test_compat_peers.py``.

    /work/peers-steer-venv/bin/python bench/peers/compat_parity.py
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from bench_peer_steering import DEFAULT_MODEL_DIR, PROMPT, load_model, load_tokenizer
from repeng import ControlModel, ControlVector
from safetensors.torch import save_file
from steering_vectors import SteeringVector

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "compat"
VOCAB = 4096
NEW = 8


def _direction(seed: int, d: int, norm: float) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@torch.no_grad()
def _run(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids).logits[0, -1, :VOCAB].clone()
    out = model.generate(
        input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    return logits, out[0, ids.shape[1] :].clone()


def main() -> int:
    torch.manual_seed(0)
    model = load_model(DEFAULT_MODEL_DIR, "eager").eval()
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    d = model.config.hidden_size
    tensors: dict[str, torch.Tensor] = {"prompt_ids": ids[0]}
    tensors["unsteered.logits"], tensors["unsteered.tokens"] = _run(model, ids)

    # repeng
    directions = {6: _direction(1, d, 6.0).numpy(), 12: _direction(2, d, 8.0).numpy()}
    vector = ControlVector(model_type="llama", directions=directions)
    vector.export_gguf(str(OUT / "repeng.gguf"))
    wrapped = ControlModel(model, list(directions))
    wrapped.set_control(vector, coeff=1.5)
    tensors["repeng.logits"], tensors["repeng.tokens"] = _run(wrapped, ids)
    wrapped.reset()
    model = wrapped.unwrap()
    for k, v in directions.items():
        tensors[f"repeng.direction.{k}"] = torch.from_numpy(v)

    # steering-vectors
    for name, layer, layer_type, seed in (("sv_block", 4, "decoder_block", 3), ("sv_mlp", 9, "mlp", 4)):
        act = _direction(seed, d, 12.0)
        sv = SteeringVector({layer: act}, layer_type=layer_type)
        with sv.apply(model, multiplier=2.0):
            tensors[f"{name}.logits"], tensors[f"{name}.tokens"] = _run(model, ids)
        tensors[f"{name}.activation"] = act

    meta = {
        "repeng": importlib.metadata.version("repeng"),
        "steering-vectors": importlib.metadata.version("steering-vectors"),
        "transformers": importlib.metadata.version("transformers"),
        "torch": torch.__version__,
        "prompt": PROMPT,
        "vocab_entries": str(VOCAB),
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(OUT / "peers.safetensors"),
        metadata={"peers": json.dumps(meta)},
    )
    print(json.dumps(meta, indent=2))
    for name in ("unsteered", "repeng", "sv_block", "sv_mlp"):
        print(name, tensors[f"{name}.tokens"].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
