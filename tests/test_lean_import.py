"""``import pysteer`` is lean: no Triton, no kernels, no CUDA extension, no CUDA initialisation,
and it still works (on the torch backend) where Triton and the extension cannot be imported.

Each check runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, env: dict[str, str] | None = None, prelude: str = "") -> dict:
    """Run ``prelude`` then ``code`` in a fresh interpreter; ``code`` prints one JSON object, returned here."""
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_pysteer_loads_no_triton_kernels_or_extension():
    out = run_python(
        """
        import json, sys
        before = set(sys.modules)
        import pysteer
        new = set(sys.modules) - before
        print(json.dumps({
            "triton": sorted(m for m in new if m == "triton" or m.startswith("triton.")),
            "pysteer_kernels": sorted(m for m in new if m.startswith("pysteer.kernels")),
            "pysteer_C": "pysteer._C" in sys.modules,
        }))
        """
    )
    assert out == {"triton": [], "pysteer_kernels": [], "pysteer_C": False}


def test_import_pysteer_does_not_initialise_cuda():
    out = run_python(
        """
        import json, torch
        import pysteer
        pysteer.backend_status("cpu")
        pysteer.resolve_backend("auto", "cpu")
        print(json.dumps({"initialized": torch.cuda.is_initialized()}))
        """
    )
    assert out == {"initialized": False}


BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton.") or name == "pysteer._C":
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_pysteer_works_without_triton_or_extension(interpret):
    out = run_python(
        """
        import json, torch
        import pysteer
        from pysteer import BackendUnavailable
        from pysteer.ops import affine_steer

        result = {"auto_cpu": pysteer.resolve_backend("auto", "cpu")}
        for name in ("triton", "cuda"):
            try:
                pysteer.resolve_backend(name, "cpu")
                result[name] = "resolved"
            except BackendUnavailable as err:
                result[name] = str(err)
        x = torch.randn(3, 2, 4)
        rows = torch.tensor([0, 1, 1], dtype=torch.int32)
        M, A = torch.full((2, 2, 4), 2.0), torch.ones(2, 2, 1)
        y = affine_steer(x, rows, M, A, backend="torch")
        result["steered"] = torch.equal(y[0], x[0]) and torch.allclose(y[1:], 2 * x[1:] + 1)
        result["op"] = torch.equal(torch.ops.pysteer.affine_steer(x, rows, M, A, "torch"), y)
        print(json.dumps(result))
        """,
        env={"TRITON_INTERPRET": interpret, "PYSTEER_BACKEND": ""},
        prelude=BLOCKER,
    )
    assert out["auto_cpu"] == "torch"
    assert out["steered"] and out["op"]
    assert "backend 'triton' requested but unavailable" in out["triton"]
    assert "triton is not installed" in out["triton"]
    assert "backend 'cuda' requested but unavailable" in out["cuda"]
    assert "pysteer._C is not built" in out["cuda"]
