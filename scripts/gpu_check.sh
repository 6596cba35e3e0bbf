#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and CuPy already installed (about 5 minutes):
#  1. the GPU tests: CuPy against NumPy for every layer of both readings (minillm/layers and
#     minillm/fast), a training step and greedy decoding on each, checkpoints (tests/test_gpu.py);
#     each fused kernel against the plain array code on the GPU (tests/test_fused.py); transfers
#     and the device RNG (tests/test_backend.py); the kept attention weights and --log-layers'
#     measurements on the GPU (tests/test_inspect.py, tests/test_layer_health.py);
#  2. training on MPI with one rank on the GPU (tests/test_distributed.py -k nccl): the gradients
#     summed through NCCL (allreduce; with --zero 1 reduce-scatter and allgather) against one process,
#     and train.py under `mpiexec -n 1`; it needs the mpi extra (`pip install -e '.[mpi]'`) and an NCCL
#     library that CuPy loads (CuPy's installation guide, "Additional CUDA Libraries", says how);
#  3. the device benchmark with TF32 matrix products (GPT-2 small shape only), then in full
#     float32 with sampling; each times the fast step against the same step without fused kernels
#     and on the reference layers, records its table in BENCHMARKS.md, and the float32 one prints last.
# It needs the package's own dependencies too (`pip install -e .`; at least numpy and regex).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "from minillm import backend; backend.resolve_device('cuda')" 2>/dev/null \
    || { echo "gpu_check: no CUDA GPU usable through CuPy on this machine" >&2; exit 1; }
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused.py tests/test_backend.py \
    tests/test_inspect.py tests/test_layer_health.py -k cuda
python -c "import mpi4py" 2>/dev/null \
    || { echo "gpu_check: mpi4py is missing for the NCCL check: pip install -e '.[mpi]'" >&2; exit 1; }
python -c "from cupy.cuda import nccl; nccl.get_version()" 2>/dev/null \
    || { echo "gpu_check: CuPy loads no NCCL library: see CuPy's installation guide, Additional CUDA Libraries" >&2; exit 1; }
python -m pytest -q -p no:cacheprovider tests/test_distributed.py -k nccl
CUPY_TF32=1 python -m minillm.bench.device --device cuda --configs gpt2 --new-tokens 0 --write
python -m minillm.bench.device --device cuda --write
