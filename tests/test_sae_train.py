"""SAE training (``pysteer.train_sae``): planted-feature recovery, AuxK revival, resumable
checkpoints, streaming from a traced dataset, the ReLU + L1 variant and the SAELens-layout save."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import triton_available

import pysteer
from pysteer import SAE
from pysteer.models.tiny import tiny_model
from pysteer.sae_train import CHECKPOINT_FILE, SAE_SUBDIR, _TopKEncode, train_sae
from pysteer.tracing import TraceReader, trace_dataset

D_IN, N_FEATURES, ACTIVE = 32, 64, 4


def planted(n: int, d: int = D_IN, n_features: int = N_FEATURES, active: int = ACTIVE, seed: int = 0):
    """``(x [n, d], directions [n_features, d])``: each row sums ``active`` random unit feature
    directions with magnitudes in [0.5, 2.5], plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ dirs + 0.3, dirs


def fve(sae: SAE, x: torch.Tensor) -> float:
    err = (sae(x) - x).pow(2).sum()
    return 1 - float(err / (x - x.mean(0)).pow(2).sum())


def recovered(sae: SAE, dirs: torch.Tensor, cos: float = 0.9) -> float:
    """Fraction of planted directions matched by some decoder row with cosine above ``cos``."""
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return float(((rows @ dirs.T).max(0).values > cos).float().mean())


QUICK = {"progress": False, "batch_tokens": 256, "lr": 3e-3}


def test_topk_training_recovers_planted_features():
    rows, dirs = planted(16384 + 4096)
    x, held_out = rows[:16384], rows[16384:]
    opts = {**QUICK, "k": ACTIVE, "d_sae": 2 * N_FEATURES, "dead_tokens": 2048}
    # the same initialisation after one step at a negligible learning rate
    untrained = train_sae(x, **{**opts, "lr": 1e-12}, max_tokens=256)
    trained = train_sae(x, **opts, max_tokens=4 * x.shape[0])
    assert fve(untrained, held_out) < 0.5
    assert fve(trained, held_out) > 0.85
    assert recovered(trained, dirs) > 0.85
    assert recovered(untrained, dirs) < 0.1
    info = trained.metadata["training"]
    assert info["tokens"] == 4 * x.shape[0] and info["l0"] <= ACTIVE and 0.85 < info["fve"] <= 1
    assert torch.allclose(trained.W_dec.norm(dim=1), torch.ones(trained.d_sae), atol=1e-5)


def parked_latents_sae(dirs: torch.Tensor, live: int, d_sae: int, k: int) -> SAE:
    """A TopK SAE whose first ``live`` latents encode/decode ``dirs[:live]`` with encoder bias 1, so
    they always win the top k; the others have tiny random encoders and never fire: dead."""
    g = torch.Generator().manual_seed(1)
    d = dirs.shape[1]
    enc = torch.randn(d_sae, d, generator=g) * 0.01
    enc[:live] = dirs[:live]
    dec = torch.randn(d_sae, d, generator=g)
    dec[:live] = dirs[:live]
    b_enc = torch.zeros(d_sae)
    b_enc[:live] = 1.0
    return SAE(
        enc.T.contiguous(), b_enc, dec / dec.norm(dim=1, keepdim=True), torch.zeros(d), activation="topk", k=k
    )


@pytest.mark.parametrize("auxk_alpha", [0.0, 1 / 32])
def test_auxk_loss_revives_dead_latents(auxk_alpha):
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))[0]  # 32 orthonormal features
    codes = torch.zeros(8192, D_IN).scatter_(
        1,
        torch.rand(8192, D_IN, generator=g).argsort(1)[:, :ACTIVE],
        torch.rand(8192, ACTIVE, generator=g) * 2 + 0.5,
    )
    x = codes @ dirs
    init = parked_latents_sae(dirs, live=16, d_sae=64, k=ACTIVE)
    logs: list[dict] = []
    sae = train_sae(x, init=init, **QUICK, k=ACTIVE, d_sae=64, dead_tokens=512, auxk_alpha=auxk_alpha,
                    log_every=4, callback=logs.append)  # fmt: skip
    assert logs[0]["dead_fraction"] == 0.75  # the 48 parked latents
    alive = float((sae.encode(x[:2048]) > 0).any(0).float().mean())
    if auxk_alpha == 0:
        assert logs[-1]["dead_fraction"] == 0.75 and alive == 0.25  # no gradient ever reaches them
    else:
        assert logs[-1]["dead_fraction"] < 0.5 and alive > 0.6


def test_topk_encode_backward_matches_dense_autograd():
    g = torch.Generator().manual_seed(0)
    T, d, m, k = 7, 5, 11, 3
    x, enc, b = (
        torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in ((T, d), (m, d), (m,))
    )
    w = torch.randn(T, k, generator=g, dtype=torch.float64)
    values, _ = _TopKEncode.apply(x, enc, b, k, "torch")
    sparse = torch.autograd.grad((values * w).sum(), (x, enc, b))
    dense_values = torch.relu(torch.topk(x @ enc.T + b, k, dim=1).values)
    dense = torch.autograd.grad((dense_values * w).sum(), (x, enc, b))
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _kernel_backends() -> list:
    """The TopK encode's kernel backends runnable here (Triton runs in its interpreter without a GPU)."""
    reason = None if triton_available() else "triton is not installed"
    if reason is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "no CUDA device and TRITON_INTERPRET is not 1"
    return [pytest.param("triton", marks=pytest.mark.skipif(reason is not None, reason=reason or ""))]


@pytest.mark.parametrize("backend", _kernel_backends())
def test_topk_encode_on_a_kernel_backend_matches_torch(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    T, d, m, k = 9, 16, 40, 4
    x, enc, b = (torch.randn(*s, generator=g).to(device).requires_grad_() for s in ((T, d), (m, d), (m,)))
    w = torch.randn(T, k, generator=g).to(device)
    got = _TopKEncode.apply(x, enc, b, k, backend)
    want = _TopKEncode.apply(x, enc, b, k, "torch")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    grads = [torch.autograd.grad((v * w).sum(), (x, enc, b)) for v in (got[0], want[0])]
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_)


class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def callback(record):
        if record["step"] == step:
            raise Interrupted

    return callback


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_resume_from_checkpoint_equals_uninterrupted_run(kind, tmp_path):
    x, _ = planted(4096)
    opts = {**QUICK, "kind": kind, "k": ACTIVE, "d_sae": 96, "dead_tokens": 256, "max_tokens": 2 * x.shape[0],
            "lr_warmup_steps": 5, "l1_warmup_steps": 5, "l1_coefficient": 0.05, "log_every": 1, "checkpoint_every": 7}  # fmt: skip
    whole = train_sae(x, checkpoint_dir=tmp_path / "whole", **opts)
    with pytest.raises(Interrupted):
        train_sae(x, checkpoint_dir=tmp_path / "cut", callback=interrupt_at(18), **opts)
    resumed_at: list[int] = []
    resumed = train_sae(
        x, checkpoint_dir=tmp_path / "cut", callback=lambda r: resumed_at.append(r["step"]), **opts
    )
    assert resumed_at[0] == 15  # continued after the step-14 checkpoint
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 33))  # steps 15-18 of the interrupted run are not listed twice
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    # a finished run called again returns the same SAE without training
    again = train_sae(
        x, checkpoint_dir=tmp_path / "whole", callback=lambda r: pytest.fail("trained again"), **opts
    )
    assert torch.equal(again.W_dec, whole.W_dec)
    assert again.metadata["training"] == whole.metadata["training"]
    assert whole.metadata["training"]["steps"] == 32 and "fve" in whole.metadata["training"]


def test_checkpoint_of_another_run_is_refused_before_writing(tmp_path):
    x, _ = planted(1024)
    train_sae(x, checkpoint_dir=tmp_path, **QUICK, k=ACTIVE, d_sae=64)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"different run \(options.k: checkpoint 4, now 8"):
        train_sae(x, checkpoint_dir=tmp_path, **QUICK, k=8, d_sae=64)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "gated"}, "kind must be one of topk, relu"),
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 200, "d_sae": 64}, "k=200 exceeds d_sae=64"),
        ({"b_dec_init": "median"}, "b_dec_init must be one of"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"learning_rate": 1e-3}, "unknown option 'learning_rate'"),
        ({"init": "sae/"}, "init must be a pysteer.SAE, got str"),
        (
            {"init": SAE(torch.zeros(8, 16), torch.zeros(16), torch.zeros(16, 8), torch.zeros(8))},
            "init has d_in=8",
        ),
    ],
)
def test_bad_options_are_named_before_anything_is_written(options, message, tmp_path):
    x, _ = planted(512)
    with pytest.raises((ValueError, TypeError), match=message):
        train_sae(x, checkpoint_dir=tmp_path / "run", progress=False, **options)
    assert not (tmp_path / "run").exists()


def test_streams_from_a_traced_dataset(tmp_path):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (40, 31, 57, 22, 64, 50)]
    trace_dataset(model, docs, ["layers.0.resid", "layers.1.resid"], tmp_path / "trace", dtype=torch.float32,
                  shard_tokens=60)  # fmt: skip
    reader = TraceReader(tmp_path / "trace")
    assert len(reader.shards) > 1
    with pytest.raises(ValueError, match="name one with site="):
        train_sae(reader, progress=False)
    with pytest.raises(ValueError, match="not in this trace; traced sites: layers.0.resid, layers.1.resid"):
        train_sae(reader, site="layers.1.mlp.out", progress=False)
    x = reader.load("layers.1.resid")
    opts = {**QUICK, "batch_tokens": 64, "k": 8, "expansion": 4}
    untrained = train_sae(reader, site="layers.1.resid", **{**opts, "lr": 1e-12}, max_tokens=64)
    sae = train_sae(reader, site="layers.1.resid", **opts, max_tokens=30 * reader.num_rows,
                    checkpoint_dir=tmp_path / "sae-run")  # fmt: skip
    assert sae.d_in == x.shape[1] and sae.d_sae == 4 * x.shape[1]
    assert sae.metadata["site"] == "layers.1.resid"
    assert sae.metadata["hook_name"] == "blocks.1.hook_resid_post" and sae.site == "layers.1.resid"
    assert sae.metadata["training"]["tokens"] == 30 * reader.num_rows
    assert fve(sae, x) > 0.8 > fve(untrained, x) + 0.3
    cfg = json.loads((tmp_path / "sae-run" / SAE_SUBDIR / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and "sae_lens_version" in cfg  # sae-lens 6.x layout
    assert SAE.load(tmp_path / "sae-run" / SAE_SUBDIR).site == "layers.1.resid"
    lines = (tmp_path / "sae-run" / "log.jsonl").read_text().splitlines()
    assert {"fve", "l0", "dead_fraction", "aux_loss"} <= set(json.loads(lines[-1]))


def test_iterable_of_chunks_is_rebatched():
    x, _ = planted(3000)
    chunks = list(x.split(77))
    steps: list[int] = []
    sae = train_sae(
        iter(chunks), **QUICK, k=ACTIVE, d_sae=64, log_every=1, callback=lambda r: steps.append(r["tokens"])
    )
    assert steps == [*range(256, 3000, 256), 3000]  # one pass of an iterator, re-batched to 256 rows
    assert sae.metadata["training"]["tokens"] == 3000


def test_relu_l1_coefficient_trades_reconstruction_for_sparsity():
    x, _ = planted(8192)
    opts = {**QUICK, "kind": "relu", "d_sae": 128, "max_tokens": 3 * x.shape[0]}
    loose = train_sae(x, l1_coefficient=0.01, **opts)
    tight = train_sae(x, l1_coefficient=1.0, **opts)
    l0 = {
        name: float((s.encode(x) > 0).sum(1).float().mean())
        for name, s in (("loose", loose), ("tight", tight))
    }
    assert loose.activation == "relu" and loose.k is None
    assert l0["tight"] < 0.6 * l0["loose"]
    assert fve(loose, x) > fve(tight, x) > 0.5


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_saved_sae_lens_layout_reloads_bit_exactly(kind, tmp_path):
    x, _ = planted(1024)
    sae = train_sae(x, **QUICK, kind=kind, k=ACTIVE, d_sae=64, checkpoint_dir=tmp_path / "run")
    sae.save(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard"}[kind]
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (
        D_IN,
        64,
        True,
        "none",
    )
    for path in (tmp_path / "out", tmp_path / "run" / SAE_SUBDIR):
        back = SAE.load(path)
        assert (back.activation, back.k) == (sae.activation, sae.k)
        for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(back, name), getattr(sae, name)), name
        assert torch.equal(back(x), sae(x))


def test_train_sae_is_a_lazy_public_name():
    assert pysteer.train_sae is train_sae
