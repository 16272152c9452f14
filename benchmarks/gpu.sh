#!/usr/bin/env bash
# The GPU measurements in one run, for a machine whose Python already has JAX (with CUDA),
# Flax, optax, rich and PyTorch (with CUDA): jbn is used from this checkout, uninstalled.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Writes to OUT_DIR: RESULTS.md (bench.py's tables, then resnet_step.py's, eager.py's and
# kernels.py's), one log per step, and hlo.tar.gz (the compiled programs that kernels.py
# counted). Each step has a time limit, so that a slow one leaves the others their time.
set -uo pipefail
out=${1:?usage: gpu.sh OUT_DIR}
# Absolute, as the script moves to the repository's root.
out=$(mkdir -p "$out" && cd "$out" && pwd) || exit 1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# JAX and torch share the GPU: JAX takes half of its memory up front, torch allocates as needed.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
# Programs compiled once are reused from this cache by the later steps (kernels.py
# compiles bench.py's programs again, resnet_step.py its step twice).
export JAX_COMPILATION_CACHE_DIR=/tmp/jbn-jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
python3 -c "import jax, sys; jax.devices()[0].platform == 'gpu' or sys.exit(
    f'gpu.sh needs a GPU that JAX sees (a jax with CUDA); it sees {jax.devices()}')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
    > "$out/nvidia-smi.txt"

timeout 330 python3 benchmarks/bench.py --out "$out/RESULTS.md" 2>&1 | tee "$out/bench.log"
timeout 180 python3 benchmarks/resnet_step.py --out "$out/RESULTS.md" 2>&1 | tee "$out/resnet.log"
timeout 40 python3 benchmarks/eager.py --out "$out/RESULTS.md" 2>&1 | tee "$out/eager.log"
rm -rf /tmp/jbn-hlo  # this run's programs only
timeout 45 python3 benchmarks/kernels.py --out "$out/RESULTS.md" --hlo-dir /tmp/jbn-hlo \
    2>&1 | tee "$out/kernels.log"
tar czf "$out/hlo.tar.gz" -C /tmp jbn-hlo 2>/dev/null
