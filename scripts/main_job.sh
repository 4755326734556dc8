#!/usr/bin/env bash
# The main job: on a fresh machine, with no downloads beyond the package installs, train a
# SentencePiece tokenizer and a small Qwen2 from scratch on the Python standard library's own
# source files, for a few minutes on the CPU; checkpoint, export HF safetensors, and print
# greedy and sampled continuations of a few prompts side by side. Extra arguments are config
# overrides, e.g. `steps=50`; MAIN_JOB_OUT sets the output folder (default out/main_job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
OUT=${MAIN_JOB_OUT:-out/main_job}
mkdir -p "$OUT"
# Text found on this machine: the standard library of the Python running the job.
export QWEN2_JAX_CORPUS=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
echo "[main] corpus: $QWEN2_JAX_CORPUS/*.py ($(ls "$QWEN2_JAX_CORPUS"/*.py | wc -l) files)"
if [ ! -f "$OUT/tokenizer/sp.model" ]; then
  qwen2-jax tokenizer train --input "$QWEN2_JAX_CORPUS/*.py" --output-prefix "$OUT/tokenizer/sp" \
    --vocab-size 4096 --quiet
fi
overrides=(--set "output_dir=$OUT/run" --set "tokenizer=$OUT/tokenizer/sp.model")
for kv in "$@"; do overrides+=(--set "$kv"); done
qwen2-jax pretrain --config configs/cpu_demo.yaml "${overrides[@]}"
echo "[main] samples from the exported HF checkpoint $OUT/run/hf (with its tokenizer):"
python - "$OUT/run/hf" <<'PY'
import itertools, sys
from qwen2_jax.infer import Generator, SamplingParams

PROMPTS = ["def main(", "class Stack:\n    def push(self, item):\n", "import os\n\n\ndef "]
NEW_TOKENS, W, MAX_LINES = 64, 46, 14  # two 46-character columns fit a 96-character terminal
LABELS = ("greedy", "sampled: temperature 0.8, top-p 0.95")

def lines(text):
  """`text` as at most MAX_LINES lines of at most W characters (long lines wrapped)."""
  out = []
  for line in text.rstrip().expandtabs(4).split("\n"):
    out += [line[i:i + W] for i in range(0, max(len(line), 1), W)]
  return out[:MAX_LINES - 1] + ["..."] if len(out) > MAX_LINES else out

# Each prompt twice in one batch: greedy, and sampled with the prompt's number as its seed.
sampling = [p for i in range(len(PROMPTS)) for p in (
    SamplingParams(max_new_tokens=NEW_TOKENS),
    SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.95, seed=i))]
gen = Generator.from_pretrained(sys.argv[1])
done = gen.complete([p for p in PROMPTS for _ in LABELS], sampling)
for i, prompt in enumerate(PROMPTS):
  columns = [lines(prompt + c.text) for c in done[2 * i:2 * i + 2]]
  print(f"\nprompt {i + 1} of {len(PROMPTS)}: {prompt!r} (+ {NEW_TOKENS} tokens at most; seed {i})")
  print(" | ".join(f"{label:<{W}}" for label in LABELS).rstrip())
  print("-+-".join("-" * W for _ in LABELS))
  for row in itertools.zip_longest(*columns, fillvalue=""):
    print(" | ".join(f"{cell:<{W}}" for cell in row).rstrip())
PY
