#!/usr/bin/env bash
# One short run that proves the GPU paths on a GPU machine without a package registry: installs the
# project and the wheels brought along, runs the GPU tests, the training-step benchmark, a killed and
# resumed DINO training with k-NN and CLIP steps with zero-shot, each time-boxed, and writes the figures
# into one folder (see BENCHMARKS.md). Everything is in dino_sparo/gpu_check.py (options: cli/gpu_check.py, --help).
#   tools/gpu_check.sh --fetch-wheels     # beforehand, where the package index is reachable
#   tools/gpu_check.sh --dry-run          # what would run, on any machine
#   tools/gpu_check.sh --output DIR       # on the GPU machine (wheels from .gpu_wheels)
# PYTHON names the interpreter, one that holds torch (default: the repository's .venv where there is
# one, as `make install` makes it, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m dino_sparo.cli.gpu_check "$@"
