#!/usr/bin/env bash
# The main job: on a fresh machine, with no downloads beyond the package installs, train a
# SentencePiece tokenizer and a small Qwen2 from scratch on the Python standard library's own
# source files, for a few minutes on the CPU; checkpoint, export HF safetensors, and print a
# sample continuation. Extra arguments are config overrides, e.g. `steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
OUT=out/main_job
mkdir -p "$OUT"
# Text found on this machine: the standard library of the Python running the job.
export QWEN2_JAX_CORPUS=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
echo "[main] corpus: $QWEN2_JAX_CORPUS/*.py ($(ls "$QWEN2_JAX_CORPUS"/*.py | wc -l) files)"
if [ ! -f "$OUT/tokenizer/sp.model" ]; then
  qwen2-jax tokenizer train --input "$QWEN2_JAX_CORPUS/*.py" --output-prefix "$OUT/tokenizer/sp" \
    --vocab-size 4096 --quiet
fi
overrides=()
for kv in "$@"; do overrides+=(--set "$kv"); done
qwen2-jax pretrain --config configs/cpu_demo.yaml "${overrides[@]}"
echo "[main] sample continuation (greedy) from the exported HF checkpoint $OUT/run/hf (with its tokenizer):"
qwen2-jax generate "$OUT/run/hf" \
  --prompt "def main(" --max-new-tokens 48 --temperature 0 --no-progress
