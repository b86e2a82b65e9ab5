#!/usr/bin/env bash
# One prepared check of the project on one GPU (at most 9 3/4 minutes on an H100/H200): `dama selftest`, the CUDA tests of
# packed attention, the loss head at H 4096 (flat and peaked softmax), the filtered backward's kept-tile products
# against cuBLAS, and the end-to-end step at LLaVA-1.5-7B's width with 8 layers, TRL beside.
# `bash bench/gpu_check.sh --help` says more; `--dry-run` checks the script on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_check "$@"
