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
#   PEER_PY=/work/peers-steer-venv/bin/python SV_TESTS=/path/to/steering-vectors/tests \
#       bash bench/peers/run_compat_suites.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEER_PY="${PEER_PY:-/work/peers-steer-venv/bin/python}"
SCRATCH="${SCRATCH:-$(mktemp -d)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT:$ROOT/tests/compat${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

echo "==> tests/compat with $PEER_PY"
"$PEER_PY" -m pytest -q -p no:cacheprovider tests/compat

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

run_suite() {  # run_suite NAME DIR ACCELERATE
    local name=$1 dir=$2 accel=$3
    echo "==> $name, PYSTEER_ACCELERATE=$accel"
    (cd "$dir" && PYSTEER_ACCELERATE=$accel "$PEER_PY" -m pytest -q -p no:cacheprovider -p suite_standins \
        -o junit_logging=system-out --junitxml="$SCRATCH/$name-$accel.xml" . | tail -n 15) || true
}
for accel in 0 1; do
    run_suite repeng "$SCRATCH/repeng-suite" "$accel"
    run_suite steering-vectors "$SCRATCH/sv-suite" "$accel"
done
"$PEER_PY" "$ROOT/bench/peers/compat_suite_report.py" "$SCRATCH" "$ROOT/bench/results/compat-suites.json"
