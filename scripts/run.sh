#!/usr/bin/env bash
# Start ComfyUI with this pack at http://127.0.0.1:8188 (CPU when there is no GPU). Provisions the
# harness first if needed. Extra arguments go to ComfyUI's main.py (e.g. --port 8189).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
comfy="${COMFYUI_PATH:-$here/.harness/ComfyUI}"
py="${STORYDIFFUSION_VENV:-$here/.harness/venv}/bin/python"
extra=()
if ! "$py" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  extra+=(--cpu)
fi
cd "$comfy"
exec "$py" main.py --listen 127.0.0.1 --port 8188 "${extra[@]}" "$@"
