#!/usr/bin/env bash
# Provision the browser tests (idempotent; a second run takes a second):
#   /usr/bin/chromium          Debian's chromium package (apt); Playwright never downloads a browser
#   .harness/node/node_modules playwright-core, the Node driver tests/browser/*.mjs use
# Exits non-zero with a message saying what is missing; tests/test_workflows.py then skips with it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
node_dir="$here/.harness/node"
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
playwright_version="1.65.1"

fail() { echo "[setup_browser] $*" >&2; exit 1; }

if [ ! -x "$chromium" ]; then
  command -v apt-get >/dev/null 2>&1 || fail "no $chromium and no apt-get: install Chromium yourself and set CHROMIUM_PATH"
  sudo=""
  if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || fail "no $chromium and not root: run 'apt-get install -y chromium' as root"
    sudo="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # refresh the package lists only when apt does not know the package yet
  if ! apt-cache show chromium >/dev/null 2>&1; then
    echo "[setup_browser] apt-get update"
    $sudo apt-get update -qq || fail "apt-get update failed (offline?)"
  fi
  echo "[setup_browser] apt-get install -y chromium"
  $sudo apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null \
    || fail "apt-get install chromium failed"
  [ -x "$chromium" ] || fail "apt installed chromium but $chromium is missing"
fi

command -v node >/dev/null 2>&1 || fail "Node.js is missing: install it (apt-get install -y nodejs npm)"
command -v npm >/dev/null 2>&1 || fail "npm is missing: install it (apt-get install -y npm)"
if [ ! -f "$node_dir/node_modules/playwright-core/package.json" ] \
   || ! grep -q "\"version\": \"$playwright_version\"" "$node_dir/node_modules/playwright-core/package.json"; then
  mkdir -p "$node_dir"
  [ -f "$node_dir/package.json" ] || echo '{"name": "storydiffusion-browser-tests", "private": true}' > "$node_dir/package.json"
  echo "[setup_browser] npm install playwright-core@$playwright_version"
  # playwright-core has no install script and never fetches a browser; we point it at $chromium
  (cd "$node_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund \
     "playwright-core@$playwright_version") || fail "npm install playwright-core failed (offline?)"
fi
echo "[setup_browser] ready: $("$chromium" --version 2>/dev/null | head -1), playwright-core $playwright_version"
