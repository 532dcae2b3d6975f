"""llama.cpp control vectors: the GGUF format read and written, and steering equal to llama.cpp's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pysteer
from pysteer.compat import llamacpp
from pysteer.models.tiny import tiny_model

gguf = pytest.importorskip("gguf")
D = 64


def _directions(seed=0, layers=(1,)):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(D, generator=g) for k in layers}


def test_write_then_read_is_exact_and_the_file_is_what_llama_cpp_reads(tmp_path):
    dirs = _directions(layers=(1, 3))
    path = llamacpp.write_control_vector(tmp_path / "cv.gguf", dirs, model_hint="llama")
    # the raw file, by gguf's own reader: the fields and tensors llama.cpp's loader looks for
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    names = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(names) == ["direction.1", "direction.3"]
    np.testing.assert_array_equal(names["direction.3"], dirs[3].numpy())
    back, meta = llamacpp.read_control_vector(path)
    assert list(back) == [1, 3] and all(torch.equal(back[k], dirs[k]) for k in dirs)
    assert meta["controlvector.model_hint"] == "llama"


def test_a_control_vector_steers_like_adding_it_after_the_layer():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    dirs = _directions(layers=(1,))
    hook = model.model.layers[1].register_forward_hook(
        lambda m, a, o: (o[0] + 0.5 * dirs[1],) + tuple(o[1:]) if isinstance(o, tuple) else o + 0.5 * dirs[1]
    )
    try:
        with torch.no_grad():
            ref = model(ids).logits
    finally:
        hook.remove()
    ivs = llamacpp.to_interventions(dirs, scale=0.5)
    with pysteer.steer(model, ivs), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    back = llamacpp.from_interventions(ivs)
    torch.testing.assert_close(back[1], 0.5 * dirs[1])


def test_bad_files_and_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layers >= 1"):
        llamacpp.write_control_vector(tmp_path / "zero.gguf", {0: torch.zeros(D)})
    with pytest.raises(ValueError, match="NaN"):
        llamacpp.write_control_vector(tmp_path / "nan.gguf", {1: torch.full((D,), float("nan"))})
    with pytest.raises(ValueError, match="widths"):
        llamacpp.write_control_vector(tmp_path / "w.gguf", {1: torch.zeros(D), 2: torch.zeros(D + 1)})
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        llamacpp.read_control_vector(bad)
    other = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("direction.1", np.zeros(D, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="not 'controlvector'"):
        llamacpp.read_control_vector(other)
    with pytest.raises(ValueError, match="resid"):
        llamacpp.from_interventions([pysteer.HeadScale(0, scale=2.0)])
    assert not list(tmp_path.glob(".*.tmp"))  # failed writes leave nothing behind
