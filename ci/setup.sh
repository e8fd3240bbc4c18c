#!/usr/bin/env bash
# Creates (or completes) the virtualenv that `make run`, `make test` and CI use.
# Usage: ci/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch==2.13.0 is the CPU build on our CPU machines; a GPU machine keeps the torch it has.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" "tilelang==0.1.15" pytest pytest-xdist hatchling
for package in packages/*/; do
  "${PIP[@]}" --no-build-isolation --no-deps -e "$package"
done
# Dependencies the packages declare (torch and tilelang are already there).
"${PIP[@]}" numpy filelock tqdm
touch "$VENV/.installed"
