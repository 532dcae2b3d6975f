"""Build script: pure Python always; the CUDA extension ``pysteer._C`` when nvcc is found.

``pysteer._C`` is a pybind11 module compiled by nvcc that takes raw device pointers, sizes,
strides and the CUDA stream from Python. It needs no torch headers, so it builds against the CPU
torch wheel (CI) as well as against CUDA torch on a GPU machine.

Environment:
    PYSTEER_BUILD_CUDA   auto (default) | 0 | 1   -- 1 fails the build when nvcc is missing
    PYSTEER_CUDA_ARCHS   e.g. "80;90" (default) or "90a"
    CUDA_HOME / CUDA_PATH  where to look for bin/nvcc (then PATH)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _find_nvcc() -> tuple[str | None, str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc"), f"{var}={home}"
    found = shutil.which("nvcc")
    if found:
        return found, "PATH"
    for home in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc"), home
    return None, "nvcc not found in CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda"


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the highest arch so newer GPUs can JIT it.
    top = sorted(a.strip() for a in archs.replace(",", ";").split(";") if a.strip())[-1]
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


class NvccBuildExt(build_ext):
    """Compiles ``csrc/*.cu`` with nvcc into one shared object; never fatal in ``auto`` mode."""

    def build_extensions(self) -> None:
        self._skipped: set[str] = set()
        super().build_extensions()
        # An extension that was skipped has no file to copy: without this, editable installs
        # (which copy build outputs into the source tree) and wheels fail on the missing .so.
        self.extensions = [ext for ext in self.extensions if ext.name not in self._skipped]

    def build_extension(self, ext: Extension) -> None:
        if not self._build_nvcc(ext):
            self._skipped.add(ext.name)

    def _build_nvcc(self, ext: Extension) -> bool:
        """Build ``ext``; return False when it was skipped (and the install is pure Python)."""
        mode = os.environ.get("PYSTEER_BUILD_CUDA", "auto").strip().lower()
        if mode in ("0", "false", "no", "off"):
            print("pysteer: PYSTEER_BUILD_CUDA=0, installing pure Python (no pysteer._C)")
            return False
        nvcc, where = _find_nvcc()
        if nvcc is None:
            msg = f"pysteer: not building the CUDA extension: {where}"
            if mode in ("1", "true", "yes", "on"):
                raise RuntimeError(msg + " (PYSTEER_BUILD_CUDA=1 requires it)")
            print(msg + "; installing pure Python")
            return False
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("PYSTEER_CUDA_ARCHS", "80;90")
        cmd = [
            nvcc,
            "-O3",
            "-std=c++17",
            "--threads",
            "0",  # compile the architectures in parallel
            "-shared",
            "-Xcompiler",
            "-fPIC,-fvisibility=hidden",
            "--expt-relaxed-constexpr",
            *_gencode_flags(archs),
            "-I",
            pybind11.get_include(),
            "-I",
            sysconfig.get_paths()["include"],
            "-I",
            str(CSRC),
            *[str(s) for s in ext.sources],
            "-o",
            str(out),
        ]
        print(f"pysteer: building the CUDA extension with {nvcc} ({where}), archs {archs}")
        print(" ".join(cmd))
        try:
            subprocess.check_call(cmd)
        except subprocess.CalledProcessError as err:
            if mode in ("1", "true", "yes", "on"):
                raise
            print(f"pysteer: CUDA extension build failed ({err}); installing pure Python", file=sys.stderr)
            return False
        # setuptools' run() builds into build_lib and copies to the source tree for --inplace and
        # editable installs.
        return True


cu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
ext_modules = [Extension("pysteer._C", sources=cu_sources)] if cu_sources else []

setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})
