#!/usr/bin/env bash
# Build .gpu/bundle.tar.xz: what the GPU machine's image lacks for spin-pipeline (Ray, smplx,
# roma, MLflow's client and their dependencies), pinned in bench/gpu_bundle.lock.
#
#   bench/gpu_bundle.sh            # here, in the repo root, with the project's venv active
#   bench/gpu_bundle.sh --relock   # resolve the lock again first (see bench/gpu_bundle.py)
#
# Then carry .gpu to the device and run the steps there (bench/gpu_run.sh):
#   run(carry=[".gpu"], timeout_s=600, command="bash bench/gpu_run.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_bundle.py "$@"
