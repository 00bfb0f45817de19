#!/usr/bin/env bash
# Lint the repository with ruff, pinned: the rules are in pyproject.toml ([tool.ruff]): ruff's default rules plus
# the Comfy registry's security selection S102,S307,E702 (what `comfy node validate` runs before a publish).
#   bash scripts/lint.sh                 # ruff check .
#   bash scripts/lint.sh --fix           # extra arguments go to `ruff check` (a path, --fix, --statistics, ...)
# ruff is installed into the harness venv (.harness/venv, or $STORYDIFFUSION_VENV); when there is no venv yet
# it is created the way scripts/setup.sh creates it (setup.sh installs the rest into it later).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUFF_VERSION=0.17.6  # a new ruff may bring new default rules: bump it on purpose, with the fixes it asks for
venv="${STORYDIFFUSION_VENV:-$here/.harness/venv}"

if [ ! -x "$venv/bin/python" ]; then
  py="${PYTHON:-python3.11}"
  command -v "$py" >/dev/null 2>&1 || py=python3
  echo "[lint] creating venv $venv with $py"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
if [ "$("$venv/bin/ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]; then
  echo "[lint] installing ruff $RUFF_VERSION into $venv"
  "$venv/bin/python" -m pip install --quiet "ruff==$RUFF_VERSION"
fi

cd "$here"
[ $# -gt 0 ] || set -- .
echo "[lint] ruff $RUFF_VERSION: ruff check $*"
exec "$venv/bin/ruff" check "$@"
