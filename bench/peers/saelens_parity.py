"""Record what sae-lens itself computes, for pysteer's SAELens loading and saving tests.

Standalone, in the peer virtualenv ``/work/peers-sae-venv`` (sae-lens 6.54.12, torch 2.13, pysteer
installed editable with ``--no-deps``). Each SAE kind is built by sae-lens with seeded random weights
(decoder row norms spread over 0.3-3, so a decoder-norm convention that is ignored shows), saved
by sae-lens itself into ``tests/data/saelens/<case>/`` and run through sae-lens's own ``encode`` /
``decode`` on fixed inputs:

- ``standard``, ``jumprelu``, ``topk`` (``rescale_acts_by_decoder_norm=False``): inference SAEs;
- ``topk_rescale``: an inference TopK SAE with ``rescale_acts_by_decoder_norm=True``;
- ``topk_training``: a TopK training checkpoint (``save_model``; rescaling on, sae-lens's default);
- ``batchtopk_training``, ``matryoshka_training``: BatchTopK / Matryoshka training checkpoints
  (``save_model``, holding ``topk_threshold``); their reference is sae-lens's own inference form
  (``save_inference_model``, loaded back as the JumpReLU SAE it is), also saved as
  ``batchtopk_inference`` / ``matryoshka_inference``;
- ``hook_z``: a standard SAE with ``reshape_activations="hook_z"`` at ``blocks.1.attn.hook_z``,
  fed ``[..., n_heads, d_head]``.

Expected features and reconstructions go to ``tests/data/saelens/expected.safetensors``, read by
``tests/test_sae_lens_parity.py`` in the main environment (no sae-lens there). The script then
checks pysteer against it: pysteer loads each directory (and converts the in-memory sae-lens object
with ``SAE.from_sae_lens``), compares its features, saves with
``SAE.save`` and sae-lens loads that save (``SAE.load_from_disk``); the hook name, reshape mode and
the features sae-lens computes from pysteer's save are recorded in ``tests/data/saelens/roundtrip.json``.

Re-run (from the repository root; ``PYTHONHASHSEED=0`` keeps the key order of the cfg.json files
``save_inference_model`` writes, which it takes from a set, so an unchanged re-run leaves no diff):

    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 /work/peers-sae-venv/bin/python bench/peers/saelens_parity.py

The peer virtualenv: ``python3.11 -m venv /work/peers-sae-venv``, then with the torch pin
(``PIP_CONSTRAINT`` naming a file that holds ``torch==2.13.0``) ``pip install torch==2.13.0
sae-lens==6.54.12 pybind11 wheel`` and ``PYSTEER_BUILD_CUDA=0 pip install --no-deps
--no-build-isolation -e .``. Run the script by its path, not with ``-c`` from the repository root:
the repository's ``kernels/`` directory would shadow the ``kernels`` package transformers imports.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from sae_lens import SAE as LensSAE
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "saelens"
D_IN, D_SAE, K = 16, 48, 6
N_HEADS, D_HEAD = 4, 8
TOKENS = 6


def _meta(hook: str) -> SAEMetadata:
    return SAEMetadata(model_name="tiny-random", hook_name=hook)


@torch.no_grad()
def _randomise(sae, seed: int) -> None:
    """Seeded weights; decoder rows with norms in [0.3, 3] and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    d_sae, d_in = sae.W_dec.shape
    direction = torch.randn(d_sae, d_in, generator=g)
    norms = 0.3 + 2.7 * torch.rand(d_sae, 1, generator=g)
    sae.W_dec.copy_(direction / direction.norm(dim=-1, keepdim=True) * norms)
    sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
    sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))


def _inputs(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = sae.encode(x)
    return f.clone(), sae.decode(f).clone()


def _save_dir(name: str) -> Path:
    path = OUT / name
    shutil.rmtree(path, ignore_errors=True)
    return path


@torch.no_grad()
def _set_topk_threshold(sae, x: torch.Tensor) -> None:
    """A training threshold that lets about half of the per-token top-k latents through."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.cfg.rescale_acts_by_decoder_norm:
        pre = pre * sae.W_dec.norm(dim=-1)
    top = pre.topk(K, dim=-1).values.relu()
    sae.topk_threshold = top[top > 0].median().double()


def build_cases() -> dict[str, torch.Tensor]:
    """Save every case with sae-lens and return the tensors sae-lens computed."""
    expected: dict[str, torch.Tensor] = {}
    x = _inputs(0, (TOKENS, D_IN))
    expected["x"] = x

    def record(name: str, sae, inputs: torch.Tensor) -> None:
        sae.save_model(_save_dir(name))
        expected[f"{name}.features"], expected[f"{name}.recons"] = _run(sae, inputs)

    hook = "blocks.3.hook_resid_post"
    standard = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta(hook)))
    _randomise(standard, 1)
    record("standard", standard, x)

    jumprelu = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta("blocks.2.hook_mlp_out")))
    _randomise(jumprelu, 2)
    record("jumprelu", jumprelu, x)

    for name, rescale, seed in (("topk", False, 3), ("topk_rescale", True, 4)):
        cfg = TopKSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, metadata=_meta(hook)
        )
        sae = TopKSAE(cfg)
        _randomise(sae, seed)
        record(name, sae, x)

    training = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=_meta(hook)))
    _randomise(training, 5)
    assert training.cfg.rescale_acts_by_decoder_norm
    record("topk_training", training, x)
    for name in ("topk_rescale", "topk_training"):
        # sae-lens's own folded form: same features up to float32 rounding of the folded weights
        folded = LensSAE.load_from_disk(OUT / name)
        folded.fold_W_dec_norm()
        expected[f"{name}.features_folded_by_sae_lens"], _ = _run(folded, x)

    batch_cfgs = {
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=_meta(hook))),
        "matryoshka": (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[16, 32, D_SAE], metadata=_meta(hook)
            ),
        ),
    }  # fmt: skip
    for seed, (name, (cls, cfg)) in enumerate(batch_cfgs.items(), start=6):
        sae = cls(cfg)
        _randomise(sae, seed)
        _set_topk_threshold(sae, x)
        sae.save_model(_save_dir(f"{name}_training"))
        sae.save_inference_model(_save_dir(f"{name}_inference"))
        inference = LensSAE.load_from_disk(OUT / f"{name}_inference")
        assert isinstance(inference, JumpReLUSAE), type(inference)
        # sae-lens's inference form is the reference for the training checkpoint too
        f, r = _run(inference, x)
        for case in (f"{name}_training", f"{name}_inference"):
            expected[f"{case}.features"], expected[f"{case}.recons"] = f, r

    z = _inputs(10, (2, 3, N_HEADS, D_HEAD))
    expected["z"] = z
    cfg = StandardSAEConfig(
        d_in=N_HEADS * D_HEAD,
        d_sae=D_SAE,
        reshape_activations="hook_z",
        metadata=_meta("blocks.1.attn.hook_z"),
    )
    hook_z = StandardSAE(cfg)
    _randomise(hook_z, 11)
    record("hook_z", hook_z, z)
    return expected


CASES = (
    "standard", "jumprelu", "topk", "topk_rescale", "topk_training", "batchtopk_training",
    "batchtopk_inference", "matryoshka_training", "matryoshka_inference", "hook_z",
)  # fmt: skip


@torch.no_grad()
def round_trip(expected: dict[str, torch.Tensor]) -> dict[str, dict]:
    """pysteer loads each case, matches sae-lens's features, and saves; sae-lens loads that save."""
    from pysteer.sae import SAE

    report: dict[str, dict] = {}
    for case in CASES:
        x = expected["z"] if case == "hook_z" else expected["x"]
        ref = expected[f"{case}.features"]
        ours = SAE.load(OUT / case)
        f = ours.encode(x)
        # the in-memory object sae-lens loads from the same directory, converted without files
        lens_cls = TrainingSAE if case.endswith("_training") else LensSAE
        from_object = SAE.from_sae_lens(lens_cls.load_from_disk(OUT / case)).encode(x)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save(tmp)
            saved_cfg = json.loads((Path(tmp) / "cfg.json").read_text())
            back = LensSAE.load_from_disk(tmp)
            f_back = back.encode(x)
            r_back = back.decode(f_back)
        entry = {
            "pysteer_features_max_abs_diff": float((f - ref).abs().max()),
            "pysteer_from_object_features_max_abs_diff": float((from_object - ref).abs().max()),
            "pysteer_recons_max_abs_diff": float((ours.decode(f).reshape(x.shape) - expected[f"{case}.recons"]).abs().max()),
            "saved_by_pysteer": {key: saved_cfg.get(key) for key in ("architecture", "hook_name", "sae_lens_version", "reshape_activations")},
            "sae_lens_reload_class": type(back).__name__,
            "sae_lens_reload_hook_name": back.cfg.metadata.hook_name,
            "sae_lens_reload_reshape_activations": back.cfg.reshape_activations,
            "sae_lens_reload_features_max_abs_diff": float((f_back - ref).abs().max()),
            "sae_lens_reload_recons_max_abs_diff": float((r_back - expected[f"{case}.recons"]).abs().max()),
        }  # fmt: skip
        folded = expected.get(f"{case}.features_folded_by_sae_lens")
        if folded is not None:
            # the float32 rounding of folding: how far sae-lens's own folded form moves its features
            entry["sae_lens_folded_vs_unfolded_features_diff"] = float((folded - ref).abs().max())
            entry["pysteer_vs_sae_lens_folded_features_diff"] = float((f - folded).abs().max())
        report[case] = entry
    return report


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    expected = build_cases()
    save_file({k: v.clone().contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    report = {
        "versions": {
            "sae-lens": importlib.metadata.version("sae-lens"),
            "torch": torch.__version__,
        },
        "cases": round_trip(expected),
    }
    (OUT / "roundtrip.json").write_text(json.dumps(report, indent=2) + "\n")
    worst = max(max(v for k, v in c.items() if k.endswith("max_abs_diff")) for c in report["cases"].values())
    print(json.dumps(report, indent=2))
    print(f"worst max abs diff: {worst:.3g}; threads={os.environ.get('OMP_NUM_THREADS')}")
    # float32 features up to ~8 here: 1e-6 relative to the largest is about 2 ulp
    return 0 if worst <= 1e-6 * 8 else 1


if __name__ == "__main__":
    sys.exit(main())
