"""LF-Steering and the head edit must be compared on the same facts: ``pysteer lf-steer`` sets aside
exactly the test facts that ``pysteer locate --test-split`` sets aside (and ``pysteer edit`` reports
on), and both hold out the same validation facts of what remains. No model is loaded."""

from __future__ import annotations

import pytest
import torch

from pysteer.cli import main
from pysteer.recipes import cli_lf_steer, cli_locate, selection
from pysteer.recipes import lf_features as lf
from pysteer.recipes import locate as locate_mod
from pysteer.sae import SAE


class _Stop(Exception):
    pass


def _splits(monkeypatch, argv: list[str]) -> tuple[list, list]:
    """Run a command up to the model load; return the (development, test) split it made."""
    import pysteer.default_model

    made = []
    real = selection.split_test_facts

    def record(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(selection, "split_test_facts", record)
    stopped = []

    def no_model(*args, **kwargs):
        stopped.append(True)
        raise _Stop

    monkeypatch.setattr(pysteer.default_model, "load_model", no_model)
    assert main(argv) != 0  # the CLI reports the stop as an error
    assert stopped and len(made) == 1
    return made[0]


def _keys(facts) -> list[tuple[str, str]]:
    return [(f.relation, f.subject) for f in facts]


@pytest.mark.parametrize("extra", [[], ["--seed", "3", "--test-split", "0.4"]])
def test_lf_steer_sets_aside_the_test_facts_of_the_head_edit(monkeypatch, tmp_path, extra):
    sae_dir = tmp_path / "sae"
    d = 8
    SAE(torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d), activation="topk", k=2).save(sae_dir)
    dev_h, test_h = _splits(monkeypatch, ["locate", "--test-split", "0.3", *extra])
    dev_lf, test_lf = _splits(monkeypatch, ["lf-steer", "--sae", str(sae_dir), *extra])
    dev_p, test_p = _splits(monkeypatch, ["lf-steer", "--probe-only", *extra])
    assert _keys(test_lf) == _keys(test_h) == _keys(test_p)
    assert _keys(dev_lf) == _keys(dev_h) == _keys(dev_p)
    assert test_h and not set(_keys(test_h)) & set(_keys(dev_h))


def test_validation_facts_are_held_out_the_same_way():
    import argparse

    def defaults(mod) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        return p.parse_args(["--sae", "x"] if mod is cli_lf_steer else [])

    h, f = defaults(cli_locate), defaults(cli_lf_steer)
    assert f.validation_fraction == h.test_fraction  # locate's --test-fraction is its validation share
    assert f.test_split == 0.3 and f.seed == h.seed
    # both draw the validation facts with the one split_groups over the development facts' indices
    assert lf.split_groups is locate_mod.split_groups
    groups = torch.arange(63).repeat_interleave(10)
    assert lf.split_groups(groups, f.validation_fraction, f.seed) == locate_mod.split_groups(
        groups, h.test_fraction, h.seed
    )
