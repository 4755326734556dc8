"""The `qwen2-jax` command line: one console script, one module per subcommand.

Each subcommand module in this package exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning an exit code. Modules import
jax and friends inside their handlers, so `qwen2-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("convert", "tokenizer", "data", "pretrain", "sft", "dpo", "compile", "generate",
               "bench", "upcycle", "eval")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="qwen2-jax",
      description="Qwen2 / Qwen2.5 / Qwen2-MoE in JAX: conversion, training, generation.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in SUBCOMMANDS:
    importlib.import_module(f"qwen2_jax.cli.{name}_cmd").register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
