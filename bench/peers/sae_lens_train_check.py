"""Do SAEs trained by ``pysteer.train_sae`` and saved with ``SAE.save`` load in sae-lens and compute
the same thing there?

Two halves in one file. In pysteer's environment, ``--out DIR`` trains a TopK and a ReLU SAE on
planted sparse activations (d_in 64, d_sae 256), saves each in the SAELens layout under ``DIR``
with a ``check.safetensors`` of inputs, pysteer's features and reconstructions, then (with
``--peer-python``) runs this same file in the sae-lens virtualenv, which loads each directory with
``sae_lens.SAE.load_from_disk`` and compares its ``encode`` / ``decode`` with pysteer's (it imports
nothing from pysteer). Each SAE records ``hook_name`` as one trained on a trace of ``layers.15.resid``
does; the report says which hook name sae-lens reads back. The JSON report goes to stdout and to
``--report``; the check passes when features and reconstructions agree within 1e-5 and sae-lens
reads the hook name back.

    python bench/peers/sae_lens_train_check.py --out /tmp/sae-check \\
        --peer-python /work/peers-sae-venv/bin/python --report bench/results/sae-train-sae-lens-load.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KINDS = ("topk", "relu")
D_IN, D_SAE, K = 64, 256, 8
HOOK = "blocks.15.hook_resid_post"


def planted(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(128, D_IN, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, 128, generator=g).argsort(1)[:, :K]
    codes = torch.zeros(n, 128).scatter_(1, idx, torch.rand(n, K, generator=g) * 2 + 0.5)
    return codes @ dirs + 0.2


def make(out: Path) -> None:
    """pysteer's half: train, save, record what pysteer computes."""
    import pysteer

    x = planted(8192)
    probe = planted(512, seed=1)
    for kind in KINDS:
        sae = pysteer.train_sae(x, kind=kind, k=K, d_sae=D_SAE, batch_tokens=512, lr=2e-3, l1_coefficient=0.1,
                                progress=False)  # fmt: skip
        sae.metadata["hook_name"] = HOOK  # what an SAE trained on a trace of layers.15.resid records
        root = sae.save(out / kind)
        with torch.no_grad():
            save_file(
                {"x": probe, "features": sae.encode(probe), "recon": sae(probe)},
                str(root / "check.safetensors"),
            )


def check(out: Path) -> dict:
    """sae-lens's half: load each directory and compare."""
    from sae_lens import SAE as LensSAE

    report: dict = {
        "sae_lens": importlib.metadata.version("sae-lens"),
        "torch": torch.__version__,
        "saes": {},
    }
    for kind in KINDS:
        root = out / kind
        ref = load_file(str(root / "check.safetensors"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae = LensSAE.load_from_disk(str(root), device="cpu")
        with torch.no_grad():
            feats = sae.encode(ref["x"])
            recon = sae.decode(feats)
        report["saes"][kind] = {
            "class": type(sae).__name__,
            "cfg_architecture": sae.cfg.architecture(),
            "cfg_k": getattr(sae.cfg, "k", None),
            "metadata_hook_name": getattr(sae.cfg.metadata, "hook_name", None),
            "features_max_abs_diff": float((feats - ref["features"]).abs().max()),
            "recon_max_abs_diff": float((recon - ref["recon"]).abs().max()),
            "features_equal": bool(torch.equal(feats, ref["features"])),
            "warnings": sorted({str(w.message)[:200] for w in caught}),
        }
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the saved SAEs")
    ap.add_argument("--peer-python", default=None, help="the sae-lens virtualenv's python (pysteer's half)")
    ap.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    ap.add_argument("--peer", action="store_true", help="run sae-lens's half (internal)")
    args = ap.parse_args()
    if args.peer:
        print(json.dumps(check(args.out)))
        return 0
    make(args.out)
    if args.peer_python is None:
        print(f"saved under {args.out}; pass --peer-python to check them in sae-lens")
        return 0
    # the peer imports nothing from this checkout (its top-level ``kernels`` would shadow a dependency)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [args.peer_python, str(Path(__file__).resolve()), "--peer", "--out", str(args.out.resolve())],
        capture_output=True, text=True, check=False, env=env, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"sae-lens half failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = all(
        r["features_max_abs_diff"] <= 1e-5
        and r["recon_max_abs_diff"] <= 1e-5
        and r["metadata_hook_name"] == HOOK
        for r in report["saes"].values()
    )
    report["pass"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.report is not None:
        args.report.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
