#!/usr/bin/env bash
# The whole test suite: provisions the harness if needed (scripts/setup.sh), then runs pytest in it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_attention_core.py -k window`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
if [ "${STORYDIFFUSION_SKIP_BROWSER_SETUP:-0}" != "1" ] && [ -f "$here/scripts/setup_browser.sh" ]; then
  bash "$here/scripts/setup_browser.sh" || echo "[test] browser set-up failed: the browser tests will say why they skip"
fi
cd "$here"
exec "${STORYDIFFUSION_VENV:-$here/.harness/venv}/bin/python" -m pytest "$@"
