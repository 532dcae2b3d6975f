"""pysteer.SAE: construction, encode/decode/forward, steering rows, loaders and saving."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import pysteer
from pysteer.sae import SAE, SAEEditTable, SAEFormatError

D_IN, D_SAE = 13, 37


def make_sae(
    activation: str = "relu",
    *,
    dtype=torch.float32,
    seed: int = 0,
    apply_b_dec: bool = True,
    d_sae: int = D_SAE,
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D_IN, d_sae, generator=g) / math.sqrt(D_IN)
    return SAE(
        W_enc,
        0.1 * torch.randn(d_sae, generator=g),
        torch.randn(d_sae, D_IN, generator=g) / math.sqrt(d_sae),
        0.1 * torch.randn(D_IN, generator=g),
        activation=activation,
        threshold=0.2 * torch.rand(d_sae, generator=g) if activation == "jumprelu" else None,
        k=5 if activation == "topk" else None,
        apply_b_dec_to_input=apply_b_dec,
        metadata={"hook_name": "blocks.3.hook_resid_post"},
    ).to(dtype)


def manual_encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's encode written out by hand, in float64."""
    W_enc, b_enc, b_dec = sae.W_enc.double(), sae.b_enc.double(), sae.b_dec.double()
    xin = x.double() - b_dec if sae.apply_b_dec_to_input else x.double()
    pre = xin @ W_enc + b_enc
    if sae.activation == "relu":
        return pre.clamp_min(0)
    if sae.activation == "jumprelu":
        return pre.clamp_min(0) * (pre > sae.threshold.double())
    top = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.clamp_min(0))


def write_sae_lens(root: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(root / "sae_weights.safetensors"))
    return root


def sae_lens_files(sae: SAE) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = {
        "architecture": {"relu": "standard"}.get(sae.activation, sae.activation),
        "d_in": D_IN,
        "d_sae": D_SAE,
    }
    if sae.k is not None:
        cfg["k"] = sae.k
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    return cfg, tensors


def write_sparsify(root: Path, sae: SAE, cfg: dict | None = None, drop: str | None = None) -> Path:
    """A sparsify-layout directory: cfg.json (d_in, num_latents, k, ...) + sae.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    base = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    base.update(cfg or {})
    (root / "cfg.json").write_text(json.dumps(base))
    tensors = {
        "encoder.weight": sae.encoder_weight,
        "encoder.bias": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    if drop:
        tensors.pop(drop)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(root / "sae.safetensors"))
    return root


# ---------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------


def test_pysteer_exposes_sae_lazily():
    assert pysteer.SAE is SAE


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encode_decode_forward_match_the_formulas(activation):
    sae = make_sae(activation)
    x = torch.randn(2, 3, D_IN)
    f = sae.encode(x, backend="torch")
    assert f.shape == (2, 3, D_SAE)
    torch.testing.assert_close(f.double(), manual_encode(sae, x), rtol=1e-5, atol=1e-5)
    recon = f.double() @ sae.W_dec.double() + sae.b_dec.double()
    torch.testing.assert_close(sae.decode(f).double(), recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x, backend="torch").double(), recon, rtol=1e-5, atol=1e-5)


def test_topk_sparse_codes_round_trip_through_decode_sparse():
    sae = make_sae("topk")
    x = torch.randn(4, D_IN)
    values, indices = sae.encode_topk(x, backend="torch")
    assert values.shape == indices.shape == (4, 5)
    dense = sae.encode(x, backend="torch")
    torch.testing.assert_close(sae.decode_sparse(indices, values, backend="torch"), sae.decode(dense))
    with pytest.raises(ValueError, match="not 'topk'"):
        make_sae("relu").encode_topk(x)


def test_apply_b_dec_to_input_false_skips_the_input_shift():
    sae = make_sae("relu", apply_b_dec=False)
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(
        sae.encode(x, backend="torch").double(), manual_encode(sae, x), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(sae.encode(x, backend="torch"), make_sae("relu").encode(x, backend="torch"))


def test_to_moves_and_casts_every_tensor():
    sae = make_sae("jumprelu").to(torch.bfloat16)
    assert sae.dtype == torch.bfloat16
    for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold):
        assert t.dtype == torch.bfloat16
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_enc.stride() == (1, D_IN)
    assert not any(p.requires_grad for p in sae.buffers())
    assert "activation='jumprelu'" in repr(sae)


def test_constructor_rejects_inconsistent_tensors():
    W_enc = torch.zeros(D_IN, D_SAE)
    ok = {"b_enc": torch.zeros(D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}
    with pytest.raises(ValueError, match=r"W_dec has shape \(13, 37\)"):
        SAE(W_enc, ok["b_enc"], torch.zeros(D_IN, D_SAE), ok["b_dec"])
    with pytest.raises(ValueError, match="needs threshold"):
        SAE(W_enc, **ok, activation="jumprelu")
    with pytest.raises(ValueError, match="needs k"):
        SAE(W_enc, **ok, activation="topk", k=D_SAE + 1)
    with pytest.raises(ValueError, match="unknown activation 'gated'"):
        SAE(W_enc, **ok, activation="gated")


# ---------------------------------------------------------------------------------------------
# steering rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_steer_rows_keeps_the_error_term_and_row_zero(activation):
    sae = make_sae(activation)
    x = torch.randn(2, 4, D_IN, dtype=torch.bfloat16)  # the model's dtype differs from the SAE's
    table = sae.edit_table([1, 7, 30], num_rows=3)
    table.set(1, 7, "add", 2.0)
    table.set(2, 1, "ablate")
    table.set(2, 30, "scale", 0.5)
    rows = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0], dtype=torch.int32)
    y = sae.steer_rows(x, rows, table, backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype
    flat_x, flat_y = x.reshape(-1, D_IN), y.reshape(-1, D_IN)
    assert torch.equal(flat_y[rows == 0], flat_x[rows == 0])
    # row 1 adds 2 * W_dec[7] whatever the feature's value: exactly the SAE-space edit, error kept
    expect = (flat_x[rows == 1].float() + 2.0 * sae.W_dec[7]).to(torch.bfloat16)
    torch.testing.assert_close(flat_y[rows == 1], expect, rtol=0, atol=0.02)
    f = sae.encode(flat_x[rows == 2].float(), backend="torch")
    expect = flat_x[rows == 2].float() - f[:, 1:2] * sae.W_dec[1] - 0.5 * f[:, 30:31] * sae.W_dec[30]
    torch.testing.assert_close(flat_y[rows == 2].float(), expect, rtol=0, atol=0.03)


def test_steer_rows_with_a_cleared_table_is_bit_exact():
    sae = make_sae("relu")
    x = torch.randn(6, D_IN, dtype=torch.float16)
    table = sae.edit_table([2, 3], num_rows=2)
    table.set(1, 2, "set", 4.0)
    rows = torch.ones(6, dtype=torch.int32)
    assert not torch.equal(sae.steer_rows(x, rows, table, backend="torch"), x)
    kinds_before = table.kinds
    table.clear(1)
    assert table.kinds is kinds_before  # updated in place: captured graphs see the change
    assert torch.equal(sae.steer_rows(x, rows, table, backend="torch").view(torch.int16), x.view(torch.int16))


def test_edit_table_validates_on_the_host():
    with pytest.raises(ValueError, match="distinct"):
        SAEEditTable([1, 2, 1], 2, d_sae=10)
    with pytest.raises(ValueError, match=r"outside \[0, d_sae=10\)"):
        SAEEditTable([3, 10], 2, d_sae=10)
    table = SAEEditTable([1, 4], 3, d_sae=10)
    with pytest.raises(ValueError, match="row 0 is the identity"):
        table.set(0, 1, "add", 1.0)
    with pytest.raises(ValueError, match="feature 5 is not in the table"):
        table.set(1, 5, "add", 1.0)
    with pytest.raises(ValueError, match="unknown edit kind 'boost'"):
        table.set(1, 4, "boost", 1.0)
    with pytest.raises(ValueError, match="finite"):
        table.set(1, 4, "add", float("nan"))
    table.set(2, 4, "set", 3.0)
    assert table.kinds[2].tolist() == [0, 1] and table.strengths[2].tolist() == [0.0, 3.0]
    with pytest.raises(ValueError, match="built for d_sae=10"):
        make_sae().steer_rows(torch.zeros(1, D_IN), torch.ones(1, dtype=torch.int32), table)


# ---------------------------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_round_trip_sae_lens_layout(tmp_path, activation, dtype):
    sae = make_sae(activation, dtype=dtype)
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    stored = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert stored["W_enc"].shape == (D_IN, D_SAE)  # SAELens's [d_in, d_sae]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["dtype"] == str(dtype).removeprefix("torch.")
    back = SAE.load(tmp_path / "sae")
    assert (back.activation, back.k, back.apply_b_dec_to_input) == (sae.activation, sae.k, True)
    assert back.dtype == dtype and back.metadata["hook_name"] == "blocks.3.hook_resid_post"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    x = torch.randn(3, D_IN, dtype=dtype)
    assert torch.equal(back(x, backend="torch"), sae(x, backend="torch"))


def test_load_sparsify_layout(tmp_path):
    sae = make_sae("topk")
    root = write_sparsify(tmp_path / "layers.3", sae)
    back = SAE.load(root, dtype=torch.float64)
    assert (back.activation, back.k, back.d_in, back.d_sae) == ("topk", 5, D_IN, D_SAE)
    assert back.dtype == torch.float64 and back.apply_b_dec_to_input
    assert torch.equal(back.W_enc.float(), sae.W_enc)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    # sparsify: top-k of relu(encoder(x - b_dec)); same winners' values as relu(top-k(pre))
    pre = (x - back.b_dec) @ back.encoder_weight.t() + back.b_enc
    top = pre.relu().topk(5)
    values, indices = back.encode_topk(x, backend="torch")
    torch.testing.assert_close(values, top.values)
    # and it saves to the SAELens layout and loads back identically
    again = SAE.load(back.save(tmp_path / "as_lens"))
    assert torch.equal(again.W_dec, back.W_dec) and again.k == 5


def test_sparsify_num_latents_zero_uses_expansion_factor(tmp_path):
    root = write_sparsify(
        tmp_path / "s", make_sae("topk", d_sae=3 * D_IN), cfg={"num_latents": 0, "expansion_factor": 3}
    )
    assert SAE.load(root).d_sae == 3 * D_IN
    root = write_sparsify(tmp_path / "t", make_sae("topk"), cfg={"num_latents": 0, "expansion_factor": 3})
    with pytest.raises(
        SAEFormatError, match=r"'encoder.weight' has shape \[37, 13\], expected \[d_sae, d_in\] = \[39, 13\]"
    ):
        SAE.load(root)


def test_from_sae_lens_duck_typed_object():
    @dataclass
    class FakeMeta:
        hook_name: str = "blocks.2.hook_resid_pre"
        model_name: str = "tiny"

    @dataclass
    class FakeJumpReLUConfig:
        d_in: int
        d_sae: int
        apply_b_dec_to_input: bool = False
        normalize_activations: str = "none"
        meta: FakeMeta = field(default_factory=FakeMeta)

        @classmethod
        def architecture(cls) -> str:
            return "jumprelu"

    src = make_sae("jumprelu")
    fake = SimpleNamespace(
        cfg=FakeJumpReLUConfig(D_IN, D_SAE),
        W_enc=torch.nn.Parameter(src.W_enc.clone()),
        b_enc=torch.nn.Parameter(src.b_enc.clone()),
        W_dec=torch.nn.Parameter(src.W_dec.clone()),
        b_dec=torch.nn.Parameter(src.b_dec.clone()),
        threshold=torch.nn.Parameter(src.threshold.clone()),
    )
    sae = SAE.from_sae_lens(fake)
    assert sae.activation == "jumprelu" and not sae.apply_b_dec_to_input
    assert sae.metadata["hook_name"] == "blocks.2.hook_resid_pre"
    assert torch.equal(sae.threshold, src.threshold) and not sae.W_enc.requires_grad
    topk_fake = SimpleNamespace(
        cfg={"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 5},
        **sae_lens_files(make_sae("topk"))[1],
    )
    assert SAE.from_sae_lens(topk_fake).k == 5
    with pytest.raises(SAEFormatError, match="has no 'cfg'"):
        SAE.from_sae_lens(SimpleNamespace(W_enc=src.W_enc))


def test_older_sae_lens_config_and_log_threshold(tmp_path):
    src = make_sae("topk")
    cfg, tensors = sae_lens_files(src)
    cfg = {
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "d_in": D_IN,
        "d_sae": D_SAE,
    }
    assert SAE.load(write_sae_lens(tmp_path / "a", cfg, tensors)).k == 5
    src = make_sae("jumprelu")
    cfg, tensors = sae_lens_files(src)
    tensors["log_threshold"] = tensors.pop("threshold").log()
    back = SAE.load(write_sae_lens(tmp_path / "b", cfg, tensors))
    torch.testing.assert_close(back.threshold, src.threshold)
    cfg = {"architecture": "batchtopk", "k": 5.0, "d_in": D_IN, "d_sae": D_SAE}
    assert (
        SAE.load(write_sae_lens(tmp_path / "c", cfg, sae_lens_files(make_sae("relu"))[1])).activation
        == "topk"
    )
    # pre-6.0: hook_point is the hook name, and a hook_z one means reshape_activations "hook_z"
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.2.attn.hook_z"}
    old = SAE.load(write_sae_lens(tmp_path / "d", cfg, sae_lens_files(make_sae("relu"))[1]))
    assert old.metadata["hook_name"] == "blocks.2.attn.hook_z" and old.reshape_activations == "hook_z"
    cfg = {**cfg, "hook_point": "blocks.2.hook_resid_post"}
    assert (
        SAE.load(write_sae_lens(tmp_path / "e", cfg, sae_lens_files(make_sae("relu"))[1])).reshape_activations
        == "none"
    )


def test_expected_average_only_in_is_folded_into_the_weights(tmp_path):
    src = make_sae("relu")
    cfg, tensors = sae_lens_files(src)
    cfg["normalize_activations"] = "expected_average_only_in"
    root = write_sae_lens(tmp_path / "n", cfg, tensors)
    s = 2.5
    folded = SAE.load(root, norm_scaling_factor=s)
    assert folded.metadata["folded_norm_scaling_factor"] == s
    x = torch.randn(5, D_IN)
    # the SAE trained on s * x: features of s * x, reconstruction scaled back by 1 / s
    torch.testing.assert_close(
        folded.encode(x, backend="torch"), src.encode(s * x, backend="torch"), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        folded(x, backend="torch"), src(s * x, backend="torch") / s, rtol=1e-5, atol=1e-5
    )
    cfg["norm_scaling_factor"] = s
    from_cfg = SAE.load(write_sae_lens(tmp_path / "m", cfg, tensors))
    assert torch.equal(from_cfg.W_enc, folded.W_enc)
    del cfg["norm_scaling_factor"]
    with pytest.warns(UserWarning, match="without a norm_scaling_factor"):
        unscaled = SAE.load(write_sae_lens(tmp_path / "u", cfg, tensors))
    assert torch.equal(unscaled.W_enc, src.W_enc)


def _lens_dir(tmp_path: Path, activation: str = "relu", cfg_edit=None, tensor_edit=None) -> Path:
    cfg, tensors = sae_lens_files(make_sae(activation))
    if cfg_edit:
        cfg_edit(cfg)
    if tensor_edit:
        tensor_edit(tensors)
    return write_sae_lens(tmp_path / "bad", cfg, tensors)


@pytest.mark.parametrize(
    ("activation", "cfg_edit", "tensor_edit", "message"),
    [
        ("relu", None, lambda t: t.pop("W_enc"), "missing tensor 'W_enc'"),
        (
            "relu",
            None,
            lambda t: t.update(b_dec=torch.zeros(D_IN + 1)),
            "'b_dec' has shape [14], expected [d_in] = [13]",
        ),
        (
            "relu",
            lambda c: c.update(d_in=12),
            None,
            "'W_enc' has shape [13, 37], expected [d_in, d_sae] = [12, 37] (config: d_in=12",
        ),
        ("relu", lambda c: c.pop("d_sae"), None, "missing field 'd_sae'"),
        ("relu", lambda c: c.update(d_in="13"), None, "field 'd_in' must be a positive integer"),
        (
            "relu",
            lambda c: c.update(architecture="gated"),
            None,
            "unknown architecture 'gated' (field 'architecture')",
        ),
        ("relu", lambda c: c.update(activation_fn="tanh-relu"), None, "unknown activation_fn 'tanh-relu'"),
        ("jumprelu", None, lambda t: t.pop("threshold"), "missing tensor 'threshold'"),
        ("topk", lambda c: c.pop("k"), None, "missing field 'k'"),
        ("topk", lambda c: c.update(k=D_SAE + 1), None, "field 'k'=38 exceeds d_sae=37"),
        (
            "relu",
            lambda c: c.update(normalize_activations="layer_norm"),
            None,
            "normalize_activations='layer_norm' is not supported",
        ),
        (
            "relu",
            None,
            lambda t: t.update(b_enc=torch.zeros(D_SAE, dtype=torch.int64)),
            "'b_enc' must be floating point",
        ),
    ],
)
def test_malformed_sae_lens_files_raise_naming_the_field(
    tmp_path, activation, cfg_edit, tensor_edit, message
):
    root = _lens_dir(tmp_path, activation, cfg_edit, tensor_edit)
    with pytest.raises(SAEFormatError) as err:
        SAE.load(root)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "drop", "message"),
    [
        ({}, "encoder.weight", "missing tensor 'encoder.weight'"),
        ({"activation": "groupmax"}, None, "unknown activation 'groupmax' (field 'activation')"),
        ({"transcode": True}, None, "transcoders are not supported"),
        ({"skip_connection": True}, None, "skip_connection"),
        ({"d_in": 14}, None, "'encoder.weight' has shape [37, 13], expected [d_sae, d_in] = [37, 14]"),
    ],
)
def test_malformed_sparsify_files_raise_naming_the_field(tmp_path, cfg, drop, message):
    root = write_sparsify(tmp_path / "bad", make_sae("topk"), cfg=cfg, drop=drop)
    with pytest.raises(SAEFormatError) as err:
        SAE.load(root)
    assert message in str(err.value)


def test_unreadable_or_missing_files_raise(tmp_path):
    with pytest.raises(SAEFormatError, match="no SAE found"):
        SAE.load(tmp_path)
    write_sparsify(tmp_path / "layers.0", make_sae("topk"))
    with pytest.raises(SAEFormatError, match=r"subdirectories \['layers.0'\] hold SAEs"):
        SAE.load(tmp_path)
    root = _lens_dir(tmp_path)
    (root / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json: not valid JSON"):
        SAE.load(root)
    root = _lens_dir(tmp_path)
    (root / "sae_weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SAEFormatError, match="not a readable safetensors file"):
        SAE.load(root)
    root = _lens_dir(tmp_path)
    (root / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match="cfg.json: missing"):
        SAE.load(root)


@pytest.mark.parametrize(
    ("arch", "field", "value", "tensor", "match"),
    [
        ("standard", "rescale_acts_by_decoder_norm", True, None, "rescale_acts_by_decoder_norm"),
        ("topk", "reshape_activations", "hook_q", None, "reshape_activations"),
        ("batchtopk", "k", 5, torch.tensor([0.5, 0.6]), "topk_threshold"),
    ],
)
def test_sae_lens_fields_that_change_the_math_are_refused_by_name(
    tmp_path, arch, field, value, tensor, match
):
    """Loading these as if absent would compute different features without a word (the
    implemented ones are checked against sae-lens itself in test_sae_lens_parity.py)."""
    cfg, tensors = sae_lens_files(make_sae("topk"))
    cfg["architecture"] = arch
    cfg[field] = value
    if tensor is not None:
        tensors["topk_threshold"] = tensor
    with pytest.raises(SAEFormatError, match=match):
        SAE.load(write_sae_lens(tmp_path / field, cfg, tensors))


def test_hook_names_map_to_sites():
    from pysteer.sae import site_for_hook_name

    assert site_for_hook_name("blocks.6.hook_resid_post") == "layers.6.resid"
    assert site_for_hook_name("blocks.0.hook_resid_pre") == "layers.0.resid_pre"
    assert site_for_hook_name("blocks.3.attn.hook_z") == "layers.3.attn.heads"
    assert site_for_hook_name("blocks.2.mlp.hook_post") == "layers.2.mlp.hidden"
    assert site_for_hook_name("blocks.11.hook_mlp_out") == "layers.11.mlp.out"
    assert site_for_hook_name("hook_embed") == "embed"
    with pytest.raises(ValueError, match="hook_resid_mid"):
        site_for_hook_name("blocks.4.hook_resid_mid")
    sae = make_sae("relu")
    sae.metadata["hook_name"] = "blocks.1.hook_attn_out"
    assert sae.site == "layers.1.attn.out"
