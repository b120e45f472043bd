#!/usr/bin/env bash
# Set up the test environment and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --dev
# The browser tests (Label Studio's labeling page, the rating page of evaluate.py --serve) drive Debian's chromium
# through Playwright (whose own browser download needs the internet). Installed once.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  echo "test: installing Debian's chromium for the browser tests"
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
