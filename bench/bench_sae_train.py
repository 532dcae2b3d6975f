"""TopK SAE training on CPU: tokens/s of ``pysteer.train_sae`` against sae-lens's ``SAETrainer``.

The activations are the same for both sides: SmolLM2-135M-Instruct's layer-15 residual stream
(``d_in`` 576) over this repository's README and ARCHITECTURE text (128-token documents), traced
with ``pysteer.trace_dataset`` in fp32 and written to one safetensors file that sae-lens's side
reads. sae-lens needs its own virtualenv (``bench/peers/bench_peer_sae_train.py`` runs there, as
a persistent subprocess answering one request per line); with ``--peer-python`` the two sides are
interleaved config by config and round by round, the order rotated each round.

A step is one batch of ``--batch`` rows: forward, TopK (+ AuxK) loss, backward, Adam and each
trainer's bookkeeping; both use the same learning rate (sparsify's ``2e-4 / sqrt(d_sae / 2**14)``)
and one torch thread. No latent is dead within a timed run (pysteer's ``dead_tokens`` is 10M
tokens, sae-lens's ``dead_feature_window`` 1000 steps), so AuxK costs neither side anything here.
sae-lens runs ``TopKTrainingSAE`` with its defaults, dense activations, and is asked once per
round with ``use_sparse_activations=True`` as well (recorded, error included). Each figure is the
median step time of a side; the ratio is the median over rounds of the per-round ratio.

``--quality`` checks that the speed is not bought with a worse SAE: both trainers make one pass
over the same 20480 rows (README, ARCHITECTURE and the package's source as text) at the first
config (the committed figure with ``--batch 512``: 40 steps), and the FVE of each SAE on 4096
held-out rows of later documents goes into the same JSON under ``quality``.

    python bench/bench_sae_train.py --peer-python /work/peers-sae-venv/bin/python
    python bench/bench_sae_train.py --peer-python /work/peers-sae-venv/bin/python --quality --batch 512
    python bench/bench_sae_train.py --rounds 1 --steps 2       # pysteer's side only, a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import pysteer
from pysteer.default_model import load_model

ROOT = Path(__file__).resolve().parents[1]
SITE = "layers.15.resid"
CONFIGS = [(8, 32), (16, 32), (16, 64)]  # (expansion, k) at d_in 576


def trace_activations(rows: int, path: Path, sources: list[Path]) -> torch.Tensor:
    """``[rows, 576]`` fp32 activations at ``SITE`` over the text of ``sources`` (cached at ``path``)."""
    if path.exists():
        acts = load_file(str(path))["acts"]
        if acts.shape[0] >= rows:
            return acts[:rows]
    model, tok = load_model("default")
    text = "\n\n".join(p.read_text() for p in sources)
    ids = tok(text)["input_ids"]
    docs = [ids[i : i + 128] for i in range(0, len(ids), 128)]
    docs = (docs * (rows // len(ids) + 2))[: rows // 128 + 2]  # repeat the text if it is short
    with tempfile.TemporaryDirectory() as tmp:
        pysteer.trace_dataset(model, docs, SITE, tmp, dtype=torch.float32, max_tokens=rows)
        acts = pysteer.TraceReader(tmp).load(SITE).contiguous()
    save_file({"acts": acts}, str(path))
    return acts


def learning_rate(d_sae: int) -> float:
    return 2e-4 / (d_sae / 2**14) ** 0.5


def pysteer_steps(acts: torch.Tensor, d_sae: int, k: int, batch: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each timed ``train_sae`` step (between consecutive per-step callbacks)."""
    stamps: list[float] = []
    pysteer.train_sae(
        acts, kind="topk", k=k, d_sae=d_sae, batch_tokens=batch, lr=learning_rate(d_sae),
        max_tokens=(warmup + steps + 1) * batch, log_every=1, progress=False,
        callback=lambda record: stamps.append(time.perf_counter()),
    )  # fmt: skip
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[warmup:]


def held_out_fve(sae: pysteer.SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum()
    return float(1 - err / (x - x.mean(0)).pow(2).sum())


def quality_activations(args) -> tuple[torch.Tensor, Path]:
    """Activations over README + ARCHITECTURE + the package's source: enough text for held-out rows."""
    sources = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "pysteer").rglob("*.py"))]
    path = args.acts.with_name(args.acts.stem + "-quality.safetensors")
    return trace_activations(args.quality_train_rows + args.quality_eval_rows, path, sources), path


def quality(args, peer: Peer, acts: torch.Tensor) -> dict:
    """Both trainers, one pass over the same training rows (each side shuffles them with its own
    generator); FVE on held-out rows of later documents."""
    train, held = acts[: args.quality_train_rows], acts[args.quality_train_rows :]
    expansion, k = CONFIGS[0]
    d_sae = expansion * acts.shape[1]
    steps = args.quality_train_rows // args.batch
    t0 = time.perf_counter()
    sae = pysteer.train_sae(train, kind="topk", k=k, d_sae=d_sae, batch_tokens=args.batch, lr=learning_rate(d_sae),
                            max_tokens=steps * args.batch, progress=False)  # fmt: skip
    ours = {"held_out_fve": held_out_fve(sae, held), "wall_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    reply = peer.steps(d_sae=d_sae, k=k, batch=args.batch, steps=steps - 1, warmup=1, sparse=False,
                       lr=learning_rate(d_sae), train_rows=args.quality_train_rows)  # fmt: skip
    if "error" in reply:
        raise RuntimeError(f"sae-lens side failed: {reply['error']}")
    theirs = {"held_out_fve": reply["held_out_fve"], "wall_s": time.perf_counter() - t0}
    return {
        "d_in": acts.shape[1], "d_sae": d_sae, "k": k, "batch_tokens": args.batch, "steps": steps,
        "train_rows": train.shape[0], "held_out_rows": held.shape[0],
        "text": "README + ARCHITECTURE + pysteer/**/*.py, 128-token documents; held-out rows are later documents",
        "pysteer": ours, "sae_lens": theirs, "loadavg": os.getloadavg(),
    }  # fmt: skip


class Peer:
    """sae-lens's side as a subprocess answering one JSON request per line."""

    def __init__(self, python: str, acts_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [python, str(ROOT / "bench" / "peers" / "bench_peer_sae_train.py"), "--acts", str(acts_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the sae-lens side exited ({self.proc.wait()})")
        return json.loads(line)

    def steps(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", default=None, help="the sae-lens virtualenv's python")
    ap.add_argument(
        "--rows", type=int, default=8192, help="activation rows traced (reused epoch after epoch)"
    )
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--acts", type=Path, default=Path(tempfile.gettempdir()) / "pysteer-sae-train-acts.safetensors"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sae-train-cpu.json")
    ap.add_argument(
        "--quality",
        action="store_true",
        help="only compare held-out FVE after one pass (needs --peer-python); written as 'quality' into --out",
    )
    ap.add_argument("--quality-train-rows", type=int, default=20480)
    ap.add_argument("--quality-eval-rows", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quality:
        if not args.peer_python:
            raise SystemExit("--quality needs --peer-python")
        acts, path = quality_activations(args)
        peer = Peer(args.peer_python, path)
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result["quality"] = quality(args, peer, acts)
        peer.close()
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["quality"], indent=2))
        return 0
    acts = trace_activations(args.rows, args.acts, [ROOT / "README.md", ROOT / "ARCHITECTURE.md"])
    d_in = acts.shape[1]
    load_before = os.getloadavg()
    peer = Peer(args.peer_python, args.acts) if args.peer_python else None
    runs: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for expansion, k in CONFIGS:
            d_sae = expansion * d_in
            name = f"d{d_in}-m{d_sae}-k{k}"
            entry = runs.setdefault(name, {"d_in": d_in, "d_sae": d_sae, "k": k, "rounds": []})
            sides = ["pysteer", "sae_lens"] if peer is not None else ["pysteer"]
            if rnd % 2:
                sides.reverse()
            result: dict = {"order": sides}
            for side in sides:
                if side == "pysteer":
                    result["pysteer_step_s"] = pysteer_steps(
                        acts, d_sae, k, args.batch, args.steps, args.warmup
                    )
                else:
                    reply = peer.steps(d_sae=d_sae, k=k, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                       sparse=False, lr=learning_rate(d_sae))  # fmt: skip
                    if "error" in reply:
                        raise RuntimeError(f"sae-lens side failed on {name}: {reply['error']}")
                    result["sae_lens_step_s"] = reply["step_s"]
            if peer is not None:
                result["ratio_sae_lens_over_pysteer"] = statistics.median(
                    result["sae_lens_step_s"]
                ) / statistics.median(result["pysteer_step_s"])
                if rnd == 0:
                    entry["sae_lens_sparse_activations"] = peer.steps(
                        d_sae=d_sae,
                        k=k,
                        batch=args.batch,
                        steps=1,
                        warmup=1,
                        sparse=True,
                        lr=learning_rate(d_sae),
                    )
            entry["rounds"].append(result)
            print(name, {key: value for key, value in result.items() if key.startswith("ratio")}, flush=True)
    if peer is not None:
        peer.close()
    for entry in runs.values():
        py = statistics.median(t for r in entry["rounds"] for t in r["pysteer_step_s"])
        entry["pysteer_tokens_per_s"] = args.batch / py
        if peer is not None:
            sl = statistics.median(t for r in entry["rounds"] for t in r["sae_lens_step_s"])
            entry["sae_lens_tokens_per_s"] = args.batch / sl
            entry["speedup_pysteer_over_sae_lens"] = statistics.median(
                r["ratio_sae_lens_over_pysteer"] for r in entry["rounds"]
            )
    result = {
        "script": "bench/bench_sae_train.py (pysteer) + bench/peers/bench_peer_sae_train.py (sae-lens)",
        "workload": {
            "activations": f"SmolLM2-135M-Instruct {SITE}, README + ARCHITECTURE text, {acts.shape[0]} rows, fp32",
            "batch_tokens": args.batch,
            "timed_steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "torch_threads": 1,
            "lr": "2e-4 / sqrt(d_sae / 2**14), both sides",
        },  # fmt: skip
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "sae_lens": peer.hello.get("sae_lens") if peer is not None else None,
        },  # fmt: skip
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "configs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: {k: v for k, v in e.items() if k != "rounds"} for n, e in runs.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
