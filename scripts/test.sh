#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup_env.sh) and runs the whole suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k checkpoint` or `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export JAX_PLATFORMS=cpu
exec python -m pytest -q "$@"   # testpaths in pytest.ini: tests/
