"""LF-Steering minus the head edit on the same test facts, with a paired bootstrap interval.

``pysteer edit --choose`` and ``pysteer lf-steer`` each report their own change against the unsteered
model; whether the two methods differ needs both steered answers on the same resampled facts. This
answers the test facts recorded in the ``pysteer locate`` result (the ones both commands report on)
with each committed steering file and bootstraps ``lf - edit`` by fact (the same resampling as the
commands: ``selection.bootstrap_consistency`` with the edit as "before" and LF-Steering as "after").

    python bench/consistency_method_difference.py --located located.safetensors \
        --edit consistency-edit.safetensors --lf lf-steering.safetensors --json-out diff.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pysteer.default_model import load_model
from pysteer.recipes import load_paraphrases
from pysteer.recipes.locate import LocateResult, answer_facts, consistency_metrics, reserved_test_facts
from pysteer.recipes.selection import bootstrap_consistency


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--located", required=True, help="`pysteer locate --test-split` result (the test facts)")
    p.add_argument("--edit", required=True, help="steering file of `pysteer edit --choose`")
    p.add_argument("--lf", required=True, help="steering file of `pysteer lf-steer`")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    a = p.parse_args()
    torch.set_num_threads(1)
    load0, t0 = os.getloadavg(), time.time()
    test = reserved_test_facts(LocateResult.load(a.located), load_paraphrases())
    model, tok = load_model("default")
    edit = answer_facts(model, tok, test, a.edit)
    lf = answer_facts(model, tok, test, a.lf)
    boot = bootstrap_consistency(test, edit, lf, n_resamples=a.bootstrap, seed=a.seed)
    out = {
        "n_facts": len(test),
        "head_edit": consistency_metrics(test, edit),
        "lf_steering": consistency_metrics(test, lf),
        "lf_minus_edit": boot["change"],
        "n_resamples": boot["n_resamples"],
        "level": boot["level"],
        "resampled": boot["resampled"],
        "wall_s": round(time.time() - t0, 1),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
