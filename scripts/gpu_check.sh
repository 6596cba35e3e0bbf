#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and CuPy already installed (under 5 minutes):
# CuPy against NumPy for every layer, a training step, greedy decoding and checkpoints
# (tests/test_gpu.py, and the CUDA cases of tests/test_backend.py: transfers, the device RNG), then the device benchmark,
# which records its tables in BENCHMARKS.md and prints them last.
# It needs the package's own dependencies too (`pip install -e .`; at least numpy and regex).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "from minillm import backend; backend.resolve_device('cuda')" 2>/dev/null \
    || { echo "gpu_check: no CUDA GPU usable through CuPy on this machine" >&2; exit 1; }
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_backend.py -k cuda
python -m minillm.bench.device --device cuda --write
