#!/usr/bin/env bash
# The one command to run first on a machine with a GPU: every GPU path, on one GPU, nothing downloaded
# (random weights), in under 8 minutes on one H100.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default bench/results/gpu-check; PYTHON=... picks the interpreter
#
# First it checks that what the steps import is installed, and installs it from the lock when it is not
# (pip install -c constraints.txt -e ".[test]": matplotlib, pytest, accelerate); then bench/gpu_check.py runs
# the steps, each in its own process group, killed at its limit. See bench/gpu_check.py and docs/benchmarks.md
# for the steps and how to read the table. Exit status: 0 no step failed, 1 a step failed, 2 no CUDA device
# or an install that does not import.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-check}
PYTHON=${PYTHON:-python}
# onlinemix by its metadata: from the repository root its folder imports whether or not it is installed
NEEDED="import importlib.metadata; importlib.metadata.version('onlinemix'); import torch, accelerate, pytest, matplotlib"

if ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
    echo "gpu_check: installing what the steps need: $PYTHON -m pip install -c constraints.txt -e \".[test]\"" >&2
    timeout -k 10 300 "$PYTHON" -m pip install -q -c constraints.txt -e ".[test]" >&2
    if ! "$PYTHON" -c "$NEEDED"; then
        echo "gpu_check: the environment still lacks a package the steps import ($NEEDED): install it and rerun" >&2
        exit 2
    fi
fi
exec "$PYTHON" bench/gpu_check.py --out-dir "$OUT"
