"""pysteer.SAE against SAEs that sae-lens 6.54.12 itself made, saved and ran.

The fixtures under ``tests/data/saelens/`` (directories saved by sae-lens, its features and
reconstructions on fixed inputs, and what sae-lens computed from pysteer's own saves) are written
by ``bench/peers/saelens_parity.py`` in the peer virtualenv; these tests need no sae-lens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pysteer
from pysteer.models.tiny import tiny_model
from pysteer.sae import SAE, SAE_LENS_FORMAT_VERSION, SAEFormatError
from pysteer.sae_steering import SAEEdit

DATA = Path(__file__).parent / "data" / "saelens"
EXACT = ("standard", "jumprelu", "topk", "batchtopk_training", "batchtopk_inference", "matryoshka_training",
         "matryoshka_inference", "hook_z")  # fmt: skip
# rescale_acts_by_decoder_norm: folded into the weights, so float32 rounding of the fold remains
RESCALED = ("topk_rescale", "topk_training")
CASES = EXACT + RESCALED
# the fields a sae-lens 6.x cfg.json holds at its top level
SAE_LENS_6_FIELDS = {
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata",
}  # fmt: skip


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "expected.safetensors"))


def _inputs(case: str, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    return expected["z"] if case == "hook_z" else expected["x"]


def _close(got: torch.Tensor, ref: torch.Tensor, case: str) -> None:
    """Within 1e-6 (bit-identical in the peer run, roundtrip.json; a CPU with other kernels may round
    a last bit differently); the decoder-norm cases within 1e-6 of the largest value (~2 ulp: the
    float32 rounding of the folded weights)."""
    bound = 1e-6 if case in EXACT else 1e-6 * float(ref.abs().max())
    diff = float((got - ref).abs().max())
    assert diff <= bound, f"{case}: max abs diff {diff:.3g} > {bound:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_features_and_reconstruction_match_sae_lens(case, expected):
    sae = SAE.load(DATA / case)
    x = _inputs(case, expected)
    f = sae.encode(x, backend="torch")
    _close(f, expected[f"{case}.features"], case)
    recons = sae.decode(f).reshape(x.shape)
    _close(recons, expected[f"{case}.recons"], case)
    _close(sae(x, backend="torch"), expected[f"{case}.recons"], case)


@pytest.mark.parametrize("case", ["topk_rescale", "topk_training", "batchtopk_training"])
def test_ignoring_the_decoder_norm_fields_would_be_caught(tmp_path, case, expected):
    """The fixtures' decoder norms span 0.3-3: without the folding the features move by far more
    than the tolerance, so the parity test above can fail."""
    cfg = json.loads((DATA / case / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = False
    root = tmp_path / case
    root.mkdir()
    (root / "cfg.json").write_text(json.dumps(cfg))
    (root / "sae_weights.safetensors").write_bytes((DATA / case / "sae_weights.safetensors").read_bytes())
    f = SAE.load(root).encode(expected["x"], backend="torch")
    assert (f - expected[f"{case}.features"]).abs().max() > 0.1


def test_batchtopk_training_checkpoint_runs_as_jumprelu_at_topk_threshold():
    tensors = load_file(str(DATA / "batchtopk_training" / "sae_weights.safetensors"))
    sae = SAE.load(DATA / "batchtopk_training")
    assert sae.activation == "jumprelu" and sae.k is None
    assert torch.equal(sae.threshold, torch.full_like(sae.threshold, tensors["topk_threshold"].item()))
    assert sae.metadata["folded_decoder_norms"] is True
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.d_sae), atol=1e-6)


def test_hook_z_sae_takes_heads_and_maps_to_the_attn_heads_site(expected):
    sae = SAE.load(DATA / "hook_z")
    z = expected["z"]  # [2, 3, n_heads, d_head]
    assert sae.reshape_activations == "hook_z" and sae.site == "layers.1.attn.heads"
    f = sae.encode(z)
    assert f.shape == (*z.shape[:-2], sae.d_sae)
    assert torch.equal(sae.encode(z.flatten(-2)), f)  # the attn.heads site's flat, head-major tensor
    assert sae(z).shape == z.shape
    with pytest.raises(ValueError, match="n_heads \\* d_head"):
        sae.encode(torch.randn(2, 3, 5, 8))


@pytest.mark.parametrize("case", CASES)
def test_save_writes_the_sae_lens_6_layout(tmp_path, case, expected):
    sae = SAE.load(DATA / case)
    sae.save(tmp_path / case)
    cfg = json.loads((tmp_path / case / "cfg.json").read_text())
    source = json.loads((DATA / case / "cfg.json").read_text())
    assert SAE_LENS_6_FIELDS <= set(cfg)
    assert cfg["sae_lens_version"] == cfg["metadata"]["sae_lens_version"] == SAE_LENS_FORMAT_VERSION
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == source["metadata"]["hook_name"]
    assert cfg["reshape_activations"] == source["reshape_activations"]
    if cfg["architecture"] == "topk":
        assert cfg["rescale_acts_by_decoder_norm"] is False and cfg["k"] == source["k"]
    again = SAE.load(tmp_path / case)
    x = _inputs(case, expected)
    assert torch.equal(again.encode(x, backend="torch"), sae.encode(x, backend="torch"))


def test_sae_lens_loaded_pysteers_saves_with_the_same_hook_and_features():
    """Recorded by the peer script: sae-lens 6.54.12 loading each of pysteer's saves."""
    report = json.loads((DATA / "roundtrip.json").read_text())
    assert report["versions"]["sae-lens"] == SAE_LENS_FORMAT_VERSION
    assert set(report["cases"]) == set(CASES)
    for case, entry in report["cases"].items():
        source = json.loads((DATA / case / "cfg.json").read_text())
        assert entry["sae_lens_reload_hook_name"] == source["metadata"]["hook_name"], case
        assert entry["sae_lens_reload_reshape_activations"] == source["reshape_activations"], case
        bound = 0.0 if case in EXACT else 2e-6
        assert entry["sae_lens_reload_features_max_abs_diff"] <= bound, case
        assert entry["pysteer_features_max_abs_diff"] <= bound, case
        assert entry["pysteer_from_object_features_max_abs_diff"] <= bound, case


def _edited_cfg(tmp_path: Path, case: str, **changes) -> Path:
    cfg = json.loads((DATA / case / "cfg.json").read_text())
    cfg.update(changes)
    root = tmp_path / "edited"
    root.mkdir()
    (root / "cfg.json").write_text(json.dumps(cfg))
    (root / "sae_weights.safetensors").write_bytes((DATA / case / "sae_weights.safetensors").read_bytes())
    return root


@pytest.mark.parametrize(
    ("case", "changes", "match"),
    [
        (
            "standard",
            {"use_new_gating": True},
            r"sae_lens_version 6.54.12\): field 'use_new_gating' is not known",
        ),
        ("topk", {"sae_lens_version": "6.99.0", "k_aux": 3}, r"sae_lens_version 6.99.0\): field 'k_aux'"),
        ("hook_z", {"reshape_activations": "hook_q"}, "'reshape_activations'='hook_q'"),
        ("standard", {"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm.*'standard'"),
        ("topk", {"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ],
)
def test_fields_pysteer_does_not_implement_are_refused_by_name_and_version(tmp_path, case, changes, match):
    with pytest.raises(SAEFormatError, match=match):
        SAE.load(_edited_cfg(tmp_path, case, **changes))


def test_training_only_fields_are_ignored():
    cfg = json.loads((DATA / "matryoshka_training" / "cfg.json").read_text())
    assert {"matryoshka_widths", "topk_threshold_lr", "aux_loss_coefficient"} <= set(cfg)
    assert SAE.load(DATA / "matryoshka_training").activation == "jumprelu"


def _heads_sae(n_heads: int, head_dim: int, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    d, m = n_heads * head_dim, 40
    return SAE(
        torch.randn(d, m, generator=g) / d**0.5,
        0.01 * torch.randn(m, generator=g),
        torch.randn(m, d, generator=g) / d**0.5,
        0.01 * torch.randn(d, generator=g),
        reshape_activations="hook_z",
    )


def test_sae_edit_of_a_hook_z_sae_at_attn_heads():
    """At attn.heads (the output projection's input, head-major) a zero edit is bit-exact and an
    ``add`` adds strength x the latent's decoder row there, as a hand-written hook does."""
    model = tiny_model("llama")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    sae = _heads_sae(cfg.num_attention_heads, head_dim)
    ids = torch.randint(3, 128, (2, 6))
    o_proj = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        base = model(ids).logits
        with pysteer.steer(model, [SAEEdit("layers.1.attn.heads", sae, {3: ("add", 0.0)})]):
            assert torch.equal(model(ids).logits, base)
        with pysteer.steer(model, [SAEEdit("layers.1.attn.heads", sae, {3: ("add", 4.0)})]):
            edited = model(ids).logits
        handle = o_proj.register_forward_pre_hook(lambda _m, args: (args[0] + 4.0 * sae.W_dec[3],))
        try:
            manual = model(ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(edited, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, base, atol=1e-3)
    edit = SAEEdit("layers.1.resid", sae, {3: ("add", 1.0)})
    with pytest.raises(ValueError, match="attn.heads site"), pysteer.steer(model, [edit]):
        pass


def test_decoder_norms_fold_before_the_input_scale(tmp_path, expected):
    """rescale_acts_by_decoder_norm with expected_average_only_in: the rescaling uses the decoder as
    stored, the input scale s applies to the raw input; written out by hand in float64."""
    s = 2.5
    root = _edited_cfg(tmp_path, "topk_rescale", normalize_activations="expected_average_only_in")
    sae = SAE.load(root, norm_scaling_factor=s)
    w = {k: v.double() for k, v in load_file(str(root / "sae_weights.safetensors")).items()}
    x = expected["x"].double()
    n = w["W_dec"].norm(dim=-1)
    pre = ((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n
    top = pre.topk(sae.k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    recons = ((f / n) @ w["W_dec"] + w["b_dec"]) / s
    torch.testing.assert_close(sae.encode(expected["x"]).double(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(expected["x"]).double(), recons, rtol=1e-5, atol=1e-5)


def test_steering_file_keeps_a_hook_z_sae(tmp_path):
    sae = _heads_sae(4, 16)
    path = pysteer.save([SAEEdit("layers.1.attn.heads", sae, {3: ("add", 2.0)})], tmp_path / "s.safetensors")
    (edit,) = next(iter(pysteer.load(path).configs.values()))
    assert edit.sae.reshape_activations == "hook_z"
    assert torch.equal(edit.sae.W_dec, sae.W_dec)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"W_skip": torch.zeros(16, 16)}, r"sae_lens_version 6.54.12\): tensor 'W_skip' is not known"),
        ({"scaling_factor": torch.full((48,), 2.0)}, "tensor 'scaling_factor'"),
    ],
)
def test_tensors_pysteer_does_not_implement_are_refused_by_name(tmp_path, extra, match):
    root = _edited_cfg(tmp_path, "standard")
    tensors = load_file(str(root / "sae_weights.safetensors"))
    save_file({**tensors, **extra}, str(root / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=match):
        SAE.load(root)
    save_file({**tensors, "scaling_factor": torch.ones(48)}, str(root / "sae_weights.safetensors"))
    assert SAE.load(root).activation == "relu"  # all ones: a no-op, as sae-lens drops it
