"""The ``pysteer`` command line: listing subcommands stays lean, each subcommand loads on use."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.cli import SUBCOMMANDS, main

# Modules that ``pysteer --help`` must not pull in: they cost seconds or need a GPU toolchain.
HEAVY_MODULES = (
    "transformers",
    "triton",
    "accelerate",
    "gguf",
    "matplotlib",
    "pysteer._C",
    "pysteer.kernels",
)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _imported_after(argv: list[str]) -> tuple[int, str, set[str]]:
    """Run ``pysteer.cli.main(argv)`` in a fresh interpreter; return exit code, stdout, imported modules."""
    code = (
        "import json, sys\n"
        "from pysteer.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('\\n@@' + json.dumps([rc, sorted(sys.modules)]))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    out, _, tail = result.stdout.rpartition("\n@@")
    rc, modules = json.loads(tail)
    return rc, out, set(modules)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_help_lists_every_available_subcommand():
    rc, out, _ = _imported_after(["--help"])
    assert rc == 0
    available = [name for name, module in SUBCOMMANDS.items() if _module_exists(module)]
    assert "info" in available
    for name in available:
        assert f"    {name}" in out, f"subcommand {name!r} missing from --help:\n{out}"


def test_help_imports_no_heavy_module():
    _, _, modules = _imported_after(["--help"])
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES or m in HEAVY_MODULES)
    assert heavy == [], f"`pysteer --help` imported {heavy}"


def test_subcommand_help_loads_only_its_own_module():
    rc, out, modules = _imported_after(["info", "--help"])
    assert rc == 0
    assert "--json" in out
    others = sorted(m for name, m in SUBCOMMANDS.items() if name != "info" and m in modules)
    assert others == [], f"`pysteer info --help` imported other subcommands: {others}"


def test_no_arguments_prints_help_and_succeeds(capsys: pytest.CaptureFixture[str]):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as excinfo:
        main(["no-such-command"])
    assert excinfo.value.code == 2


def test_info_json_reports_versions_and_backends(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("PYSTEER_BACKEND", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"]
    assert info["dispatch"]["cpu"]["backends"]["torch"]["available"] is True
    assert info["dispatch"]["cpu"]["selected"] in ("torch", "cuda", "triton")
    assert set(info["default_model"]) >= {"cached", "cache_dir", "gguf"}


def test_console_script_is_installed():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="pysteer")
    if not scripts:
        pytest.skip("pysteer is not installed (run from a source tree without pip install)")
    script = Path(sys.executable).parent / "pysteer"
    assert script.is_file(), f"console script not next to {sys.executable}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout
