"""Writes the GRPO demo's data (no downloads): sums of two numbers, a verifiable task.

  python scripts/make_math_demo.py OUT_DIR [--seed 0] [--max 9] [--grpo-max 5]

The pairs (a, b) with 0 <= a, b <= max, in a seeded order:
OUT_DIR/math_sft.jsonl: {"messages": [user "What is a + b?", assistant "a + b = c"]} for the
first third of them: an SFT on these teaches the answer's form (and these sums).
OUT_DIR/math_grpo.jsonl: {"prompt": "What is a + b?", "answer": c} for the pairs with a, b <=
grpo_max, in the same order; GRPO's math reward checks the last number of the response against
"answer".
"""

from __future__ import annotations

import argparse
import json
import os
import random


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max", type=int, default=9, help="largest addend (default 9)")
  parser.add_argument("--grpo-max", type=int, default=5,
                      help="largest addend of the GRPO prompts (default 5)")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  pairs = [(a, b) for a in range(args.max + 1) for b in range(args.max + 1)]
  rng.shuffle(pairs)
  os.makedirs(args.out_dir, exist_ok=True)
  sft = pairs[:len(pairs) // 3]
  with open(os.path.join(args.out_dir, "math_sft.jsonl"), "w", encoding="utf-8") as f:
    for a, b in sft:
      f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                       {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
              + "\n")
  with open(os.path.join(args.out_dir, "math_grpo.jsonl"), "w", encoding="utf-8") as f:
    grpo = [(a, b) for a, b in pairs if max(a, b) <= args.grpo_max]
    for a, b in grpo:
      f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": a + b}) + "\n")
  print(f"{len(sft)} SFT conversations, {len(grpo)} GRPO prompts in {args.out_dir}")


if __name__ == "__main__":
  main()
