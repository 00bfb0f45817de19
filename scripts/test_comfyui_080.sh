#!/usr/bin/env bash
# The suite against a second ComfyUI: 0.8.0 from ../shared/thirdparty/ComfyUI-0.8.0.tar.gz (an
# unmodified snapshot kept beside the repository for tests), in its own harness folder and venv:
#   .harness/ComfyUI-0.8.0   the snapshot, unpacked once, with this pack linked into custom_nodes/
#   .harness/venv-0.8.0      torch 2.14.1 + ComfyUI 0.8.0's own pins (its frontend is 1.35.9)
# Without the tarball (a user's fresh clone) it prints why and exits 0. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball="${COMFYUI_080_TARBALL:-$here/../shared/thirdparty/ComfyUI-0.8.0.tar.gz}"
if [ ! -f "$tarball" ]; then
  echo "[test-0.8.0] skipped: no ComfyUI 0.8.0 snapshot at $tarball (only CI and developers have it)"
  exit 0
fi
comfy="$here/.harness/ComfyUI-0.8.0"
if [ ! -f "$comfy/main.py" ]; then
  echo "[test-0.8.0] unpacking $(basename "$tarball")"
  rm -rf "$comfy.partial"
  mkdir -p "$comfy.partial"
  tar xzf "$tarball" -C "$comfy.partial" --strip-components=1
  mv "$comfy.partial" "$comfy"
fi
export COMFYUI_PATH="$comfy"
export STORYDIFFUSION_VENV="$here/.harness/venv-0.8.0"
exec bash "$here/scripts/test.sh" "$@"
