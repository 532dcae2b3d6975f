"""Per-test outcomes of the libraries' own suites, plain and accelerated (``run_compat_suites.sh``'s
JUnit files) -> one JSON: counts per run, and every test whose outcome differs between the two. Each
virtualenv's run adds its suites; the others already in the JSON are kept.

    python bench/peers/compat_suite_report.py SCRATCH_DIR OUT.json
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(path: Path) -> dict[str, str]:
    """``{test id: passed | failed | error | skipped}`` from a JUnit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        out[f"{case.get('classname')}::{case.get('name')}"] = {"failure": "failed"}.get(kind, kind)
    return out


def printed(path: Path) -> dict[str, str]:
    """``{test id: what it printed}`` (``junit_logging=system-out``)."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        text = "".join(child.text or "" for child in case if child.tag == "system-out")
        out[f"{case.get('classname')}::{case.get('name')}"] = text
    return out


def first_line(path: Path, test: str) -> str:
    for case in ET.parse(path).getroot().iter("testcase"):
        if f"{case.get('classname')}::{case.get('name')}" == test:
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    return (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
    return ""


SUITES = ("repeng", "steering-vectors", "pyvene")  # each from its own virtualenv's run


def installed_versions() -> dict[str, str]:
    """Versions of the suites' libraries installed in this interpreter, with transformers and torch."""
    out = {}
    for name in (*SUITES, "pyreft", "transformers", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(scratch: str, out: str) -> int:
    """Add the suites whose two JUnit files are in ``scratch`` to ``out`` (other suites kept)."""
    root = Path(scratch)
    path = Path(out)
    report = json.loads(path.read_text()) if path.exists() else {"versions": {}, "suites": {}}
    report["versions"] = {**report.get("versions", {}), **installed_versions()}
    for name in SUITES:
        if not (root / f"{name}-0.xml").exists() or not (root / f"{name}-1.xml").exists():
            continue
        plain, accel = outcomes(root / f"{name}-0.xml"), outcomes(root / f"{name}-1.xml")
        count = lambda d: {
            k: sum(v == k for v in d.values()) for k in ("passed", "failed", "error", "skipped")
        }  # noqa: E731
        report["suites"][name] = {
            "plain": count(plain),
            "accelerated": count(accel),
            "differ": {
                t: [plain.get(t), accel.get(t)]
                for t in sorted(set(plain) | set(accel))
                if plain.get(t) != accel.get(t)
            },
            "not_passing": {
                t: first_line(root / f"{name}-0.xml", t) for t, v in sorted(plain.items()) if v != "passed"
            },
            "printed_differently": sorted(
                t
                for t, text in printed(root / f"{name}-0.xml").items()
                if text != printed(root / f"{name}-1.xml").get(t)
            ),
            "printed_output": {t: text for t, text in printed(root / f"{name}-1.xml").items() if text},
        }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: {r: v[r] for r in ("plain", "accelerated")} for k, v in report["suites"].items()}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
