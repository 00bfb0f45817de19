#!/usr/bin/env bash
# The suite against another ComfyUI release, from an unmodified snapshot kept beside the repository for tests:
#   bash scripts/test_snapshot.sh VERSION [pytest arguments]
# takes ../shared/thirdparty/ComfyUI-VERSION.tar.gz (or $COMFYUI_SNAPSHOT_TARBALL) and gives it its own harness
# folder and venv, so each release is tested with its own pins and its own pinned frontend:
#   .harness/ComfyUI-VERSION   the snapshot, unpacked once, with this pack linked into custom_nodes/
#   .harness/venv-VERSION      torch 2.14.1 + that ComfyUI's requirements.txt (scripts/setup.sh)
# Without the tarball (a user's fresh clone) it prints why and exits 0. scripts/test_comfyui_080.sh and
# scripts/test_comfyui_029.sh are this script for one version each.
set -euo pipefail
version="${1:?usage: test_snapshot.sh VERSION [pytest arguments]}"
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball="${COMFYUI_SNAPSHOT_TARBALL:-$here/../shared/thirdparty/ComfyUI-$version.tar.gz}"
if [ ! -f "$tarball" ]; then
  echo "[test-$version] skipped: no ComfyUI $version snapshot at $tarball (only CI and developers have it)"
  exit 0
fi
comfy="$here/.harness/ComfyUI-$version"
if [ ! -f "$comfy/main.py" ]; then
  echo "[test-$version] unpacking $(basename "$tarball")"
  rm -rf "$comfy.partial"
  mkdir -p "$comfy.partial"
  tar xzf "$tarball" -C "$comfy.partial" --strip-components=1
  mv "$comfy.partial" "$comfy"
fi
export COMFYUI_PATH="$comfy"
export STORYDIFFUSION_VENV="$here/.harness/venv-$version"
exec bash "$here/scripts/test.sh" "$@"
