#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv at .venv and installs qwen2-jax with its test extras.
# Idempotent: a second run only checks. Needs Python 3.12 or newer and the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/find_python.sh
PY=${PYTHON:-}
ok_python() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1; }
if [ -z "$PY" ]; then
  PY=$(first_python "sys.version_info[:2] >= (3, 12)" "python3.12 python3.13 python3" \
       "3.1[23]*") || true
fi
if [ -z "$PY" ]; then echo "[setup] error: needs Python 3.12 or newer (set PYTHON=...)" >&2; exit 2; fi
if [ -x .venv/bin/python ] && ! ok_python .venv/bin/python; then
  echo "[setup] .venv has $(.venv/bin/python --version 2>&1); moving it to .venv-old and starting again"
  rm -rf .venv-old && mv .venv .venv-old
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY ($("$PY" --version))"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# The stamp holds the hash of the build files last installed (setup.py, pyproject.toml, the C++
# extension's sources): a change to any (an edit, a pull, a checkout of another commit, whatever
# its mtime) reinstalls, which also rebuilds the extension in place; a fresh clone has no stamp.
stamp=.venv/.qwen2_jax_installed
want=$(python -c 'import glob, hashlib; h = hashlib.sha256()
for f in ["setup.py", "pyproject.toml", *sorted(glob.glob("qwen2_jax/kernels/*.[ch]*"))]:
    h.update(open(f, "rb").read())
print(h.hexdigest())')
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # One installer at a time when several jobs start together (flock: Linux; optional).
  if command -v flock >/dev/null 2>&1; then exec 9>.venv/.install.lock; flock 9; fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing qwen2-jax[test] into .venv (build files changed or first run)"
    python -m pip install -q --upgrade pip
    # torch 2.13.0 first (the test oracle), pinned so that no newer release is pulled in; on
    # Python 3.12 it is PyPI's CUDA build, which runs on the CPU.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
fi
echo "[setup] $(python -c 'import jax, flax, transformers; print(f"jax {jax.__version__}, flax {flax.__version__}, transformers {transformers.__version__}")')"
