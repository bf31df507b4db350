#!/usr/bin/env bash
# The GPU check (docs/gpu.md): pulse-edge's GPU tests and GPU benchmarks in one run of under ~8 minutes, from a
# bare source tree, with the Python packages already on the machine (nothing is installed or fetched).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget-s S] [--steps LIST] [--layers N] [--work DIR]
#
# It runs `pulse-edge bench gpu` (options: `bash benchmarks/gpu_check.sh --help`). The report (gpu-check.md,
# gpu-check.json, gpu-check.log) goes to --out: by default $OUT where that is set (the folder a lent machine
# sends back), else ./gpu-check-out. Exit code 0: every step and GPU test passed; 1: one failed or timed out;
# 2: no CUDA GPU, or a bad option. PYTHON picks the interpreter (default python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

# Wheels carried beside the tree in .whl/ (docs/gpu.md) for a package the machine lacks: installed into a private
# folder, not into the machine's environment. None is needed on the lent H100/H200 image.
if compgen -G "$root/.whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pulse-edge-site "$root"/.whl/*.whl
    export PYTHONPATH="/tmp/pulse-edge-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The bare tree is importable from its root: pulse_edge/__init__.py maps pulse_edge.kernels, .runtime, ... to the
# folders beside it. The steps inherit this.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# A later --out on the command line wins over this default (click keeps the last value).
exec "$python" -m pulse_edge.cli.main bench gpu --out "${OUT:-gpu-check-out}" "$@"
