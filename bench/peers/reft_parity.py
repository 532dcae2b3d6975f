"""Record pyreft's own outputs for a LoReFT intervention on SmolLM2, and save it with pyreft's save.

Standalone: it imports neither pysteer nor anything from this repository, and runs in a virtualenv
of its own, because pyreft pins ``transformers==4.45.1`` while pysteer uses transformers 5. The
pysteer side is ``tests/test_compat_pyreft.py``: it loads the saved directory with
``pysteer.compat.pyreft.load_pyreft`` and compares against the outputs recorded here.

Tested with pyreft 0.1.0 and pyvene 0.1.8 (installed ``--no-deps``), torch 2.13.0+cpu,
transformers 4.45.1.

Model: the default SmolLM2-135M-Instruct checkpoint that pysteer caches (LlamaForCausalLM, 30
layers, d_model 576), fp32 on the CPU, loaded as ``bench/peers/bench_peer_steering.py`` does (the
config rebuilt from the transformers-5 json, the weights by ``load_state_dict``, the tokenizer from
``tokenizer.json``); eager attention.

The intervention: one ``pyreft.LoreftIntervention`` (rank 4) on ``block_output`` of layer 15, at
pyreft's positions ``"f1+l1"`` with shared weights (one intervention at the first and the last
prompt token). Its rotation is pyreft's own seeded orthogonal init; the learned source ``W, b`` is
set to seeded random values large enough to change greedy generations. It is saved with
``ReftModel.save`` (``config.json`` + ``intkey_<key>.bin``); the run checks that the saved file holds
exactly the in-memory weights, and records how far ``ReftModel.load`` of that directory is from
them: pyvene rebuilds the intervention without its ``dtype``, so pyreft 0.1.0's own load puts the
learned source ``W, b`` in bfloat16 (cast back to fp32 here so it runs on an fp32 model), rounding
them. The recorded outputs are those of the in-memory intervention, i.e. of the saved weights.

Recorded (``<out>/pyreft-outputs.json``), per prompt: the input ids; the unsteered and the steered
logits at every prompt position for a fixed set of vocabulary ids (64 seeded ids plus each
position's steered and unsteered argmax), and each position's full-vocabulary argmax; and 12
greedy tokens from ``ReftModel.generate(..., intervene_on_prompt=True)`` (the edit on the prompt
pass only) and from the plain model.

Setup (``torch`` first and pinned, so pip never swaps in another torch build)::

    python3 -m venv /work/peers-reft-venv
    echo "torch==2.13.0" > /tmp/torch-pin.txt
    export PIP_CONSTRAINT=/tmp/torch-pin.txt
    /work/peers-reft-venv/bin/pip install torch==2.13.0
    /work/peers-reft-venv/bin/pip install --no-deps pyreft==0.1.0 pyvene==0.1.8
    /work/peers-reft-venv/bin/pip install transformers==4.45.1 datasets tqdm numpy protobuf \\
        sentencepiece accelerate matplotlib networkx

(pyreft's declared dependencies pull in jupyter, wandb, plotnine, ydata-profiling and more, none of
which ``import pyreft`` needs.)

Run from the repository root::

    /work/peers-reft-venv/bin/python bench/peers/reft_parity.py --out tests/data/pyreft
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
from pathlib import Path

import pyreft
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "pysteer" / "smollm2-135m-instruct"
LAYER, RANK, POSITIONS = 15, 4, "f1+l1"
NEW_TOKENS = 12
PROMPTS = [
    "<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The best thing about the ocean is",
]


def load_config(model_dir: Path, attn: str) -> LlamaConfig:
    """LlamaConfig from a transformers-5 ``config.json``, readable by transformers 4."""
    fields = json.loads((model_dir / "config.json").read_text())
    if fields.get("model_type") != "llama":
        raise ValueError(f"expected a llama checkpoint, got {fields.get('model_type')!r}")
    rope = fields.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version", "_model_name_or_path"):
        fields.pop(key, None)
    return LlamaConfig(**fields, attn_implementation=attn)


def load_model(model_dir: Path, attn: str = "eager") -> LlamaForCausalLM:
    config = load_config(model_dir, attn)
    model = LlamaForCausalLM(config)
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model.to(torch.float32).eval()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    special = json.loads((model_dir / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        **{k: special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in special},
    )


def build_reft(model: LlamaForCausalLM, seed: int) -> pyreft.ReftModel:
    torch.manual_seed(seed)  # pyreft's orthogonal init of the rotation draws from the global generator
    d = model.config.hidden_size
    intervention = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=RANK, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        intervention.learned_source.weight.copy_(torch.randn(RANK, d, generator=g) * 0.05)
        intervention.learned_source.bias.copy_(torch.randn(RANK, generator=g) * 4.0)
    config = pyreft.ReftConfig(
        representations=[
            {
                "layer": LAYER,
                "component": "block_output",
                "low_rank_dimension": RANK,
                "intervention": intervention,
            }
        ]
    )
    reft = pyreft.get_reft_model(model, config, set_device=False)
    reft.eval()
    return reft


def locations(n: int) -> dict:
    """pyreft's ``f1+l1`` with shared weights: the first and the last prompt token, one intervention."""
    return {"sources->base": (None, [[[0, n - 1]]])}


def check_saved(reft: pyreft.ReftModel, save_dir: Path) -> None:
    """The saved ``intkey_*.bin`` holds the in-memory weights exactly (rotation: the parametrized one)."""
    ((key, iv),) = reft.interventions.items()
    saved = torch.load(save_dir / f"intkey_{key}.bin", weights_only=True)
    expect = {
        "weight": iv.learned_source.weight,
        "bias": iv.learned_source.bias,
        "rotate_layer": iv.rotate_layer.weight,
    }
    if set(saved) != set(expect) or not all(torch.equal(saved[k], expect[k].detach()) for k in expect):
        raise RuntimeError(f"{key}: the saved state differs from the intervention's weights")


@torch.no_grad()
def steered_logits(reft: pyreft.ReftModel, ids: torch.Tensor) -> torch.Tensor:
    _, out = reft({"input_ids": ids}, unit_locations=locations(ids.shape[1]))
    return out.logits[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--out", type=Path, default=Path("tests/data/pyreft"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model_dir)
    tok = load_tokenizer(args.model_dir)
    reft = build_reft(model, args.seed)
    save_dir = args.out / "loreft-smollm2-l15-r4"
    if save_dir.exists():
        shutil.rmtree(save_dir)
    reft.save(str(save_dir))
    check_saved(reft, save_dir)
    reloaded = pyreft.ReftModel.load(str(save_dir), model)
    reloaded.eval()
    for iv in reloaded.interventions.values():
        iv.learned_source.to(torch.float32)

    vocab = model.config.vocab_size
    fixed_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(args.seed + 2))[:64]
    records = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        with torch.no_grad():
            base = model(input_ids=ids).logits[0]
        steered = steered_logits(reft, ids)
        again = steered_logits(reloaded, ids)
        reload_diff = (again - steered).abs().max().item()
        vocab_ids = sorted(
            set(fixed_ids.tolist()) | set(steered.argmax(-1).tolist()) | set(base.argmax(-1).tolist())
        )
        _, gen = reft.generate(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            unit_locations=locations(n),
            intervene_on_prompt=True,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
        with torch.no_grad():
            plain = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
        sel = torch.tensor(vocab_ids)
        records.append(
            {
                "prompt": prompt,
                "input_ids": ids[0].tolist(),
                "intervened_positions": [0, n - 1],
                "vocab_ids": vocab_ids,
                "steered_logits": [[float(f"{v:.7g}") for v in row] for row in steered[:, sel].tolist()],
                "unsteered_logits": [[float(f"{v:.7g}") for v in row] for row in base[:, sel].tolist()],
                "steered_argmax": steered.argmax(-1).tolist(),
                "unsteered_argmax": base.argmax(-1).tolist(),
                "steered_max_abs_change": (steered - base).abs().max().item(),
                "pyreft_load_max_abs_diff": reload_diff,
                "steered_greedy": gen[0, n:].tolist(),
                "unsteered_greedy": plain[0, n:].tolist(),
                "steered_text": tok.decode(gen[0, n:]),
            }
        )
        print(
            f"{n:3d} tokens  change {records[-1]['steered_max_abs_change']:.3f}  "
            f"greedy {'differs' if records[-1]['steered_greedy'] != records[-1]['unsteered_greedy'] else 'same'}: "
            f"{records[-1]['steered_text']!r}"
        )

    versions = {p: importlib.metadata.version(p) for p in ("pyreft", "pyvene", "torch", "transformers")}
    result = {
        "what": "pyreft's outputs for one LoReFT (rank 4, layer 15 block_output, f1+l1 shared) on SmolLM2-135M-Instruct",
        "script": "bench/peers/reft_parity.py",
        "saved_directory": save_dir.name,
        "layer": LAYER,
        "rank": RANK,
        "positions": POSITIONS,
        "seed": args.seed,
        "new_tokens": NEW_TOKENS,
        "attn_implementation": "eager",
        "dtype": "float32",
        "versions": versions,
        "python": platform.python_version(),
        "threads": args.threads,
        "prompts": records,
    }
    out = args.out / "pyreft-outputs.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    sizes = {f: os.path.getsize(save_dir / f) for f in sorted(os.listdir(save_dir))}
    print(f"wrote {out} ({os.path.getsize(out)} bytes) and {save_dir}: {sizes}")


if __name__ == "__main__":
    main()
