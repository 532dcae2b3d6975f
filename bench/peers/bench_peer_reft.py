"""pyreft's side of ``bench/bench_reft.py``: LoReFT training steps/s and steered generate tokens/s.

Standalone (it imports nothing from this repository) and run in its own virtualenv with pyreft,
which pins ``transformers==4.45.1`` (pysteer uses transformers 5); set it up as the docstring of
``bench/peers/reft_parity.py`` says. Tested with pyreft 0.1.0, pyvene 0.1.8, torch 2.13.0+cpu,
transformers 4.45.1. ``bench/bench_reft.py --peer-python <venv>/bin/python`` runs this script first,
in its own process, and merges its JSON (printed as the last line of stdout, and written to
``--out`` when given) into ``bench/results/reft-cpu.json``.

Workload (the same on pysteer's side): SmolLM2-135M-Instruct, fp32, sdpa attention, CPU, one
torch thread by default. One ``pyreft.LoreftIntervention`` of rank 4 on ``block_output`` of layer 15
at positions ``f1+l1`` with shared weights (the first and the last token of every row), the model's
weights frozen.

- training: a fixed batch of ``--batch`` rows of ``--seq`` random token ids (seed 0, ids in
  [3, vocab)), no padding; one step is ``zero_grad``, the forward through ``ReftModel`` with
  ``unit_locations``, next-token cross entropy over every position, ``backward`` and an Adam step
  (lr 1e-3) over ``reft.get_trainable_parameters()`` (the intervention's rotation, W and b). pyreft's
  ``ReftTrainer`` is not used: the loop is written out, as pysteer's is.
- generate: the 17-token chat prompt, batch 1, ``--new-tokens`` greedy tokens with EOS off;
  ``ReftModel.generate(..., intervene_on_prompt=True)`` (the edit on the prompt pass only) against the
  plain ``model.generate`` on the same model, interleaved round by round.

Times are wall-clock (``time.perf_counter``) and process CPU time; medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path

import pyreft
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "pysteer" / "smollm2-135m-instruct"
LAYER, RANK = 15, 4
# "<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n" (SmolLM2 tokenizer)
PROMPT_IDS = [1, 4093, 198, 19161, 253, 1890, 1977, 563, 253, 8085, 30, 2, 198, 1, 520, 9531, 198]


def load_model(model_dir: Path, attn: str) -> LlamaForCausalLM:
    """SmolLM2 from pysteer's transformers-5 cache, as ``bench/peers/bench_peer_steering.py`` loads it."""
    fields = json.loads((model_dir / "config.json").read_text())
    rope = fields.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version", "_model_name_or_path"):
        fields.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation=attn))
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model.to(torch.float32).eval()


def batch_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def build_reft(model: LlamaForCausalLM) -> pyreft.ReftModel:
    torch.manual_seed(0)
    iv = pyreft.LoreftIntervention(
        embed_dim=model.config.hidden_size, low_rank_dimension=RANK, dtype=torch.float32
    )
    config = pyreft.ReftConfig(
        representations=[
            {"layer": LAYER, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
        ]
    )
    return pyreft.get_reft_model(model, config, set_device=False)


def loss_of(reft: pyreft.ReftModel, ids: torch.Tensor, locations, loss: str) -> torch.Tensor:
    """As ``bench/bench_reft.py: loss_of``: ``answer`` computes only the last position's logits
    (``num_logits_to_keep=1``, this transformers line's name, passed through pyvene's ``base``)."""
    if loss == "answer":
        _, out = reft({"input_ids": ids, "num_logits_to_keep": 1}, unit_locations=locations)
        return torch.nn.functional.cross_entropy(out.logits[:, -1], ids[:, 0])
    _, out = reft({"input_ids": ids}, unit_locations=locations)
    logits = out.logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _train_steps(
    reft: pyreft.ReftModel, batches: list[torch.Tensor], steps: int, warmup: int = 0, loss_kind: str = "lm"
) -> dict:
    params = reft.get_trainable_parameters()
    assert all(p.requires_grad for p in params) and not any(p.requires_grad for p in reft.model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    reft.train()  # pyreft's trainer trains with the interventions in training mode (dropout 0 here)
    reft.model.eval()
    wall, cpu, losses = [], [], []
    for i in range(warmup + steps):
        ids = batches[i % len(batches)]
        B, S = ids.shape
        locations = {"sources->base": (None, [[[0, S - 1]] * B])}
        c0, t0 = time.process_time(), time.perf_counter()
        opt.zero_grad()
        loss = loss_of(reft, ids, locations, loss_kind)
        loss.backward()
        opt.step()
        t1, c1 = time.perf_counter(), time.process_time()
        losses.append(loss.item())
        if i >= warmup:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    reft.eval()
    return {"wall": wall, "cpu": cpu, "losses": losses, "params": sum(p.numel() for p in params)}


def bench_training(
    reft: pyreft.ReftModel, ids: torch.Tensor, steps: int, warmup: int, loss: str = "lm"
) -> dict:
    r = _train_steps(reft, [ids], steps, warmup, loss)
    return {
        "step_s": {
            "wall_median": statistics.median(r["wall"]),
            "cpu_median": statistics.median(r["cpu"]),
            "wall": r["wall"],
        },
        "steps_per_s": 1 / statistics.median(r["wall"]),
        "losses": [round(v, 5) for v in r["losses"]],
        "params": r["params"],
    }


def epoch_batches(n: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    return [
        torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(100 + i))
        for i in range(n)
    ]


def bench_epochs(
    model: LlamaForCausalLM, batches: list[torch.Tensor], epochs: int, rounds: int, loss: str = "lm"
) -> dict:
    """Whole training runs of ``epochs`` passes over ``batches``, a fresh intervention each run."""
    runs = [
        _train_steps(build_reft(model), batches, epochs * len(batches), loss_kind=loss) for _ in range(rounds)
    ]
    return {
        "run_s": {"wall": [sum(r["wall"]) for r in runs], "cpu": [sum(r["cpu"]) for r in runs]},
        "wall_median_s": statistics.median(sum(r["wall"]) for r in runs),
        "cpu_median_s": statistics.median(sum(r["cpu"]) for r in runs),
        "final_loss": runs[0]["losses"][-1],
    }


def bench_generate(reft: pyreft.ReftModel, model: LlamaForCausalLM, new_tokens: int, rounds: int) -> dict:
    ids = torch.tensor([PROMPT_IDS])
    n = ids.shape[1]
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 2}

    def unsteered():
        with torch.no_grad():
            return model.generate(**base, **kw)

    def steered():
        with torch.no_grad():
            return reft.generate(
                base, unit_locations={"sources->base": (None, [[[0, n - 1]]])}, intervene_on_prompt=True, **kw
            )[1]

    variants = {"unsteered": unsteered, "pyreft": steered}
    times = {k: {"wall": [], "cpu": []} for k in variants}
    for f in variants.values():  # warm-up
        f()
    tokens = {}
    for r in range(rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            out = variants[name]()
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
            tokens[name] = out[0, n:].tolist()
    res = {}
    for name, t in times.items():
        res[name] = {
            "wall_median_s": statistics.median(t["wall"]),
            "cpu_median_s": statistics.median(t["cpu"]),
            "tokens_per_s": new_tokens / statistics.median(t["wall"]),
            "wall_s": t["wall"],
            "tokens": tokens[name],
        }
    pairs = [s / u for s, u in zip(times["pyreft"]["wall"], times["unsteered"]["wall"])]
    cpu_pairs = [s / u for s, u in zip(times["pyreft"]["cpu"], times["unsteered"]["cpu"])]
    res["steered_over_unsteered"] = {
        "wall_median": statistics.median(pairs),
        "cpu_median": statistics.median(cpu_pairs),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epoch-batches", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--epoch-rounds", type=int, default=2)
    ap.add_argument("--loss", choices=["lm", "answer"], default="lm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model_dir, "sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    reft = build_reft(model)
    ids = batch_ids(args.batch, args.seq, model.config.vocab_size)
    result = {
        "side": "pyreft",
        "versions": {p: importlib.metadata.version(p) for p in ("pyreft", "pyvene", "torch", "transformers")},
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "workload": {
            "batch": args.batch,
            "seq": args.seq,
            "ids_sum": int(ids.sum()),
            "layer": LAYER,
            "rank": RANK,
            "positions": "f1+l1",
            "steps": args.steps,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "prompt_ids": PROMPT_IDS,
            "attn": "sdpa",
            "epoch_batches": args.epoch_batches,
            "epochs": args.epochs,
            "loss": args.loss,
        },
        "training": bench_training(reft, ids, args.steps, args.warmup, args.loss),
        "epochs": bench_epochs(
            model,
            epoch_batches(args.epoch_batches, args.batch, args.seq, model.config.vocab_size),
            args.epochs,
            args.epoch_rounds,
            args.loss,
        ),
        "generate": bench_generate(reft, model, args.new_tokens, args.rounds),
    }
    text = json.dumps(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
