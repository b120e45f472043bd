#!/usr/bin/env bash
# Set up the test environment and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --dev
# The browser tests drive Debian's chromium through Playwright (whose own browser download needs the internet).
if [ ! -x /usr/bin/chromium ]; then
  $([ "$(id -u)" -eq 0 ] || echo sudo) apt-get update -qq
  $([ "$(id -u)" -eq 0 ] || echo sudo) apt-get install -y -qq chromium
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
