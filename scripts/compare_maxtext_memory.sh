#!/usr/bin/env bash
# Training-memory comparison with MaxText under the same TPU compiler (libtpu, ahead of time).
#
# Makes MaxText's own virtualenv on first use (git-ignored .venv-maxtext/, or $MAXTEXT_VENV),
# then runs scripts/compare_maxtext_memory.py with the project's .venv (which needs jax[tpu]).
# MaxText is a peer, never a dependency: nothing of it is imported by the package or the tests.
#   scripts/compare_maxtext_memory.sh --model qwen2-7b --topology v5p-8 --batch 44 \
#       --stack qwen2-jax --stack maxtext --attention kernel --attention xla
set -euo pipefail
cd "$(dirname "$0")/.."

MAXTEXT_VENV="${MAXTEXT_VENV:-$PWD/.venv-maxtext}"
MAXTEXT_VERSION="${MAXTEXT_VERSION:-0.2.5}"
# MaxText 0.2.5 wants Python 3.12.
. scripts/find_python.sh
PYTHON312="${PYTHON312:-}"
if [[ -z "$PYTHON312" ]]; then
  PYTHON312=$(first_python "sys.version_info[:2] == (3, 12)" python3.12 "3.12*") || true
fi

if [[ ! -x "$MAXTEXT_VENV/bin/python" ]] \
    || ! "$MAXTEXT_VENV/bin/python" -c "import maxtext, libtpu" 2>/dev/null; then
  if [[ -z "$PYTHON312" ]]; then
    echo "error: MaxText $MAXTEXT_VERSION needs Python 3.12 (set PYTHON312=...)" >&2; exit 2
  fi
  echo "making MaxText's virtualenv in $MAXTEXT_VENV (maxtext==$MAXTEXT_VERSION)" >&2
  "$PYTHON312" -m venv "$MAXTEXT_VENV"
  # jax[tpu] brings libtpu, the TPU compiler; pip resolves both to MaxText's pinned jax.
  "$MAXTEXT_VENV/bin/pip" install -q "maxtext[tpu]==$MAXTEXT_VERSION" "jax[tpu]"
fi

exec env MAXTEXT_PYTHON="$MAXTEXT_VENV/bin/python" JAX_PLATFORMS=cpu \
  .venv/bin/python scripts/compare_maxtext_memory.py "$@"
