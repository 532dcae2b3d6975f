"""``pysteer.compat.accelerate``'s checks that need no peer library: what it refuses, before anything
is replaced. Parity with the libraries themselves is ``tests/compat/test_accelerate_peers.py`` (run in
the peer virtualenv by ``bench/peers/run_compat_suites.sh``)."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
import types

import numpy as np
import pytest

from pysteer.compat import UnknownLibraryVersion, accelerate


def _fake_repeng(version: str, extra_field: str | None = None) -> types.ModuleType:
    """A module named ``repeng`` whose ``ControlVector`` has repeng 0.4.0's fields, plus one."""
    fields = [("model_type", str), ("directions", dict)]
    if extra_field:
        fields.append((extra_field, float, dataclasses.field(default=1.0)))
    module = types.ModuleType("repeng")
    module.__version__ = version
    module.ControlVector = dataclasses.make_dataclass("ControlVector", fields)
    return module


def _patch_activations_with_normalize(
    self,
    model,
    layer_config=None,
    operator=None,
    multiplier=1.0,
    min_token_index=None,
    token_indices=None,
    normalize=False,
):
    """A ``patch_activations`` with a parameter steering-vectors 0.12.2 does not have."""


def _fake_steering_vectors(version: str) -> types.ModuleType:
    module = types.ModuleType("steering_vectors")
    module.__version__ = version
    cls = dataclasses.make_dataclass("SteeringVector", [("layer_activations", dict), ("layer_type", str)])
    cls.patch_activations = _patch_activations_with_normalize
    module.SteeringVector = cls
    return module


def test_a_newer_repeng_field_is_refused_by_name_and_version():
    with pytest.raises(
        UnknownLibraryVersion, match=r"repeng 0\.9\.1: ControlVector field 'layer_scales' is unknown"
    ):
        accelerate(_fake_repeng("0.9.1", "layer_scales"))


def test_an_older_repeng_without_a_known_field_is_refused():
    module = _fake_repeng("0.1.0")
    module.ControlVector = dataclasses.make_dataclass("ControlVector", [("directions", dict)])
    with pytest.raises(
        UnknownLibraryVersion, match=r"repeng 0\.1\.0: ControlVector field 'model_type' is missing"
    ):
        accelerate(module)


def test_a_new_patch_activations_parameter_is_refused_before_anything_is_replaced():
    module = _fake_steering_vectors("0.13.0")
    original = module.SteeringVector.patch_activations
    with pytest.raises(
        UnknownLibraryVersion, match=r"steering-vectors 0\.13\.0: .*parameter 'normalize' is unknown"
    ):
        accelerate(module)
    assert module.SteeringVector.patch_activations is original


def _fake_pyvene(version: str, extra_field: str | None = None) -> types.ModuleType:
    """A module named ``pyvene`` whose ``RepresentationConfig`` has pyvene 0.1.8's fields, plus one."""
    from pysteer.compat.pyvene import KNOWN_REPRESENTATION_FIELDS

    module = types.ModuleType("pyvene")
    module.__version__ = version
    fields = [*KNOWN_REPRESENTATION_FIELDS, *([extra_field] if extra_field else [])]
    module.RepresentationConfig = collections.namedtuple("RepresentationConfig", fields)

    class IntervenableModel:
        def forward(self, base, sources=None, unit_locations=None, source_representations=None,
                    subspaces=None, labels=None, output_original_output=False, return_dict=None,
                    use_cache=None, intervention_additional_kwargs=None): ...  # fmt: skip

        def generate(self, base, sources=None, unit_locations=None, source_representations=None,
                     intervene_on_prompt=False, subspaces=None, output_original_output=False,
                     intervention_additional_kwargs=None, **kwargs): ...  # fmt: skip

    module.IntervenableModel = IntervenableModel
    return module


def test_a_newer_pyvene_representation_field_is_refused_by_name_and_version():
    module = _fake_pyvene("0.2.0", "steering_scale")
    original = module.IntervenableModel.forward
    with pytest.raises(
        UnknownLibraryVersion,
        match=r"pyvene 0\.2\.0: RepresentationConfig field 'steering_scale' is unknown",
    ):
        accelerate(module)
    assert module.IntervenableModel.forward is original


def test_unknown_library_names_the_supported_ones():
    with pytest.raises(ValueError, match="repeng, steering_vectors, pyvene, pyreft"):
        accelerate("transformer_lens")
    with pytest.raises(TypeError, match="library module or its name"):
        accelerate(np.zeros(2))


def test_pysteer_compat_imports_no_peer_library():
    code = (
        "import sys, pysteer, pysteer.compat, pysteer.compat.repeng, pysteer.compat.steering_vectors\n"
        "import pysteer.compat.pyvene\n"
        "from pysteer.compat import accelerate\n"
        "print(sorted(m for m in ('repeng', 'steering_vectors', 'pyvene', 'pyreft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
