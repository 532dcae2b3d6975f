"""Trace the development prompts (plus shipped generic text) at ``layers.L.resid`` of SmolLM2 and train
a TopK SAE there for ``pysteer lf-steer`` (issue 18 section 2's comparison with the head edit). L is
the layer ``pysteer lf-steer --probe-only`` reports (default 0).

Only development facts are traced: the test facts are set aside by the same ``split_test_facts``
call (fraction 0.3, seed 0) that ``pysteer locate --test-split 0.3`` and ``pysteer lf-steer`` make.

    python bench/lf_steering_sae.py OUT_DIR [--layer 0 --k 16 --expansion 4 --epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources
from pathlib import Path

import torch

import pysteer
from pysteer.default_model import load_model
from pysteer.recipes import load_paraphrases, split_test_facts
from pysteer.recipes.locate import fact_texts


def generic_text() -> list[str]:
    """Shipped non-fact text: topic sentences and the ABSC review sentences (no country facts)."""
    data = resources.files("pysteer.recipes") / "data"
    out: list[str] = []
    for name, key in (
        ("topics.jsonl", "text"),
        ("absc_restaurant.jsonl", "sentence"),
        ("absc_laptop.jsonl", "sentence"),
    ):
        for line in (data / name).read_text().splitlines():
            if line.strip():
                out.append(json.loads(line)[key])
    return list(dict.fromkeys(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layer", type=int, default=0, help="the layer lf-steer --probe-only chose")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=1024)
    a = p.parse_args()
    site = f"layers.{a.layer}.resid"
    torch.set_num_threads(1)
    out = Path(a.out)
    t0 = time.time()
    load0 = os.getloadavg()
    model, tok = load_model("default")
    facts = load_paraphrases()
    dev, test = split_test_facts(facts, 0.3, seed=0)
    test_keys = {(f.relation, f.subject) for f in test}
    assert not test_keys & {(f.relation, f.subject) for f in dev}
    prompts = fact_texts(tok, dev)[0]
    generic = generic_text()
    docs = prompts + generic
    summary = pysteer.trace_dataset(
        model, docs, site, out / "traces", tokenizer=tok, dtype=torch.float32, batch_size=16, overwrite=True
    )
    reader = pysteer.TraceReader(out / "traces")
    print("traced", summary, flush=True)
    t1 = time.time()
    log = []
    sae = pysteer.train_sae(
        reader,
        site=site,
        kind="topk",
        k=a.k,
        expansion=a.expansion,
        batch_tokens=a.batch_tokens,
        max_tokens=a.epochs * summary.rows,
        checkpoint_dir=out / "run",
        progress=False,
        log_every=10,
        callback=log.append,
    )
    t2 = time.time()
    sae.save(out / "sae")
    # FVE / L0 of the final SAE on every traced row (the training data: there is no held-out trace)
    x = reader.load(site).float()
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
        fve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        l0 = (sae.encode(x) > 0).float().sum(1).mean()
    info = {
        "site": site,
        "k": a.k,
        "expansion": a.expansion,
        "d_sae": sae.d_sae,
        "epochs": a.epochs,
        "batch_tokens": a.batch_tokens,
        "dev_prompts": len(prompts),
        "generic_docs": len(generic),
        "dev_facts": len(dev),
        "test_facts_excluded": len(test),
        "rows": int(x.shape[0]),
        "fve_all_rows": float(fve),
        "l0_all_rows": float(l0),
        "train_log_last": log[-1] if log else None,
        "trace_s": round(t1 - t0, 1),
        "train_s": round(t2 - t1, 1),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    (out / "sae_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
