"""The `qwen2-jax` command line: one console script, one module per subcommand.

Each subcommand module in this package exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning an exit code. Modules import
jax and friends inside their handlers, so `qwen2-jax --help` stays fast.

Errors: a `qwen2_jax.errors.UserError` (a bad setting, file or request) or an OS error on a path
the user named is printed as one line, `qwen2-jax <command>: error: <message>`, with exit status 2,
like argparse's own usage errors; any other exception is an internal error and keeps its
traceback. `--debug` (anywhere on the command line) or `QWEN2_JAX_DEBUG=1` shows the traceback
of user errors too. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qwen2_jax.errors import UserError

# OS errors on a path the user named: reported like user errors, in one line.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError)

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("convert", "tokenizer", "data", "pretrain", "sft", "dpo", "rm", "grpo", "compile",
               "generate", "bench", "upcycle", "eval")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="qwen2-jax",
      description="Qwen2 / Qwen2.5 / Qwen2-MoE in JAX: conversion, training, generation.")
  parser.add_argument("--debug", action="store_true",
                      help="print the full traceback of every error, user errors included")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in SUBCOMMANDS:
    importlib.import_module(f"qwen2_jax.cli.{name}_cmd").register(sub)
  _add_debug_flag(sub)
  return parser


def _add_debug_flag(subparsers) -> None:
  """`--debug` after a (sub)command name works too."""
  for command_parser in subparsers.choices.values():
    command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    for action in command_parser._actions:  # pylint: disable=protected-access
      if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
        _add_debug_flag(action)


def _one_line(error: BaseException) -> str:
  if isinstance(error, OSError) and error.filename is not None:
    return f"{error.strerror or error}: {error.filename}"
  text = str(error).strip() or type(error).__name__
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  # A command that parses its own options (`bench NAME`) sets `passes_extra_args`; for any other,
  # an unknown argument is an error, as with `parse_args`.
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "passes_extra_args", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.extra_args = extra
  debug = args.debug or os.environ.get("QWEN2_JAX_DEBUG", "") not in ("", "0")
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print(f"qwen2-jax {args.command}: interrupted", file=sys.stderr)
    return 130
  except (UserError, *_PATH_ERRORS) as e:
    if debug:
      raise
    print(f"qwen2-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
