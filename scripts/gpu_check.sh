#!/usr/bin/env bash
# The GPU check: build pysteer._C for the detected GPU, launch every kernel against the reference
# (and under compute-sanitizer), measure the end-to-end figures on a random Llama-3-8B-shape model,
# run the GPU tests and the op benches, each step capped, the whole run within --budget seconds.
# JSONs go to --out (default .gpu/) and, on a GPU, to bench/results/*-gpu-<device>.json. DEVICE.md
# says how to run it and how to read it.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS] [--out DIR] [--only STEP,...]
#
#   --dry-run   the same steps on the CPU with tiny shapes (Triton interpreter, a 2-layer model);
#               CI runs it so the script cannot rot between GPU runs (about a minute here)
#
# Environment: PYTHON (default: .venv/bin/python when it exists, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
