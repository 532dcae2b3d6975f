"""``pysteer lf-steer`` on the same test facts, fitted and chosen on a seeded subset of the development facts.

On a loaded 2-core machine the full command (every development fact answered and traced, the alpha
sweep on its validation facts, then the test facts twice) takes longer than a results run may. This
makes the same calls as the command (``lf_steering`` then ``validate_then_test``), with the same test
facts (``split_test_facts(facts, 0.3, seed)``, checked against the ``pysteer locate`` result when one
is given), but fits the latents and chooses alpha on ``--dev-per-relation`` development facts per
relation (``select_facts``, seeded). The layer is given (``--layer``: the one ``lf-steer --probe-only``
chose on all development facts), so the SAE trained there by ``bench/lf_steering_sae.py`` fits.

    python bench/lf_steering_dev_subset.py --sae SAE_DIR --layer 10 --dev-per-relation 22 \
        --located located.safetensors --out lf.safetensors --json-out lf.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pysteer.default_model import load_model
from pysteer.io import save
from pysteer.recipes.cli_locate import select_facts
from pysteer.recipes.lf_features import lf_steering
from pysteer.recipes.locate import LocateResult, answer_facts, load_paraphrases, reserved_test_facts
from pysteer.recipes.selection import split_test_facts, validate_then_test
from pysteer.sae import SAE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sae", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--dev-per-relation", type=int, required=True)
    p.add_argument("--located", help="`pysteer locate --test-split` result whose test facts must be these")
    p.add_argument("--sweep-alpha", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--n-features", type=int, default=8)
    p.add_argument("--min-frequency", type=float, default=0.05)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json-out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    load0, t0 = os.getloadavg(), time.time()
    facts = load_paraphrases()
    dev_all, test = split_test_facts(facts, 0.3, a.seed)
    if a.located:
        recorded = reserved_test_facts(LocateResult.load(a.located), facts)
        if [(f.relation, f.subject) for f in recorded] != [(f.relation, f.subject) for f in test]:
            raise SystemExit("the locate result's test facts are not split_test_facts(facts, 0.3, seed)")
    dev = select_facts(dev_all, None, a.dev_per_relation, a.seed)
    sae = SAE.load(a.sae)
    model, tok = load_model("default")
    result = lf_steering(
        model,
        tok,
        dev,
        sae=sae,
        layer=a.layer,
        n_features=a.n_features,
        min_frequency=a.min_frequency,
        seed=a.seed,
    )
    print(f"layer {result.layer}; latents {result.features}", flush=True)
    validation = [dev[i] for i in result.heldout_groups]
    out = validate_then_test(
        lambda fs, spec: answer_facts(model, tok, fs, spec),
        lambda c: result.spec(sae, c["alpha"]),
        [{"alpha": x} for x in a.sweep_alpha],
        validation,
        test,
        result.metadata["baseline"]["validation"],
        n_resamples=a.bootstrap,
        seed=a.seed,
    )
    path = save(result.spec(sae, out["chosen"]["alpha"]), a.out)
    summary = {
        **result.summary(),
        "development_facts_available": len(dev_all),
        "development_facts_used": len(dev),
        "dev_per_relation": a.dev_per_relation,
        "validation_facts": len(validation),
        "before": result.metadata["baseline"]["validation"],
        **out,
        "steering_file": str(path),
        "test_facts": [{"relation": f.relation, "subject": f.subject} for f in test],
        "wall_s": round(time.time() - t0, 1),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    with open(a.json_out, "w") as f:
        f.write(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
