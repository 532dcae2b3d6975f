"""pysteer.compat.pyreft: a LoReFT saved by pyreft loads as pysteer.LoReFT and gives pyreft's outputs.

The fixture ``tests/data/pyreft/loreft-smollm2-l15-r4`` was written by pyreft 0.1.0's
``ReftModel.save`` and ``pyreft-outputs.json`` holds pyreft's logits and greedy tokens for it on
SmolLM2-135M-Instruct (``bench/peers/reft_parity.py``, run in a virtualenv with pyreft), so the
parity test needs no pyreft here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import pysteer
from pysteer.compat.pyreft import PyreftFormatError, load_pyreft
from pysteer.models.tiny import tiny_model
from pysteer.reft import LoReFT

DATA = Path(__file__).parent / "data" / "pyreft"
SAVED = DATA / "loreft-smollm2-l15-r4"
KEY = "layer_15_comp_block_output_unit_pos_nunit_1#0"


@pytest.fixture(scope="module")
def recorded():
    return json.loads((DATA / "pyreft-outputs.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    from pysteer.default_model import DefaultModelUnavailable, load_default_model

    try:
        model, _ = load_default_model(progress=False)
    except DefaultModelUnavailable as err:
        pytest.skip(f"the embedded model is unavailable: {err}")
    model.config._attn_implementation = "eager"  # as the pyreft run
    return model


def test_loads_pyrefts_files_as_loreft(tmp_path):
    (iv,) = load_pyreft(SAVED, positions="f1+l1")
    assert isinstance(iv, LoReFT)
    assert iv.site_name == "layers.15.resid" and iv.positions == "f1+l1" and iv.rank == 4
    state = torch.load(SAVED / f"intkey_{KEY}.bin", weights_only=True)
    # pyreft's rotate_layer is [d, r] (h @ P); pysteer's rotation is [r, d] rows: R = P^T
    assert torch.equal(iv.rotation, state["rotate_layer"].T)
    assert torch.equal(iv.weight, state["weight"]) and torch.equal(iv.bias, state["bias"])
    R, _, _ = iv.tables()
    torch.testing.assert_close(R, iv.rotation, atol=1e-6, rtol=0)
    a, b = load_pyreft(_two_interventions(tmp_path), positions=["f1", "l1"])
    assert (a.positions, b.positions) == ("f1", "l1") and torch.equal(a.weight, b.weight)


@pytest.mark.slow
def test_same_logits_and_greedy_tokens_as_pyreft(smollm2, recorded):
    model = smollm2
    ivs = load_pyreft(SAVED, model, positions=recorded["positions"])
    for rec in recorded["prompts"]:
        ids = torch.tensor([rec["input_ids"]])
        sel = torch.tensor(rec["vocab_ids"])
        with torch.no_grad():
            base = model(input_ids=ids).logits[0]
            with pysteer.steer(model, ivs):
                steered = model(input_ids=ids).logits[0]
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=recorded["new_tokens"],
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=2,
                )
        want = torch.tensor(rec["steered_logits"])
        diff = (steered[:, sel] - want).abs().max().item()
        base_diff = (base[:, sel] - torch.tensor(rec["unsteered_logits"])).abs().max().item()
        assert diff < 1e-4, f"{rec['prompt']!r}: max |pysteer - pyreft| = {diff}"  # measured <= 2.9e-5
        assert base_diff < 1e-4  # the two transformers versions agree on the unsteered model
        assert (steered[:, sel] - base[:, sel]).abs().max() > 1.0  # the edit is far from a no-op
        assert steered.argmax(-1).tolist() == rec["steered_argmax"]
        assert gen[0, ids.shape[1] :].tolist() == rec["steered_greedy"]
        fast = pysteer.generate(
            model, ids, steering=[ivs], max_new_tokens=recorded["new_tokens"], compile=False
        )
        assert fast.tokens[0] == rec["steered_greedy"][: len(fast.tokens[0])]  # the fast path stops at EOS
    assert any(r["steered_greedy"] != r["unsteered_greedy"] for r in recorded["prompts"])


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "saved"
    shutil.copytree(SAVED, out)
    return out


def _two_interventions(tmp_path: Path) -> Path:
    """The fixture as pyreft saves f1+l1 without shared weights: two interventions on the layer."""
    out = tmp_path / "two"
    shutil.copytree(SAVED, out)
    config = json.loads((out / "config.json").read_text())
    for field in (
        "representations",
        "intervention_types",
        "intervention_dimensions",
        "intervention_constant_sources",
    ):
        config[field] = config[field] * 2
    config["sorted_keys"] = [KEY, KEY[:-1] + "1"]
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(out / f"intkey_{KEY}.bin", out / f"intkey_{KEY[:-1]}1.bin")
    return out


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pyreft(tmp_path / "nope", positions="l1")
    d = _copy(tmp_path)
    weights = d / f"intkey_{KEY}.bin"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(PyreftFormatError, match="cannot be read as a weights-only state dict"):
        load_pyreft(d, positions="l1")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weight": Evil()}, weights)
    with pytest.raises(PyreftFormatError, match="weights-only"):
        load_pyreft(d, positions="l1")

    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "rotate_layer"}, weights)
    with pytest.raises(PyreftFormatError, match=r"lacks \['rotate_layer'\]"):
        load_pyreft(d, positions="l1")
    torch.save({**state, "rotate_layer": state["rotate_layer"] * 2}, weights)
    with pytest.raises(PyreftFormatError, match="not orthonormal"):
        load_pyreft(d, positions="l1")
    torch.save({**state, "weight": state["weight"].T.contiguous()}, weights)
    with pytest.raises(PyreftFormatError, match=r"weight must be \[4, 576\]"):
        load_pyreft(d, positions="l1")
    weights.write_bytes(good)

    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text("{not json")
    with pytest.raises(PyreftFormatError, match="not valid JSON"):
        load_pyreft(d, positions="l1")
    for change, match in [
        (
            {"intervention_types": ["<class 'pyreft.interventions.NoreftIntervention'>"]},
            "not pyreft's LoreftIntervention",
        ),
        (
            {"representations": [[15, "mlp_activation", "pos", 1, 4]]},
            "component 'mlp_activation' has no pysteer site",
        ),
        ({"representations": [[15, "block_output", "h.pos", 1, 4]]}, "only unit 'pos'"),
        ({"representations": [[15, "block_output", "pos", 1, 8]]}, "low_rank_dimension is 8"),
        ({"representations": []}, "no 'representations'"),
    ]:
        (d / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(PyreftFormatError, match=match):
            load_pyreft(d, positions="l1")
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="one per saved intervention"):
        load_pyreft(d, positions=["f1", "l1"])
    with pytest.raises(ValueError, match="positions"):
        load_pyreft(d, positions="x1")
    with pytest.raises(PyreftFormatError, match="layer 15 out of range"):
        load_pyreft(d, tiny_model("llama"), positions="l1")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights file"):
        load_pyreft(d, positions="l1")
