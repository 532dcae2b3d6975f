"""sae-lens's side of ``bench/bench_sae_train.py``: its own trainer on the same activations.

Runs in the sae-lens virtualenv and imports nothing from pysteer. It loads the activations once
(``--acts``, a safetensors file with ``acts [N, d_in]`` fp32), then answers one JSON request per
stdin line, ``{"d_sae", "k", "batch", "steps", "warmup", "sparse", "lr"}``, with one JSON line: the
seconds of each of ``steps`` training steps after ``warmup`` untimed ones. With ``train_rows`` it
trains on the first ``train_rows`` rows only and adds the FVE on the rest (``held_out_fve``). A step is what
``SAETrainer.fit`` does between two batches (forward, TopK + AuxK loss, backward, gradient clipping,
Adam, schedulers, dead-latent counters); it is timed between consecutive requests of the trainer's
data provider. The SAE is ``TopKTrainingSAE`` with its defaults (``rescale_acts_by_decoder_norm``,
``aux_loss_coefficient`` 1) and ``use_sparse_activations`` as requested.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from collections.abc import Iterator

import torch
from safetensors.torch import load_file


def timed_batches(acts: torch.Tensor, batch: int, stamps: list[float]) -> Iterator[torch.Tensor]:
    """Batches of ``acts`` in a seeded random order, epoch after epoch, stamping each request."""
    epoch = 0
    while True:
        order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(epoch))
        for start in range(0, acts.shape[0] - batch + 1, batch):
            stamps.append(time.perf_counter())
            yield acts[order[start : start + batch]]
        epoch += 1


def run(acts: torch.Tensor, req: dict) -> dict:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    batch, total = req["batch"], req["warmup"] + req["steps"]
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=acts.shape[1], d_sae=req["d_sae"], k=req["k"], dtype="float32", device="cpu",
            use_sparse_activations=req["sparse"],
        )
    )  # fmt: skip
    cfg = SAETrainerConfig(
        total_training_samples=total * batch, train_batch_size_samples=batch, lr=req["lr"], lr_end=req["lr"] / 10,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    stamps: list[float] = []
    train = acts[: req.get("train_rows", acts.shape[0])]
    trainer = SAETrainer(cfg, sae, timed_batches(train, batch, stamps))
    trainer.fit()
    stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    reply = {"step_s": steps[req["warmup"] :], "steps_done": trainer.n_training_steps}
    if "train_rows" in req:
        reply["held_out_fve"] = held_out_fve(sae, acts[req["train_rows"] :])
    return reply


@torch.no_grad()
def held_out_fve(sae, x: torch.Tensor) -> float:
    """Fraction of variance explained on rows the trainer never saw."""
    err = (sae(x) - x).pow(2).sum()
    return float(1 - err / (x - x.mean(0)).pow(2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acts = load_file(args.acts)["acts"]
    hello = {"ready": True, "sae_lens": importlib.metadata.version("sae-lens"), "torch": torch.__version__}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        if line.strip():
            try:
                reply = run(acts, json.loads(line))
            except Exception as err:  # reported, not hidden: a mode that fails here is a finding
                reply = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
