#!/usr/bin/env bash
# repeng's and steering-vectors' behaviour under pysteer.compat.accelerate, in the peer virtualenv
# (repeng 0.4.0, steering-vectors 0.12.2, transformers 4.57.6; they pin transformers<5):
#
#   1. tests/compat/: the libraries' own calls, on their path and accelerated, on tiny llama / gpt2 /
#      qwen2 models and SmolLM2: same greedy tokens, logits within 1e-5.
#   2. the libraries' own test suites, run twice, plain and with both libraries accelerated for the
#      whole session (tests/compat/suite_standins.py: hub checkpoints -> random stand-ins of their
#      shapes, tokenizers -> the embedded model's real one). repeng's tests come from its sdist
#      (repeng/tests.py, its relative imports made absolute, with the sdist's notebooks/data);
#      steering-vectors' from SV_TESTS (a checkout's tests/ folder: the sdist lacks the
#      tests/_original_caa helpers test_steering_vector.py imports) or else its sdist.
#      Per-test outcomes both ways, and whether each test printed the same (repeng's tests print
#      their steered generations before asserting the trained checkpoints' text) ->
#      bench/results/compat-suites.json.
#
#   3. the same for pyvene / pyreft in their own virtualenv (PYVENE_PY: pyvene 0.1.8, pyreft 0.1.0,
#      transformers 4.57.6): tests/compat/test_accelerate_pyvene.py, then, given PYVENE_TESTS (the
#      tests/ folder of a pyvene v0.1.8 checkout: its sdist has none), pyvene's unit and integration
#      tests plain and with pyvene accelerated (hub GPT-2 / tokenizers -> the same stand-ins).
#      Unset PYVENE_PY=skip to leave this part out.
#
#   PEER_PY=/work/peers-steer-venv/bin/python SV_TESTS=/path/to/steering-vectors/tests \
#       PYVENE_PY=/work/peers-pyvene-venv/bin/python PYVENE_TESTS=/path/to/pyvene/tests \
#       bash bench/peers/run_compat_suites.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEER_PY="${PEER_PY:-/work/peers-steer-venv/bin/python}"
SCRATCH="${SCRATCH:-$(mktemp -d)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT:$ROOT/tests/compat${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

PYVENE_PY="${PYVENE_PY:-/work/peers-pyvene-venv/bin/python}"

echo "==> tests/compat with $PEER_PY"
"$PEER_PY" -m pytest -q -p no:cacheprovider tests/compat --ignore=tests/compat/test_accelerate_pyvene.py

echo "==> the libraries' own suites (scratch: $SCRATCH)"
"$PEER_PY" -m pip download -q --no-deps --no-binary :all: repeng==0.4.0 steering-vectors==0.12.2 -d "$SCRATCH/sdists"
for f in "$SCRATCH"/sdists/*.tar.gz; do tar xzf "$f" -C "$SCRATCH/sdists"; done

mkdir -p "$SCRATCH/repeng-suite"
sed -e 's/^from \. import/from repeng import/' -e 's/^from \.control import/from repeng.control import/' \
    "$SCRATCH/sdists/repeng-0.4.0/repeng/tests.py" > "$SCRATCH/repeng-suite/test_repeng_suite.py"
mkdir -p "$SCRATCH/repeng-suite/notebooks"
cp -r "$SCRATCH/sdists/repeng-0.4.0/notebooks/data" "$SCRATCH/repeng-suite/notebooks/"
touch "$SCRATCH/repeng-suite/pyproject.toml"  # repeng's tests find their data from the project root

mkdir -p "$SCRATCH/sv-suite"
cp -r "${SV_TESTS:-$SCRATCH/sdists/steering_vectors-0.12.2/tests}" "$SCRATCH/sv-suite/tests"
touch "$SCRATCH/sv-suite/tests/__init__.py"

run_suite() {  # run_suite NAME DIR ACCELERATE [PYTHON [PYTEST ARGS...]]
    local name=$1 dir=$2 accel=$3 py=${4:-$PEER_PY}
    shift $(($# < 4 ? $# : 4))
    echo "==> $name, PYSTEER_ACCELERATE=$accel"
    (cd "$dir" && PYSTEER_ACCELERATE=$accel "$py" -m pytest -q -p no:cacheprovider -p suite_standins \
        -o junit_logging=system-out --junitxml="$SCRATCH/$name-$accel.xml" "${@:-.}" | tail -n 15) || true
}
for accel in 0 1; do
    run_suite repeng "$SCRATCH/repeng-suite" "$accel"
    run_suite steering-vectors "$SCRATCH/sv-suite" "$accel"
done
"$PEER_PY" "$ROOT/bench/peers/compat_suite_report.py" "$SCRATCH" "$ROOT/bench/results/compat-suites.json"

if [ "$PYVENE_PY" != skip ]; then
    echo "==> tests/compat/test_accelerate_pyvene.py with $PYVENE_PY"
    "$PYVENE_PY" -m pytest -q -p no:cacheprovider tests/compat/test_accelerate_pyvene.py
    if [ -n "${PYVENE_TESTS:-}" ]; then
        mkdir -p "$SCRATCH/pyvene-suite"
        cp -r "$PYVENE_TESTS" "$SCRATCH/pyvene-suite/tests"
        for accel in 0 1; do  # its test files are *TestCase.py, importing ..utils (tests/ is a package)
            run_suite pyvene "$SCRATCH/pyvene-suite" "$accel" "$PYVENE_PY" \
                -o 'python_files=*TestCase.py' tests/unit_tests tests/integration_tests
        done
        "$PYVENE_PY" "$ROOT/bench/peers/compat_suite_report.py" "$SCRATCH" "$ROOT/bench/results/compat-suites.json"
    fi
fi
