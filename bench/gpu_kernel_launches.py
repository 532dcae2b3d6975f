"""One small launch of every pysteer kernel, each checked against the torch reference.

Run under ``compute-sanitizer`` by ``bench/gpu_check.py`` (memcheck, racecheck, initcheck, synccheck
on a GPU); on a CPU (``--device cpu``, the check's dry run) the same calls go through the torch
reference, so the script cannot rot between GPU runs.

    python bench/gpu_kernel_launches.py --device cuda --backend cuda
    compute-sanitizer --tool memcheck python bench/gpu_kernel_launches.py --backend cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def launches(device: torch.device, backend: str) -> dict[str, float]:
    """Max |fast - reference| of each launch (fp32 inputs, odd sizes)."""
    from pysteer.ops.affine import affine_steer
    from pysteer.ops.affine_linear import affine_linear
    from pysteer.sae import SAE

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    T, H, D, C = 7, 3, 40, 4
    x = rand(T, H, D).requires_grad_(True)
    rows = torch.tensor([0, 1, 2, 3, 1, 0, 2], dtype=torch.int32, device=device)
    M, A = rand(C, H, D), rand(C, H, D)
    out = {}
    y = affine_steer(x, rows, M, A, backend=backend)
    y_ref = affine_steer(x, rows, M, A, backend="torch")
    out["affine_steer_fwd"] = (y - y_ref).abs().max().item()
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    out["affine_steer_bwd"] = (gx - gx_ref).abs().max().item()

    z, W, b = rand(T, H * D), rand(33, H * D), rand(33)
    out["affine_linear_fwd"] = (
        (
            affine_linear(z, rows, M, A, W, b, backend=backend)
            - affine_linear(z, rows, M, A, W, b, backend="torch")
        )
        .abs()
        .max()
        .item()
    )

    d, m = 48, 200
    sae = SAE(rand(d, m) / 7, rand(m) / 10, rand(m, d) / 7, rand(d) / 10, activation="topk", k=9)
    xs = rand(T, d)
    out["sae_encode"] = (sae.encode(xs, backend=backend) - sae.encode(xs, backend="torch")).abs().max().item()
    values, indices = sae.encode_topk(xs, backend=backend)
    ref_values, _ = sae.encode_topk(xs, backend="torch")
    out["sae_encode_topk"] = (values.sort(-1).values - ref_values.sort(-1).values).abs().max().item()
    out["sae_decode_sparse"] = (
        (
            sae.decode_sparse(indices, values, backend=backend)
            - sae.decode_sparse(indices, values, backend="torch")
        )
        .abs()
        .max()
        .item()
    )
    table = sae.edit_table([3, 17, 150], num_rows=C)
    table.set(1, 3, "add", 2.0)
    table.set(2, 17, "set", 0.5)
    table.set(3, 150, "add_if_active", 1.0)
    out["sae_steer"] = (
        (sae.steer_rows(xs, rows, table, backend=backend) - sae.steer_rows(xs, rows, table, backend="torch"))
        .abs()
        .max()
        .item()
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backend", default=None, help="cuda | triton | torch (default: cuda on a GPU, torch on CPU)"
    )
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="JSON file to add this backend's result to")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "torch")
    errors = launches(device, backend)
    bad = {k: v for k, v in errors.items() if not v <= args.tolerance}
    result = {"device": str(device), "max_abs_error": errors, "tolerance": args.tolerance, "ok": not bad}
    print(json.dumps({"backend": backend, **result}))
    if args.out:
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.is_file() else {}
        report[backend] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    if bad:
        print(f"gpu_kernel_launches: {backend} differs from the reference: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
