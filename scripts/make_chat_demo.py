"""Writes the post-training demo data (no downloads): chats about Python standard-library
functions, answered with the first line of the function's docstring.

  python scripts/make_chat_demo.py OUT_DIR [--seed 0]

OUT_DIR/sft.jsonl: {"messages": [...]} conversations (a third of them two questions long).
OUT_DIR/dpo.jsonl: {"prompt", "chosen", "rejected"}: the chosen answer is the function's own
docstring line, the rejected one another function's.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random

MODULES = ("json", "os.path", "string", "textwrap", "shutil", "random", "statistics", "functools",
           "re", "glob", "fnmatch", "heapq", "bisect", "base64", "copy", "difflib", "html",
           "calendar", "colorsys", "csv", "tempfile", "pathlib", "inspect", "argparse", "gzip")


def summaries() -> list[tuple[str, str]]:
  """(module.function, first docstring line) for public functions with a short docstring."""
  out = []
  for name in MODULES:
    module = importlib.import_module(name)
    for attr, value in sorted(vars(module).items()):
      if attr.startswith("_") or not inspect.isfunction(value):
        continue
      doc = (inspect.getdoc(value) or "").strip().splitlines()
      if doc and 20 <= len(doc[0]) <= 100:
        out.append((f"{name}.{attr}", doc[0]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  items = summaries()
  rng = random.Random(args.seed)
  os.makedirs(args.out_dir, exist_ok=True)
  ask = lambda name: f"What does `{name}` do?"
  with open(os.path.join(args.out_dir, "sft.jsonl"), "w") as f:
    for i, (name, line) in enumerate(items):
      messages = [{"role": "user", "content": ask(name)}, {"role": "assistant", "content": line}]
      if i % 3 == 0:
        other, other_line = rng.choice(items)
        messages += [{"role": "user", "content": ask(other)},
                     {"role": "assistant", "content": other_line}]
      f.write(json.dumps({"messages": messages}) + "\n")
  with open(os.path.join(args.out_dir, "dpo.jsonl"), "w") as f:
    for name, line in items:
      wrong = rng.choice([l for _, l in items if l != line])
      f.write(json.dumps({"prompt": ask(name), "chosen": line, "rejected": wrong}) + "\n")
  print(f"{len(items)} functions -> {args.out_dir}/sft.jsonl, {args.out_dir}/dpo.jsonl")


if __name__ == "__main__":
  main()
